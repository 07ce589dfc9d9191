"""The README against the code: every command it shows for the scripts (and the tools) parses with their current flags,
every relative link points to a file (and heading) of this repository, the copy recipe names existing files, and the
README stays within its size. Parsing only (tyro on the flags), so the whole file takes seconds."""

import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest
import tyro

from tests.conftest import ROOT

README = ROOT / "README.md"
MAX_BYTES = 15_000
SEPARATORS = {"&&", "||", ";", "|", "&"}


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def shell_commands(block: str) -> list[list[str]]:
    """The simple commands of a bash block: continuation lines joined, comments dropped, split at && ; | etc."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        command = []
        for token in list(lexer) + [";"]:
            if token in SEPARATORS:
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(token)
    return commands


def python_invocation(command: list[str]):
    """(module name, its arguments) for `[VAR=value ...] python deflow_*.py ...` or `python -m tools.<name> ...`."""
    while command and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]):
        command = command[1:]
    if len(command) < 2 or not re.fullmatch(r"(.*/)?python3?", command[0]):
        return None
    if re.fullmatch(r"deflow_[a-z0-9]+\.py", command[1]):
        return command[1][: -len(".py")], command[2:]
    if command[1] == "-m" and len(command) > 2 and command[2].startswith("tools."):
        return command[2], command[3:]
    return None


def readme_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for block in fenced_blocks(README.read_text(), "bash"):
        for command in shell_commands(block):
            if (invocation := python_invocation(command)) is not None:
                found.append(invocation)
    return found


def args_class(module):
    """The dataclass a module hands to tyro: `Args` if it has one, else the one its source passes to tyro.cli."""
    if dataclasses.is_dataclass(getattr(module, "Args", None)):
        return module.Args
    source = Path(module.__file__).read_text()
    for name in re.findall(r"tyro\.cli\(\s*([A-Za-z_][A-Za-z0-9_]*)", source):
        if dataclasses.is_dataclass(getattr(module, name, None)):
            return getattr(module, name)
    candidates = [v for k, v in vars(module).items() if k.endswith("Args") and dataclasses.is_dataclass(v)
                  and getattr(v, "__module__", None) == module.__name__]
    assert len(candidates) == 1, f"cannot tell which dataclass of {module.__name__} holds its flags: {candidates}"
    return candidates[0]


def parse(module_name: str, flags: list[str]):
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # a tool whose extra requirements (requirements-extra.txt) are not installed
        if module_name.startswith("tools."):
            pytest.skip(f"{module_name} needs {e.name}")
        raise
    try:
        return tyro.cli(args_class(module), args=flags)
    except SystemExit as e:
        pytest.fail(f"the README's `{module_name} {shlex.join(flags)}` does not parse (exit {e.code}): "
                    "a flag was renamed or removed; update the README")


INVOCATIONS = readme_invocations()


def test_the_readme_shows_commands_of_every_script():
    shown = {name for name, _ in INVOCATIONS}
    assert {"deflow_offline"} <= shown, f"no training command found in README.md's bash blocks (found {shown})"


@pytest.mark.parametrize("module_name, flags", INVOCATIONS, ids=[f"{n} {' '.join(f)}"[:80] for n, f in INVOCATIONS])
def test_readme_command_parses(module_name, flags):
    if module_name == "tools.sweep" and "--" in flags:  # flags after -- go to every job's script unchanged
        split = flags.index("--")
        sweep_args = parse(module_name, flags[:split])
        parse(Path(sweep_args.script).stem, flags[split + 1:])
    else:
        parse(module_name, flags)


def test_the_readme_is_at_most_15000_bytes():
    size = len(README.read_bytes())
    assert size <= MAX_BYTES, f"README.md is {size} bytes, over {MAX_BYTES}: move detail to docs/"


def github_anchors(markdown: str) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    anchors, seen = set(), {}
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def relative_links(markdown: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    links = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link)]  # http:, https:, mailto:


def test_readme_links_point_to_files_of_this_repository():
    links = relative_links(README.read_text())
    assert links, "no relative links found: the link pattern no longer matches the README"
    for link in links:
        path, _, anchor = link.partition("#")
        target = (README.parent / path).resolve() if path else README
        assert target.is_relative_to(ROOT), f"README links outside the repository: {link}"
        assert target.exists(), f"README links to a missing file: {link}"
        if anchor and target.suffix == ".md":
            assert anchor in github_anchors(target.read_text()), f"README links to a missing heading: {link}"


def test_the_copy_recipe_names_existing_files():
    section = README.read_text().split("## Using a script in your own project", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`((?:common|tools)/[\w/]+\.py|deflow_\w+\.py|requirements[\w-]*\.txt)`", section))
    assert {"common/__init__.py", "common/datasets.py", "deflow_offline.py", "requirements.txt"} <= named, named
    for name in sorted(named):
        assert (ROOT / name).exists(), f"the README's copy recipe names {name}, which does not exist"


SCRIPTS = ("deflow_offline", "deflow_o2o", "deflow_pixels")


def accepts(script: str, flags: list[str]) -> bool:
    try:
        tyro.cli(args_class(importlib.import_module(script)), args=flags)
        return True
    except SystemExit:
        return False


def test_the_flags_only_some_scripts_have_are_where_the_readme_says():
    """Each line of the Flags section, `X only: ...` or `not in X: ...`: every flag (or `--flag value`) listed is
    accepted by the scripts it names and refused by the others."""
    section = README.read_text().split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    items = re.split(r"\n- ", section.replace("\n  ", " "))[1:]
    assert len(items) >= 3, "the Flags section no longer lists the flags only some scripts have"
    checked = []
    for item in items:
        head, _, listed = item.partition(":")
        (named,) = re.findall(r"`(deflow_\w+)\.py`", head)
        having = {named} if "only" in head else set(SCRIPTS) - {named}
        for flag in re.findall(r"`(--[\w-]+(?: \w+)?)`", listed):
            name, _, value = flag.partition(" ")
            for script in SCRIPTS:
                if value:
                    ok = accepts(script, [name, value])
                else:
                    field = name[2:].replace("-", "_")
                    ok = field in {f.name for f in dataclasses.fields(args_class(importlib.import_module(script)))}
                checked.append(flag)
                assert ok == (script in having), f"README's Flags: {script}.py {'has' if ok else 'lacks'} {flag}"
    assert len(checked) >= 3 * 13, checked

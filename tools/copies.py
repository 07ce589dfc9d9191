"""The parts the three scripts repeat, kept identical (as Hugging Face transformers' `# Copied from`).

    python -m tools.copies          # list every marked copy that differs from its source; exit 1 if any
    python -m tools.copies --fix    # overwrite those copies with deflow_offline.py's text

Each script holds its whole run, so deflow_o2o.py and deflow_pixels.py repeat much of deflow_offline.py. A comment
`# Copied from deflow_offline.py: name, name, ...` (the list may go on over the following comment lines) marks the
top-level functions, classes and constants of that name below it as copies: each must equal the source's, text for
text (decorators and docstrings included). tests/test_copies.py runs the check.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE, COPIES = "deflow_offline.py", ("deflow_o2o.py", "deflow_pixels.py")
MARKER = re.compile(r"# Copied from (\S+\.py): (.*)")
CONTINUATION = re.compile(r"#\s+([A-Za-z_]\w*(, [A-Za-z_]\w*)*,?)\s*$")


def marked_names(lines: list[str]) -> dict[str, str]:
    """{name: source file} of every name listed in a marker."""
    names, source = {}, None
    for line in lines:
        if match := MARKER.match(line):
            source, listed = match.group(1), match.group(2)
        elif source and (match := CONTINUATION.match(line)):
            listed = match.group(1)
        else:
            source = None
            continue
        names.update({name.strip(): source for name in listed.split(",") if name.strip()})
    return names


def definitions(text: str) -> dict[str, tuple[int, int]]:
    """{name: (first line, last line)} (0-based, inclusive; decorators included) of the module's top-level
    functions, classes and single-name assignments."""
    spans, nodes = {}, ast.parse(text).body
    names = [getattr(node, "name", None) for node in nodes]
    if twice := {name for name in names if name and names.count(name) > 1}:
        raise SystemExit(f"error: defined twice at the top level: {', '.join(sorted(twice))}")
    for node in nodes:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            spans[node.name] = (first, node.end_lineno - 1)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            spans[node.targets[0].id] = (first, node.end_lineno - 1)
    return spans


def check(copy: str, fix: bool = False) -> list[str]:
    """The problems of one script's marked copies (fixed in place with fix=True, where a source has the name)."""
    lines = (ROOT / copy).read_text().split("\n")
    spans, problems, replacements, sources = definitions("\n".join(lines)), [], [], {}
    for name, source in marked_names(lines).items():
        if source not in sources:
            text = (ROOT / source).read_text()
            sources[source] = text.split("\n"), definitions(text)
        source_lines, source_spans = sources[source]
        if name not in spans or name not in source_spans:
            problems.append(f"{copy}: '{name}' is marked as copied from {source}, but "
                            f"{'it has' if name in spans else copy + ' has'} no top-level '{name}'")
            continue
        (a, b), (c, d) = spans[name], source_spans[name]
        if lines[a:b + 1] != source_lines[c:d + 1]:
            problems.append(f"{copy}: '{name}' (line {a + 1}) differs from {source}'s (line {c + 1})")
            replacements.append((a, b, source_lines[c:d + 1]))
    if fix and replacements:
        for a, b, new in sorted(replacements, reverse=True):
            lines[a:b + 1] = new
        (ROOT / copy).write_text("\n".join(lines))
    return problems


if __name__ == "__main__":
    problems = [problem for copy in COPIES for problem in check(copy, fix="--fix" in sys.argv)]
    print("\n".join(problems) or "every marked copy equals its source")
    sys.exit(1 if problems and "--fix" not in sys.argv else 0)

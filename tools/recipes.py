"""The paper's per-task settings in one place: the sweep launcher's --recipe paper uses these, and README's recipe
table is checked against them (tests/test_sweep.py). Every other flag keeps the scripts' defaults, which are the
paper's. `python -m tools.recipes` prints the table (README's, in Markdown).

Also the task sets: an OGBench dataset name without a task ('cube-double-play') stands for its 5 tasks, 'D4RL/antmaze'
and 'D4RL/adroit' for their D4RL datasets.
"""

from __future__ import annotations

from common import d4rl

# State-based OGBench (1M updates): per dataset, --discount, --q-agg, --target-divergence.
OGBENCH = {
    "antmaze-large-navigate": (0.99, "min", 0.01),
    "antmaze-giant-navigate": (0.995, "min", 0.01),
    "humanoidmaze-medium-navigate": (0.995, "mean", 0.001),
    "humanoidmaze-large-navigate": (0.995, "mean", 0.001),
    "antsoccer-arena-navigate": (0.995, "mean", 0.01),
    "cube-single-play": (0.99, "mean", 0.001),
    "cube-double-play": (0.99, "mean", 0.001),
    "scene-play": (0.99, "mean", 0.001),
    "puzzle-3x3-play": (0.99, "mean", 0.005),
    "puzzle-4x4-play": (0.99, "mean", 0.005),
}
# Pixels (deflow_pixels.py, 500k updates, task 1 in the paper): --target-divergence.
PIXELS = {"visual-cube-single-play": 0.001, "visual-cube-double-play": 0.001, "visual-scene-play": 0.001,
          "visual-puzzle-3x3-play": 0.0005, "visual-puzzle-4x4-play": 0.0005}
PIXEL_STEPS = D4RL_STEPS = 500_000


def dataset_of(env_name: str) -> str:
    """'cube-double-play-singletask-task2-v0' -> 'cube-double-play'; Minari ids stay as they are."""
    if "/" in env_name:
        return env_name
    return env_name.split("-singletask")[0]


def recipe(env_name: str) -> dict[str, object]:
    """The paper's flags for one task, as {flag name: value}; raises KeyError for a task without a recipe."""
    name = dataset_of(env_name)
    if name in d4rl.TASKS:
        return {"discount": 0.99, **d4rl.TASKS[name], "offline_steps": D4RL_STEPS}
    if name in PIXELS:
        return {"target_divergence": PIXELS[name], "offline_steps": PIXEL_STEPS}
    if name in OGBENCH:
        discount, q_agg, delta = OGBENCH[name]
        return {"discount": discount, "q_agg": q_agg, "target_divergence": delta}
    raise KeyError(f"no paper recipe for {env_name}; the paper's tasks are those of "
                   f"{', '.join([*OGBENCH, *PIXELS])} and the D4RL datasets {', '.join(d4rl.TASKS)}")


def recipe_flags(env_name: str) -> list[str]:
    """recipe() as command-line flags."""
    return [part for key, value in recipe(env_name).items() for part in (f"--{key.replace('_', '-')}", str(value))]


def expand(names: list[str]) -> list[str]:
    """Environment names with the shorthands expanded: an OGBench dataset name ('cube-double-play',
    'visual-scene-play') -> its 5 single tasks; 'D4RL/antmaze', 'D4RL/adroit' or 'D4RL' -> those D4RL datasets."""
    out = []
    for name in names:
        if name in ("D4RL", "D4RL/antmaze", "D4RL/adroit"):
            out += [t for t in d4rl.TASKS if name == "D4RL" or d4rl.is_antmaze(t) == (name == "D4RL/antmaze")]
        elif "/" not in name and "singletask" not in name:
            out += [f"{name}-singletask-task{i}-v0" for i in range(1, 6)]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def markdown_table() -> str:
    """README's recipe table: every task family of the paper with its script (deflow_<script>.py), updates
    (--offline-steps) and flags."""
    rows = ["| tasks | script | updates | --discount | --q-agg | --target-divergence |", "|---|---|---|---|---|---|"]
    for name, (discount, q_agg, delta) in OGBENCH.items():
        rows.append(f"| {name} | offline | 1M | {discount} | {q_agg} | {delta} |")
    for name, delta in PIXELS.items():
        rows.append(f"| {name} (task1) | pixels | {PIXEL_STEPS // 1000}k | 0.99 | mean | {delta} |")
    for group in ("antmaze", "pen", "door", "hammer", "relocate"):
        tasks = [t for t in d4rl.TASKS if t.split("/")[1] == group]
        names = "{" + ", ".join(t.split("/")[2].rsplit("-v", 1)[0] for t in tasks) + "}"
        version = tasks[0].rsplit("-", 1)[1]
        r = recipe(tasks[0])
        rows.append(f"| D4RL/{group}/{names}-{version} | offline | {D4RL_STEPS // 1000}k | {r['discount']} | "
                    f"{r['q_agg']} | {r['target_divergence']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())

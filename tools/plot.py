"""Learning curves and a results table from runs: every run directory below the given folders (the ones that hold
args.json and eval.csv, e.g. a sweep's), grouped by script, environment and every flag that differs between them.
Runs of the official JAX code (a folder with its flags.json and eval.csv, as its main.py writes them under
--save_dir) are read too, as the group "official", so both code bases plot side by side.

    python -m tools.plot sweeps/sweep                  # writes sweeps/sweep/curves.png, results.md, results.csv
    python -m tools.plot runs/ --iqm                    # also the interquartile mean with bootstrap intervals
    python -m tools.plot sweeps/sweep ../official/exp   # this code's runs and the official code's, side by side

The score is evaluation/episode.normalized_return (D4RL) or evaluation/success x 100 (OGBench). Curves: the mean
over seeds with a 95% confidence band (Student t over seeds, cut at the scores' range) and each seed faintly, one
panel per environment (the 5 tasks of an OGBench dataset averaged, as the paper does). Table: the final evaluation
of each run (one that ended before the others, e.g. still running, marked with its update); per task and per
environment the mean +- standard deviation over seeds (an environment's score per seed is the mean over its tasks;
one seed has no spread: n/a) and the seed count; per environment, each pair of groups' difference of means with a
95% Welch interval (scipy.stats.ttest_ind); the online gain (o2o against an offline control from the same
checkpoints) with a 95% paired t interval over seeds. --iqm adds the interquartile mean over all runs of an
environment with a 95% bootstrap interval (Agarwal et al. 2021), computed with scipy.stats (trim_mean, bootstrap).
Written by hand: only the grouping and the averaging.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import tyro

from tools import require
from tools.recipes import dataset_of

IGNORED = {"seed", "run_dir", "resume", "track", "wandb_project_name", "wandb_entity", "save_interval", "device",
           "env_name", "dataset_path", "dataset_dir", "num_workers", "generate_episodes", "eval_workers",
           "capture_video", "video_episodes", "log_interval",
           "save_dir", "restore_path", "restore_epoch", "run_group", "video_frame_skip"}  # change nothing learned


@dataclasses.dataclass
class Args:
    folders: tyro.conf.Positional[tuple[str, ...]]
    """folders to search for run directories (args.json + eval.csv), e.g. a sweep directory"""
    out: str | None = None
    """where curves.png, results.md and results.csv go (default: the first folder)"""
    iqm: bool = False
    """also the interquartile mean over runs with a 95% bootstrap interval"""


@dataclasses.dataclass
class Run:
    args: dict
    steps: np.ndarray
    scores: np.ndarray  # 0-100


def official_args(flags: dict) -> dict:
    """The official code's flags.json (absl flags, the agent's config under "agent") as this code's settings: the
    flags keep their names, which this code shares, and the group is called "official". A flag main.py copies into
    the config after writing flags.json (offline_steps) is stale under "agent": the top-level one wins."""
    top = {k: v for k, v in flags.items() if k != "agent"}
    return {**flags.get("agent", {}), **top, "exp_name": "official"}


def read_eval(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, scores 0-100) of a run directory's eval.csv."""
    with open(path / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    key = "evaluation/episode.normalized_return"
    scores = [float(r[key]) if key in r else 100 * float(r["evaluation/success"]) for r in rows]
    return np.array([int(r["step"]) for r in rows], dtype=int), np.array(scores)


def read_runs(folders) -> list[Run]:
    runs = []
    for folder in folders:
        settings = sorted([*Path(folder).rglob("args.json"), *Path(folder).rglob("flags.json")])
        for args_file in settings:
            path = args_file.parent
            if "abandoned" in path.parts or not (path / "eval.csv").exists():
                continue
            steps, scores = read_eval(path)
            if not len(steps):
                continue
            args = json.loads(args_file.read_text())
            if args_file.name == "flags.json":
                args = official_args(args)
            if (path / "offline_run.json").exists():  # deflow_o2o.py gone online from a deflow_offline.py run:
                source = Path(json.loads((path / "offline_run.json").read_text())["checkpoint"]).parent
                before, before_scores = read_eval(source)  # its curve starts with that run's evaluations
                keep = before < steps[0]
                steps, scores = np.concatenate([before[keep], steps]), np.concatenate([before_scores[keep], scores])
            runs.append(Run(args, steps, scores))
    return runs


def group_label(run: Run, differing: list[str]) -> str:
    flags = " ".join(f"{k}={run.args[k]}" for k in differing)
    return f"{run.args.get('exp_name', '?')}" + (f" [{flags}]" if flags else "")


def groups(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """{(group label, env_name): runs}; the label names the script (exp_name) and each flag that differs among the
    flags every run of that environment has (a flag only one script or code base has does not split groups: exp_name
    tells them apart; nor does a recipe flag that differs only between environments)."""
    out = defaultdict(list)
    for env in {dataset_of(r.args["env_name"]) for r in runs}:
        same_env = [r for r in runs if dataset_of(r.args["env_name"]) == env]
        keys = sorted(set.intersection(*(set(r.args) for r in same_env)) - IGNORED - {"exp_name"})
        differing = [k for k in keys if len({json.dumps(r.args.get(k), sort_keys=True) for r in same_env}) > 1]
        for run in same_env:
            out[(group_label(run, differing), run.args["env_name"])].append(run)
    return dict(out)


def mean_and_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 and the half-width of a 95% Student t interval (0 for one seed)."""
    from scipy import stats

    n = len(values)
    mean = values.mean(axis=0)
    if n < 2:
        return mean, np.zeros_like(mean)
    return mean, stats.t.ppf(0.975, n - 1) * values.std(axis=0, ddof=1) / np.sqrt(n)


def environment_curves(by_group: dict) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{environment: {group label: (steps, per-seed curves averaged over the environment's tasks)}}, on the steps
    every run of the group evaluated."""
    out = defaultdict(dict)
    per_env = defaultdict(list)
    for (label, env_name), runs in by_group.items():
        per_env[(label, dataset_of(env_name))].append(runs)
    for (label, env), task_runs in per_env.items():
        steps = sorted(set.intersection(*[set(r.steps.tolist()) for runs in task_runs for r in runs]))
        seeds = sorted(set.intersection(*[{r.args["seed"] for r in runs} for runs in task_runs]))
        if not steps or not seeds:
            continue
        curves = []
        for seed in seeds:
            per_task = []
            for runs in task_runs:
                run = next(r for r in runs if r.args["seed"] == seed)
                per_task.append([run.scores[list(run.steps).index(s)] for s in steps])
            curves.append(np.mean(per_task, axis=0))
        out[env][label] = (np.array(steps), np.array(curves))
    return dict(out)


def plot_curves(curves: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted(curves)
    columns = min(3, len(envs))
    rows = -(-len(envs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for ax, env in zip(axes.flat, envs):
        for label, (steps, per_seed) in sorted(curves[env].items()):
            mean, band = mean_and_band(per_seed)
            line, = ax.plot(steps, mean, label=f"{label} ({len(per_seed)} seeds)")
            for seed_curve in per_seed:  # each seed, faintly
                ax.plot(steps, seed_curve, color=line.get_color(), alpha=0.3, linewidth=0.8)
            low, high = min(0.0, per_seed.min()), max(100.0, per_seed.max())  # the band, within what scores can be
            ax.fill_between(steps, np.clip(mean - band, low, high), np.clip(mean + band, low, high),
                            color=line.get_color(), alpha=0.2)
        ax.set_title(env)
        ax.set_xlabel("updates")
        ax.set_ylabel("score (success % or normalized return)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(envs):]:
        ax.remove()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def over_seeds(finals: np.ndarray) -> dict:
    """Mean +- standard deviation over seeds (NaN, undefined, for one seed) and the seed count, as the paper reports
    them."""
    std = finals.std(ddof=1) if len(finals) > 1 else float("nan")
    return {"mean": finals.mean(), "std": std, "seeds": len(finals)}


def spread(row: dict) -> str:
    return f"{row['mean']:.1f} +- " + ("n/a" if np.isnan(row["std"]) else f"{row['std']:.1f}")


def differences(curves: dict) -> list[dict]:
    """Per environment and pair of groups: the difference of the mean final scores (first - second) with a 95% Welch
    interval over seeds (unequal variances; NaN where a group has fewer than 2 seeds)."""
    from scipy import stats

    rows = []
    for env, by_label in sorted(curves.items()):
        labels = sorted(by_label)
        for i, first in enumerate(labels):
            for second in labels[i + 1:]:
                a, b = by_label[first][1][:, -1], by_label[second][1][:, -1]
                low = high = float("nan")
                if min(len(a), len(b)) > 1 and max(a.var(), b.var()) > 0:
                    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
                    low, high = float(ci.low), float(ci.high)
                rows.append({"name": env, "first": first, "second": second, "difference": a.mean() - b.mean(),
                             "low": low, "high": high, "seeds": f"{len(a)} / {len(b)}"})
    return rows


def paired_interval(gains: np.ndarray) -> tuple[float, float]:
    """95% Student t interval of the mean of paired differences (NaN for fewer than 2)."""
    from scipy import stats

    if len(gains) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(gains) - 1) * gains.std(ddof=1) / np.sqrt(len(gains))
    return gains.mean() - half, gains.mean() + half


def final_table(by_group: dict, curves: dict, iqm: bool) -> list[dict]:
    """Rows of the results table: one per (group, task) and one per (group, environment)."""
    rows = []
    for (label, env_name), runs in sorted(by_group.items()):
        runs = sorted(runs, key=lambda r: r.args["seed"])
        end = int(max(r.steps[-1] for r in runs))
        rows.append({"group": label, "level": "task", "name": env_name,
                     **over_seeds(np.array([r.scores[-1] for r in runs])), "final_step": end,
                     "every_seed": " / ".join(f"{r.args['seed']}: {r.scores[-1]:.0f}"  # one that ended early says so
                                              + (f" (at {r.steps[-1]})" if r.steps[-1] < end else "") for r in runs)})
    for env, by_label in sorted(curves.items()):
        for label, (steps, per_seed) in sorted(by_label.items()):
            row = {"group": label, "level": "environment", "name": env, **over_seeds(per_seed[:, -1]),
                   "final_step": int(steps[-1])}
            if iqm:
                row.update(interquartile_mean(by_group, label, env))
            rows.append(row)
    return rows


def interquartile_mean(by_group: dict, label: str, env: str) -> dict:
    """IQM of the final scores of every run (tasks x seeds) of an environment, with a 95% bootstrap interval."""
    from scipy import stats

    finals = np.array([r.scores[-1] for (lab, name), runs in by_group.items() if lab == label
                       and dataset_of(name) == env for r in runs])
    iqm = float(stats.trim_mean(finals, 0.25))
    if len(finals) < 2 or np.ptp(finals) == 0:
        return {"iqm": iqm, "iqm_low": iqm, "iqm_high": iqm}
    ci = stats.bootstrap((finals,), lambda x, axis: stats.trim_mean(x, 0.25, axis=axis), confidence_level=0.95,
                         n_resamples=2000, random_state=np.random.default_rng(0)).confidence_interval
    return {"iqm": iqm, "iqm_low": float(ci.low), "iqm_high": float(ci.high)}


def online_gain(by_group: dict) -> list[dict]:
    """deflow_o2o.py runs against a control of deflow_offline.py runs of the same task that end at the same update
    (e.g. the same checkpoints continued offline): per seed, o2o's final score minus the control's; mean +- std."""
    rows = []
    for (label, env_name), o2o in sorted(by_group.items()):
        if o2o[0].args.get("exp_name") != "deflow_o2o":
            continue
        for (control_label, control_env), control in sorted(by_group.items()):
            if control_env != env_name or control[0].args.get("exp_name") != "deflow_offline":
                continue
            end = {r.args["seed"]: r for r in control if r.steps[-1] == o2o[0].steps[-1]}
            pairs = sorted((r.args["seed"], r.scores[-1], end[r.args["seed"]].scores[-1]) for r in o2o
                           if r.args["seed"] in end)
            if not pairs:
                continue
            gains = np.array([a - b for _, a, b in pairs])
            low, high = paired_interval(gains)
            rows.append({"o2o": label, "control": control_label, "name": env_name, "at_update": int(o2o[0].steps[-1]),
                         **over_seeds(gains), "low": low, "high": high,
                         "every_seed": " / ".join(f"{s}: {a:.0f} - {b:.0f}" for s, a, b in pairs)})
    return rows


def interval(row: dict) -> str:
    return "n/a" if np.isnan(row["low"]) else f"[{row['low'] + 0.0:+.1f}, {row['high'] + 0.0:+.1f}]"


def write_table(rows: list[dict], out: Path, gains: list[dict] = (), diffs: list[dict] = ()) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| group | task or environment | final score (mean +- std over seeds) | seeds | at update | every seed |"
             + (" IQM [95% CI] |" if "iqm" in columns else ""), "|---|---|---|---|---|---|"
             + ("---|" if "iqm" in columns else "")]
    for row in rows:
        name = row["name"] if row["level"] == "task" else f"**{row['name']}** (mean of its tasks)"
        line = f"| {row['group']} | {name} | {spread(row)} | {row['seeds']} | {row['final_step']} | " \
               f"{row.get('every_seed', '')} |"
        if "iqm" in columns:
            line += f" {row['iqm']:.1f} [{row['iqm_low']:.1f}, {row['iqm_high']:.1f}] |" if "iqm" in row else " |"
        lines.append(line)
    if diffs:
        lines += ["", "Differences between groups: the first's mean final score minus the second's, per environment, "
                  "with a 95% Welch interval over seeds.", "",
                  "| environment | first | second | difference | 95% interval | seeds |", "|---|---|---|---|---|---|"]
        lines += [f"| {d['name']} | {d['first']} | {d['second']} | {round(d['difference'], 1) + 0.0:+.1f} | "
                  f"{interval(d)} | {d['seeds']} |" for d in diffs]
    if gains:
        lines += ["", "Online gain: the o2o run's final score minus the control's, per seed (95% paired t interval).",
                  "", "| o2o | control | task | at update | gain (mean +- std over seeds) | 95% interval | seeds | "
                  "seed: o2o - control |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {g['o2o']} | {g['control']} | {g['name']} | {g['at_update']} | "
                  f"{round(g['mean'], 1) + 0.0:+.1f} +- " + ("n/a" if np.isnan(g["std"]) else f"{g['std']:.1f}")
                  + f" | {interval(g)} | {g['seeds']} | {g['every_seed']} |" for g in gains]  # + 0.0: no "-0.0"
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(args: Args) -> None:
    require("scipy", "matplotlib")
    runs = read_runs(args.folders)
    if not runs:
        sys.exit(f"error: no run directories (args.json + eval.csv) below {', '.join(args.folders)}")
    out = Path(args.out or args.folders[0])
    out.mkdir(parents=True, exist_ok=True)
    by_group = groups(runs)
    curves = environment_curves(by_group)
    plot_curves(curves, out / "curves.png")
    write_table(final_table(by_group, curves, args.iqm), out, online_gain(by_group), differences(curves))
    print(f"{len(runs)} runs in {len(by_group)} groups of (flags, task): wrote {out / 'curves.png'}, "
          f"{out / 'results.md'}, {out / 'results.csv'}")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))

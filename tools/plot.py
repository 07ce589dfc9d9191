"""Learning curves and a results table from runs: every run directory below the given folders (the ones that hold
args.json and eval.csv, e.g. a sweep's), grouped by script, environment and every flag that differs between them.
Runs of the official JAX code (a folder with its flags.json and eval.csv, as its main.py writes them under
--save_dir) are read too, as the group "official", so both code bases plot side by side; so are the evaluations of a
CSV file with the columns code, task, seed, step, success and episode_return (e.g. docs/study-evaluations.csv).

    python -m tools.plot sweeps/sweep                  # writes sweeps/sweep/curves.png, results.md, results.csv
    python -m tools.plot sweeps/sweep ../official/exp   # this code's runs and the official code's, side by side
    python -m tools.plot sweeps/a sweeps/b --step 20000 --iqm   # cut at update 20,000; rliable's aggregates

The score is evaluation/episode.normalized_return (D4RL) or evaluation/success x 100 (OGBench), or with --metric
return the episode return. Curves: the mean over seeds with a 95% confidence band (Student t over seeds, cut at the
scores' range) and each seed faintly, one panel per environment (the 5 tasks of an OGBench dataset averaged, as the
paper does). Table: the final evaluation of each run (one that ended before the others, e.g. still running, marked
with its update); per task and per environment the mean +- standard deviation over seeds (an environment's score
per seed is the mean over its tasks; one seed has no spread: n/a) and the seed count; per environment, each pair of
groups' difference of means with a 95% Welch interval (scipy.stats.ttest_ind); the slope over the last three
evaluations (each seed's least-squares slope, a 95% Student t interval over seeds: has the curve flattened?); the
online gain (o2o against an offline control from the same checkpoints) with a 95% paired t interval over seeds.
--iqm adds rliable's aggregates over tasks (Agarwal et al. 2021): each group's interquartile mean of its final
scores with a 95% stratified-bootstrap interval, each pair's probability of improvement with its interval, and
performance profiles (profiles.png). Written by hand: only the grouping and the averaging.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

from typing import Literal

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
    """folders to search for run directories (args.json + eval.csv), e.g. a sweep directory, or CSV files of
    evaluations (columns code, task, seed, step, success, episode_return; a column part other than offline names a
    group of its own, as in docs/study-evaluations.csv)"""
    out: str | None = None
    """where curves.png, results.md and results.csv go (default: the first folder, or the CSV file's folder)"""
    metric: Literal["score", "return"] = "score"
    """score: success x 100 (OGBench) or D4RL normalized return; return: the episode return"""
    step: int | None = None
    """read each run up to this update only: its evaluation there is its final one (e.g. 20000 of a longer run)"""
    groups: tuple[str, ...] = ()
    """only these groups, by their labels in the table (default: all)"""
    iqm: bool = False
    """also rliable's aggregates over tasks: interquartile mean, probability of improvement, performance profiles"""
    evaluations: bool = False
    """also write evaluations.csv: every evaluation of every run, in the CSV form this tool reads (a study's record)"""


@dataclasses.dataclass
class Run:
    args: dict
    steps: np.ndarray
    scores: np.ndarray
    rows: list = ()  # its evaluations as --evaluations writes them (without code, task, seed)


def official_args(flags: dict) -> dict:
    """The official code's flags.json (absl flags, the agent's config under "agent") as this code's settings: the
    flags keep their names, which this code shares, and the group is called "official". A flag main.py copies into
    the config after writing flags.json (offline_steps) is stale under "agent": the top-level one wins."""
    top = {k: v for k, v in flags.items() if k != "agent"}
    return {**flags.get("agent", {}), **top, "exp_name": "official"}


EVALUATIONS = ("code", "task", "seed", "step", "success", "episode_return", "episode_length")


def score(row: dict, metric: str, prefix: str = "evaluation/") -> float:
    """An evaluation's score: the return (metric "return"), else the D4RL normalized return or the success x 100."""
    if metric == "return":
        return float(row[f"{prefix}episode.return" if prefix else "episode_return"])
    key = f"{prefix}episode.normalized_return"
    return float(row[key]) if key in row else 100 * float(row[f"{prefix}success"])


def read_eval(path: Path, metric: str = "score") -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(steps, scores, rows of the columns of EVALUATIONS) of a run directory's eval.csv."""
    with open(path / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    flat = [{"step": int(r["step"]), **{c: r.get("evaluation/" + c.replace("_", ".")) for c in EVALUATIONS[4:]}}
            for r in rows]
    return np.array([int(r["step"]) for r in rows], dtype=int), np.array([score(r, metric) for r in rows]), flat


def read_table(path: Path, metric: str) -> list[Run]:
    """Runs from a CSV file of evaluations, one row each (EVALUATIONS, and optionally a part: other than offline, it
    joins the code in the group's label)."""
    by_run = defaultdict(list)
    with open(path) as f:
        for row in csv.DictReader(f):
            part = row.get("part", "offline")
            label = row["code"] if part == "offline" else f"{row['code']} ({part})"
            by_run[(label, row["task"], int(row["seed"]))].append({**row, "step": int(row["step"])})
    runs = []
    for (label, task, seed), rows in by_run.items():
        rows = sorted(rows, key=lambda r: r["step"])
        runs.append(Run({"exp_name": label, "env_name": task, "seed": seed}, np.array([r["step"] for r in rows]),
                        np.array([score(r, metric, "") for r in rows]),
                        [{c: r.get(c) for c in EVALUATIONS[3:]} for r in rows]))
    return runs


def cut(runs: list[Run], step: int | None) -> list[Run]:
    """Each run's evaluations up to `step` (all for None); a run with none left is dropped."""
    kept = [Run(r.args, r.steps[r.steps <= step], r.scores[r.steps <= step],
                [row for row in r.rows if row["step"] <= step]) for r in runs] if step else runs
    return [r for r in kept if len(r.steps)]


def write_evaluations(by_group: dict, path: Path) -> None:
    """Every evaluation of every run, one row each, in the form read_table reads (the group's label as code)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=EVALUATIONS)
        writer.writeheader()
        for (label, task), runs in sorted(by_group.items()):
            for run in sorted(runs, key=lambda r: r.args["seed"]):
                writer.writerows({"code": label, "task": task, "seed": run.args["seed"], **row} for row in run.rows)


def read_runs(folders, metric: str = "score") -> list[Run]:
    runs = []
    for folder in folders:
        if str(folder).endswith(".csv"):
            runs += read_table(Path(folder), metric)
            continue
        settings = sorted([*Path(folder).rglob("args.json"), *Path(folder).rglob("flags.json")])
        for args_file in settings:
            path = args_file.parent
            if "abandoned" in path.parts or not (path / "eval.csv").exists():
                continue
            steps, scores, rows = read_eval(path, metric)
            if not len(steps):
                continue
            args = json.loads(args_file.read_text())
            if args_file.name == "flags.json":
                args = official_args(args)
            if (path / "offline_run.json").exists():  # deflow_o2o.py gone online from a deflow_offline.py run:
                source = Path(json.loads((path / "offline_run.json").read_text())["checkpoint"]).parent
                before, before_scores, _ = read_eval(source, metric)  # its curve starts with that run's evaluations
                keep = before < steps[0]
                steps, scores = np.concatenate([before[keep], steps]), np.concatenate([before_scores[keep], scores])
            runs.append(Run(args, steps, scores, rows))
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


def plot_curves(curves: dict, path: Path, metric: str = "score"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

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
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x else "0"))  # 20k, not 20000
        ax.set_ylabel("score (success % or normalized return)" if metric == "score" else "episode return")
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


def final_table(by_group: dict, curves: dict) -> list[dict]:
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
            rows.append({"group": label, "level": "environment", "name": env, **over_seeds(per_seed[:, -1]),
                         "final_step": int(steps[-1])})
    return rows


def aggregates(by_group: dict, metric: str, out: Path) -> tuple[list[dict], list[dict]]:
    """rliable's aggregates over tasks (Agarwal et al. 2021), on the final scores of the runs that reached their
    group's last update, the seeds every task of the group has: per group the interquartile mean of its runs x tasks
    with a 95% stratified-bootstrap interval (50,000 resamples); per pair of groups, on the tasks both have, the
    probability that the first's score on a task beats the second's (averaged over tasks) with its interval (2,000);
    each group's performance profile, the fraction of its runs above each score with a 95% band, in profiles.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import library as rly, metrics, plot_utils

    finals = defaultdict(dict)  # group -> task -> {seed: final score}
    for (label, task), runs in by_group.items():
        end = max(r.steps[-1] for r in runs)
        finals[label][task] = {r.args["seed"]: r.scores[-1] for r in runs if r.steps[-1] == end}

    def matrix(label: str, tasks: list[str]) -> np.ndarray:
        seeds = sorted(set.intersection(*(set(finals[label][t]) for t in tasks)))
        return np.array([[finals[label][t][s] for t in tasks] for s in seeds]).reshape(len(seeds), len(tasks))

    scores = {label: matrix(label, sorted(tasks)) for label, tasks in sorted(finals.items())}
    scores = {label: m for label, m in scores.items() if m.size}
    np.random.seed(0)  # rliable's bootstraps draw from numpy's global generator, whatever random_state says
    point, ci = rly.get_interval_estimates(scores, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=50000)
    iqms = [{"group": label, "iqm": point[label][0], "low": ci[label][0, 0], "high": ci[label][1, 0],
             "tasks": m.shape[1], "seeds": m.shape[0]} for label, m in scores.items()]
    pairs = {}
    for i, first in enumerate(scores):
        for second in list(scores)[i + 1:]:
            shared = sorted(set(finals[first]) & set(finals[second]))
            if shared and matrix(first, shared).size and matrix(second, shared).size:
                pairs[f"{first} > {second}"] = [matrix(first, shared), matrix(second, shared)]
    improvements = []
    if pairs:
        point, ci = rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=2000)
        improvements = [{"pair": key, "probability": float(point[key]), "low": float(np.ravel(ci[key])[0]),
                         "high": float(np.ravel(ci[key])[1]), "tasks": pairs[key][0].shape[1],
                         "seeds": f"{len(pairs[key][0])} / {len(pairs[key][1])}"} for key in pairs]
    values = np.concatenate([m.ravel() for m in scores.values()])
    low, high = (min(0.0, values.min()), max(100.0, values.max())) if metric == "score" else (values.min(),
                                                                                             values.max())
    taus = np.linspace(low, high, 101)
    profiles, bands = rly.create_performance_profile(scores, taus, reps=2000)
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=bands, ax=ax,
                                         xlabel="score" if metric == "score" else "episode return",
                                         ylabel="fraction of runs above", labelsize="medium",
                                         ticklabelsize="small")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "profiles.png", dpi=110)
    plt.close(fig)
    return iqms, improvements


def settling(curves: dict) -> list[dict]:
    """Has each curve flattened? Per environment and group with 3 or more evaluations: the means over seeds of the
    last three, and the slope through them per 10,000 updates (each seed's least-squares slope; the mean and a 95%
    Student t interval over seeds)."""
    rows = []
    for env, by_label in sorted(curves.items()):
        for label, (steps, per_seed) in sorted(by_label.items()):
            if len(steps) < 3:
                continue
            x = steps[-3:] / 10_000
            slopes = np.array([np.polyfit(x, seed[-3:], 1)[0] for seed in per_seed])
            mean, half = mean_and_band(slopes)
            rows.append({"name": env, "group": label, "steps": " / ".join(map(str, steps[-3:])),
                         "means": " / ".join(f"{v:.1f}" for v in per_seed[:, -3:].mean(axis=0)),
                         "slope": mean, "low": mean - half if len(slopes) > 1 else float("nan"),
                         "high": mean + half if len(slopes) > 1 else float("nan"), "seeds": len(slopes)})
    return rows


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
    return "n/a" if np.isnan(row["low"]) else f"[{signed(row['low'])}, {signed(row['high'])}]"


def signed(value: float) -> str:
    return f"{round(value, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


def section(intro: str, header: list[str], rows: list[list]) -> list[str]:
    """A paragraph and a markdown table under it."""
    return ["", intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def write_table(rows: list[dict], out: Path, metric: str = "score", gains=(), diffs=(), settled=(), iqms=(),
                improvements=()) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    what = "score" if metric == "score" else "episode return"
    lines = [f"| group | task or environment | final {what} (mean +- std over seeds) | seeds | at update | "
             "every seed |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        name = row["name"] if row["level"] == "task" else f"**{row['name']}** (mean of its tasks)"
        lines.append(f"| {row['group']} | {name} | {spread(row)} | {row['seeds']} | {row['final_step']} | "
                     f"{row.get('every_seed', '')} |")
    if diffs:
        lines += section(f"Differences between groups: the first's mean final {what} minus the second's, per "
                         "environment, with a 95% Welch interval over seeds.",
                         ["environment", "first", "second", "difference", "95% interval", "seeds"],
                         [[d["name"], d["first"], d["second"], signed(d["difference"]), interval(d), d["seeds"]]
                          for d in diffs])
    if settled:
        lines += section(f"The last three evaluations: the mean {what} over seeds at each, and the slope through them "
                         "per 10,000 updates (each seed's least-squares slope; mean and 95% t interval over seeds). An "
                         "interval that holds 0: no trend beyond the noise.",
                         ["environment", "group", "at updates", "means", "slope per 10k updates", "95% interval",
                          "seeds"], [[r["name"], r["group"], r["steps"], r["means"], signed(r["slope"]), interval(r),
                                      r["seeds"]] for r in settled])
    if iqms:
        lines += section(f"Aggregates over tasks (rliable): the interquartile mean of the final {what}s (seeds x "
                         "tasks) with a 95% stratified-bootstrap interval; the probability that the first group's "
                         "score on a task beats the second's, averaged over the tasks both have, with its 95% "
                         "interval.",
                         ["group", "IQM", "95% interval", "tasks", "seeds"],
                         [[r["group"], f"{r['iqm']:.1f}", f"[{r['low']:.1f}, {r['high']:.1f}]", r["tasks"], r["seeds"]]
                          for r in iqms])
        lines += section("", ["first > second", "probability of improvement", "95% interval", "tasks", "seeds"],
                         [[r["pair"], f"{r['probability']:.2f}", f"[{r['low']:.2f}, {r['high']:.2f}]", r["tasks"],
                           r["seeds"]] for r in improvements])[2:]
    if gains:
        lines += section("Online gain: the o2o run's final score minus the control's, per seed (95% paired t "
                         "interval).",
                         ["o2o", "control", "task", "at update", "gain (mean +- std over seeds)", "95% interval",
                          "seeds", "seed: o2o - control"],
                         [[g["o2o"], g["control"], g["name"], g["at_update"], f"{signed(g['mean'])} +- "
                           + ("n/a" if np.isnan(g["std"]) else f"{g['std']:.1f}"), interval(g), g["seeds"],
                           g["every_seed"]] for g in gains])
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(args: Args) -> None:
    require("scipy", "matplotlib", *(["rliable"] if args.iqm else []))
    runs = cut(read_runs(args.folders, args.metric), args.step)
    by_group = {key: runs for key, runs in groups(runs).items() if not args.groups or key[0] in args.groups}
    if not by_group:
        sys.exit(f"error: no run directories (args.json + eval.csv) below {', '.join(args.folders)}"
                 + (f" in the groups {', '.join(args.groups)}" if runs and args.groups else ""))
    first = Path(args.folders[0])
    out = Path(args.out or (first.parent if first.suffix == ".csv" else first))
    out.mkdir(parents=True, exist_ok=True)
    curves = environment_curves(by_group)
    plot_curves(curves, out / "curves.png", args.metric)
    if args.evaluations:
        write_evaluations(by_group, out / "evaluations.csv")
    iqms, improvements = aggregates(by_group, args.metric, out) if args.iqm else ((), ())
    write_table(final_table(by_group, curves), out, args.metric, online_gain(by_group), differences(curves),
                settling(curves), iqms, improvements)
    print(f"{sum(map(len, by_group.values()))} runs in {len(by_group)} groups of (flags, task): wrote "
          f"{out / 'curves.png'}, "
          f"{out / 'results.md'}, {out / 'results.csv'}")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))

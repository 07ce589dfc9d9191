"""Many runs: the sweep launcher through submitit's local executor (for real, on a tiny generated dataset), its
skip/resume on rerun, the SLURM submission it would make, the recipes shared with the README, and the curves/table."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

from tools import plot, recipes, sweep
from tests.conftest import ROOT, TINY_FLAGS

submitit = pytest.importorskip("submitit")
TASKS = ["cube-single-play-singletask-task1-v0", "cube-single-play-singletask-task2-v0"]


def sweep_command(sweep_dir, dataset, steps=6, interval=3, tasks=TASKS):
    """`tasks` x 2 seeds, 2 jobs at a time; a checkpoint, a log line and an evaluation every `interval` updates."""
    return [sys.executable, "-m", "tools.sweep", "--env-names", *tasks, "--seeds", "0", "1", "--jobs", "2",
            "--sweep-dir", str(sweep_dir), "--poll-seconds", "0.5", "--save-interval", str(interval), "--",
            "--dataset-path", str(dataset), "--offline-steps", str(steps), "--log-interval", str(interval),
            "--eval-interval", str(interval), "--eval-episodes", "1", *TINY_FLAGS]


def run_sweep(*command_args, **kwargs):
    result = subprocess.run(sweep_command(*command_args, **kwargs), cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory, cube_dataset):
    """2 tasks x 2 seeds of cube-single, 6 updates each, through submitit's local executor; then the same sweep
    again (everything finished: all skipped)."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    first = run_sweep(sweep_dir, cube_dataset)
    again = run_sweep(sweep_dir, cube_dataset)
    return sweep_dir, first, again


def test_sweep_runs_every_job_and_a_rerun_skips_them(small_sweep):
    sweep_dir, first, again = small_sweep
    assert "4 jobs: 0 finished before (skipped), 0 to resume, 4 to start (local, 2 at a time)" in first
    assert re.search(r"4 done, 0 running, 0 failed, 0 waiting", first)
    assert "4 jobs: 4 finished before (skipped), 0 to resume, 0 to start" in again
    for task in TASKS:
        for seed in (0, 1):
            job_dir = sweep_dir / "deflow_offline" / task / f"seed{seed}"
            assert (job_dir / "finished").exists() and "done:" in (job_dir / "log.txt").read_text()
            (run_dir,) = job_dir.glob(f"{task}__deflow_offline__{seed}__*")
            with open(run_dir / "eval.csv") as f:
                assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 3, 6]


@pytest.mark.slow  # kills a real training job mid-run and reruns the sweep: about 30 s of both cores
def test_a_killed_job_resumes_from_its_checkpoint(tmp_path, cube_dataset):
    """Kill a sweep while its jobs run (after their first checkpoint), rerun it: they continue from the checkpoint."""
    process = subprocess.Popen(sweep_command(tmp_path, cube_dataset, 400, 100, TASKS[:1]), cwd=ROOT,
                               start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(tmp_path.glob("deflow_offline/*/seed*/*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the sweep, submitit's job controllers and the scripts
    process.wait()
    time.sleep(1)
    assert not list(tmp_path.glob("deflow_offline/*/seed*/finished"))
    out = run_sweep(tmp_path, cube_dataset, 400, 100, TASKS[:1])
    resumed = int(re.search(r"(\d+) to resume", out).group(1))
    assert resumed >= 1 and "2 done, 0 running, 0 failed" in out
    logs = [p.read_text() for p in tmp_path.glob("deflow_offline/*/seed*/log.txt")]
    assert sum("resuming" in log for log in logs) == resumed
    for job_dir in tmp_path.glob("deflow_offline/*/seed*"):
        assert len([p for p in job_dir.iterdir() if p.is_dir() and p.name != "abandoned"]) == 1


def test_dry_run_prints_the_scripts_own_commands_with_the_recipe():
    result = subprocess.run([sys.executable, "-m", "tools.sweep", "--env-names", "puzzle-3x3-play",
                             "D4RL/pen/cloned-v2", "--seeds", "0", "1", "--recipe", "paper", "--dry-run", "--sweep-dir",
                             "/tmp/never", "--", "--target-divergence", "0.002"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert len(lines) == 12  # 5 puzzle tasks and one D4RL dataset, 2 seeds each
    assert all(line.startswith("[new] ") and " --save-interval 50000 " in line for line in lines)
    puzzle = next(line for line in lines if "puzzle-3x3-play-singletask-task4-v0 --seed 1" in line)
    assert "--q-agg mean --target-divergence 0.005 --target-divergence 0.002" in puzzle  # the user's flag comes last
    assert "/never/deflow_offline/puzzle-3x3-play-singletask-task4-v0/seed1 " in puzzle
    pen = next(line for line in lines if "D4RL/pen/cloned-v2" in line)
    assert "--run-dir /never/deflow_offline/D4RL-pen-cloned-v2/seed0" in pen.replace("/tmp/never", "/never")
    assert "--q-agg min --target-divergence 0.01 --offline-steps 500000" in pen
    misplaced = subprocess.run([sys.executable, "-m", "tools.sweep", "--sweep-dir", "/tmp/never", "--", "--dry-run"],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert misplaced.returncode == 1 and "put it before --" in misplaced.stderr  # not 1 real job per task and seed


def test_slurm_submission(tmp_path, monkeypatch):
    """What sbatch would get, checked without a cluster: the job array and the resources per job."""
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # as if srun were here
    args = sweep.Args(executor="slurm", jobs=3, partition="gpu", gpus_per_job=1, cpus_per_job=6, mem_gb=40,
                      time_min=600, sweep_dir=str(tmp_path), env_names=("cube-double-play",), seeds=(0, 1))
    jobs = sweep.plan(args, ["--offline-steps", "1000"])
    executor = sweep.make_executor(args)
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for expected in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=6",
                     "#SBATCH --mem=40GB", "#SBATCH --time=600"):
        assert expected in text, text
    assert executor._executor.parameters["array_parallelism"] == 3
    assert len(jobs) == 10 and all(job.command[-2:] == ["--offline-steps", "1000"] for job in jobs)


def test_recipes_of_the_launcher():
    assert recipes.recipe("cube-double-play-singletask-task2-v0") == {"discount": 0.99, "q_agg": "mean",
                                                                      "target_divergence": 0.001}
    assert recipes.recipe("visual-puzzle-3x3-play-singletask-task1-v0") == {"target_divergence": 0.0005,
                                                                            "offline_steps": 500_000}
    assert recipes.recipe("D4RL/door/human-v2") == {"discount": 0.99, "q_agg": "min", "target_divergence": 0.001,
                                                    "offline_steps": 500_000}
    assert recipes.expand(["D4RL/antmaze"]) == [t for t in recipes.d4rl.TASKS if "antmaze" in t]
    with pytest.raises(KeyError, match="no paper recipe"):
        recipes.recipe("pointmaze-medium-navigate-singletask-v0")


def test_plot_and_table_equal_a_hand_computation(small_sweep, tmp_path):
    sweep_dir, *_ = small_sweep
    plot.main(plot.Args(folders=(str(sweep_dir),), out=str(tmp_path)))
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    finals = {}
    for eval_csv in sweep_dir.glob("deflow_offline/*/seed*/*/eval.csv"):
        with open(eval_csv) as f:
            last = list(csv.DictReader(f))[-1]
        task = eval_csv.parent.name.split("__")[0]
        finals.setdefault(task, {})[int(eval_csv.parent.name.split("__")[2])] = 100 * float(last["evaluation/success"])
    with open(tmp_path / "results.csv") as f:
        rows = {(r["level"], r["name"]): r for r in csv.DictReader(f)}
    for task, by_seed in finals.items():
        values = np.array(list(by_seed.values()))
        row = rows[("task", task)]
        assert float(row["mean"]) == pytest.approx(values.mean()) and int(row["seeds"]) == 2
        assert float(row["std"]) == pytest.approx(values.std(ddof=1))
    per_seed = [np.mean([finals[t][seed] for t in TASKS]) for seed in (0, 1)]
    env = rows[("environment", "cube-single-play")]
    assert float(env["mean"]) == pytest.approx(np.mean(per_seed))
    assert "**cube-single-play** (mean of its tasks)" in (tmp_path / "results.md").read_text()
    curves = plot.environment_curves(plot.groups(plot.read_runs([sweep_dir])))
    figure = plot.plot_curves(curves, tmp_path / "again.png")
    assert [ax.get_title() for ax in figure.axes] == ["cube-single-play"]  # one panel per environment


def test_official_runs_plot_beside_this_codes(small_sweep, tmp_path):
    """Runs of the official JAX code, in the layout and CSV format its main.py writes (flags.json with the agent's
    config under "agent"; eval.csv with `step` last, by its CsvLogger), read as the group "official"."""
    sweep_dir, *_ = small_sweep
    official = tmp_path / "exp" / "fql" / "deflow"
    ours = json.loads(next(sweep_dir.rglob("args.json")).read_text())  # the same settings, as a fair study has
    shared = {k: ours[k] for k in ("offline_steps", "eval_interval", "eval_episodes")}
    agent = {k: ours[k] for k in ("discount", "q_agg", "target_divergence", "batch_size", "actor_hidden_dims",
                                  "value_hidden_dims", "flow_steps")}
    finals = {}
    for task in TASKS:
        for seed, success in ((0, 0.5), (1, 0.25)):
            run = official / f"sd{seed:03d}_{task}"
            run.mkdir(parents=True)
            flags = {"run_group": "deflow", "seed": seed, "env_name": task, "save_dir": str(run), "online_steps": 0,
                     "log_interval": 5000, **shared,  # main.py writes the config before it sets offline_steps there:
                     "agent": {"agent_name": "deflow", **agent, "offline_steps": 1_000_000}}
            (run / "flags.json").write_text(json.dumps(flags))
            (run / "eval.csv").write_text("evaluation/success,evaluation/episode.return,step\n"
                                          f"0.0,-200.0,1\n0.1,-190.0,3\n{success},-150.0,6\n")
            finals.setdefault(task, []).append(100 * success)
    runs = plot.read_runs([sweep_dir, official])
    labels = {label for label, _ in plot.groups(runs)}
    assert labels == {"deflow_offline", "official"}  # flags only one code base has do not split the groups
    flags["agent"]["target_divergence"] *= 2  # one run with another setting: a group of its own, named by it
    (run / "flags.json").write_text(json.dumps(flags))
    assert "official [target_divergence=0.002]" in {label for label, _ in plot.groups(plot.read_runs([official]))}
    flags["agent"]["target_divergence"] /= 2
    (run / "flags.json").write_text(json.dumps(flags))
    plot.main(plot.Args(folders=(str(sweep_dir), str(official)), out=str(tmp_path / "out")))
    with open(tmp_path / "out" / "results.csv") as f:
        rows = {(r["group"], r["level"], r["name"]): r for r in csv.DictReader(f)}
    for task, values in finals.items():
        row = rows[("official", "task", task)]
        assert float(row["mean"]) == pytest.approx(np.mean(values)) and int(row["final_step"]) == 6
        assert ("deflow_offline", "task", task) in rows
    assert float(rows[("official", "environment", "cube-single-play")]["mean"]) == pytest.approx(37.5)
    (difference,) = plot.differences(plot.environment_curves(plot.groups(runs)))  # Welch's interval, by hand:
    ours = plot.environment_curves(plot.groups(runs))["cube-single-play"]["deflow_offline"][1][:, -1]
    theirs = np.array([np.mean([finals[t][i] for t in TASKS]) for i in (0, 1)])
    se2 = ours.var(ddof=1) / 2 + theirs.var(ddof=1) / 2
    dof = se2 ** 2 / ((ours.var(ddof=1) / 2) ** 2 + (theirs.var(ddof=1) / 2) ** 2)
    half = stats.t.ppf(0.975, dof) * np.sqrt(se2)
    assert (difference["first"], difference["second"]) == ("deflow_offline", "official")
    assert difference["difference"] == pytest.approx(ours.mean() - theirs.mean())
    assert (difference["low"], difference["high"]) == pytest.approx((ours.mean() - theirs.mean() - half,
                                                                     ours.mean() - theirs.mean() + half))
    assert "Differences between groups" in (tmp_path / "out" / "results.md").read_text()
    (run / "eval.csv").write_text("evaluation/success,evaluation/episode.return,step\n0.0,-200.0,1\n")  # unfinished
    plot.main(plot.Args(folders=(str(official),), out=str(tmp_path / "partial")))
    assert "1: 0 (at 1)" in (tmp_path / "partial" / "results.md").read_text()  # not mistaken for a final score


def test_a_table_of_evaluations_cut_at_an_update_with_rliables_aggregates(tmp_path):
    """A CSV of evaluations (docs/study-evaluations.csv's columns) read as runs, cut at an update, one group left out,
    by success and by return, and written back; the IQM, the probability of improvement and the last three
    evaluations' slope equal a hand computation, and the aggregates' intervals hold them."""
    rng = np.random.default_rng(0)
    tasks = ["cube-single-play-singletask-task1-v0", "scene-play-singletask-task1-v0"]
    steps, table = [1, 10, 20, 30], {}
    rows = ["part,code,task,seed,step,success,episode_return,episode_length"]
    for part, code in (("offline", "ours"), ("offline", "official"), ("control", "ours")):
        for task in tasks:
            for seed in range(4):
                for step in steps:
                    success = round(float(rng.uniform()), 2)
                    table[(part, code, task, seed, step)] = success
                    rows.append(f"{part},{code},{task},{seed},{step},{success},{-100 * success},200")
    (tmp_path / "study.csv").write_text("\n".join(rows) + "\n")
    plot.main(plot.Args(folders=(str(tmp_path / "study.csv"),), step=20, groups=("ours", "official"), iqm=True,
                        evaluations=True))
    again = {(r.args["exp_name"], r.args["env_name"], r.args["seed"]): r.scores.tolist()
             for r in plot.read_runs([tmp_path / "evaluations.csv"])}  # the record it writes reads back the same
    assert again == {(c, t, s): [100 * table[("offline", c, t, s, u)] for u in steps[:3]]
                     for c in ("ours", "official") for t in tasks for s in range(4)}
    assert (tmp_path / "profiles.png").stat().st_size > 10_000 and (tmp_path / "curves.png").exists()
    with open(tmp_path / "results.csv") as f:
        rows = {(r["group"], r["name"]): r for r in csv.DictReader(f)}
    assert {group for group, _ in rows} == {"ours", "official"}  # the control left out
    finals = {code: np.array([[100 * table[("offline", code, t, s, 20)] for t in tasks] for s in range(4)])
              for code in ("ours", "official")}
    for code, matrix in finals.items():
        for j, task in enumerate(tasks):
            assert float(rows[(code, task)]["mean"]) == pytest.approx(matrix[:, j].mean())
            assert rows[(code, task)]["final_step"] == "20"
    text = (tmp_path / "results.md").read_text()
    for code, matrix in finals.items():
        iqm, low, high = re.search(rf"\| {code} \| ([\d.]+) \| \[([\d.]+), ([\d.]+)\] \| 2 \| 4 \|", text).groups()
        assert float(iqm) == pytest.approx(stats.trim_mean(matrix, 0.25, axis=None), abs=0.05)
        assert float(low) <= float(iqm) <= float(high)
    a, b = finals["official"], finals["ours"]  # labels in sorted order: official first
    wins = np.mean([np.mean((a[:, j, None] > b[None, :, j]) + 0.5 * (a[:, j, None] == b[None, :, j]))
                    for j in range(2)])
    probability, low, high = re.search(r"\| official > ours \| ([\d.]+) \| \[([\d.]+), ([\d.]+)\]", text).groups()
    assert float(probability) == pytest.approx(wins, abs=0.005) and float(low) <= float(probability) <= float(high)
    per_seed = np.array([[100 * table[("offline", "ours", tasks[1], s, u)] for u in (1, 10, 20)] for s in range(4)])
    slopes = [np.polyfit(np.array([1, 10, 20]) / 10_000, seed, 1)[0] for seed in per_seed]  # per 10k updates
    runs = plot.cut(plot.read_runs([tmp_path / "study.csv"]), 20)
    (row,) = [r for r in plot.settling(plot.environment_curves(plot.groups(runs)))
              if (r["group"], r["name"]) == ("ours", "scene-play")]
    half = stats.t.ppf(0.975, 3) * np.std(slopes, ddof=1) / 2
    assert (row["slope"], row["low"], row["high"]) == pytest.approx((np.mean(slopes), np.mean(slopes) - half,
                                                                     np.mean(slopes) + half))
    returns = plot.read_runs([tmp_path / "study.csv"], metric="return")
    assert sorted(r.scores[-1] for r in returns if r.args["exp_name"] == "ours") == pytest.approx(
        sorted(-100 * table[("offline", "ours", t, s, 30)] for t in tasks for s in range(4)))


def test_one_seed_has_no_spread():
    row = plot.over_seeds(np.array([40.0]))
    assert np.isnan(row["std"]) and plot.spread(row) == "40.0 +- n/a"
    assert all(np.isnan(x) for x in plot.paired_interval(np.array([3.0])))


def test_o2o_and_an_offline_control_start_from_another_sweeps_checkpoints(small_sweep, tmp_path, cube_dataset):
    """--start-from: deflow_o2o.py goes online from each (task, seed)'s deflow_offline.py checkpoint of another sweep,
    and deflow_offline.py continues a copy of the same runs (a control); the source runs stay as they ended. The plot
    starts the o2o curves with the offline evaluations and tables the online gain over the control."""
    sweep_dir, *_ = small_sweep
    sources = sorted(sweep_dir.glob(f"deflow_offline/{TASKS[0]}/seed*/*/checkpoint.pt"))
    before = [(p.stat().st_mtime, (p.parent / "eval.csv").read_text()) for p in sources]

    def start_from(script, *flags, launcher=()):
        return [sys.executable, "-m", "tools.sweep", "--script", script, "--env-names", TASKS[0], "--seeds", "0",
                "1", "--jobs", "2", "--sweep-dir", str(tmp_path), "--poll-seconds", "0.5", "--save-interval", "3",
                "--start-from", str(sweep_dir), *launcher, "--", "--dataset-path", str(cube_dataset),
                "--log-interval", "3", "--eval-interval", "3", "--eval-episodes", "1", *flags]

    for command in (start_from("deflow_o2o.py", "--online-steps", "3", "--buffer-size", "1000"),
                    start_from("deflow_offline.py", "--offline-steps", "9")):
        for expected in ("2 to start", "2 finished before (skipped)"):  # and a rerun skips them
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0 and expected in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    for command in (start_from("deflow_o2o.py", "--online-steps", "6", "--buffer-size", "1000", launcher=["--extend"]),
                    start_from("deflow_offline.py", "--offline-steps", "12", launcher=["--extend"])):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)  # 3 steps longer
        assert result.returncode == 0 and "2 to resume" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert [(p.stat().st_mtime, (p.parent / "eval.csv").read_text()) for p in sources] == before
    for seed in (0, 1):
        (control,) = tmp_path.glob(f"deflow_offline/{TASKS[0]}/seed{seed}/*/eval.csv")
        (o2o,) = tmp_path.glob(f"deflow_o2o/{TASKS[0]}/seed{seed}/*/eval.csv")
        assert control.parent.name == sources[seed].parent.name  # the copy, continued
        assert [int(r["step"]) for r in csv.DictReader(open(control))] == [1, 3, 6, 9, 12]
        assert [int(r["step"]) for r in csv.DictReader(open(o2o))] == [9, 12]
        assert "continuing the deflow_offline.py run" in (o2o.parents[1] / "log.txt").read_text()
    by_group = plot.groups(plot.read_runs([tmp_path]))
    o2o_runs = next(runs for (label, _), runs in by_group.items() if label.startswith("deflow_o2o"))
    assert all(r.steps.tolist() == [1, 3, 6, 9, 12] for r in o2o_runs)  # the offline evaluations, then the online
    (gain,) = plot.online_gain(by_group)
    finals = {group: {r.args["seed"]: r.scores[-1] for r in runs} for (group, _), runs in by_group.items()}
    expected = [finals[gain["o2o"]][s] - finals[gain["control"]][s] for s in (0, 1)]
    assert gain["seeds"] == 2 and gain["at_update"] == 12 and gain["mean"] == pytest.approx(np.mean(expected))
    half = stats.t.ppf(0.975, 1) * np.std(expected, ddof=1) / np.sqrt(2)  # the paired t interval
    assert (gain["low"], gain["high"]) == pytest.approx((np.mean(expected) - half, np.mean(expected) + half))
    plot.main(plot.Args(folders=(str(tmp_path),), out=str(tmp_path / "out")))
    assert "Online gain" in (tmp_path / "out" / "results.md").read_text()

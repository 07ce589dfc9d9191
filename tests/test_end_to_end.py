"""deflow_offline.py as a user runs it: a subprocess on a tiny generated dataset with tiny networks."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY_FLAGS, read_csv, run_script
from tools import evaluate as evaluate_tool

ENV = "cube-single-play-singletask-task1-v0"


def training_numbers(run_dir):
    """Every logged number except wall-clock times."""
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_csv(run_dir / "train.csv")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cube_dataset):
    """Run A (40 updates), its twin A2 (same seed), and B (20 updates, then resumed to 40)."""
    root = tmp_path_factory.mktemp("runs")
    flags = ["--env-name", ENV, "--dataset-path", cube_dataset, "--run-dir", root, "--log-interval", 10,
             "--eval-interval", 20, "--eval-episodes", 2, *TINY_FLAGS]
    out = {}
    for name, steps in (("A", 40), ("A2", 40), ("B", 20)):
        out[name] = run_script(*flags, "--offline-steps", steps, "--exp-name", name)
        out[name + "_dir"] = next(root.glob(f"*__{name}__*"))
    out["resume"] = run_script("--resume", out["B_dir"] / "checkpoint.pt", "--offline-steps", 40)
    return out


def test_run_writes_logs_evaluation_and_checkpoint(runs):
    run_dir = runs["A_dir"]
    evals = read_csv(run_dir / "eval.csv")
    assert [int(r["step"]) for r in evals] == [1, 20, 40]
    assert all(0.0 <= float(r["evaluation/success"]) <= 1.0 for r in evals)
    train = read_csv(run_dir / "train.csv")
    assert [int(r["step"]) for r in train] == [10, 20, 30, 40]
    for name in ("training/critic/critic_loss", "training/actor/bc_flow_loss", "training/actor/distill_loss",
                 "training/actor/alpha_value", "training/actor/q", "training/actor/mse",
                 "validation/critic/critic_loss", "time/epoch_time"):
        assert name in train[0]
    assert (run_dir / "checkpoint.pt").exists()
    assert json.loads((run_dir / "args.json").read_text())["offline_steps"] == 40
    assert "step 20: success " in runs["A"].stdout and "critic_loss" in runs["A"].stdout
    assert "2 evaluation environments side by side" in runs["A"].stdout


def test_same_seed_same_numbers(runs):
    assert training_numbers(runs["A_dir"]) == training_numbers(runs["A2_dir"])
    assert read_csv(runs["A_dir"] / "eval.csv") == read_csv(runs["A2_dir"] / "eval.csv")


def test_resume_continues_exactly(runs):
    assert "resuming" in runs["resume"].stdout and "at step 21" in runs["resume"].stdout
    assert [int(r["step"]) for r in read_csv(runs["B_dir"] / "train.csv")] == [10, 20, 30, 40]
    assert training_numbers(runs["B_dir"]) == training_numbers(runs["A_dir"])  # as if never interrupted


def test_evaluate_tool_repeats_the_runs_evaluation_and_runs_every_sampler(runs, tmp_path):
    """`python -m tools.evaluate CHECKPOINT` with the paper's sampler gives the run's own final evaluation (the same
    episodes, seeds and noise streams); max-q and iterative run on the same checkpoint (here in this process)."""
    checkpoint = str(runs["A_dir"] / "checkpoint.pt")
    result = subprocess.run([sys.executable, "-m", "tools.evaluate", checkpoint, "--episodes", "2", "--out",
                             str(tmp_path / "flow.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "flow.json").read_text())
    assert metrics["step"] == 40 and metrics["sampler"] == "flow"
    final = read_csv(runs["A_dir"] / "eval.csv")[-1]
    assert {k: float(v) for k, v in final.items() if k != "step"} == \
        {k: v for k, v in metrics.items() if k.startswith("evaluation/")}
    for sampler in ("max-q", "iterative"):
        metrics = evaluate_tool.main(evaluate_tool.Args(checkpoint, sampler=sampler, num_samples=4, episodes=1))
        assert metrics["episodes"] == 1 and 0 <= metrics["evaluation/success"] <= 1


@pytest.mark.slow  # generation itself is tested in test_data.py; this is the flag's path through the script
def test_generate_flag_builds_a_missing_dataset(tmp_path):
    path = tmp_path / "gen.npz"
    run_script("--env-name", "puzzle-3x3-play-singletask-v0", "--dataset-path", path, "--generate-episodes", 1,
               "--offline-steps", 2, "--eval-interval", 0, "--run-dir", tmp_path / "runs", *TINY_FLAGS)
    assert path.exists() and (tmp_path / "gen-val.npz").exists()


@pytest.mark.parametrize("flags, message", [
    (["--env-name", "cheetah-run-v0"], "Supported families"),
    (["--env-name", ENV, "--dataset-path", "nowhere/x.npz"], "python -m tools.generate --env-name cube-single-play-v0"),
    (["--resume", "nowhere/checkpoint.pt"], "does not exist"),
])
def test_bad_input_gives_one_clear_line(flags, message):
    result = run_script(*flags, check=False)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_nan_loss_stops_with_step_and_term(tmp_path, cube_dataset):
    flags = ["--env-name", ENV, "--dataset-path", cube_dataset, "--run-dir", tmp_path, "--offline-steps", 20,
             "--log-interval", 10, "--eval-interval", 0, "--save-interval", 10, *TINY_FLAGS]
    result = run_script(*flags, "--lr", "1e30", check=False)  # weights of 1e30 after update 1: inf at update 2
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "training/actor/actor_loss became non-finite at step 2" in result.stderr
    assert "no checkpoint was written in" in result.stderr
    assert not list(tmp_path.glob("*/checkpoint.pt"))  # a diverged model is never saved


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x80\x02 truncated")
    result = run_script("--resume", bad, check=False)
    assert result.returncode != 0 and "corrupt or not a DeFlow checkpoint" in result.stderr


@pytest.mark.parametrize("script", ["deflow_offline.py", "deflow_o2o.py"])
def test_help_documents_every_flag(script):
    import dataclasses
    import importlib

    text = run_script("--help", script=script).stdout
    for field in dataclasses.fields(importlib.import_module(script[:-3]).Args):
        flag = "--" + field.name.replace("_", "-")
        assert f"{flag} " in text or f"{flag}," in text
    assert "target divergence" in text.lower() or "delta" in text

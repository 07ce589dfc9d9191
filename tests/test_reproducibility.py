"""Numbers that can be compared: evaluation episodes independent across runs and evaluations, generated data that
depends only on its own settings, logging that never changes training, and one clear line for the small failures."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.datasets import DatasetError, load_env_and_datasets
from common.generate import generate_dataset
from deflow_offline import evaluate
from tests.conftest import ROOT, TINY_FLAGS, make_envs, read_csv, run_script, tiny_agent

ENV = "cube-single-play-singletask-task1-v0"


def evaluation(seed, step, episodes=4):
    """(metrics, first observations, noise of the first step) of one evaluation: `episodes` side by side, 2 steps."""
    agent, args = tiny_agent(obs_dim=28, action_dim=5)
    seen = []

    def policy(agent, obs, noise, args):
        seen.append((obs.clone(), noise.clone()))
        return noise.clamp(-1, 1)

    args = dataclasses.replace(args, env_name=ENV, seed=seed, eval_episodes=episodes)
    metrics, _ = evaluate(agent, make_envs(episodes, max_episode_steps=2), args, step, policy)
    return metrics, *seen[0]


def shared_rows(a, b):
    return {bytes(row.numpy()) for row in a} & {bytes(row.numpy()) for row in b}


def test_evaluation_episodes_are_independent_across_seeds_and_evaluations_and_reproducible():
    metrics, obs, noise = evaluation(seed=0, step=1)
    assert len(shared_rows(obs, obs)) == 4  # four episodes, four start states
    _, other_seed_obs, other_seed_noise = evaluation(seed=1, step=1)
    assert not shared_rows(obs, other_seed_obs) and not shared_rows(noise, other_seed_noise)
    _, later_obs, later_noise = evaluation(seed=0, step=2)
    assert not shared_rows(obs, later_obs) and not shared_rows(noise, later_noise)
    again = evaluation(seed=0, step=1)
    assert again[0] == metrics and torch.equal(again[1], obs) and torch.equal(again[2], noise)


def test_concurrent_generation_of_one_file_gives_one_valid_file_equal_to_a_lone_one(tmp_path):
    """Two runs (different seeds) ask for the same missing file at once: one generates it, the other waits for it and
    loads it; the file equals one generated alone, and generating in-process leaves numpy's global stream as it was."""
    shared = tmp_path / "shared" / "cube.npz"
    ask = ("import sys, numpy as np; np.random.seed(int(sys.argv[1])); from common.datasets import "
           f"load_env_and_datasets as load; load('{ENV}', dataset_path='{shared}', generate_episodes=1)")
    workers = [subprocess.Popen([sys.executable, "-c", ask, str(seed)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
               for seed in (1, 2)]
    np.random.seed(3)
    before = np.random.get_state()[1].copy()
    alone = generate_dataset(ENV, 1, tmp_path / "alone" / "cube.npz", progress=False)
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's global random state is untouched
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read()[-2000:]
    assert sorted(p.name for p in shared.parent.iterdir()) == ["cube-val.npz", "cube.npz", "cube.npz.lock"]
    for path, lone in zip((shared, shared.with_name("cube-val.npz")), alone):
        with np.load(path) as a, np.load(lone) as b:
            assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
            assert json.loads(str(a["generation"]))["seed"] == 0  # the data seed is recorded in the file


@pytest.fixture(scope="module")
def interval_runs(tmp_path_factory, cube_dataset):
    """30 eager updates of one seed, logged every update / at the end only; and 15 + 15 resumed with another
    interval."""
    root = tmp_path_factory.mktemp("runs")
    flags = ["--env-name", ENV, "--dataset-path", cube_dataset, "--run-dir", root, "--eval-interval", 0, *TINY_FLAGS]
    out = {}
    for name, more in (("every", ["--log-interval", 1]), ("end", ["--log-interval", 0, "--save-interval", 0]),
                       ("half", ["--log-interval", 1, "--offline-steps", 15])):
        run_script(*flags, "--offline-steps", 30, "--exp-name", name, *more)
        out[name] = next(root.glob(f"*__{name}__*"))
    out["resume"] = run_script("--resume", out["half"] / "checkpoint.pt", "--offline-steps", 30, "--log-interval", 7)
    return out


def agent_state(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["agent"]


def test_logging_interval_does_not_change_training(interval_runs):
    every, end = agent_state(interval_runs["every"]), agent_state(interval_runs["end"])
    assert all(torch.equal(every[k], end[k]) for k in every)
    assert len(read_csv(interval_runs["every"] / "train.csv")) == 30
    assert [row["step"] for row in read_csv(interval_runs["end"] / "train.csv")] == ["30"]  # 0: at the end only
    resumed = agent_state(interval_runs["half"])  # 15 updates, then 15 more logged every 7
    assert "resuming" in interval_runs["resume"].stdout and all(torch.equal(every[k], resumed[k]) for k in every)


def test_going_online_past_the_offline_phase_is_refused_clearly(interval_runs):
    result = run_script("--resume", interval_runs["every"] / "checkpoint.pt", "--offline-steps", 20,
                        script="deflow_o2o.py", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "at update 30, past --offline-steps 20" in result.stderr and "--offline-steps 30" in result.stderr


def test_generating_a_dataset_without_an_oracle_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="cannot generate 'antmaze-medium-navigate-v0' locally"):
        load_env_and_datasets("antmaze-medium-navigate-singletask-v0", dataset_path=str(tmp_path / "a.npz"),
                              generate_episodes=1)


def test_more_environments_than_episodes_leaves_the_rest_parked():
    agent, args = tiny_agent(obs_dim=28, action_dim=5)
    args = dataclasses.replace(args, env_name=ENV, seed=0, eval_episodes=1)
    metrics, _ = evaluate(agent, make_envs(3, max_episode_steps=2), args, 1)
    assert metrics["episode.length"] == 2  # one episode; the two environments without one never ran

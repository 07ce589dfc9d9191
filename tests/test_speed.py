"""The fast paths change no math: --compile's training step, and evaluation with environments side by side."""

import numpy as np
import torch

import deflow_offline
from common.envs import EnvPool
from deflow_offline import evaluate, train_step
from tests.conftest import (TINY_FLAGS, assert_compiled_step_equals_eager, random_batch, run_script,
                            tiny_agent)

ENV = "cube-single-play-singletask-task1-v0"


def test_compiled_training_step_equals_eager():
    """A few steps of torch.compile(train_step) against eager from the same state and seed (fewer Euler steps: the
    same graph, compiled sooner)."""
    data = {k: torch.cat([v, v + 0.5]) for k, v in random_batch(batch_size=64).items()}
    state = assert_compiled_step_equals_eager(train_step, lambda: tiny_agent(flow_steps=3), data, tolerance=1e-5)
    assert not torch.equal(state["refine.net.0.weight"], tiny_agent(flow_steps=3)[0].refine.net[0].weight)


def test_side_by_side_evaluation_runs_every_episode_as_if_alone():
    """Episode j gets reset seed + j and its own noise stream wherever it runs. With the noise as the action (a
    batch-independent policy), every (noise, observation) pair must be the same with 1 environment, with 3, and with
    3 stepped in 2 worker processes."""
    agent, args = tiny_agent(obs_dim=28, action_dim=5, script=deflow_offline)
    seen = {}

    def noise_as_action(name):
        def policy(agent, obs, noise, args):
            seen.setdefault(name, []).extend(zip(map(bytes, noise.numpy()), map(bytes, obs.numpy())))
            return noise.clamp(-1, 1)
        return policy

    alone = evaluate(agent, EnvPool(ENV, 1), 4, args, seed=3, policy=noise_as_action("alone"))
    side_by_side = evaluate(agent, EnvPool(ENV, 3), 4, args, seed=3, policy=noise_as_action("side by side"))
    workers = EnvPool(ENV, 3, workers=2)
    in_workers = evaluate(agent, workers, 4, args, seed=3, policy=noise_as_action("workers"))
    workers.close()
    assert alone == side_by_side == in_workers
    assert len(seen["alone"]) == 4 * 200 and set(seen["alone"]) == set(seen["side by side"]) == set(seen["workers"])
    other_seed = evaluate(agent, EnvPool(ENV, 1), 1, args, seed=100, policy=noise_as_action("other"))[0]
    assert other_seed["episode.length"] == 200 and not set(seen["other"]) & set(seen["alone"])


def test_side_by_side_policy_calls_match_one_state_at_a_time():
    """The batched policy call gives each state the action it gets alone (up to float rounding)."""
    agent, args = tiny_agent()
    obs, noise = torch.randn(5, 3), torch.randn(5, 2)
    with torch.no_grad():
        batched = deflow_offline.eval_actions(agent, obs, noise, args)
        alone = torch.cat([deflow_offline.eval_actions(agent, obs[i:i + 1], noise[i:i + 1], args) for i in range(5)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_compile_flag_end_to_end(tmp_path, cube_dataset):
    """deflow_o2o.py --compile through both phases (compiled update and evaluation policy), as a user runs it."""
    result = run_script("--env-name", ENV, "--dataset-path", cube_dataset, "--run-dir", tmp_path, "--offline-steps", 3,
                        "--online-steps", 3, "--log-interval", 3, "--eval-interval", 3, "--eval-episodes", 2,
                        "--flow-steps", 2, "--compile", *TINY_FLAGS, script="deflow_o2o.py", timeout=600)
    assert "--compile: the first update" in result.stdout
    run_dir = next(tmp_path.glob("*__deflow_o2o__*"))
    train = (run_dir / "train.csv").read_text().splitlines()
    assert len(train) == 3 and "nan" not in train[2].split(",")[1]  # steps 3 and 6, finite losses
    assert [line.split(",")[0] for line in (run_dir / "eval.csv").read_text().splitlines()[1:]] == ["1", "3", "6"]


def test_videos_record_the_first_episodes_in_this_process_and_in_workers(tmp_path):
    """--capture-video: the first episodes' rendered frames, the same wherever the environments run, written as mp4."""
    import imageio

    agent, args = tiny_agent(obs_dim=28, action_dim=5, script=deflow_offline)
    results = []
    for workers in (0, 1):
        pool = EnvPool(ENV, 2, workers=workers, max_episode_steps=3)
        results.append(evaluate(agent, pool, 3, args, seed=0, video_episodes=2))
        pool.close()
    (metrics, videos), (metrics_workers, videos_workers) = results
    assert metrics == metrics_workers and metrics["episode.length"] == 3
    assert sorted(videos) == [0, 1] and videos[0].shape == (4, 200, 200, 3)  # the reset frame + 3 steps
    assert all(np.array_equal(videos[j], videos_workers[j]) for j in videos)
    assert not np.array_equal(videos[0][0], videos[0][-1])  # the arm moved
    deflow_offline.write_video(tmp_path / "episode.mp4", videos[0])
    assert [p.name for p in tmp_path.iterdir()] == ["episode.mp4"]  # no temporary file left behind
    assert len(imageio.mimread(tmp_path / "episode.mp4")) == 4

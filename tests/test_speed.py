"""The fast paths change no math: --compile's training step, and evaluation with environments side by side."""

import dataclasses

import numpy as np
import pytest
import torch

import deflow_offline
from common.video import write_videos
from deflow_offline import evaluate, sample_batch
from tests.conftest import (TINY_FLAGS, assert_compiled_update_equals_eager, make_envs, random_batch, run_script,
                            tiny_agent, train_step)

ENV = "cube-single-play-singletask-task1-v0"


def compile_agent():
    """A tiny agent of cube-single's shapes, as in test_compile_flag_end_to_end, with 2 flow steps: compiled sooner."""
    return tiny_agent(obs_dim=28, action_dim=5, flow_steps=2)


@pytest.fixture(scope="module")
def compiled_losses():
    """torch.compile(deflow_losses) as the scripts make it, shared by the tests below (compiling is most of their
    time); they use the same shapes, so it compiles once (twice with the slow test's `mse` draw)."""
    return torch.compile(deflow_offline.deflow_losses)


def random_data(n=1024):
    return random_batch(batch_size=n, obs_dim=28, action_dim=5)


def test_compiled_training_step_equals_eager(compiled_losses):
    """A few steps with the compiled losses against eager from the same state and seed."""
    eager_state = assert_compiled_update_equals_eager(deflow_offline, compile_agent, random_data(), 1e-5,
                                                      compiled_losses, mse_steps=())
    assert not torch.equal(eager_state["refine.net.0.weight"], compile_agent()[0].refine.net[0].weight)


@pytest.mark.slow  # the logging step's graph (with the `mse` rollout) compiles again: about 25 s
def test_compiled_logging_step_equals_eager(compiled_losses):
    assert_compiled_update_equals_eager(deflow_offline, compile_agent, random_data(), 1e-5, compiled_losses)


def test_compiled_training_draws_fresh_independent_noise(compiled_losses, monkeypatch):
    """The real compiled step's randomness: every step draws new noise for its three uses (the TD target's actions, the
    flow-matching x_0, the base actions) and a new t, mutually uncorrelated, N(0, 1) and U[0, 1). The draws are inputs
    of the compiled losses, which use them (other draws, other losses) and draw nothing themselves (same draws, same
    losses). Thresholds are about 4 standard errors of 16 steps of 32 x 5 draws per use."""
    agent, args = compile_agent()
    data = random_data()
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3, fused=True)
    draws, real_update_draws = [], deflow_offline.update_draws
    monkeypatch.setattr(deflow_offline, "update_draws", lambda *a, **k: draws.append(real_update_draws(*a, **k)) or
                        draws[-1])
    for _ in range(16):
        train_step(deflow_offline, agent, optimizer, sample_batch(data, args.batch_size), args, losses=compiled_losses)
    assert len(draws) == 16
    uses = {name: torch.stack([d[name] for d in draws]) for name in ("next_base_noise", "x_0", "base_noise")}
    for name, x in uses.items():  # (16 steps, 32, 5)
        assert abs(x.mean()) < 0.08 and abs(x.var() - 1) < 0.12, name
        assert abs(torch.corrcoef(x.flatten(1)).fill_diagonal_(0)).max() < 0.4, f"{name} repeats across steps"
    flat = torch.stack([x.flatten() for x in uses.values()])
    assert abs(torch.corrcoef(flat).fill_diagonal_(0)).max() < 0.08, "the three uses are correlated"
    t = torch.stack([d["t"] for d in draws]).flatten()  # 512 draws
    assert t.min() >= 0 and t.max() < 1 and abs(t.mean() - 0.5) < 0.05 and abs(t.var() - 1 / 12) < 0.02
    assert abs(torch.corrcoef(torch.stack([t, uses["x_0"][..., 0].flatten()]))[0, 1]) < 0.2

    batch = deflow_offline.sample_batch(data, args.batch_size)
    with torch.no_grad():
        first, again = (compiled_losses(agent, batch, draws[0], args)[1] for _ in range(2))
        other = compiled_losses(agent, batch, draws[1], args)[1]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["actor/bc_flow_loss"] != other["actor/bc_flow_loss"]
    assert first["critic/critic_loss"] != other["critic/critic_loss"]


def test_side_by_side_evaluation_runs_every_episode_as_if_alone():
    """Episode j gets its own reset seed and noise stream wherever it runs. With the noise as the action (a
    batch-independent policy), every (noise, observation) pair must be the same with 1 environment, with 3, and with
    3 in worker processes (gymnasium's AsyncVectorEnv)."""
    agent, args = tiny_agent(obs_dim=28, action_dim=5, script=deflow_offline)
    seen = {}

    def noise_as_action(name):
        def policy(agent, obs, noise, args):
            seen.setdefault(name, []).extend(zip(map(bytes, noise.numpy()), map(bytes, obs.numpy())))
            return noise.clamp(-1, 1)
        return policy

    args = dataclasses.replace(args, env_name=ENV, seed=3, eval_episodes=4)
    alone = evaluate(agent, make_envs(1), args, 1, noise_as_action("alone"))
    side_by_side = evaluate(agent, make_envs(3), args, 1, noise_as_action("side by side"))
    workers = make_envs(3, workers=True)
    in_workers = evaluate(agent, workers, args, 1, noise_as_action("workers"))
    assert len(workers.processes) == 3
    workers.close()
    assert alone == side_by_side == in_workers
    assert len(seen["alone"]) == 4 * 200 and set(seen["alone"]) == set(seen["side by side"]) == set(seen["workers"])
    other_seed = evaluate(agent, make_envs(1), dataclasses.replace(args, seed=100, eval_episodes=1), 1,
                          noise_as_action("other"))[0]
    assert other_seed["episode.length"] == 200 and not set(seen["other"]) & set(seen["alone"])


def test_side_by_side_policy_calls_match_one_state_at_a_time():
    """The batched policy call gives each state the action it gets alone (up to float rounding)."""
    agent, args = tiny_agent()
    obs, noise = torch.randn(5, 3), torch.randn(5, 2)
    with torch.no_grad():
        batched = deflow_offline.sample_actions(agent, obs, noise, args)
        alone = torch.cat([deflow_offline.sample_actions(agent, obs[i:i + 1], noise[i:i + 1], args)
                           for i in range(5)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


@pytest.mark.slow  # compiles in a subprocess again; compiled == eager is checked above in the default run
def test_compile_flag_end_to_end(tmp_path, cube_dataset):
    """deflow_o2o.py --compile through both phases (compiled update and evaluation policy), as a user runs it."""
    result = run_script("--env-name", ENV, "--dataset-path", cube_dataset, "--run-dir", tmp_path, "--offline-steps", 3,
                        "--online-steps", 3, "--log-interval", 3, "--eval-interval", 3, "--eval-episodes", 2,
                        "--flow-steps", 2, *TINY_FLAGS, "--compile", script="deflow_o2o.py", timeout=600)
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
    for workers in (False, True):
        envs = make_envs(2, workers=workers, max_episode_steps=3, video=True)
        args = dataclasses.replace(args, env_name=ENV, seed=0, eval_episodes=3)
        results.append(evaluate(agent, envs, args, 1, video_episodes=2))
        envs.close()
    (metrics, videos), (metrics_workers, videos_workers) = results
    assert metrics == metrics_workers and metrics["episode.length"] == 3
    assert sorted(videos) == [0, 1] and videos[0].shape == (4, 200, 200, 3)  # the reset frame + 3 steps
    assert all(np.array_equal(videos[j], videos_workers[j]) for j in videos)
    assert not np.array_equal(videos[0][0], videos[0][-1])  # the arm moved
    write_videos(tmp_path / "videos", {0: videos[0]}, step=7)
    assert [p.name for p in (tmp_path / "videos").iterdir()] == ["step00000007_episode0.mp4"]  # no temporary file
    assert len(imageio.mimread(tmp_path / "videos" / "step00000007_episode0.mp4")) == 4

"""Shared fixtures: tiny networks, and a tiny real OGBench dataset made with the ogbench oracles."""

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import deflow_offline
from common.generate import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MUJOCO_GL", "egl")  # the tests render (visual datasets, videos) without a display
if "PYTEST_XDIST_WORKER" in os.environ:  # pytest -n N: N test processes share the cores, one thread each (with the
    os.environ["OMP_NUM_THREADS"] = "1"  # scripts they start), or their OpenMP threads would wait on each other
    torch.set_num_threads(1)
# bfloat16 matmuls are native on CUDA and on CPUs with AVX-512 BF16 or AMX; elsewhere they are emulated, many times
# slower than float32, and the tests that train in bfloat16 skip.
NATIVE_BF16 = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
TINY_NETS = dict(actor_hidden_dims=(32, 32), refine_hidden_dims=(32, 32), value_hidden_dims=(32, 32))
TINY_FLAGS = ["--actor-hidden-dims", "32", "32", "--refine-hidden-dims", "32", "32", "--value-hidden-dims", "32", "32",
              "--batch-size", "32", "--no-compile"]


def tiny_args(script=deflow_offline, **overrides):
    """The script's Args with tiny networks; `script` is the imported module (deflow_offline or deflow_o2o)."""
    return dataclasses.replace(script.Args(), **{"batch_size": 32, **TINY_NETS, **overrides})


def tiny_agent(obs_dim=3, action_dim=2, seed=0, script=deflow_offline, **overrides):
    torch.manual_seed(seed)
    args = tiny_args(script, **overrides)
    return script.DeFlowAgent(obs_dim, action_dim, args), args


def random_batch(batch_size=32, obs_dim=3, action_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "observations": torch.randn(batch_size, obs_dim, generator=g),
        "actions": torch.rand(batch_size, action_dim, generator=g) * 2 - 1,
        "rewards": -torch.rand(batch_size, generator=g),
        "masks": torch.ones(batch_size),
        "next_observations": torch.randn(batch_size, obs_dim, generator=g),
    }


def draw_batch(script, data: dict, args):
    """A training batch drawn as the script's loop draws it (pixels: stacked and shifted frames)."""
    if script.__name__ == "deflow_pixels":
        return script.sample_batch(data, args.batch_size, args.frame_stack, args.p_aug)
    return script.sample_batch(data, args.batch_size)


def train_step(script, agent, optimizer, batch, args, log_rng=None, losses=None, train_flow=None):
    """One update as the script's loop does it: the draws (the logged mse's from log_rng), the losses (default:
    script.deflow_losses; under --precision bf16 in autocast), update(); returns the metrics."""
    draws = script.update_draws(*batch["actions"].shape, batch["actions"].device, mse_rng=log_rng)
    flow = () if train_flow is None else (train_flow,)
    with torch.autocast(batch["actions"].device.type, torch.bfloat16, enabled=args.precision == "bf16"):
        loss, metrics = (losses or script.deflow_losses)(agent, batch, draws, args, *flow)
    script.update(agent, optimizer, loss, args)
    return metrics


def make_envs(num_envs, workers=False, max_episode_steps=None, video=False,
              env_name="cube-single-play-singletask-task1-v0"):
    """The scripts' evaluation environments (deflow_offline.make_eval_envs) with these settings."""
    settings = SimpleNamespace(env_name=env_name, eval_workers=workers, capture_video=video,
                               eval_max_episode_steps=max_episode_steps)
    return deflow_offline.make_eval_envs(settings, num_envs)


def losses_of(agent, batch, args, script=deflow_offline, with_mse=False):
    """script.deflow_losses on `batch` with fresh draws from the global torch stream (the mse's too)."""
    draws = script.update_draws(*batch["actions"].shape, batch["actions"].device,
                                mse_rng=torch.default_generator if with_mse else None)
    return script.deflow_losses(agent, batch, draws, args)


def assert_compiled_update_equals_eager(script, make_agent, data: dict, tolerance: float, compiled=None,
                                        mse_steps=(2,)):
    """Three training steps with `compiled` (default: torch.compile(script.deflow_losses)) against the eager losses,
    from the same state and seed: the same losses, the same parameters. The batches and the noise are drawn outside
    the compiled losses, so both runs see the same random numbers. `make_agent()` returns a fresh (agent, args);
    the steps in `mse_steps` are logging steps (with the `mse` metric's rollout: another compiled graph). Returns the
    eager run's final state."""
    results = []
    for losses in (script.deflow_losses, compiled or torch.compile(script.deflow_losses)):
        agent, args = make_agent()
        optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3, fused=True)
        torch.manual_seed(7)
        log_rng = torch.Generator().manual_seed(8)
        metrics = [train_step(script, agent, optimizer, draw_batch(script, data, args), args,
                              log_rng=log_rng if step in mse_steps else None, losses=losses) for step in range(3)]
        results.append((metrics, agent.state_dict()))
    (eager_metrics, eager_state), (compiled_metrics, compiled_state) = results
    for eager, compiled in zip(eager_metrics, compiled_metrics):
        assert eager.keys() == compiled.keys()
        for name in eager:
            torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=tolerance, msg=name)
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-4, atol=tolerance, msg=name)
    return eager_state


def read_csv(path) -> list[dict]:
    """The rows of a run's train.csv or eval.csv."""
    with open(path) as f:
        return list(csv.DictReader(f))


def run_script(*flags, check=True, timeout=300, script="deflow_offline.py"):
    """Run a training script as a user would; return the CompletedProcess (stdout and stderr as text)."""
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, flags)], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def run_straight_and_killed(tmp_path, flags, line, script="deflow_offline.py"):
    """The run of `flags` straight (in tmp_path/straight) and once more (in tmp_path/killed), killed with SIGKILL as
    soon as it prints a line starting with `line`: their run folders."""
    run_script(*flags, "--run-dir", tmp_path / "straight", script=script)
    command = [sys.executable, str(ROOT / script), *map(str, flags), "--run-dir", str(tmp_path / "killed")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for printed in process.stdout:
        if printed.startswith(line):
            process.kill()
            break
    process.wait(timeout=60)
    (straight,), (killed,) = (tmp_path / "straight").iterdir(), (tmp_path / "killed").iterdir()
    return straight, killed


@pytest.fixture(scope="session")
def cube_dataset(tmp_path_factory) -> Path:
    """2 train + 1 val cube-single 'play' episodes of 60 steps, generated by the real oracle."""
    path = tmp_path_factory.mktemp("data") / "cube-single-play-tiny.npz"
    generate_dataset("cube-single-play-v0", episodes=2, out=path, episode_length=60, progress=False)
    return path


@pytest.fixture(scope="session")
def visual_dataset(tmp_path_factory) -> Path:
    """2 train + 1 val visual-cube-single 'play' episodes of 12 frames (64x64x3), rendered by MuJoCo on the CPU."""
    path = tmp_path_factory.mktemp("data") / "visual-cube-single-play-tiny.npz"
    generate_dataset("visual-cube-single-play-v0", episodes=2, out=path, episode_length=12, progress=False)
    return path

"""Evaluation environments side by side on gymnasium.vector, autoreset off: evaluate() resets each episode with a seed
of its own (reset(seed=[...], options={"reset_mask": ...})); one with no episode left to run is parked."""

from __future__ import annotations

import ctypes

import gymnasium
from gymnasium.vector import AutoresetMode

from common.datasets import make_env


class EvaluationEnv(gymnasium.Wrapper):
    """Environment `index` of a vector: reset option "park" (a boolean array over the vector) parks it until its next
    reset, simulating nothing. Its info keeps only `success`: all evaluation reads (the rest is slow to gather)."""

    def __init__(self, env, index):
        super().__init__(env)
        self.index, self.parked, self.obs = index, False, env.observation_space.sample()  # (parked: never read)

    def reset(self, *, seed=None, options=None):
        self.parked = bool(options["park"][self.index])
        if not self.parked:
            self.obs, _ = self.env.reset(seed=seed)
        return self.obs, {}

    def step(self, action):
        if self.parked:
            return self.obs, 0.0, False, False, {}
        self.obs, reward, terminated, truncated, info = self.env.step(action)
        return self.obs, reward, terminated, truncated, {k: float(info[k]) for k in ("success",) if k in info}


def _make(env_name: str, index: int, max_episode_steps: int | None, frame_stack: int, record: bool):
    env = make_env(env_name, max_episode_steps)
    if frame_stack > 1:  # the last frame_stack observations, the reset one repeated at first
        env = gymnasium.wrappers.FrameStackObservation(env, frame_stack, padding_type="reset")
    try:  # MuJoCo's model compilation frees scratch memory that glibc keeps (~20 MB an environment) unless told
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # no glibc
        pass
    env = EvaluationEnv(env, index)
    if record:
        from common.video import VideoFrames

        env = VideoFrames(env, index)
    return env


def resident_gb(pid: int | str = "self") -> float:
    """Resident memory of a process in GB, from /proc (Linux); 0.0 elsewhere."""
    try:
        return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:")) / 1e6
    except (OSError, StopIteration):
        return 0.0


def make_eval_envs(env_name: str, num_envs: int, workers: bool = False, max_episode_steps: int | None = None,
                   frame_stack: int = 1, record: bool = False):
    """`num_envs` environments of `env_name` (observations: the last `frame_stack`, stacked on a new first axis;
    `record`: able to record videos) in a SyncVectorEnv, or with `workers` an AsyncVectorEnv (a process each).
    Returns (envs, a line on where they are and the resident memory they added)."""
    fns = [lambda i=i: _make(env_name, i, max_episode_steps, frame_stack, record) for i in range(num_envs)]
    before, where = resident_gb(), f"in {num_envs} worker processes" if workers else "in this process"
    if workers:
        envs = gymnasium.vector.AsyncVectorEnv(fns, context="spawn", autoreset_mode=AutoresetMode.DISABLED)
    else:
        envs = gymnasium.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
    memory = sum(resident_gb(p.pid) for p in envs.processes) if workers else resident_gb() - before
    return envs, f"{num_envs} evaluation environments side by side {where} ({memory:.2f} GB resident)"

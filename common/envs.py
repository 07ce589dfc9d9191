"""Evaluation environments side by side on gymnasium.vector, autoreset off, and the bookkeeping of the episodes run on
them (EvaluationEpisodes): each resets with a seed of its own (reset(seed=[...], options={"reset_mask": ...})); an
environment with no episode left to run is parked."""

from __future__ import annotations

import ctypes

import gymnasium
import numpy as np
import torch
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


class EvaluationEpisodes:
    """`num_episodes` episodes on `envs` (make_eval_envs's), envs.num_envs at a time, each started as soon as an
    environment is free. Episode j resets with the seed, and draws its policy noise (*noise_shape, A) from the
    generator, that SeedSequence([seed, step, j]) gives, whatever runs beside it; the first `video_episodes` are
    recorded. Iterating gives, once per step, the running episodes' observations and noise (in a fixed order) until
    all have ended; step(actions) takes their actions in that order. Then metrics() and videos {episode: frames}."""

    def __init__(self, envs, num_episodes: int, seed: int, step: int, video_episodes: int = 0, noise_shape=()):
        self.envs, self.words, self.noise_shape = envs, [seed, step], (*noise_shape, *envs.single_action_space.shape)
        self.todo, self.running, self.results, self.videos = iter(range(num_episodes)), {}, [], {}
        self.free, self.record = np.ones(envs.num_envs, dtype=bool), np.arange(envs.num_envs) < video_episodes

    def __iter__(self):
        while True:
            seeds = [None] * self.envs.num_envs
            for i in np.flatnonzero(self.free):  # running: environment -> its episode, in start order
                if (j := next(self.todo, None)) is not None:
                    reset_seed, noise_seed = np.random.SeedSequence([*self.words, j]).generate_state(2)
                    seeds[i] = int(reset_seed)
                    noise = torch.Generator().manual_seed(int(noise_seed))
                    self.running[i] = {"episode": j, "noise": noise, "return": 0.0, "length": 0}
            if not self.running:
                return
            if self.free.any():  # a new episode on each free environment; where none is left, park it
                park = self.free & np.array([s is None for s in seeds])
                options = {"reset_mask": self.free, "park": park, "record": self.record}
                self.obs, _ = self.envs.reset(seed=seeds, options=options)
                self.free[:], self.record[:] = False, False
            noise = [torch.randn(self.noise_shape, generator=e["noise"]) for e in self.running.values()]
            yield self.obs[list(self.running)], torch.stack(noise)

    def step(self, actions: np.ndarray) -> None:
        running = list(self.running)
        all_actions = np.zeros(self.envs.action_space.shape, dtype=np.float32)  # (parked: ignored)
        all_actions[running] = actions
        self.obs, rewards, terminated, truncated, info = self.envs.step(all_actions)
        for i in running:
            e = self.running[i]
            e["return"], e["length"] = e["return"] + rewards[i], e["length"] + 1
            if terminated[i] or truncated[i]:
                success = info["success"][i] if "success" in info else np.nan  # at the last step, as OGBench
                self.results.append((success, e["return"], e["length"]))
                if "frames" in info and info["_frames"][i]:
                    self.videos[e["episode"]] = np.stack(info["frames"][i])
                self.free[i] = True
                del self.running[i]

    def metrics(self) -> dict:
        success, episode_return, length = np.mean(self.results, axis=0)
        return {"success": float(success), "episode.return": float(episode_return), "episode.length": float(length)}

"""Evaluation environments side by side: a fixed set of environments, stepped in this process or in worker processes.

The scripts' evaluate() starts episode j on a free environment with reset(i, seed + j) and steps every running one
with one batched policy call; EnvPool only does the stepping, in `workers` processes when the machine has cores to
spare (environment i lives in worker i % workers). Results do not depend on `workers`.
"""

from __future__ import annotations

import ctypes
import multiprocessing

import numpy as np

from common.datasets import make_env


def _step(env, action) -> tuple:
    obs, reward, terminated, truncated, info = env.step(action)
    return obs, float(reward), bool(terminated), bool(truncated), float(info.get("success", np.nan))


def _handle(envs: list, command: str, payload: dict) -> dict:
    """Run one command on the environments named in `payload` ({index into envs: argument}); the same in a worker."""
    if command == "reset":
        return {i: envs[i].reset(seed=seed)[0] for i, seed in payload.items()}
    if command == "step":
        return {i: _step(envs[i], action) for i, action in payload.items()}
    return {i: envs[i].render() for i in payload}  # "render"


def _make_envs(env_name: str, count: int, max_episode_steps: int | None) -> list:
    envs = []
    for _ in range(count):
        envs.append(make_env(env_name, max_episode_steps))
        try:  # MuJoCo's model compilation frees its scratch memory, which glibc keeps (~20 MB per environment) unless
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # given back like this
        except (OSError, AttributeError):  # no glibc: nothing to give back this way
            pass
    return envs


def _worker(env_name: str, count: int, max_episode_steps: int | None, connection) -> None:
    envs = _make_envs(env_name, count, max_episode_steps)
    connection.send("ready")
    while (message := connection.recv())[0] != "close":
        connection.send(_handle(envs, *message))


def resident_gb(pid: int | str = "self") -> float:
    """Resident memory of a process in GB, from /proc (Linux); 0.0 where that is not available."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1e6
    except (OSError, StopIteration, ValueError):
        return 0.0


class EnvPool:
    """`memory_gb`: the resident memory the pool added, measured when it was made (its environments in this process,
    or its worker processes whole); about 0.15-0.2 GB per manipulation environment. Episodes started with
    reset(..., record=...) are recorded frame by frame for videos (`video(i)`): MuJoCo renders of state-based
    environments, the observations themselves (the frames the agent sees) of visual ones."""

    def __init__(self, env_name: str, num_envs: int, workers: int = 0, max_episode_steps: int | None = None):
        self.num_envs, self.workers, self.connections = num_envs, min(workers, num_envs), []
        self.visual, self.frames = env_name.startswith("visual-"), {}  # env index -> recorded frames
        if self.workers == 0:
            before = resident_gb()
            self.envs = _make_envs(env_name, num_envs, max_episode_steps)
            self.memory_gb = resident_gb() - before
            return
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: safe next to torch's threads
        processes = []
        for w in range(self.workers):
            parent, child = context.Pipe()
            count = len(range(w, num_envs, self.workers))
            processes.append(context.Process(target=_worker, args=(env_name, count, max_episode_steps, child),
                                             daemon=True))
            processes[-1].start()
            self.connections.append(parent)
        for connection in self.connections:
            connection.recv()  # "ready": the worker has made its environments
        self.memory_gb = sum(resident_gb(process.pid) for process in processes)

    def describe(self) -> str:
        if self.num_envs == 0:
            return "no evaluation"
        where = "in this process"
        if self.workers:
            where = f"in {self.workers} worker process{'es' if self.workers > 1 else ''}"
        return (f"{self.num_envs} evaluation environments side by side {where} ({self.memory_gb:.2f} GB resident; "
                "--eval-envs sets how many)")

    def _call(self, command: str, payload: dict) -> dict:
        """Run `command` on the environments in `payload` ({env index: value}): here, or each worker its part."""
        if self.workers == 0:
            return _handle(self.envs, command, payload)
        parts = [{} for _ in self.connections]
        for i, value in payload.items():
            parts[i % self.workers][i // self.workers] = value
        for connection, part in zip(self.connections, parts):
            connection.send((command, part))
        out = {}
        for w, connection in enumerate(self.connections):
            out.update({local * self.workers + w: result for local, result in connection.recv().items()})
        return out

    def reset(self, seeds: dict[int, int], record=()) -> dict[int, np.ndarray]:
        """{env index: seed} -> {env index: first observation}; the episodes of the indices in `record` are recorded."""
        observations = self._call("reset", seeds)
        self.frames.update({i: [] if i in record else None for i in seeds})
        self._record(observations)
        return observations

    def step(self, actions: dict[int, np.ndarray]) -> dict[int, tuple]:
        """{env index: action} -> {env index: (obs, reward, terminated, truncated, success)}."""
        results = self._call("step", actions)
        self._record({i: result[0] for i, result in results.items()})
        return results

    def _record(self, observations: dict[int, np.ndarray]) -> None:
        recorded = [i for i in observations if self.frames.get(i) is not None]
        if recorded:
            frames = {i: observations[i] for i in recorded} if self.visual else self.render(recorded)
            for i, frame in frames.items():
                self.frames[i].append(frame)

    def render(self, indices: list[int]) -> dict[int, np.ndarray]:
        """{env index: RGB frame (H, W, 3) uint8 of its current state}."""
        return self._call("render", dict.fromkeys(indices))

    def video(self, i: int) -> np.ndarray | None:
        """The frames (T, H, W, 3) of environment i's episode since its last reset, if that one was recorded."""
        frames = self.frames.pop(i, None)
        return np.stack(frames) if frames else None

    def close(self) -> None:
        for connection in self.connections:
            connection.send(("close", None))

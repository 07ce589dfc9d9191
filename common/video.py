"""--capture-video: the frames of the first evaluation episodes, and the mp4 files they become. Imported only then."""

from __future__ import annotations

import os
from pathlib import Path

import gymnasium
import numpy as np


class VideoFrames(gymnasium.Wrapper):
    """Environment `index` of a vector of EvaluationEnv's: reset option "record" (a boolean array over the vector)
    records its episode, frame by frame (a render; visual environments: the newest frame the agent sees), returned as
    info["frames"] at the episode's end (a list: episodes of other lengths may end at the same step)."""

    def __init__(self, env, index):
        super().__init__(env)
        self.index, self.frames = index, None

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.frames = [] if options["record"][self.index] else None
        return obs, self._record(obs, info, False)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, self._record(obs, info, terminated or truncated)

    def _record(self, obs, info, done):
        if self.frames is None:
            return info
        self.frames.append(self.env.render() if obs.ndim == 1 else obs[..., -3:])  # pixels: the newest frame
        return {**info, "frames": self.frames} if done else info


def write_videos(folder: Path, videos: dict[int, np.ndarray], step: int) -> None:
    """{episode: frames (T, H, W, 3) uint8} -> folder/step<step>_episode<j>.mp4 (H.264, imageio's ffmpeg)."""
    import imageio

    folder.mkdir(exist_ok=True)
    for episode, frames in videos.items():
        path = folder / f"step{step:08d}_episode{episode}.mp4"
        tmp = path.with_name(f".tmp-{path.name}")  # keeps the .mp4 suffix, which tells ffmpeg the format
        imageio.mimwrite(tmp, list(frames), fps=15, macro_block_size=1)
        os.replace(tmp, path)

"""Generate an OGBench dataset locally (no internet needed) with the oracles shipped in the `ogbench` package
(common/generate.py, which the scripts' --generate-episodes also run):

    python -m tools.generate --env-name cube-single-play-v0 --episodes 100 --num-workers 2 \
        --out data/cube-single-play-100ep.npz
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

from common.generate import generate_dataset


@dataclasses.dataclass
class GenerateArgs:
    """Generate an OGBench dataset locally (no internet needed) with the oracles shipped in `ogbench`."""

    env_name: str = "cube-single-play-v0"
    """dataset name (cube-single-play-v0, scene-play-v0, puzzle-3x3-play-v0, pointmaze-medium-navigate-v0, ...)
    or any single-task name of it (cube-single-play-singletask-task2-v0)"""
    episodes: int = 1000
    """training episodes (the official datasets have 1000); validation gets episodes // 10 more (at least 1)"""
    out: str = "data/cube-single-play-v0.npz"
    """training file to write (must end in .npz); the validation file goes next to it as *-val.npz"""
    num_workers: int = 1
    """parallel processes (one environment each); the output does not depend on it"""
    episode_length: int = 1001
    """environment steps per episode (1001 in every official dataset)"""
    seed: int = 0
    """data seed; episode i is seeded from (seed, i). The training scripts' --generate-episodes always use 0"""


def main() -> None:
    import tyro

    args = tyro.cli(GenerateArgs)
    os.environ.setdefault("MUJOCO_GL", "egl")  # visual datasets are rendered; without a display, through EGL
    try:
        train_path, val_path = generate_dataset(args.env_name, args.episodes, args.out, args.num_workers,
                                                args.episode_length, args.seed)
    except ValueError as e:
        sys.exit(f"error: {e}")
    for path in (train_path, val_path):
        with np.load(path) as f:
            print(f"wrote {path}: {len(f['actions'])} transitions, keys {sorted(f.keys())}")


if __name__ == "__main__":
    main()

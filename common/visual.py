"""Visual OGBench datasets for deflow_pixels.py: 12 GB of uint8 frames per 1M steps, streamed from the .npz straight
into one tensor on the training device, each frame stored once (no next_observations copy), optionally only the first
fraction of the episodes, after a memory check; rewards and masks come from OGBench's own `relabel_dataset`, the
function `make_env_and_datasets` calls for state datasets (common/datasets.py).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from common.datasets import (ACTION_CLIP_EPS, DatasetError, available_memory, check_finite, check_shapes,  # noqa: F401
                             generation_command, make_env, npz_header, resolve_files, single_task_gym_id, val_path)

WORKING_MEMORY = 2 * 2**30  # kept free next to the frames for the networks, optimizer state and activations


def _read_rows(path: Path, key: str, rows: int, out=None, chunk_bytes: int = 2**28):
    """The first `rows` rows of one .npz array; streamed into the torch tensor `out` chunk by chunk when given."""
    import torch

    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        old = np.lib.format.read_magic(f) == (1, 0)
        shape, fortran_order, dtype = (np.lib.format.read_array_header_1_0 if old else
                                       np.lib.format.read_array_header_2_0)(f)
        if fortran_order or rows > shape[0]:
            raise ValueError(f"'{key}' is Fortran-ordered or has fewer than {rows} rows")
        row_bytes = dtype.itemsize * int(np.prod(shape[1:]))
        if out is None:
            return np.frombuffer(f.read(rows * row_bytes), dtype=dtype).reshape(rows, *shape[1:]).copy()
        step = max(1, chunk_bytes // max(row_bytes, 1))
        for start in range(0, rows, step):
            n = min(step, rows - start)
            chunk = np.frombuffer(f.read(n * row_bytes), dtype=dtype).reshape(n, *shape[1:])
            out[start : start + n].copy_(torch.from_numpy(chunk.copy()))
        return out


def _kept_frames(terminals: np.ndarray, fraction: float) -> int:
    """Frames in the first `fraction` of the episodes (at least one episode); episodes end where terminals is 1."""
    ends = np.flatnonzero(terminals) + 1
    if len(ends) == 0 or ends[-1] != len(terminals):
        ends = np.append(ends, len(terminals))
    return int(ends[max(1, int(np.ceil(fraction * len(ends)))) - 1])


def episode_starts(terminals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, valid) of a file's frames from its terminals (1 on the last frame of each episode): each frame's
    episode's first frame, and the frames with a next frame in their episode (the transitions t -> t + 1)."""
    terminals = terminals.astype(bool)
    terminals[-1] = True  # (the file's last frame ends an episode, whatever it says)
    first = np.concatenate([[0], np.flatnonzero(terminals[:-1]) + 1])
    starts = np.zeros(len(terminals), dtype=np.int64)
    starts[first] = first
    return np.maximum.accumulate(starts), np.flatnonzero(~terminals)


def load_visual_datasets(env_name: str, device, dataset_dir: str = "~/.ogbench/data", dataset_path: str | None = None,
                         generate_episodes: int = 0, num_workers: int = 1, fraction: float = 1.0):
    """Return (env, train, val, report) for a visual-* task; train and val are dicts of tensors on `device`:

    frames (N, H, W, 3) uint8, every stored frame once; actions (N, A), rewards (N,), masks (N,) per frame;
    starts (N,) the first frame of each frame's episode (frame stacking clamps to it); valid (M,) the frames that have
    a next frame in their episode, i.e. the transitions (frame t -> t + 1). `fraction` keeps the first part of the
    episodes of both files. Raises DatasetError when the data will not fit on `device`, naming a fraction that does.
    """
    import torch
    from ogbench.relabel_utils import relabel_dataset

    env = make_env(env_name)
    obs_shape, act_shape = env.observation_space.shape, env.action_space.shape
    if len(obs_shape) != 3:
        raise DatasetError(f"{env_name} has state observations {obs_shape}; train it with deflow_offline.py "
                           "(deflow_pixels.py is for the visual-* environments)")
    if not 0 < fraction <= 1:
        raise DatasetError(f"--dataset-fraction must be in (0, 1] (got {fraction})")
    train_path = resolve_files(env_name, dataset_dir, dataset_path, generate_episodes, num_workers)
    regenerate = generation_command(env_name, str(train_path)) if dataset_path else f"rm {train_path}*  # then rerun"
    paths = {"train": train_path, "val": val_path(train_path)}
    try:
        kept = {}
        for split, path in paths.items():
            check_shapes(path, env_name, obs_shape, act_shape, regenerate)
            kept[split] = _kept_frames(_read_rows(path, "terminals", npz_header(path, "terminals")[0][0]), fraction)
        frame_bytes = int(np.prod(obs_shape))
        needed = sum(kept.values()) * frame_bytes + WORKING_MEMORY
        full = sum(npz_header(p, "observations")[0][0] for p in paths.values()) * frame_bytes + WORKING_MEMORY
        free = available_memory(device)
        report = (f"{sum(kept.values()):,} frames of {'x'.join(map(str, obs_shape))} uint8 = "
                  f"{(needed - WORKING_MEMORY) / 2**30:.2f} GiB on {device} (+{WORKING_MEMORY / 2**30:.0f} GiB "
                  f"working memory; {free / 2**30:.1f} GiB free)")
        if needed > free:
            fit = np.floor(100 * fraction * (free - WORKING_MEMORY) / (needed - WORKING_MEMORY)) / 100
            raise DatasetError(
                f"the dataset does not fit: {report}. The whole dataset needs {full / 2**30:.1f} GiB. Train on part "
                f"of it with --dataset-fraction {fit:.2f}" + (" (or less)" if fit > 0 else " or free memory first")
                + ", or use a device with more memory (--device)."
            )
        data = {}
        for split, path in paths.items():
            n = kept[split]
            frames = torch.empty((n, *obs_shape), dtype=torch.uint8, device=device)
            _read_rows(path, "observations", n, out=frames)
            with zipfile.ZipFile(path) as zf:
                info_keys = [k for k in ("qpos", "button_states") if f"{k}.npy" in zf.namelist()]
            raw = {k: _read_rows(path, k, n) for k in ["terminals", *info_keys]}
            relabel_dataset(single_task_gym_id(env_name), env, raw)  # OGBench's rewards and masks for the task
            actions = np.clip(_read_rows(path, "actions", n), -1 + ACTION_CLIP_EPS, 1 - ACTION_CLIP_EPS)
            check_finite({"actions": actions, "rewards": raw["rewards"]}, str(path))
            starts, valid = episode_starts(raw["terminals"])
            as_tensor = lambda x, dtype: torch.as_tensor(np.asarray(x), dtype=dtype, device=device)  # noqa: E731
            data[split] = {"frames": frames, "actions": as_tensor(actions, torch.float32),
                           "rewards": as_tensor(raw["rewards"], torch.float32),
                           "masks": as_tensor(raw["masks"], torch.float32),
                           "starts": as_tensor(starts, torch.long), "valid": as_tensor(valid, torch.long)}
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError, OSError) as e:
        raise DatasetError(
            f"dataset {train_path} (or its -val file) is corrupt or not an OGBench dataset "
            f"({type(e).__name__}: {e}). Delete it and make it again:\n    {regenerate}"
        ) from None
    return env, data["train"], data["val"], report

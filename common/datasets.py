"""Load an OGBench single-task environment and its datasets, with errors that say how to fix them.

State datasets take the official path: `ogbench.make_env_and_datasets(env_name, dataset_path=...)` builds the
single-task environment and relabels rewards and masks for its task, so a locally generated file (see
`common/generate.py`) and a downloaded one go through the same code. Dataset actions are clipped to
[-1 + 1e-5, 1 - 1e-5], as the official code does before training.

Visual datasets (`load_visual_datasets`) are 12 GB of uint8 frames per 1M steps. They are streamed from the .npz
straight into one tensor on the training device, each frame stored once (no next_observations copy), optionally only
the first fraction of the episodes, after a memory check; rewards and masks come from OGBench's own `relabel_dataset`,
the function `make_env_and_datasets` calls.
"""

from __future__ import annotations

import fcntl
import os
import socket
import urllib.error
import zipfile
from pathlib import Path

import numpy as np

from common import d4rl
from common.generate import dataset_name_of, generate_dataset, generation_command

ACTION_CLIP_EPS = 1e-5
FAMILIES = ("antmaze", "humanoidmaze", "antsoccer", "pointmaze", "cube", "scene", "puzzle")
KEYS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")


class DatasetError(RuntimeError):
    """A problem with the environment name or the dataset files; the message says how to fix it."""


def single_task_gym_id(env_name: str) -> str:
    """'cube-single-play-singletask-task2-v0' -> 'cube-single-singletask-task2-v0', checked against OGBench's registry."""
    import gymnasium

    import ogbench  # noqa: F401  (registers the environments)

    parts = env_name.split("-")
    family_ok = any(env_name.startswith(f) or env_name.startswith(f"visual-{f}") for f in FAMILIES)
    if (minari_id := d4rl.minari_id_of(env_name)) is not None:
        raise DatasetError(f"'{env_name}' is a D4RL name; D4RL comes through Minari here: --env-name {minari_id}")
    if "singletask" not in parts or not family_ok:
        raise DatasetError(
            f"unknown environment '{env_name}'. DeFlow trains on OGBench single-task environments named "
            "<family>-<size>-<dataset type>-singletask[-taskN]-v0, e.g. cube-single-play-singletask-task2-v0 or "
            f"antmaze-large-navigate-singletask-v0 (default task). Supported families: {', '.join(FAMILIES)}."
        )
    pos = parts.index("singletask")
    gym_id = "-".join(parts[: pos - 1] + parts[pos:])
    if gym_id not in gymnasium.registry:
        base, dataset_type = "-".join(parts[: pos - 1]), parts[pos - 1]
        same_env = [k for k in gymnasium.registry if k.startswith(f"{base}-singletask")]
        same_family = [k for k in gymnasium.registry if "singletask" in k and k.startswith(parts[0] + "-")]
        known = sorted(k.replace("-singletask", f"-{dataset_type}-singletask") for k in same_env or same_family)
        raise DatasetError(
            f"unknown environment '{env_name}' (OGBench has no '{gym_id}'). Did you mean one of: "
            f"{', '.join(known[:12]) or 'none'}{' ...' if len(known) > 12 else ''}? "
            f"Supported families: {', '.join(FAMILIES)}."
        )
    return gym_id


def make_env(env_name: str, max_episode_steps: int | None = None):
    """A fresh single-task environment (its own instance, e.g. for evaluation next to a training env); an episode
    length other than the task's own (`max_episode_steps`) is for quick checks only. Minari ids (D4RL/...) get the
    dataset's evaluation environment (common/d4rl.py)."""
    import gymnasium

    if d4rl.is_minari_id(env_name):
        try:
            return d4rl.make_env(env_name, max_episode_steps)
        except d4rl.MinariError as e:
            raise DatasetError(str(e)) from None

    kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    return gymnasium.make(single_task_gym_id(env_name), **kwargs)


def _val_path(train_path: Path) -> Path:
    return train_path.with_name(train_path.name[: -len(".npz")] + "-val.npz")


def _resolve_files(env_name: str, dataset_dir: str, dataset_path: str | None, generate_episodes: int,
                   num_workers: int) -> Path:
    """Find (or download, or generate) the training file; return its path. Its validation file sits next to it.
    Generated files depend only on their settings (data seed 0), never on the run; runs that ask for the same missing
    file at once (a sweep over seeds) take turns through a lock: the first generates it, the others then load it."""
    name = dataset_name_of(env_name)
    local_hint = f"data/{name.replace('-v0', '')}-1000ep.npz"
    if dataset_path is not None:
        train = Path(dataset_path).expanduser()
        if train.suffix != ".npz":
            raise DatasetError(f"--dataset-path must be a .npz file (got {train})")
        missing = [p for p in (train, _val_path(train)) if not p.exists()]
        if missing and generate_episodes > 0:
            train.parent.mkdir(parents=True, exist_ok=True)
            with open(train.with_name(train.name + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (also if this process dies)
                if not (train.exists() and _val_path(train).exists()):
                    try:
                        generate_dataset(env_name, generate_episodes, train, num_workers=num_workers)
                    except ValueError as e:  # no oracle for this dataset: the message says what to do instead
                        raise DatasetError(str(e)) from None
        elif missing:
            raise DatasetError(
                f"dataset file {missing[0]} does not exist. Generate it locally (no internet needed) with\n"
                f"    {generation_command(env_name, str(train))}\n"
                f"or add --generate-episodes N to this command to generate N episodes there first."
            )
        return train

    train = Path(dataset_dir).expanduser() / f"{name}.npz"
    if not (train.exists() and _val_path(train).exists()):
        import ogbench

        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            ogbench.download_datasets([name], str(train.parent))
        except (urllib.error.URLError, OSError) as e:
            raise DatasetError(
                f"dataset {name} is not in {train.parent} and could not be downloaded ({e}). Without internet, "
                f"generate it locally with\n    {generation_command(env_name, local_hint)}\n"
                f"and pass --dataset-path {local_hint} (or add --dataset-path {local_hint} --generate-episodes N "
                "to this command to do both)."
            ) from None
        finally:
            socket.setdefaulttimeout(old_timeout)
    return train


def _npz_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an .npz, read from its header without decompressing the data."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        return _read_header(f)[:2]


def _read_header(f) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype, fortran_order


def _check_shapes(path: Path, env_name: str, obs_shape: tuple, act_shape: tuple, regenerate: str) -> None:
    obs, act = _npz_header(path, "observations")[0], _npz_header(path, "actions")[0]
    if obs[1:] != obs_shape or act[1:] != act_shape or obs[0] == 0:
        raise DatasetError(
            f"{path} has {obs[0]} observations of shape {obs[1:]} and actions of shape {act[1:]}, but {env_name} has "
            f"observations {obs_shape} and actions {act_shape}. The file belongs to another environment (or is "
            f"empty); make the right one with\n    {regenerate}"
        )


def check_finite(data: dict[str, np.ndarray], source: str) -> None:
    """Stop at load, not thousands of updates later, when an array holds NaN or inf."""
    for key, array in data.items():
        if np.issubdtype(array.dtype, np.floating):
            bad = ~np.isfinite(array).reshape(len(array), -1).all(axis=1)
            if bad.any():
                raise DatasetError(f"{source}: '{key}' has NaN or inf values in {bad.sum()} of {len(array)} rows "
                                   f"(first: row {bad.argmax()}); fix or regenerate the dataset")


def load_env_and_datasets(env_name: str, dataset_dir: str = "~/.ogbench/data", dataset_path: str | None = None,
                          generate_episodes: int = 0, num_workers: int = 1):
    """Return (env, train, val): the single-task environment and two dicts of numpy arrays with the keys KEYS.

    `dataset_path` names a local training file (its validation file is the same name with -val.npz); without it the
    official file is used from `dataset_dir`, downloaded if missing. `generate_episodes` > 0 generates a missing
    `dataset_path` locally with the ogbench oracles. A Minari id (the D4RL tasks, common/d4rl.py) loads from Minari's
    folder instead, and has no validation split: val is None. Raises DatasetError with the fix for every foreseeable
    problem.
    """
    if d4rl.is_minari_id(env_name):
        if dataset_path is not None or generate_episodes:
            raise DatasetError(f"{env_name} is a Minari dataset: --dataset-path and --generate-episodes are for "
                               "OGBench; Minari datasets are looked for in $MINARI_DATASETS_PATH (~/.minari/datasets)")
        try:
            env, train = d4rl.load_env_and_dataset(env_name)
        except d4rl.MinariError as e:
            raise DatasetError(str(e)) from None
        train["actions"] = np.clip(train["actions"], -1 + ACTION_CLIP_EPS, 1 - ACTION_CLIP_EPS)
        check_finite(train, f"Minari dataset {env_name}")
        return env, train, None

    import ogbench

    env = make_env(env_name)  # fails on a bad name before touching any file
    obs_shape, act_shape = env.observation_space.shape, env.action_space.shape
    if len(obs_shape) != 1:
        raise DatasetError(f"{env_name} has image observations {obs_shape}; train it with deflow_pixels.py")
    train_path = _resolve_files(env_name, dataset_dir, dataset_path, generate_episodes, num_workers)
    regenerate = generation_command(env_name, str(train_path)) if dataset_path else f"rm {train_path}*  # then rerun"
    try:
        for path in (train_path, _val_path(train_path)):  # check the raw file first: relabeling a foreign one fails
            _check_shapes(path, env_name, obs_shape, act_shape, regenerate)
        train, val = ogbench.make_env_and_datasets(env_name, dataset_path=str(train_path), dataset_only=True,
                                                   cur_env=env)
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError, OSError) as e:
        raise DatasetError(
            f"dataset {train_path} (or its -val file) is corrupt or not an OGBench dataset "
            f"({type(e).__name__}: {e}). Delete it and make it again:\n    {regenerate}"
        ) from None
    for data, path in ((train, train_path), (val, _val_path(train_path))):
        data["actions"] = np.clip(data["actions"], -1 + ACTION_CLIP_EPS, 1 - ACTION_CLIP_EPS)
        for k in [k for k in data if k not in KEYS]:
            del data[k]
        check_finite(data, str(path))
    return env, train, val


# ---------------------------------------------------------------------------------------------------------------------
# Visual datasets: frames on the training device, read in chunks (the host never holds the whole file).
# ---------------------------------------------------------------------------------------------------------------------
WORKING_MEMORY = 2 * 2**30  # kept free next to the frames for the networks, optimizer state and activations


def _read_rows(path: Path, key: str, rows: int, out=None, chunk_bytes: int = 2**28):
    """The first `rows` rows of one .npz array; streamed into the torch tensor `out` chunk by chunk when given."""
    import torch

    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, dtype, fortran_order = _read_header(f)
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


def available_memory(device) -> int:
    """Bytes free on `device`: free CUDA memory, or the host's MemAvailable for the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _kept_frames(terminals: np.ndarray, fraction: float) -> int:
    """Frames in the first `fraction` of the episodes (at least one episode); episodes end where terminals is 1."""
    ends = np.flatnonzero(terminals) + 1
    if len(ends) == 0 or ends[-1] != len(terminals):
        ends = np.append(ends, len(terminals))
    return int(ends[max(1, int(np.ceil(fraction * len(ends)))) - 1])


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
    train_path = _resolve_files(env_name, dataset_dir, dataset_path, generate_episodes, num_workers)
    regenerate = generation_command(env_name, str(train_path)) if dataset_path else f"rm {train_path}*  # then rerun"
    paths = {"train": train_path, "val": _val_path(train_path)}
    try:
        kept = {}
        for split, path in paths.items():
            _check_shapes(path, env_name, obs_shape, act_shape, regenerate)
            kept[split] = _kept_frames(_read_rows(path, "terminals", _npz_header(path, "terminals")[0][0]), fraction)
        frame_bytes = int(np.prod(obs_shape))
        needed = sum(kept.values()) * frame_bytes + WORKING_MEMORY
        full = sum(_npz_header(p, "observations")[0][0] for p in paths.values()) * frame_bytes + WORKING_MEMORY
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
            terminals = raw["terminals"].astype(bool)  # 1 on the last frame of each episode
            terminals[-1] = True  # (the file's last frame ends an episode, whatever it says)
            first = np.concatenate([[0], np.flatnonzero(terminals[:-1]) + 1])  # each episode's first frame
            starts = np.zeros(n, dtype=np.int64)
            starts[first] = first
            starts = np.maximum.accumulate(starts)
            as_tensor = lambda x, dtype: torch.as_tensor(np.asarray(x), dtype=dtype, device=device)  # noqa: E731
            data[split] = {"frames": frames, "actions": as_tensor(actions, torch.float32),
                           "rewards": as_tensor(raw["rewards"], torch.float32),
                           "masks": as_tensor(raw["masks"], torch.float32),
                           "starts": as_tensor(starts, torch.long), "valid": as_tensor(np.flatnonzero(~terminals),
                                                                                         torch.long)}
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError, OSError) as e:
        raise DatasetError(
            f"dataset {train_path} (or its -val file) is corrupt or not an OGBench dataset "
            f"({type(e).__name__}: {e}). Delete it and make it again:\n    {regenerate}"
        ) from None
    return env, data["train"], data["val"], report

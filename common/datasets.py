"""OGBench tasks and their datasets (downloaded or generated files relabeled by `ogbench.make_env_and_datasets`; D4RL
ids: common/d4rl.py), errors that say how to fix them. Actions are clipped to [-1 + 1e-5, 1 - 1e-5], as officially."""

from __future__ import annotations

import hashlib
import importlib
import os
import socket
import sys
import urllib.error
import zipfile
from pathlib import Path

import numpy as np

ACTION_CLIP_EPS = 1e-5
FAMILIES = ("antmaze", "humanoidmaze", "antsoccer", "pointmaze", "cube", "scene", "puzzle")
KEYS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")


class DatasetError(RuntimeError):
    """A problem with the environment name or the dataset; the message says how to fix it."""


def dataset_name_of(env_name: str) -> str:
    """'cube-single-play-singletask-task2-v0' -> 'cube-single-play-v0' (the file every task of it shares)."""
    parts = env_name.split("-")
    return "-".join(parts[: parts.index("singletask")] + parts[-1:] if "singletask" in parts else parts)


def optional(module: str, needed_by: str | None = None):
    """common/<module>.py, imported only for what needs it; missing: None, or one line naming the file to copy."""
    try:
        return importlib.import_module(f"common.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"common.{module}":
            raise
        if needed_by is None:
            return None
        sys.exit(f"error: {needed_by} needs common/{module}.py; copy it from the DeFlow repository into common/")


def generation_command(env_name: str, out: str) -> str:
    return f"python -m tools.generate --env-name {dataset_name_of(env_name)} --episodes 1000 --num-workers 8 " \
           f"--out {out}"


def single_task_gym_id(env_name: str) -> str:
    """'cube-single-play-singletask-task2-v0' -> 'cube-single-singletask-task2-v0', in OGBench's registry."""
    import gymnasium
    import ogbench  # noqa: F401  (registers the environments)
    parts, families = env_name.split("-"), f"Supported families: {', '.join(FAMILIES)}."
    if "singletask" not in parts or not env_name.removeprefix("visual-").startswith(FAMILIES):
        d4rl = optional("d4rl")
        if d4rl is not None and (minari_id := d4rl.minari_id_of(env_name)) is not None:
            raise DatasetError(f"'{env_name}' is a D4RL name; D4RL comes through Minari here: --env-name {minari_id}")
        raise DatasetError(f"unknown environment '{env_name}'. DeFlow trains on OGBench single-task environments "
                           "<family>-<size>-<dataset type>-singletask[-taskN]-v0, e.g. cube-single-play-singletask-"
                           f"task2-v0 or antmaze-large-navigate-singletask-v0. {families}")
    pos = parts.index("singletask")
    gym_id, base, kind = "-".join(parts[: pos - 1] + parts[pos:]), "-".join(parts[: pos - 1]), parts[pos - 1]
    if gym_id not in gymnasium.registry:
        known = [k for k in gymnasium.registry if k.startswith(f"{base}-singletask")] or \
            [k for k in gymnasium.registry if "singletask" in k and k.startswith(parts[0] + "-")]
        known = sorted(k.replace("-singletask", f"-{kind}-singletask") for k in known)
        raise DatasetError(f"unknown environment '{env_name}' (OGBench has no '{gym_id}'). Did you mean one of: "
                           f"{', '.join(known[:12]) or 'none'}{' ...' if len(known) > 12 else ''}? {families}")
    return gym_id


def make_env(env_name: str, max_episode_steps: int | None = None):
    """A fresh environment of the task (D4RL: D4RL's); another `max_episode_steps` is for quick checks only."""
    import gymnasium
    if "/" in env_name:
        return optional("d4rl", "a D4RL id").make_env(env_name, max_episode_steps)
    return gymnasium.make(single_task_gym_id(env_name), max_episode_steps=max_episode_steps)


def val_path(train_path: Path) -> Path:
    return train_path.with_name(train_path.name[: -len(".npz")] + "-val.npz")


def resolve_files(env_name: str, dataset_dir: str, dataset_path: str | None, generate_episodes: int,
                  num_workers: int) -> Path:
    """Find (or download, or generate) the training file; return its path. Its validation file sits next to it."""
    name = dataset_name_of(env_name)
    if dataset_path is not None:
        train = Path(dataset_path).expanduser()
        if train.suffix != ".npz":
            raise DatasetError(f"--dataset-path must be a .npz file (got {train})")
        if not (train.exists() and val_path(train).exists()) and generate_episodes > 0:
            try:
                optional("generate", "--generate-episodes").generate_missing(env_name, generate_episodes, train,
                                                                            num_workers)
            except ValueError as e:  # no oracle for this dataset: the message says what to do instead
                raise DatasetError(str(e)) from None
        if missing := [p for p in (train, val_path(train)) if not p.exists()]:
            raise DatasetError(f"dataset file {missing[0]} does not exist. Generate it locally (no internet needed) "
                               f"with\n    {generation_command(env_name, str(train))}\nor add --generate-episodes N "
                               "to this command to generate N episodes there first (needs common/generate.py).")
        return train
    train, local = Path(dataset_dir).expanduser() / f"{name}.npz", f"data/{name.replace('-v0', '')}-1000ep.npz"
    if not (train.exists() and val_path(train).exists()):
        import ogbench
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            ogbench.download_datasets([name], str(train.parent))
        except (urllib.error.URLError, OSError) as e:
            raise DatasetError(f"dataset {name} is not in {train.parent} and could not be downloaded ({e}). Without "
                               f"internet, generate it locally with\n    {generation_command(env_name, local)}\nand "
                               f"pass --dataset-path {local} (or add --dataset-path {local} --generate-episodes N to "
                               "this command to do both).") from None
        finally:
            socket.setdefaulttimeout(old_timeout)
    return train


def npz_header(path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of one array of an .npz, from its header (nothing decompressed)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        old = np.lib.format.read_magic(f) == (1, 0)
        return (np.lib.format.read_array_header_1_0 if old else np.lib.format.read_array_header_2_0)(f)


def check_shapes(path: Path, env_name: str, obs_shape: tuple, act_shape: tuple, regenerate: str) -> None:
    obs, act = npz_header(path, "observations")[0], npz_header(path, "actions")[0]
    if obs[1:] != obs_shape or act[1:] != act_shape or obs[0] == 0:
        raise DatasetError(f"{path} has {obs[0]} observations of shape {obs[1:]} and actions of shape {act[1:]}, but "
                           f"{env_name} has observations {obs_shape} and actions {act_shape}. The file belongs to "
                           f"another environment (or is empty); make the right one with\n    {regenerate}")


def check_finite(data: dict[str, np.ndarray], source: str) -> None:
    for key, array in data.items():
        bad = ~np.isfinite(array).reshape(len(array), -1).all(axis=1) if array.dtype.kind == "f" else np.zeros(1)
        if bad.any():
            raise DatasetError(f"{source}: '{key}' has NaN or inf values in {bad.sum()} of {len(array)} rows "
                               f"(first: row {bad.argmax()}); fix or regenerate the dataset")


def available_memory(device) -> int:
    """Bytes free on `device`: free CUDA memory, or the host's MemAvailable for the CPU."""
    if device.type == "cuda":
        import torch
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def data_fingerprint(train: dict, val: dict | None) -> str:
    """What identifies a run's data wherever its files lie: sizes and a hash of the (train, val) actions."""
    arrays = [np.asarray(d["actions"].cpu() if hasattr(d["actions"], "cpu") else d["actions"])
              for d in (train, val) if d]
    digest = hashlib.sha1(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()[:12]
    return f"{' + '.join(str(len(a)) for a in arrays)} transitions, actions sha1 {digest}"


def load_env_and_datasets(env_name: str, dataset_dir: str = "~/.ogbench/data", dataset_path: str | None = None,
                          generate_episodes: int = 0, num_workers: int = 1):
    """(env, train, val): the environment and dicts of numpy arrays (KEYS) from `dataset_path` (and its -val.npz;
    generated if missing and `generate_episodes` > 0), else OGBench's files in `dataset_dir` (downloaded if missing).
    D4RL: no validation split (val None). Raises DatasetError with the fix."""
    if "/" in env_name:
        d4rl = optional("d4rl", "a D4RL id")
        env, train, val = d4rl.load_env_and_datasets(env_name, dataset_path, generate_episodes)
        sources = [f"Minari dataset {env_name}"]
    else:
        env, train, val, sources = load_ogbench(env_name, dataset_dir, dataset_path, generate_episodes, num_workers)
    for data, source in zip((train, val), sources):
        data["actions"] = np.clip(data["actions"], -1 + ACTION_CLIP_EPS, 1 - ACTION_CLIP_EPS)
        for k in [k for k in data if k not in KEYS]:
            del data[k]
        check_finite(data, source)
    return env, train, val


def load_ogbench(env_name: str, dataset_dir: str, dataset_path: str | None, generate_episodes: int, num_workers: int):
    import ogbench

    env = make_env(env_name)  # fails on a bad name before touching any file
    obs_shape, act_shape = env.observation_space.shape, env.action_space.shape
    if len(obs_shape) != 1:
        raise DatasetError(f"{env_name} has image observations {obs_shape}; train it with deflow_pixels.py")
    train_path = resolve_files(env_name, dataset_dir, dataset_path, generate_episodes, num_workers)
    regenerate = generation_command(env_name, str(train_path)) if dataset_path else f"rm {train_path}*  # then rerun"
    try:
        for path in (train_path, val_path(train_path)):  # check the raw file first: relabeling a foreign one fails
            check_shapes(path, env_name, obs_shape, act_shape, regenerate)
        train, val = ogbench.make_env_and_datasets(env_name, dataset_path=str(train_path), dataset_only=True,
                                                   cur_env=env)
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError, OSError) as e:
        raise DatasetError(f"dataset {train_path} (or its -val file) is corrupt or not an OGBench dataset "
                           f"({type(e).__name__}: {e}). Delete it and make it again:\n    {regenerate}") from None
    return env, train, val, [str(train_path), str(val_path(train_path))]

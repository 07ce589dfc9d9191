"""Load an OGBench single-task environment and its datasets, with errors that say how to fix them.

The data path is the official one: `ogbench.make_env_and_datasets(env_name, dataset_path=...)` builds the
single-task environment and relabels rewards and masks for its task, so a locally generated file (see
`common/generate.py`) and a downloaded one go through the same code. Dataset actions are clipped to
[-1 + 1e-5, 1 - 1e-5], as the official code does before training.
"""

from __future__ import annotations

import socket
import urllib.error
import zipfile
from pathlib import Path

import numpy as np

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


def make_env(env_name: str):
    """A fresh single-task evaluation environment (its own instance, e.g. for evaluation next to a training env)."""
    import gymnasium

    return gymnasium.make(single_task_gym_id(env_name))


def _val_path(train_path: Path) -> Path:
    return train_path.with_name(train_path.name[: -len(".npz")] + "-val.npz")


def _resolve_files(env_name: str, dataset_dir: str, dataset_path: str | None, generate_episodes: int,
                   num_workers: int, seed: int) -> Path:
    """Find (or download, or generate) the training file; return its path. Its validation file sits next to it."""
    name = dataset_name_of(env_name)
    local_hint = f"data/{name.replace('-v0', '')}-1000ep.npz"
    if dataset_path is not None:
        train = Path(dataset_path).expanduser()
        if train.suffix != ".npz":
            raise DatasetError(f"--dataset-path must be a .npz file (got {train})")
        missing = [p for p in (train, _val_path(train)) if not p.exists()]
        if missing and generate_episodes > 0:
            generate_dataset(env_name, generate_episodes, train, num_workers=num_workers, seed=seed)
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


def load_env_and_datasets(env_name: str, dataset_dir: str = "~/.ogbench/data", dataset_path: str | None = None,
                          generate_episodes: int = 0, num_workers: int = 1, seed: int = 0):
    """Return (env, train, val): the single-task environment and two dicts of numpy arrays with the keys KEYS.

    `dataset_path` names a local training file (its validation file is the same name with -val.npz); without it the
    official file is used from `dataset_dir`, downloaded if missing. `generate_episodes` > 0 generates a missing
    `dataset_path` locally with the ogbench oracles. Raises DatasetError with the fix for every foreseeable problem.
    """
    import ogbench

    env = make_env(env_name)  # fails on a bad name before touching any file
    train_path = _resolve_files(env_name, dataset_dir, dataset_path, generate_episodes, num_workers, seed)
    regenerate = generation_command(env_name, str(train_path)) if dataset_path else f"rm {train_path}*  # then rerun"
    obs_shape, act_shape = env.observation_space.shape, env.action_space.shape
    try:
        for path in (train_path, _val_path(train_path)):
            with np.load(path) as f:  # check the raw file first: relabeling a foreign file fails obscurely
                shapes = f["observations"].shape, f["actions"].shape
            if shapes[0][1:] != obs_shape or shapes[1][1:] != act_shape or shapes[0][0] == 0:
                raise DatasetError(
                    f"{path} has {shapes[0][0]} observations of shape {shapes[0][1:]} and actions of shape "
                    f"{shapes[1][1:]}, but {env_name} has observations {obs_shape} and actions {act_shape}. "
                    f"The file belongs to another environment (or is empty); make the right one with\n    {regenerate}"
                )
        train, val = ogbench.make_env_and_datasets(env_name, dataset_path=str(train_path), dataset_only=True,
                                                   cur_env=env)
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError, OSError) as e:
        raise DatasetError(
            f"dataset {train_path} (or its -val file) is corrupt or not an OGBench dataset "
            f"({type(e).__name__}: {e}). Delete it and make it again:\n    {regenerate}"
        ) from None
    for data in (train, val):
        data["actions"] = np.clip(data["actions"], -1 + ACTION_CLIP_EPS, 1 - ACTION_CLIP_EPS)
        for k in [k for k in data if k not in KEYS]:
            del data[k]
    return env, train, val

"""D4RL AntMaze and Adroit through Minari: the paper's 18 D4RL tasks, with the official code's conventions.

The official code reaches D4RL through the `d4rl` package (gym 0.21 and mujoco-py, which no longer install on a
current Python). Its maintained successor is Minari, which holds the same tasks as datasets named
D4RL/<task>/<dataset>-vN (AntMaze re-collected in gymnasium-robotics' AntMaze, Adroit converted from the D4RL files),
with the environments of gymnasium-robotics. The scripts take these ids as --env-name; everything D4RL-specific lives
here, and common/datasets.py hands Minari ids to it.

Transitions, from Minari's episodes (an episode stores T + 1 observations for T actions):
  - (obs[t], action[t], reward[t], obs[t + 1]) within each episode, episodes concatenated in order.
  - terminals = 1 on the last transition of every episode. (Officially: where the next observation does not continue
    the trajectory, or D4RL's terminal; Minari's episode boundaries say this directly.)
  - masks = 1 - terminations: only a true termination stops bootstrapping, never a time limit (a truncation).
  - AntMaze: rewards - 1, so {-1, 0} (online too: `reward_offset`). Adroit: rewards unchanged.
  - Actions clipped to [-1 + 1e-5, 1 - 1e-5], as for every dataset (common/datasets.py does it).
  - No validation split: D4RL has none, so the scripts log no validation/* metrics for these datasets.
Observations. Adroit's are flat vectors. Minari's AntMaze observation is a dict: `observation` (the ant's qpos without
x and y, then qvel: 27 numbers), `achieved_goal` (x, y) and `desired_goal` (the goal's x, y). The networks see
[achieved_goal, observation] = [x, y, qpos[2:], qvel], 29 numbers in the order of D4RL's AntMaze observation
(qpos[:15], qvel[:14]), so they carry what D4RL's did. `desired_goal` is left out, as D4RL's observation had no goal:
each AntMaze task has one evaluation goal that the policy learns to reach, and the goals the data collector moved
between would mean nothing at evaluation.
Evaluation runs on the dataset's own evaluation environment (`recover_environment(eval_env=True)`; the dataset's
environment when it has none). AntMaze episodes end when the goal is reached (gymnasium-robotics' continuing_task
False), as D4RL's evaluation AntMaze did, so the raw return is 1 at success and 0 otherwise. Scores:
evaluation/episode.normalized_return = 100 (return - ref_min) / (ref_max - ref_min), with D4RL's reference scores 0
and 1 for AntMaze (so it is 100 x the success rate) and the reference scores Minari stores with the dataset for the
others (for Adroit, D4RL's own).

Minari's datasets are regenerated, not the D4RL files: numbers compare with the paper only approximately.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

ANTMAZE = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
ADROIT = tuple(f"{task}/{kind}" for task in ("pen", "door", "hammer", "relocate")
               for kind in ("human", "cloned", "expert"))
# The paper's 18 D4RL datasets (Minari ids) and their DeFlow recipes (500k offline updates each).
TASKS = {
    **{f"D4RL/antmaze/{name}-v1": {"q_agg": "mean", "target_divergence": 0.015} for name in ANTMAZE},
    **{f"D4RL/{name}-v2": {"q_agg": "min", "target_divergence": 0.01 if name.startswith("pen") else 0.001}
       for name in ADROIT},
}


class MinariError(RuntimeError):
    """A problem with a Minari dataset id or its files; the message says how to fix it."""


def is_minari_id(env_name: str) -> bool:
    """Minari ids have a namespace ('D4RL/pen/cloned-v2'); OGBench names never contain a slash."""
    return "/" in env_name


def is_antmaze(dataset_id: str) -> bool:
    return dataset_id.startswith("D4RL/antmaze/")


def minari_id_of(d4rl_name: str) -> str | None:
    """The Minari id of one of the 18 tasks under its D4RL gym name ('antmaze-large-play-v2', 'pen-cloned-v1')."""
    base = d4rl_name.rsplit("-v", 1)[0]
    task, _, name = base.partition("-")
    candidate = f"D4RL/antmaze/{name}-v1" if task == "antmaze" else f"D4RL/{task}/{name}-v2"
    return candidate if candidate in TASKS else None


def reward_offset(env_name: str) -> float:
    """What the official code adds to every reward of this task, in the dataset and online: -1 for D4RL AntMaze."""
    return -1.0 if is_antmaze(env_name) else 0.0


def datasets_root() -> Path:
    """Where Minari looks for datasets: $MINARI_DATASETS_PATH, else ~/.minari/datasets."""
    return Path(os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")).expanduser()


def _load(dataset_id: str):
    """minari.load_dataset, with one line that says how to get a missing dataset without internet here."""
    try:
        import minari
    except ImportError:
        raise MinariError(f"{dataset_id} is a Minari dataset id; install Minari and gymnasium-robotics with "
                          "pip install 'minari[hdf5]' gymnasium-robotics") from None
    path = datasets_root() / dataset_id
    if not (path / "data").exists():
        suggestion = "" if dataset_id in TASKS else f" (the paper's D4RL datasets are {', '.join(TASKS)})"
        raise MinariError(
            f"Minari dataset {dataset_id} is not in {datasets_root()}{suggestion}. Where there is internet, run "
            f"`pip install 'minari[hdf5]' && minari download {dataset_id}`, then copy ~/.minari/datasets/"
            f"{dataset_id} to {path} here (or point MINARI_DATASETS_PATH at the folder that holds {dataset_id})."
        )
    try:
        return minari.load_dataset(dataset_id)
    except Exception as e:  # a truncated or foreign folder raises many different errors
        raise MinariError(f"Minari dataset {path} is corrupt or unreadable ({type(e).__name__}: {e}); delete it and "
                          f"copy it again (`minari download {dataset_id}` where there is internet)") from None


def _flat_observation_keys(space) -> tuple[str, ...] | None:
    """None for a flat Box; ('achieved_goal', 'observation') for the AntMaze dict; else a MinariError says why not."""
    import gymnasium

    if isinstance(space, gymnasium.spaces.Box) and len(space.shape) == 1:
        return None
    if isinstance(space, gymnasium.spaces.Dict) and set(space.spaces) == {"achieved_goal", "desired_goal",
                                                                          "observation"}:
        return ("achieved_goal", "observation")
    raise MinariError(f"observations of {space} are not supported: DeFlow's networks take one flat vector, and only "
                      "flat Box observations and the AntMaze dict (flattened to D4RL's 29 numbers) have a known "
                      "flattening")


def flatten(observation, keys: tuple[str, ...] | None) -> np.ndarray:
    """One observation (or a batch, along the last axis) as the flat vector the networks see."""
    if keys is None:
        return np.asarray(observation, dtype=np.float32)
    return np.concatenate([np.asarray(observation[k], dtype=np.float32) for k in keys], axis=-1)


def make_env(dataset_id: str, max_episode_steps: int | None = None, dataset=None):
    """The dataset's evaluation environment with flat observations (AntMaze: ends at the goal, as in D4RL);
    `dataset` is the loaded Minari dataset when the caller has it."""
    import gymnasium

    try:
        import gymnasium_robotics

        gymnasium.register_envs(gymnasium_robotics)  # AntMaze and Adroit
    except ImportError:
        pass
    dataset = dataset if dataset is not None else _load(dataset_id)
    overrides = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    if is_antmaze(dataset_id):
        overrides["continuing_task"] = False  # D4RL's evaluation AntMaze ends at the goal: return 1 at success
    try:
        env = dataset.recover_environment(eval_env=True, **overrides)
    except (ValueError, gymnasium.error.Error) as e:
        raise MinariError(f"the environment of Minari dataset {dataset_id} cannot be made ({e}); is "
                          "gymnasium-robotics installed (pip install gymnasium-robotics)?") from None
    keys = _flat_observation_keys(env.observation_space)
    if keys is not None:
        space = gymnasium.spaces.Box(-np.inf, np.inf, (sum(env.observation_space[k].shape[0] for k in keys),),
                                     np.float32)
        env = gymnasium.wrappers.TransformObservation(env, lambda obs: flatten(obs, keys), space)
    return env


def transitions(episodes, offset: float, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Flat transitions with the official conventions (module docstring) from episodes with Minari's fields:
    observations (T + 1 of them), actions, rewards, terminations, truncations (T each); `offset` is added to every
    reward (reward_offset)."""
    parts = {k: [] for k in ("observations", "actions", "rewards", "masks", "terminals", "next_observations")}
    for episode in episodes:
        obs = flatten(episode.observations, keys)
        steps = len(episode.actions)
        if len(obs) != steps + 1:
            raise MinariError(f"an episode has {len(obs)} observations for {steps} actions (Minari stores T + 1)")
        terminals = np.zeros(steps, dtype=np.float32)
        terminals[-1] = 1.0
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(episode.actions, dtype=np.float32))
        parts["rewards"].append(np.asarray(episode.rewards, dtype=np.float32) + offset)
        parts["masks"].append(1.0 - np.asarray(episode.terminations, dtype=np.float32))
        parts["terminals"].append(terminals)
    if not parts["actions"]:
        raise MinariError("the dataset has no episodes")
    return {k: np.concatenate(v) for k, v in parts.items()}


def load_env_and_dataset(dataset_id: str):
    """(env, train) for a Minari dataset id: the evaluation environment and the transitions (module docstring)."""
    dataset = _load(dataset_id)
    env = make_env(dataset_id, dataset=dataset)
    keys = _flat_observation_keys(dataset.observation_space)
    if len(dataset.action_space.shape) != 1:
        raise MinariError(f"{dataset_id} has actions {dataset.action_space}; DeFlow needs a flat Box of actions")
    train = transitions(dataset.iterate_episodes(), reward_offset(dataset_id), keys)
    if train["observations"].shape[1:] != env.observation_space.shape:
        raise MinariError(f"{dataset_id} has observations of shape {train['observations'].shape[1:]} but its "
                          f"environment {env.observation_space.shape}; the dataset belongs to another environment")
    return env, train


@functools.lru_cache
def reference_scores(dataset_id: str) -> tuple[float, float] | None:
    """D4RL's reference scores (random, expert) of a task: 0 and 1 for AntMaze, else the ones stored with the Minari
    dataset (None when it has none)."""
    if is_antmaze(dataset_id):
        return 0.0, 1.0
    metadata = _load(dataset_id).storage.metadata
    if metadata.get("ref_min_score") is None or metadata.get("ref_max_score") is None:
        return None
    return float(metadata["ref_min_score"]), float(metadata["ref_max_score"])


def normalized_return(env_name: str, episode_return: float) -> float | None:
    """The D4RL score x 100 of a raw (un-shifted) return; None for OGBench tasks and datasets without references."""
    scores = reference_scores(env_name) if is_minari_id(env_name) else None
    if scores is None:
        return None
    return 100.0 * (episode_return - scores[0]) / (scores[1] - scores[0])


def run_name_of(env_name: str) -> str:
    """The environment's part of a run directory's name: Minari ids without their slashes."""
    return env_name.replace("/", "-")

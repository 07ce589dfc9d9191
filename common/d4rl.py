"""D4RL AntMaze and Adroit through Minari: the paper's 18 D4RL tasks, scored as D4RL scored them.

The official code reaches D4RL through the `d4rl` package (gym 0.21 and mujoco-py, which no longer install on a
current Python). Its maintained successor is Minari, which holds the same tasks as datasets named
D4RL/<task>/<dataset>-vN (AntMaze re-collected in gymnasium-robotics' AntMaze; Adroit re-simulated in
gymnasium-robotics from D4RL's initial states and actions, its observations and rewards those of the re-simulation),
with the environments of gymnasium-robotics. Minari's files differ from D4RL's in ways that change the task, and this
module puts D4RL's definitions back (each from the D4RL source named at its constant); D4RL ids outside the 18 are
refused (check_supported):

Transitions, from Minari's episodes (an episode stores T + 1 observations for T actions):
  - (obs[t], action[t], reward[t], obs[t + 1]) within each episode, episodes concatenated in order; terminals = 1 on
    the last transition of every episode; actions clipped to [-1 + 1e-5, 1 - 1e-5].
  - Adroit: masks = 1 - terminations (a time limit never stops bootstrapping); rewards D4RL's. Minari stores
    env.step's, which for door, hammer and relocate carry gymnasium-robotics 1.2.1-1.4.2's sign error (+0.1
    |palm - object| where D4RL subtracts it): each stored reward is checked at load against both forms, recomputed
    from its transition's observations (d4rl_rewards; the run prints the form found), and D4RL's is trained on.
  - AntMaze: Minari collected every episode with a goal of its own (continuing_task=True, reset_target=False), so its
    stored rewards follow goals the policy never sees and no episode terminates. D4RL relabelled its AntMaze data to
    the task's one evaluation goal (scripts/generation/relabel_antmaze_rewards.py): reward = terminal = 1 where the
    next position is within 0.5 of the goal. Here likewise, from the data's own positions (achieved_goal), with the
    goal cell's centre; then the official -1 shift (FQL's envs/d4rl_utils.py): rewards {-1, 0}, masks 0 exactly on
    the goal transitions.
  - No validation split: D4RL has none, so the scripts log no validation/* metrics for these datasets.
Observations. Adroit's are flat vectors. Minari's AntMaze observation is a dict: `observation` (the ant's qpos without
x and y, then qvel: 27 numbers), `achieved_goal` (x, y) and `desired_goal`. The networks see [achieved_goal,
observation] = [x, y, qpos[2:], qvel], the 29 numbers of D4RL's AntMaze observation in its order; the goal is left
out, as D4RL's observation had none.
Evaluation environments, D4RL's tasks on gymnasium-robotics' environments:
  - AntMaze: the maze of D4RL's antmaze-*-v2 (ANTMAZE_MAPS, checked wall for wall against the data's maze), its start
    and goal cells, its horizon (700 umaze, 1000 otherwise), and its goal test: reward 1 and the episode's end within
    0.5 of the goal (gymnasium-robotics: 0.45), so the return is 1 at success and 0 otherwise. Minari's own
    evaluation spec is not used: for both umaze datasets it holds a mirrored U-maze whose walls the data never saw
    (Minari#304). Online (deflow_o2o.py) the same environment gives the same reward and mask as the relabelled data.
  - Adroit: D4RL's horizons (pen 100 steps, door, hammer and relocate 200; gymnasium-robotics registers 200 for all),
    the pen episode ends when the pen drops (D4RL's pen_v0.py; gymnasium-robotics' pen never ends), and door, hammer
    and relocate return D4RL's reward, recomputed from the simulator's state (gymnasium-robotics 1.2.1-1.4.2 add the
    hand-to-object distance term where D4RL subtracts it).
Scores: evaluation/episode.normalized_return = 100 (return - ref_min) / (ref_max - ref_min) with D4RL's reference
scores (d4rl/infos.py; REFERENCE_SCORES), whatever the Minari dataset stores (a difference is printed once).

What stays different from D4RL: Minari re-collected AntMaze with gymnasium's ant (another timestep and motor gear)
and samples goals and starts with its own noise; Adroit's observations come from gymnasium-robotics' re-simulation.
Numbers compare with the paper only approximately.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import gymnasium
import numpy as np

from common.datasets import DatasetError

ANTMAZE = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
ADROIT = tuple(f"{task}/{kind}" for task in ("pen", "door", "hammer", "relocate")
               for kind in ("human", "cloned", "expert"))
# The paper's 18 D4RL datasets (Minari ids) and their DeFlow recipes (500k offline updates each).
TASKS = {
    **{f"D4RL/antmaze/{name}-v1": {"q_agg": "mean", "target_divergence": 0.015} for name in ANTMAZE},
    **{f"D4RL/{name}-v2": {"q_agg": "min", "target_divergence": 0.01 if name.startswith("pen") else 0.001}
       for name in ADROIT},
}


# D4RL's AntMaze tasks as gymnasium-robotics maze maps (1 wall, "r" start, "g" goal). D4RL (d4rl/locomotion/
# maze_env.py: U_MAZE_TEST, BIG_MAZE_TEST, HARDEST_MAZE_TEST) draws row i at y = 4i - 4, gymnasium-robotics at
# y = 2H - 4(i + 0.5): the same list is the maze mirrored in y. Medium and large keep D4RL's cells in the list, as
# Minari's data maps do (their mirror image: the same paths); the U-maze, symmetric under the mirror, is written
# upside down so that start and goal sit where D4RL's do (Minari's umaze data map).
R, G = "r", "g"
ANTMAZE_MAPS = {
    "umaze": [[1, 1, 1, 1, 1], [1, G, 0, 0, 1], [1, 1, 1, 0, 1], [1, R, 0, 0, 1], [1, 1, 1, 1, 1]],
    "medium": [[1, 1, 1, 1, 1, 1, 1, 1], [1, R, 0, 1, 1, 0, 0, 1], [1, 0, 0, 1, 0, 0, 0, 1], [1, 1, 0, 0, 0, 1, 1, 1],
               [1, 0, 0, 1, 0, 0, 0, 1], [1, 0, 1, 0, 0, 1, 0, 1], [1, 0, 0, 0, 1, 0, G, 1], [1, 1, 1, 1, 1, 1, 1, 1]],
    "large": [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, R, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
              [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1],
              [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1], [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1],
              [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1], [1, 0, 0, 1, 0, 0, 0, 1, 0, G, 0, 1],
              [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]],
}
GOAL_RADIUS = 0.5  # D4RL's goal test (d4rl/locomotion/goal_reaching_env.py: <= 0.5)
MAZE_SCALING = 4.0  # D4RL's maze_size_scaling, gymnasium-robotics' default
# D4RL's episode lengths: d4rl/locomotion/__init__.py (antmaze-*-v2), hand_manipulation_suite/__init__.py MAX_STEPS.
MAX_EPISODE_STEPS = {"umaze": 700, "medium": 1000, "large": 1000, "pen": 100, "door": 200, "hammer": 200,
                     "relocate": 200}
# D4RL's reference scores (d4rl/infos.py REF_MIN_SCORE, REF_MAX_SCORE; the -v1 Adroit tasks take the human-v0 ones).
REFERENCE_SCORES = {"antmaze": (0.0, 1.0), "pen": (96.262799, 3076.8331017826877),
                    "door": (-56.512833, 2880.5693087298737), "hammer": (-274.856578, 12794.134825156867),
                    "relocate": (-6.425911, 4233.877797728884)}
PEN_DROP_HEIGHT = 0.075  # D4RL's pen_v0.py: the episode ends when the pen's z falls below this


MinariError = DatasetError  # a problem with a Minari dataset id or its files; the message says how to fix it


def is_antmaze(dataset_id: str) -> bool:
    return dataset_id.startswith("D4RL/antmaze/")


def family(dataset_id: str) -> str:
    """'D4RL/antmaze/large-play-v1' -> 'antmaze', 'D4RL/pen/cloned-v2' -> 'pen'."""
    return dataset_id.split("/")[1]


def maze_of(dataset_id: str) -> str:
    """'D4RL/antmaze/umaze-diverse-v1' -> 'umaze'."""
    return dataset_id.split("/")[2].split("-")[0]


def cell_xy(maze_map: list, cell: str) -> np.ndarray:
    """The centre of the maze's `cell` ("r" or "g") in gymnasium-robotics' coordinates (the maze centred on 0)."""
    (i, j), = [(i, j) for i, row in enumerate(maze_map) for j, c in enumerate(row) if c == cell]
    height, width = len(maze_map), len(maze_map[0])
    return np.array([(j + 0.5) * MAZE_SCALING - width / 2 * MAZE_SCALING,
                     height / 2 * MAZE_SCALING - (i + 0.5) * MAZE_SCALING])


def walls(maze_map: list) -> list:
    return [[int(c == 1) for c in row] for row in maze_map]


def minari_id_of(d4rl_name: str) -> str | None:
    """The Minari id of one of the 18 tasks under its D4RL gym name ('antmaze-large-play-v2', 'pen-cloned-v1')."""
    base = d4rl_name.rsplit("-v", 1)[0]
    task, _, name = base.partition("-")
    candidate = f"D4RL/antmaze/{name}-v1" if task == "antmaze" else f"D4RL/{task}/{name}-v2"
    return candidate if candidate in TASKS else None


def check_supported(dataset_id: str) -> None:
    """D4RL ids outside the paper's 18 are refused: their conventions (AntMaze's goal relabelling and -1 shift,
    Adroit's rewards, horizons and scores) are not known. Other Minari namespaces load as stored."""
    if dataset_id.startswith("D4RL/") and dataset_id not in TASKS:
        raise MinariError(f"{dataset_id} is not one of the paper's D4RL datasets, the ones this code supports with "
                          f"D4RL's conventions: {', '.join(TASKS)}")


def datasets_root() -> Path:
    """Where Minari looks for datasets: $MINARI_DATASETS_PATH, else ~/.minari/datasets."""
    return Path(os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")).expanduser()


def _load(dataset_id: str):
    """minari.load_dataset, with one line that says how to get a missing dataset without internet here."""
    try:
        import minari
    except ImportError:
        raise MinariError(f"{dataset_id} is a Minari dataset id: D4RL needs the extra requirements, "
                          "pip install -r requirements-extra.txt") from None
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
    if isinstance(space, gymnasium.spaces.Box) and len(space.shape) == 1:
        return None
    if isinstance(space, gymnasium.spaces.Dict) and set(space.spaces) == {"achieved_goal", "desired_goal",
                                                                          "observation"}:
        return ("achieved_goal", "observation")
    raise MinariError(f"observations of {space} are not supported: DeFlow's networks take one flat vector, and only "
                      "flat Box observations and the AntMaze dict (flattened to D4RL's 29 numbers) have a known "
                      "flattening")


def flatten(observation, keys: tuple[str, ...] | None, dtype=np.float32) -> np.ndarray:
    """One observation (or a batch, along the last axis) as the flat vector the networks see."""
    if keys is None:
        return np.asarray(observation, dtype=dtype)
    return np.concatenate([np.asarray(observation[k], dtype=dtype) for k in keys], axis=-1)


class AntMazeGoal(gymnasium.Wrapper):
    """D4RL's evaluation AntMaze goal test: reward 1, and the episode's end, within GOAL_RADIUS of the goal."""

    def step(self, action):
        obs, _, _, truncated, info = self.env.step(action)
        success = bool(np.linalg.norm(obs["achieved_goal"] - obs["desired_goal"]) <= GOAL_RADIUS)
        return obs, float(success), success, truncated, {**info, "success": success}


class AdroitD4RL(gymnasium.Wrapper):
    """D4RL's Adroit: the pen episode ends when the pen drops; door, hammer and relocate return D4RL's reward."""

    def __init__(self, env, task: str):
        super().__init__(env)
        self.task = task

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        hand = self.env.unwrapped
        if self.task == "pen":
            terminated = terminated or bool(hand.data.xpos[hand.obj_body_id][2] < PEN_DROP_HEIGHT)
        else:
            reward = d4rl_adroit_reward(self.task, hand)
        return obs, reward, terminated, truncated, info


def d4rl_adroit_reward(task: str, env) -> float:
    """D4RL's dense reward of door, hammer or relocate (d4rl/hand_manipulation_suite/{door,hammer,relocate}_v0.py,
    bonuses included), from the state of a gymnasium-robotics Adroit environment (`env.unwrapped`) after a step."""
    data, norm = env.data, np.linalg.norm
    if task == "door":
        door = float(data.qpos[env.door_hinge_addrs])
        reward = -0.1 * norm(data.site_xpos[env.grasp_site_id] - data.site_xpos[env.handle_site_id])
        reward += -0.1 * (door - 1.57) ** 2 - 1e-5 * np.sum(data.qvel ** 2)
        return reward + 2 * (door > 0.2) + 8 * (door > 1.0) + 10 * (door > 1.35)
    palm, obj = data.site_xpos[env.S_grasp_site_id], data.xpos[env.obj_body_id]
    if task == "hammer":
        tool, nail, goal = (data.site_xpos[i] for i in (env.tool_site_id, env.target_obj_site_id, env.goal_site_id))
        reward = -0.1 * norm(palm - obj) - norm(tool - nail) - 10 * norm(nail - goal) - 1e-2 * norm(data.qvel)
        reward += 2 * (obj[2] > 0.04 and tool[2] > 0.04)
        return reward + 25 * (norm(nail - goal) < 0.02) + 75 * (norm(nail - goal) < 0.01)
    target = data.site_xpos[env.target_obj_site_id]  # relocate
    reward = -0.1 * norm(palm - obj)
    if obj[2] > 0.04:  # the object is off the table
        reward += 1.0 - 0.5 * norm(palm - target) - 0.5 * norm(obj - target)
    return reward + 10 * (norm(obj - target) < 0.1) + 20 * (norm(obj - target) < 0.05)


# The Adroit rewards Minari stores: it re-simulated D4RL's initial states and actions in gymnasium-robotics and kept
# env.step's reward, which gymnasium-robotics 1.2.1-1.4.2 compute with +0.1 |palm - object| where D4RL subtracts it
# (door, hammer, relocate; pen's is D4RL's in every version). D4RL's reward is recomputed from each transition's next
# observation (the state after the step), as far as it shows it: pen's wholly; relocate's too, but for its lift test
# (object above 0.04) within 4 mm of the threshold, where the object's height, from the hand's forward kinematics, is
# a MuJoCo substep off (both outcomes allowed there); door's and hammer's but for a penalty on the joint velocities,
# which no observation holds: it must be at least 0 (hammer: at least that of the velocities its observation shows),
# and where both forms allow that, the form whose implied penalties are nearest those of the velocities estimated
# from consecutive observations (at a step's end: the mean of the mean velocities of the steps around it) is the
# file's.
REWARD_FORMS = {"D4RL": 0.0, "gymnasium-robotics 1.2.1-1.4.2": 0.2}  # form: its reward - D4RL's, per |palm - object|
REWARD_TOLERANCE = 1e-5


def d4rl_reward_parts(task: str, obs: np.ndarray, next_obs: np.ndarray, terminals: np.ndarray, env) -> tuple:
    """(lower, upper bound of D4RL's reward, |palm - object|, D4RL's reward but its joint-velocity penalty, an
    estimate of that penalty) per transition: rows of gymnasium-robotics' Adroit observations before and after the
    step (terminals: 1 at each episode's last). `env` is the task's (`env.unwrapped`): its model gives the hammer's
    geometry and the hand's forward kinematics."""
    o, norm, zeros = next_obs, lambda x: np.linalg.norm(x, axis=-1), np.zeros(len(next_obs))
    if task == "pen":  # pen_v0.py: object position - goal, orientations, the drop
        dist, similarity = norm(o[:, 39:42]), np.sum(o[:, 33:36] * o[:, 36:39], axis=1)
        bonus = 10 * ((dist < 0.075) & (similarity > 0.9)) + 50 * ((dist < 0.075) & (similarity > 0.95))
        reward = -dist + similarity + bonus - 5 * (o[:, 26] < PEN_DROP_HEIGHT)
        return reward, reward, zeros, reward, zeros
    joints = (o - obs)[:, :29 if task == "door" else 27] / env.dt  # qpos but the arm's height (door), the hammer's
    inner = np.flatnonzero(terminals[:-1] == 0)  # a step's end velocity: the mean of the steps' around it
    joints[inner] = (joints[inner] + joints[inner + 1]) / 2
    if task == "door":  # door_v0.py: palm - handle, the hinge's angle; penalty 1e-5 |qvel|^2
        door, distance = o[:, 28], norm(o[:, 35:38])
        reward = -0.1 * distance - 0.1 * (door - 1.57) ** 2 + 2 * (door > 0.2) + 8 * (door > 1.0) + 10 * (door > 1.35)
        return np.full(len(o), -np.inf), reward, distance, reward, 1e-5 * np.sum(joints ** 2, axis=1)
    model = env.model
    if task == "hammer":  # hammer_v0.py: palm, hammer, its head (a site on it), nail, goal; penalty 1e-2 |qvel|
        from gymnasium_robotics.utils.rotations import euler2mat

        palm, hammer, nail = o[:, 33:36], o[:, 36:39], o[:, 42:45]
        head = hammer + euler2mat(o[:, 39:42]) @ model.site_pos[env.tool_site_id]
        depth = model.site_pos[env.target_obj_site_id][2] - model.site_pos[env.goal_site_id][2]
        goal = np.abs(depth - o[:, 26])  # nail - goal: the nail slides down its joint (obs[26]) towards the goal
        distance, lifted = norm(palm - hammer), (hammer[:, 2] > 0.04) & (head[:, 2] > 0.04)
        reward = -0.1 * distance - norm(head - nail) - 10 * goal + 2 * lifted + 25 * (goal < 0.02) + 75 * (goal < 0.01)
        shown = o[:, 27:33]  # the hammer's velocities, clipped to [-1, 1]: the penalty is at least theirs
        estimate = 1e-2 * norm(np.concatenate([joints, shown], axis=1))
        return np.full(len(o), -np.inf), reward - 1e-2 * norm(shown), distance, reward, estimate
    import mujoco  # relocate_v0.py: palm - object, palm - target, object - target, and the lift test

    data, palm_z = mujoco.MjData(model), np.empty(len(o))
    for i, hand in enumerate(o[:, :30]):
        data.qpos[:30] = hand
        mujoco.mj_kinematics(model, data)
        palm_z[i] = data.site_xpos[env.S_grasp_site_id][2]
    distance, to_target, obj_to_target = norm(o[:, 30:33]), norm(o[:, 33:36]), norm(o[:, 36:39])
    height = palm_z - o[:, 32]  # obs[30:33] = palm - object
    reward = -0.1 * distance + 10 * (obj_to_target < 0.1) + 20 * (obj_to_target < 0.05)
    lift = 1.0 - 0.5 * to_target - 0.5 * obj_to_target  # added while the object is off the table
    low, high = reward + lift * (height > 0.044), reward + lift * (height > 0.036)  # (the test's 0.04 +- 4 mm)
    return np.minimum(low, high), np.maximum(low, high), distance, np.maximum(low, high), zeros


def d4rl_rewards(task: str, data: dict, env, dataset_id: str) -> tuple[np.ndarray, str]:
    """D4RL's rewards of a Minari Adroit file's transitions (`data`, transitions()'s), and the form (REWARD_FORMS)
    its rewards are stored in; a MinariError names the first transition whose stored reward fits no form."""
    stored = data["rewards"]
    lower, upper, distance, free, estimate = d4rl_reward_parts(task, data["observations"],
                                                               data["next_observations"], data["terminals"], env)
    d4rl = {form: stored - gap * distance for form, gap in REWARD_FORMS.items()}  # were the file in that form
    fits = {form: (lower - REWARD_TOLERANCE <= r) & (r <= upper + REWARD_TOLERANCE) for form, r in d4rl.items()}
    if forms := [form for form, fit in fits.items() if fit.all()]:  # two only where a velocity penalty hides their
        form = min(forms, key=lambda f: np.median(np.abs(free - d4rl[f] - estimate)))  # gap: its penalties decide
        return d4rl[form], form
    neither = ~np.logical_or.reduce(list(fits.values()))
    row = int(np.argmax(neither if neither.any() else ~fits[max(fits, key=lambda f: fits[f].sum())]))

    def span(low, high):
        return f"{high:.6g}" if low == high else f"at most {high:.6g}" if low == -np.inf else f"{low:.6g} to {high:.6g}"

    expected = ", ".join(f"{form}'s {span(lower[row] + gap * distance[row], upper[row] + gap * distance[row])}"
                         for form, gap in REWARD_FORMS.items())
    raise MinariError(f"{dataset_id}: the stored reward of transition {row} ({stored[row]:.6g}) fits no known form "
                      f"(from its observations: {expected}); " + ("its rows do not all hold one form" if not
                      neither.any() else "the file is not a D4RL Adroit dataset as Minari makes them"))


def make_env(dataset_id: str, max_episode_steps: int | None = None, dataset=None):
    """The task's evaluation environment as D4RL defined it (module docstring), with flat observations; `dataset` is
    the loaded Minari dataset when the caller has it. For the paper's 18 tasks; other Minari datasets get the
    evaluation environment they store."""
    try:
        import gymnasium_robotics

        gymnasium.register_envs(gymnasium_robotics)  # AntMaze and Adroit
    except ImportError:
        pass
    check_supported(dataset_id)
    dataset = dataset if dataset is not None else _load(dataset_id)
    name = maze_of(dataset_id) if is_antmaze(dataset_id) else family(dataset_id)
    steps = max_episode_steps
    if steps is None and dataset_id in TASKS:
        steps = MAX_EPISODE_STEPS[name]  # D4RL's, whatever the dataset's spec says
    overrides = {} if steps is None else {"max_episode_steps": steps}
    try:
        if is_antmaze(dataset_id) and dataset_id in TASKS:  # the data's environment, on D4RL's maze and task
            env = AntMazeGoal(dataset.recover_environment(maze_map=ANTMAZE_MAPS[name], continuing_task=True,
                                                          reset_target=False, **overrides))
        else:
            env = dataset.recover_environment(eval_env=True, **overrides)
            if dataset_id in TASKS:
                env = AdroitD4RL(env, name)
    except (ValueError, gymnasium.error.Error) as e:
        raise MinariError(f"the environment of Minari dataset {dataset_id} cannot be made ({e}); is "
                          "gymnasium-robotics installed (pip install -r requirements-extra.txt)?") from None
    keys = _flat_observation_keys(env.observation_space)
    if keys is not None:
        space = gymnasium.spaces.Box(-np.inf, np.inf, (sum(env.observation_space[k].shape[0] for k in keys),),
                                     np.float32)
        env = gymnasium.wrappers.TransformObservation(env, lambda obs: flatten(obs, keys), space)
    return env


def transitions(episodes, offset: float, keys: tuple[str, ...] | None = None,
                goal: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Flat transitions with the official conventions (module docstring) from episodes with Minari's fields:
    observations (T + 1 of them), actions, rewards, terminations, truncations (T each); `offset` is added to every
    reward (D4RL AntMaze: -1). With `goal` (AntMaze), rewards and masks are relabelled to it from the next
    observation's position (its first two numbers): reward 1 and mask 0 within GOAL_RADIUS, else reward 0 and mask 1.
    Float64 as stored (the Adroit reward check recomputes from them); the caller casts."""
    parts = {k: [] for k in ("observations", "actions", "rewards", "masks", "terminals", "next_observations")}
    for episode in episodes:
        obs = flatten(episode.observations, keys, np.float64)
        steps = len(episode.actions)
        if len(obs) != steps + 1:
            raise MinariError(f"an episode has {len(obs)} observations for {steps} actions (Minari stores T + 1)")
        terminals = np.zeros(steps, dtype=np.float32)
        terminals[-1] = 1.0
        rewards, ends = np.asarray(episode.rewards, np.float64), np.asarray(episode.terminations, np.float32)
        if goal is not None:  # D4RL's relabelling (scripts/generation/relabel_antmaze_rewards.py)
            rewards = ends = (np.linalg.norm(obs[1:, :2] - goal, axis=1) <= GOAL_RADIUS).astype(np.float32)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(episode.actions, dtype=np.float64))
        parts["rewards"].append(rewards + offset)
        parts["masks"].append(1.0 - ends)
        parts["terminals"].append(terminals)
    if not parts["actions"]:
        raise MinariError("the dataset has no episodes")
    return {k: np.concatenate(v) for k, v in parts.items()}


def load_env_and_datasets(dataset_id: str, dataset_path: str | None = None, generate_episodes: int = 0):
    """(env, train, None): the evaluation environment and the transitions (module docstring); D4RL has no
    validation split. (common.datasets clips the actions and checks the values, as for OGBench.)"""
    if dataset_path is not None or generate_episodes:
        raise DatasetError(f"{dataset_id} is a Minari dataset: --dataset-path and --generate-episodes are for OGBench; "
                           "Minari datasets are looked for in $MINARI_DATASETS_PATH (~/.minari/datasets)")
    env, train = load_env_and_dataset(dataset_id)
    return env, train, None


def load_env_and_dataset(dataset_id: str):
    """(env, train) for a Minari dataset id: the evaluation environment and the transitions (module docstring)."""
    check_supported(dataset_id)
    dataset = _load(dataset_id)
    env = make_env(dataset_id, dataset=dataset)
    keys = _flat_observation_keys(dataset.observation_space)
    if len(dataset.action_space.shape) != 1:
        raise MinariError(f"{dataset_id} has actions {dataset.action_space}; DeFlow needs a flat Box of actions")
    goal = None
    if is_antmaze(dataset_id) and dataset_id in TASKS:  # once per run: D4RL's maze must be the data's, wall for wall
        maze, data_maze = maze_of(dataset_id), dataset.recover_environment().unwrapped.maze.maze_map
        if walls(ANTMAZE_MAPS[maze]) != walls(data_maze):
            raise MinariError(f"the maze of {dataset_id}'s data is not D4RL's {maze} maze: {data_maze}")
        goal = cell_xy(ANTMAZE_MAPS[maze], G)
    train = transitions(dataset.iterate_episodes(), -1.0 if is_antmaze(dataset_id) else 0.0, keys, goal)
    if train["observations"].shape[1:] != env.observation_space.shape:
        raise MinariError(f"{dataset_id} has observations of shape {train['observations'].shape[1:]} but its "
                          f"environment {env.observation_space.shape}; the dataset belongs to another environment")
    if dataset_id in TASKS and not is_antmaze(dataset_id):  # Adroit: D4RL's reward, whichever form is stored
        train["rewards"], form = d4rl_rewards(family(dataset_id), train, env.unwrapped, dataset_id)
        print(f"{dataset_id}: the stored rewards are {form}'s; training uses D4RL's")
    return env, {k: v.astype(np.float32) for k, v in train.items()}


@functools.lru_cache
def reference_scores(dataset_id: str) -> tuple[float, float] | None:
    """D4RL's reference scores (random, expert) of one of the paper's tasks (REFERENCE_SCORES), with a line printed
    once where the Minari dataset stores others; for other Minari datasets the stored ones (None without)."""
    metadata = _load(dataset_id).storage.metadata
    stored = None
    if metadata.get("ref_min_score") is not None and metadata.get("ref_max_score") is not None:
        stored = float(metadata["ref_min_score"]), float(metadata["ref_max_score"])
    if dataset_id not in TASKS:
        return stored
    scores = REFERENCE_SCORES[family(dataset_id)]
    if stored is not None and not np.allclose(stored, scores, rtol=1e-6):
        print(f"note: Minari stores the reference scores {stored} for {dataset_id}; the scores here use D4RL's "
              f"{scores} (d4rl/infos.py), as the paper does", file=sys.stderr)
    return scores


def normalized_return(env_name: str, episode_return: float) -> float | None:
    """The D4RL score x 100 of a raw (un-shifted) return; None for OGBench tasks and datasets without references."""
    scores = reference_scores(env_name) if "/" in env_name else None
    if scores is None:
        return None
    return 100.0 * (episode_return - scores[0]) / (scores[1] - scores[0])

"""OGBench datasets generated locally with the scripted oracles that ship in the `ogbench` package: what the scripts'
--generate-episodes and `python -m tools.generate` (its command line) run.

For machines without internet (clusters, CI): writes the same two files OGBench publishes
(`<name>.npz` for training and `<name>-val.npz` for validation) with the same keys and dtypes:
observations, actions, terminals (bool), qpos, qvel and, for scene/puzzle, button_states (int64).
`ogbench.make_env_and_datasets(env_name, dataset_path=...)` then loads them with the real single-task reward
relabeling, exactly like a downloaded file.

Supported: the manipulation 'play' datasets (cube-*, scene, puzzle-*), their visual-* variants (64x64x3 uint8
frames rendered by MuJoCo: set MUJOCO_GL=egl or osmesa without a display; a CPU renders a few frames/s) and pointmaze
'navigate'. A single-task name
(`cube-single-play-singletask-task2-v0`) names the same dataset. Episodes follow OGBench's own generation recipe:
`--episodes` training episodes plus episodes // 10 validation episodes (at least 1), each `--episode-length` steps
(1001 in every official dataset, so 1000 episodes make the official 1M transitions). Differences from the official
generator: every episode is seeded from (--seed, episode index), so a file depends only on its own settings (the data
seed, default 0, whatever run asks for it; recorded in the file as `generation`) and not on --num-workers, but is not
bit-identical to the published ones; small runs get at least one validation episode.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import re
from pathlib import Path

import numpy as np

from common.datasets import dataset_name_of

# The dataset families whose oracle ships in the `ogbench` package, as (name pattern, dataset type).
GENERATABLE = (
    (r"(visual-)?(cube-(single|double|triple|quadruple|octuple)|scene|puzzle-\d+x\d+)", "play"),
    (r"pointmaze-(medium|large|giant|teleport)", "navigate"),
)


def generation_target(env_name: str) -> tuple[str, str]:
    """Map a dataset or single-task name to (gym id of the data-collection env, dataset type), or raise ValueError."""
    name = dataset_name_of(env_name)
    base, dataset_type, version = (["", ""] + name.rsplit("-", 2))[-3:]
    for pattern, family_type in GENERATABLE:
        if dataset_type == family_type and re.fullmatch(pattern, base):
            return f"{base}-{version}", dataset_type
    raise ValueError(
        f"cannot generate '{name}' locally: the ogbench package ships oracles only for the manipulation 'play' "
        "datasets (cube-single/double/triple/quadruple, scene, puzzle-3x3/4x4/4x5/4x6, and their visual-* variants) and "
        "pointmaze-* 'navigate'. "
        "Locomotion datasets (antmaze, humanoidmaze, antsoccer) need OGBench's trained experts: download them on a "
        "machine with internet (ogbench.download_datasets) and copy the .npz files over."
    )


# ---------------------------------------------------------------------------------------------------------------------
# One episode per call. A worker builds its environment and oracles once (in `_init_worker`) and keeps them.
# ---------------------------------------------------------------------------------------------------------------------
_worker: dict = {}


def _init_worker(gym_id: str, dataset_type: str, episode_length: int, seed: int) -> None:
    import gymnasium

    import ogbench  # noqa: F401  (registers the environments)

    kwargs = dict(terminate_at_goal=False, max_episode_steps=episode_length)
    if dataset_type == "play":
        kwargs["mode"] = "data_collection"
    env = gymnasium.make(gym_id, **kwargs)
    _worker.update(env=env, gym_id=gym_id, dataset_type=dataset_type, seed=seed)
    if dataset_type == "play":
        _worker["oracles"] = _make_plan_oracles(env, gym_id)
    else:
        _worker["cells"] = _maze_cells(env.unwrapped.maze_map)


def _make_plan_oracles(env, gym_id: str) -> dict:
    """OGBench's 'play' data: non-Markovian plan oracles with noise 0.1 and noise smoothing 0.5."""
    from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
    from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

    noise = dict(noise=0.1, noise_smoothing=0.5)
    if "puzzle" in gym_id:
        return {"button": ButtonPlanOracle(env=env, gripper_always_closed=True, **noise)}
    oracles = {"cube": CubePlanOracle(env=env, **noise)}
    if "scene" in gym_id:
        oracles.update(
            button=ButtonPlanOracle(env=env, **noise),
            drawer=DrawerPlanOracle(env=env, **noise),
            window=WindowPlanOracle(env=env, **noise),
        )
    return oracles


def _maze_cells(maze_map: np.ndarray) -> tuple[list, list]:
    """Free cells (start states) and free cells that are not straight corridor pieces (goals), as OGBench samples."""
    free, goals = [], []
    for i in range(maze_map.shape[0]):
        for j in range(maze_map.shape[1]):
            if maze_map[i, j] != 0:
                continue
            free.append((i, j))
            vertical_corridor = maze_map[i - 1, j] == 0 == maze_map[i + 1, j] and maze_map[i, j - 1] == 1 == maze_map[i, j + 1]
            horizontal_corridor = maze_map[i, j - 1] == 0 == maze_map[i, j + 1] and maze_map[i - 1, j] == 1 == maze_map[i + 1, j]
            if not (vertical_corridor or horizontal_corridor):
                goals.append((i, j))
    return free, goals


def _stacking_probability(gym_id: str) -> float:
    """Per-episode probability that a cube task is a stacking task, as in OGBench's generator."""
    for word, (low, high) in {"single": (0, 0), "double": (0, 0.25), "triple": (0.05, 0.35),
                              "quadruple": (0.1, 0.5), "octuple": (0, 0.35)}.items():
        if word in gym_id:
            return np.random.uniform(low, high)
    return 0.5


def _scene_is_healthy(qpos: np.ndarray) -> bool:
    """OGBench's check that the scene cube never leaves the camera view (unless it is inside the drawer)."""
    xyz = qpos[:, 14:17]
    too_far_right = (xyz[:, 1] >= 0.29).any()
    too_far_left = ((xyz[:, 1] <= -0.3) & ((xyz[:, 2] < 0.06) | (xyz[:, 2] > 0.08))).any()
    return not (too_far_right or too_far_left)


def _play_episode(env, oracles: dict, gym_id: str, record) -> None:
    ob, info = env.reset()
    p_stack = _stacking_probability(gym_id)
    oracle = oracles[info["privileged/target_task"]]
    oracle.reset(ob, info)
    done = False
    while not done:
        action = np.clip(np.asarray(oracle.select_action(ob, info)), -1, 1)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if oracle.done:  # the oracle finished its sub-task: the play data moves straight on to a new one
            oracle_ob, oracle_info = env.unwrapped.set_new_target(p_stack=p_stack)
            oracle = oracles[oracle_info["privileged/target_task"]]
            oracle.reset(oracle_ob, oracle_info)
        record(ob, action, done, info)
        ob = next_ob


def _navigate_episode(env, cells: tuple[list, list], record, noise: float = 0.2) -> None:
    free, goals = cells
    pick = lambda cells: cells[np.random.randint(len(cells))]  # noqa: E731
    ob, _ = env.reset(options=dict(task_info=dict(init_ij=pick(free), goal_ij=pick(goals))))
    maze = env.unwrapped
    done = False
    while not done:
        subgoal_xy, _ = maze.get_oracle_subgoal(maze.get_xy(), maze.cur_goal_xy)
        direction = subgoal_xy - maze.get_xy()
        action = np.clip(direction / (np.linalg.norm(direction) + 1e-6) + np.random.normal(0, noise, 2), -1, 1)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if info["success"]:  # 'navigate': a new random goal every time one is reached
            maze.set_goal(pick(goals))
        record(ob, action, done, info)
        ob = next_ob


def generate_episode(index: int) -> dict[str, np.ndarray]:
    """Collect episode `index` (seeded from the data seed and the index) and return its arrays."""
    w = _worker
    episode_seed = int(np.random.SeedSequence(w["seed"], spawn_key=(index,)).generate_state(1)[0])
    w["env"].reset(seed=episode_seed)  # seeds the environment's own generator
    np.random.seed(episode_seed)  # the oracles and the stacking probability use numpy's global generator
    while True:
        steps: dict[str, list] = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel", "button_states")}

        def record(ob, action, done, info):
            steps["observations"].append(ob)
            steps["actions"].append(action)
            steps["terminals"].append(done)
            steps["qpos"].append(info["prev_qpos"])  # the state the observation was taken in
            steps["qvel"].append(info["prev_qvel"])
            if "prev_button_states" in info:
                steps["button_states"].append(info["prev_button_states"])

        if w["dataset_type"] == "play":
            _play_episode(w["env"], w["oracles"], w["gym_id"], record)
        else:
            _navigate_episode(w["env"], w["cells"], record)
        if "scene" not in w["gym_id"] or _scene_is_healthy(np.asarray(steps["qpos"])):
            break  # (an unhealthy scene episode is collected again, continuing the same random stream)
    dtypes = dict(terminals=bool, button_states=np.int64)
    if steps["observations"][0].dtype == np.uint8:  # visual-*: 64x64x3 frames stay uint8, as OGBench stores them
        dtypes["observations"] = np.uint8
    return {k: np.asarray(v, dtype=dtypes.get(k, np.float32)) for k, v in steps.items() if v}


def generate_missing(env_name: str, episodes: int, out: Path, num_workers: int = 1) -> None:
    """A training script's --generate-episodes: generate `out` (and its -val file) with data seed 0 unless it exists.
    Runs that ask for the same missing file at once (a sweep over seeds) take turns through a lock next to it: the
    first generates it, the others then find it; a dataset without an oracle is a ValueError saying what to do."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (also if this process dies)
        if not (out.exists() and out.with_name(out.name[: -len(".npz")] + "-val.npz").exists()):
            generate_dataset(env_name, episodes, out, num_workers=num_workers)


def save_npz_atomic(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a compressed .npz so that `path` is either absent or complete, never half-written (a temporary name of
    this process's own: processes writing the same file at once never mix their bytes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def generate_dataset(env_name: str, episodes: int, out: str | Path, num_workers: int = 1, episode_length: int = 1001,
                     seed: int = 0, progress: bool = True) -> tuple[Path, Path]:
    """Generate `episodes` training episodes (+ episodes // 10, at least 1, validation ones); return both paths."""
    from tqdm import tqdm

    gym_id, dataset_type = generation_target(env_name)
    out = Path(out).expanduser()
    if out.suffix != ".npz":
        raise ValueError(f"--out must end in .npz (got {out}); the validation file is written next to it as *-val.npz")
    val_out = out.with_name(out.name[: -len(".npz")] + "-val.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    num_val = max(1, episodes // 10)
    total = episodes + num_val
    init_args = (gym_id, dataset_type, episode_length, seed)
    bar = tqdm(total=total * episode_length, unit="step", unit_scale=True, desc=f"generating {out.name}",
               disable=not progress, dynamic_ncols=True)
    results = []
    if num_workers <= 1:
        global_state = np.random.get_state()  # the oracles draw from numpy's global generator: give it back after
        _init_worker(*init_args)
        for i in range(total):
            results.append(generate_episode(i))
            bar.update(len(results[-1]["actions"]))
        np.random.set_state(global_state)
        _worker.clear()  # and its environment
    else:
        # 'spawn': MuJoCo and torch must not be inherited through fork.
        with multiprocessing.get_context("spawn").Pool(num_workers, _init_worker, init_args) as pool:
            for episode in pool.imap(generate_episode, range(total)):
                results.append(episode)
                bar.update(len(episode["actions"]))
    bar.close()
    settings = json.dumps({"env_name": gym_id, "dataset_type": dataset_type, "episodes": episodes,
                           "episode_length": episode_length, "seed": seed})  # OGBench's loader reads only its keys
    for path, part in ((out, results[:episodes]), (val_out, results[episodes:])):
        save_npz_atomic(path, {**{k: np.concatenate([ep[k] for ep in part]) for k in part[0]},
                               "generation": np.array(settings)})
    return out, val_out

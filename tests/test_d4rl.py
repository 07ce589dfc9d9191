"""D4RL through Minari, without internet: tiny datasets in Minari's own format (its DataCollector and
create_dataset_from_buffers) from the real gymnasium-robotics environments, loaded through the function users call."""

import os

import gymnasium
import numpy as np
import pytest
import torch
from packaging.version import Version

from common import d4rl
from common.datasets import DatasetError, load_env_and_datasets, make_env
from tests.conftest import TINY_FLAGS, read_csv, run_script

minari = pytest.importorskip("minari")
from minari.data_collector import EpisodeBuffer  # noqa: E402
gymnasium_robotics = pytest.importorskip("gymnasium_robotics")
gymnasium.register_envs(gymnasium_robotics)

ANTMAZE, PEN = "D4RL/antmaze/umaze-v1", "D4RL/pen/cloned-v2"
HANDMADE_ANTMAZE, HANDMADE_FLAT = "D4RL/antmaze/medium-play-v1", "test/pen-handmade-v0"
WRONG_MAZE = "D4RL/antmaze/large-play-v1"  # data recorded in the U-maze under a large-maze name
NEITHER = "D4RL/door/human-v2"  # door's recording, its rewards 0.5 above gymnasium-robotics'
ADROIT_SLICES = {"door": lambda o: o[35:38], "hammer": lambda o: o[33:36] - o[36:39], "relocate": lambda o: o[30:33]}
# Minari's umaze datasets: data in the U-maze with the goal on top, and an evaluation spec whose maze is mirrored
# (Minari#304), as its generation script writes them.
MINARI_UMAZE_DATA = [[1, 1, 1, 1, 1], [1, "g", 0, 0, 1], [1, 1, 1, 0, 1], [1, "r", 0, 0, 1], [1, 1, 1, 1, 1]]
MINARI_UMAZE_EVAL = [[1, 1, 1, 1, 1], [1, 0, 0, "r", 1], [1, 0, 1, 1, 1], [1, 0, 0, "g", 1], [1, 1, 1, 1, 1]]
MEDIUM_GOAL = np.array([10.0, -10.0])  # the centre of D4RL's medium goal cell in gymnasium-robotics' coordinates


def stack(observations: list):
    """Observations of one episode as Minari stores them: an array, or a dict of arrays for a Dict space."""
    if isinstance(observations[0], dict):
        return {k: np.stack([o[k] for o in observations]) for k in observations[0]}
    return np.stack(observations)


def record(dataset_id: str, env_id: str, episodes: int, steps: int, eval_steps: int, seed: int, eval_kwargs=None,
           reward_of=None, action_scale=1.0, **kwargs):
    """A few random-action episodes of a real environment, written with Minari's own writer (its DataCollector
    needs jax, which this project does not; the buffers it would make are built here instead). The rewards are the
    environment's (gymnasium-robotics') or reward_of(env.unwrapped, its reward) after each step."""
    env = gymnasium.make(env_id, max_episode_steps=steps, **kwargs)
    rng = np.random.default_rng(seed)
    buffers = []
    for episode in range(episodes):
        observations, rewards, terminations, truncations = [env.reset(seed=seed + episode)[0]], [], [], []
        actions = []
        while not (terminations and (terminations[-1] or truncations[-1])):
            actions.append(action_scale * rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
            obs, reward, terminated, truncated, _ = env.step(actions[-1])
            reward = reward if reward_of is None else reward_of(env.unwrapped, reward)
            observations.append(obs)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
        buffers.append(EpisodeBuffer(seed=seed + episode, observations=stack(observations),
                                     actions=np.stack(actions), rewards=np.array(rewards),
                                     terminations=np.array(terminations), truncations=np.array(truncations)))
    eval_env = gymnasium.make(env_id, max_episode_steps=eval_steps, **{**kwargs, **(eval_kwargs or {})})
    minari.create_dataset_from_buffers(dataset_id, buffers, env=env, eval_env=eval_env.spec, algorithm_name="random",
                                       ref_min_score=-10.0, ref_max_score=90.0)


def handmade_episodes(observation, action_dim: int, rng) -> list:
    """Three episodes with known boundaries: 3 steps ending in a termination, 2 ending in a truncation, 1 more."""
    episodes = []
    for steps, terminated in ((3, True), (2, False), (1, False)):
        last = np.eye(steps, dtype=bool)[-1]
        episodes.append(EpisodeBuffer(observations=observation(steps + 1),
                                      actions=rng.uniform(-1, 1, (steps, action_dim)).astype(np.float32),
                                      rewards=np.arange(steps, dtype=np.float64), terminations=last & terminated,
                                      truncations=last & (not terminated)))
    return episodes


@pytest.fixture(scope="module")
def minari_root(tmp_path_factory):
    """MINARI_DATASETS_PATH with the tiny datasets (the scripts started by the tests see it too)."""
    root = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    d4rl.reference_scores.cache_clear()
    maze = dict(reward_type="sparse", continuing_task=True, reset_target=False)
    record(ANTMAZE, "AntMaze_UMaze-v4", episodes=2, steps=12, eval_steps=10, seed=0, maze_map=MINARI_UMAZE_DATA,
           eval_kwargs=dict(maze_map=MINARI_UMAZE_EVAL), **maze)
    record(PEN, "AdroitHandPen-v1", episodes=2, steps=12, eval_steps=10, seed=0)
    # 2 episodes of 12 steps in each form stored rewards can have, their actions small (a hand as slow as a demo's
    # at times: random ones keep it so fast that a joint-velocity penalty hides the difference of the two forms)
    for task in ("door", "hammer", "relocate"):
        env_id = f"AdroitHand{task.capitalize()}-v1"
        record(f"D4RL/{task}/cloned-v2", env_id, 2, 12, 10, seed=1, action_scale=0.1)  # gymnasium-robotics'
        record(f"D4RL/{task}/expert-v2", env_id, 2, 12, 10, seed=1, action_scale=0.1,
               reward_of=lambda hand, reward, task=task: d4rl.d4rl_adroit_reward(task, hand))  # D4RL's
    record(NEITHER, "AdroitHandDoor-v1", 2, 12, 10, seed=1, action_scale=0.1,
           reward_of=lambda hand, reward: reward + 0.5)
    rng = np.random.default_rng(0)
    pen = gymnasium.make("AdroitHandPen-v1")
    obs_dim = pen.observation_space.shape[0]
    minari.create_dataset_from_buffers(
        HANDMADE_FLAT, handmade_episodes(lambda n: rng.normal(size=(n, obs_dim)), 24, rng), env=pen)
    ant = gymnasium.make("AntMaze_Medium-v4", **maze)
    space = ant.observation_space
    # Positions that pass through the goal (within 0.5, and once between gymnasium-robotics' 0.45 and D4RL's 0.5),
    # while the stored rewards and terminations (of other goals) say otherwise.
    path = iter(MEDIUM_GOAL + np.array([[-3, 0], [0.2, 0.1], [2, 0], [0.48, 0], [0.3, -0.3], [0, 5], [1, 0],
                                        [0, 0], [-0.1, 0.0]]))

    def ant_observation(n):
        obs = {k: rng.normal(size=(n, *space[k].shape)) for k in space}
        obs["achieved_goal"] = np.stack([next(path) for _ in range(n)])
        return obs

    minari.create_dataset_from_buffers(HANDMADE_ANTMAZE, handmade_episodes(ant_observation, 8, rng), env=ant)
    umaze = gymnasium.make("AntMaze_UMaze-v4", **maze)
    minari.create_dataset_from_buffers(WRONG_MAZE, handmade_episodes(
        lambda n: {k: rng.normal(size=(n, *space[k].shape)) for k in space}, 8, rng), env=umaze)
    yield root
    if old is None:
        del os.environ["MINARI_DATASETS_PATH"]
    else:
        os.environ["MINARI_DATASETS_PATH"] = old
    d4rl.reference_scores.cache_clear()


def test_conventions_on_handmade_episodes(minari_root):
    dataset = minari.load_dataset(HANDMADE_FLAT)
    raw = list(dataset.iterate_episodes())
    _, train, val = load_env_and_datasets(HANDMADE_FLAT)
    assert val is None  # D4RL has no validation split
    assert len(train["actions"]) == 6
    np.testing.assert_array_equal(train["terminals"], [0, 0, 1, 0, 1, 1])  # every episode boundary
    np.testing.assert_array_equal(train["masks"], [1, 1, 0, 1, 1, 1])  # only the true termination
    np.testing.assert_array_equal(train["rewards"], [0, 1, 2, 0, 1, 0])  # not AntMaze: unchanged
    obs = np.concatenate([e.observations[:-1] for e in raw])
    next_obs = np.concatenate([e.observations[1:] for e in raw])
    np.testing.assert_allclose(train["observations"], obs, rtol=1e-6)
    np.testing.assert_allclose(train["next_observations"], next_obs, rtol=1e-6)
    assert np.abs(train["actions"]).max() <= 1 - 1e-5  # clipped as every dataset


def test_antmaze_rewards_and_masks_relabelled_to_the_evaluation_goal(minari_root):
    """D4RL's relabelling: reward 1 and a terminal where the next position is within 0.5 of the task's goal, whatever
    Minari stored (here rewards 0, 1, 2 and a termination elsewhere); then the official -1 shift."""
    raw = list(minari.load_dataset(HANDMADE_ANTMAZE).iterate_episodes())
    _, train, _ = load_env_and_datasets(HANDMADE_ANTMAZE)
    # next positions: goal + (0.2, 0.1) hit, (2, 0) miss, (0.48, 0) hit | (0, 5) miss, (1, 0) miss | (-0.1, 0) hit
    np.testing.assert_array_equal(train["rewards"], [0, -1, 0, -1, -1, 0])
    np.testing.assert_array_equal(train["masks"], [0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(train["terminals"], [0, 0, 1, 0, 1, 1])  # episode boundaries, as before
    np.testing.assert_array_equal(d4rl.cell_xy(d4rl.ANTMAZE_MAPS["medium"], "g"), MEDIUM_GOAL)
    first = raw[0].observations
    expected = np.concatenate([first["achieved_goal"][0], first["observation"][0]])  # [x, y, the rest]; no goal
    np.testing.assert_allclose(train["observations"][0], expected, rtol=1e-6)


def test_umaze_evaluation_is_d4rls_task_in_the_data_maze(minari_root):
    env = make_env(ANTMAZE)
    dataset = minari.load_dataset(ANTMAZE)
    data_maze = dataset.recover_environment().unwrapped.maze.maze_map
    minari_eval_maze = dataset.recover_environment(eval_env=True).unwrapped.maze.maze_map
    assert d4rl.walls(env.unwrapped.maze.maze_map) == d4rl.walls(data_maze)
    assert d4rl.walls(minari_eval_maze) != d4rl.walls(data_maze)  # Minari's evaluation spec: the mirrored U (#304)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (29,) and obs.dtype == np.float32
    data = env.unwrapped.ant_env.data
    np.testing.assert_allclose(obs, np.concatenate([data.qpos, data.qvel]), rtol=1e-6)  # D4RL: qpos[:15], qvel[:14]
    assert np.abs(obs[:2] - [-4, -4]).max() <= 1 and np.abs(env.unwrapped.goal - [-4, 4]).max() <= 1  # D4RL's cells
    assert env.spec.max_episode_steps == 700  # D4RL's antmaze-umaze-v2 (the dataset's spec says 10)
    for offset, success in ((0.3, True), (0.8, False)):  # D4RL's goal test: within 0.5, then the episode ends
        env.reset(seed=0)
        data.qpos[:2] = env.unwrapped.goal + [offset, 0]
        _, reward, terminated, _, info = env.step(np.zeros(8, np.float32))
        assert (reward, terminated, info["success"]) == (float(success), success, success)
    with pytest.raises(DatasetError, match="not D4RL's large maze"):
        load_env_and_datasets(WRONG_MAZE)


def test_pen_ends_after_100_steps_or_when_the_pen_drops(minari_root):
    env = make_env(PEN)  # the dataset's spec says 10 steps, gymnasium-robotics 200: D4RL's pen has 100
    env.reset(seed=0)
    steps = 0
    while True:
        _, _, terminated, truncated, _ = env.step(np.zeros(24, np.float32))  # the hand holds still
        steps += 1
        if terminated or truncated:
            break
    assert (steps, terminated, truncated) == (100, False, True)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    while obs[26] >= d4rl.PEN_DROP_HEIGHT:  # random actions drop the pen (obs[24:27]: its position)
        obs, reward, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 24).astype(np.float32))
        assert not truncated and terminated == (obs[26] < d4rl.PEN_DROP_HEIGHT)
    assert terminated and reward < -4  # D4RL's -5 for the drop, on the step that ends the episode


@pytest.mark.parametrize("task", ["door", "hammer", "relocate"])
def test_adroit_rewards_are_d4rls(task):
    """gymnasium-robotics 1.2.1-1.4.2 add 0.1 |palm - object| where D4RL subtracts it; the wrapper returns D4RL's
    reward. Random actions from the start state earn about D4RL's own random reference score with it."""
    raw = gymnasium.make(f"AdroitHand{task.capitalize()}-v1")
    env = d4rl.AdroitD4RL(gymnasium.make(f"AdroitHand{task.capitalize()}-v1"), task)
    raw.reset(seed=0)
    env.reset(seed=0)
    rng, total = np.random.default_rng(0), 0.0
    buggy = Version("1.2.1") <= Version(gymnasium_robotics.__version__) <= Version("1.4.2")
    palm_minus_object = ADROIT_SLICES[task]
    for _ in range(200):
        action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        obs, raw_reward, *_ = raw.step(action)
        reward = env.step(action)[1]
        total += reward
        np.testing.assert_allclose(reward, raw_reward - buggy * 0.2 * np.linalg.norm(palm_minus_object(obs)),
                                   rtol=1e-9, atol=1e-12)
    random_score = d4rl.REFERENCE_SCORES[task][0]
    assert abs(total - random_score) < 0.05 * abs(random_score) + 5, (total, random_score)


def test_normalized_return_uses_d4rls_reference_scores(minari_root, capsys):
    d4rl.reference_scores.cache_clear()
    assert d4rl.normalized_return(ANTMAZE, 1.0) == 100.0  # AntMaze: 0 and 1, so 100 x the success rate
    assert d4rl.normalized_return(PEN, 96.262799) == pytest.approx(0.0)  # d4rl/infos.py, not the stored -10 and 90
    assert d4rl.normalized_return(PEN, 3076.8331017826877) == pytest.approx(100.0)
    assert "Minari stores the reference scores (-10.0, 90.0) for D4RL/pen/cloned-v2" in capsys.readouterr().err
    assert d4rl.normalized_return("cube-single-play-singletask-task1-v0", 1.0) is None
    assert {d4rl.family(t) for t in d4rl.TASKS} == set(d4rl.REFERENCE_SCORES)
    assert d4rl.REFERENCE_SCORES["hammer"] == (-274.856578, 12794.134825156867)
    assert d4rl.REFERENCE_SCORES["relocate"] == (-6.425911, 4233.877797728884)


def test_missing_dataset_says_where_to_download_and_copy(minari_root):
    with pytest.raises(DatasetError) as e:
        load_env_and_datasets("D4RL/relocate/human-v2")
    message = str(e.value)
    assert "minari download D4RL/relocate/human-v2" in message and "MINARI_DATASETS_PATH" in message
    assert str(minari_root) in message and "\n" not in message


def test_d4rl_names_point_to_the_minari_ids():
    with pytest.raises(DatasetError, match="--env-name D4RL/antmaze/large-play-v1"):
        load_env_and_datasets("antmaze-large-play-v2")
    assert d4rl.minari_id_of("hammer-expert-v1") == "D4RL/hammer/expert-v2"
    assert d4rl.minari_id_of("antmaze-large-navigate-v0") is None  # OGBench's, not D4RL's


def test_dict_observations_without_a_known_flattening_are_refused():
    space = gymnasium.spaces.Dict({"position": gymnasium.spaces.Box(-1, 1, (2,)),
                                   "velocity": gymnasium.spaces.Box(-1, 1, (2,))})
    with pytest.raises(d4rl.MinariError, match="flat Box observations and the AntMaze dict"):
        d4rl._flat_observation_keys(space)


def test_paper_tasks_and_recipes():
    assert len(d4rl.TASKS) == 18
    assert sum(d4rl.is_antmaze(t) for t in d4rl.TASKS) == 6
    assert d4rl.TASKS["D4RL/antmaze/large-diverse-v1"] == {"q_agg": "mean", "target_divergence": 0.015}
    assert d4rl.TASKS["D4RL/pen/expert-v2"] == {"q_agg": "min", "target_divergence": 0.01}
    assert d4rl.TASKS["D4RL/relocate/human-v2"] == {"q_agg": "min", "target_divergence": 0.001}


@pytest.mark.parametrize("dataset_id", [ANTMAZE, PEN])
def test_both_scripts_end_to_end(minari_root, tmp_path, dataset_id):
    common = ["--env-name", dataset_id, "--run-dir", tmp_path, "--log-interval", 2, "--eval-interval", 4,
              "--eval-episodes", 1, *TINY_FLAGS]
    offline = run_script(*common, "--offline-steps", 4, "--exp-name", "offline")
    assert " transitions, actions sha1 " in offline.stdout and "normalized_return" in offline.stdout
    run_dir = next(tmp_path.glob(f"{dataset_id.replace('/', '-')}__offline__*"))
    train, evals = read_csv(run_dir / "train.csv"), read_csv(run_dir / "eval.csv")
    assert not any(k.startswith("validation/") for k in train[0])
    assert [int(r["step"]) for r in evals] == [1, 4]
    assert all(np.isfinite(float(r["evaluation/episode.normalized_return"])) for r in evals)
    run_script(*common, "--offline-steps", 2, "--online-steps", 4, "--exp-name", "o2o", script="deflow_o2o.py")
    run_dir = next(tmp_path.glob(f"{dataset_id.replace('/', '-')}__o2o__*"))
    assert [int(r["step"]) for r in read_csv(run_dir / "eval.csv")] == [1, 2, 4, 6]
    online = torch.load(run_dir / "checkpoint.pt", weights_only=True)["buffer"]["data"]
    assert len(online["rewards"]) == 4
    if d4rl.is_antmaze(dataset_id):  # stored as the dataset's rewards: r - 1 (a random ant never reaches the goal)
        assert torch.equal(online["rewards"], -torch.ones(4))


@pytest.mark.parametrize("task", ["pen", "door", "hammer", "relocate"])
def test_d4rl_rewards_recomputed_from_the_observations_bound_the_simulators(task):
    """What the reward check recomputes from two observations alone: pen's D4RL reward exactly; door's and hammer's
    but for the joint-velocity penalty no observation holds (at least, for hammer, that of the velocities it shows),
    and an estimate of it; relocate's exactly but where the lift test is too close to call (then both outcomes)."""
    env = gymnasium.make(f"AdroitHand{task.capitalize()}-v1")
    observations, rng, true, penalty = [env.reset(seed=3)[0]], np.random.default_rng(3), [], []
    hand = env.unwrapped
    for _ in range(60):
        obs, reward, *_ = env.step(0.3 * rng.uniform(-1, 1, env.action_space.shape))
        observations.append(obs)
        true.append(reward if task == "pen" else d4rl.d4rl_adroit_reward(task, hand))  # (pen: D4RL's in both)
        penalty.append({"door": 1e-5 * np.sum(hand.data.qvel ** 2),
                        "hammer": 1e-2 * np.linalg.norm(hand.data.qvel)}.get(task, 0.0))
    obs, true, penalty = np.array(observations), np.array(true), np.array(penalty)
    terminals = np.eye(60)[-1]
    lower, upper, distance, free, estimate = d4rl.d4rl_reward_parts(task, obs[:-1], obs[1:], terminals, hand)
    assert np.all(lower - 1e-9 <= true) and np.all(true <= upper + 1e-9)
    if task in ("door", "hammer"):
        np.testing.assert_allclose(free - penalty, true, atol=1e-9)  # all but the penalty, exactly
        np.testing.assert_allclose(distance, [np.linalg.norm(ADROIT_SLICES[task](o)) for o in obs[1:]], atol=1e-12)
        assert np.sum(np.abs(estimate - penalty) < 0.1 * distance) >= 54  # within half the forms' difference
    else:
        assert np.sum(lower == upper) >= (20 if task == "relocate" else 60)  # (relocate: the object rests 5 mm
        # below the lift test's threshold)


@pytest.mark.parametrize("task", ["door", "hammer", "relocate"])
def test_adroit_datasets_in_either_reward_form_train_on_d4rls(minari_root, task, capsys):
    """The same episodes stored with gymnasium-robotics' rewards and with D4RL's load to the same rewards, D4RL's
    (recorded from the simulator), and the run says which form the file held."""
    gr, d4rl_form = (load_env_and_datasets(f"D4RL/{task}/{kind}-v2")[1] for kind in ("cloned", "expert"))
    np.testing.assert_allclose(gr["rewards"], d4rl_form["rewards"], rtol=0, atol=1e-6)
    stored = np.concatenate([e.rewards for e in minari.load_dataset(f"D4RL/{task}/expert-v2").iterate_episodes()])
    np.testing.assert_allclose(d4rl_form["rewards"], stored, rtol=0, atol=1e-6)  # D4RL's, as recorded
    out = capsys.readouterr().out
    assert f"D4RL/{task}/cloned-v2: the stored rewards are gymnasium-robotics 1.2.1-1.4.2's" in out
    assert f"D4RL/{task}/expert-v2: the stored rewards are D4RL's" in out


def test_a_file_whose_rewards_fit_no_form_is_refused_naming_the_row(minari_root):
    with pytest.raises(DatasetError, match=r"D4RL/door/human-v2: the stored reward of transition 0 \(.*\) fits no "
                                           r"known form .*D4RL's .*gymnasium-robotics 1.2.1-1.4.2's"):
        load_env_and_datasets(NEITHER)


def test_d4rl_ids_outside_the_papers_are_refused_with_the_list(minari_root):
    for dataset_id in ("D4RL/antmaze/umaze-v2", "D4RL/pen/human-v1"):  # Minari's generation names, an old version
        with pytest.raises(DatasetError, match="not one of the paper's D4RL datasets.*D4RL/antmaze/umaze-v1, "):
            load_env_and_datasets(dataset_id)
    assert "D4RL/antmaze/umaze-v2" not in str(minari_root)  # refused before any file is looked for

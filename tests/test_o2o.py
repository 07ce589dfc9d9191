"""deflow_o2o.py: the replay buffer, the frozen flow, and the script end to end through both phases."""


import numpy as np
import pytest
import torch

import deflow_o2o
from deflow_o2o import ReplayBuffer, draw_batch, resume_episode, transition
from tests.conftest import TINY_FLAGS, random_batch, read_csv, run_script, tiny_agent, train_step

ENV = "cube-single-play-singletask-task1-v0"


def dataset(n, obs_dim=3, action_dim=2, reward=0.0):
    """n transitions whose observations count 0..n-1, so every row is recognisable."""
    rows = torch.arange(n, dtype=torch.float32)
    return {"observations": rows[:, None].repeat(1, obs_dim), "actions": torch.zeros(n, action_dim),
            "rewards": torch.full((n,), reward), "masks": torch.ones(n), "terminals": torch.zeros(n),
            "next_observations": rows[:, None].repeat(1, obs_dim) + 1}


def online_transition(value, obs_dim=3, action_dim=2, terminated=False, truncated=False):
    obs = torch.full((obs_dim,), float(value)).numpy()
    return transition(obs, torch.zeros(action_dim).numpy(), 1.0, terminated, truncated, obs + 1)


def test_buffer_starts_as_the_dataset_and_appends_at_the_end():
    data = dataset(10)
    buffer = ReplayBuffer(data, capacity=16)
    assert buffer.num_added == 0
    for k, v in data.items():
        assert torch.equal(buffer.data[k][:10], v)
    for value in (100, 101, 102):
        buffer.add(online_transition(value))
    assert buffer.num_added == 3 and buffer.data["observations"][10:13, 0].tolist() == [100, 101, 102]
    assert buffer.data["rewards"][10:13].tolist() == [1, 1, 1]
    assert buffer.data["observations"][:10, 0].tolist() == list(range(10))  # the dataset is untouched
    assert buffer.sample(1000)["observations"][:, 0].max() <= 102  # sampling never reaches the empty rows


def test_buffer_smaller_than_the_dataset_keeps_room_for_one_online_transition():
    buffer = ReplayBuffer(dataset(10), capacity=4)  # --buffer-size below the dataset's size
    assert buffer.capacity == 11 and len(buffer.data["observations"]) == 11
    buffer.add(online_transition(100))
    assert buffer.data["observations"][10, 0] == 100 and set(buffer.sample(1000)["observations"][:, 0].tolist()) == {
        *range(10), 100}
    buffer.add(online_transition(101))  # full: the next row is row 0
    assert buffer.data["observations"][0, 0] == 101


def test_buffer_wraps_around_overwriting_the_oldest_rows():
    buffer = ReplayBuffer(dataset(10), capacity=12)
    for value in range(100, 105):  # rows 10, 11, then 0, 1, 2
        buffer.add(online_transition(value))
    assert buffer.data["observations"][:, 0].tolist() == [102, 103, 104, 3, 4, 5, 6, 7, 8, 9, 100, 101]
    seen = set(buffer.sample(5000)["observations"][:, 0].tolist())
    assert seen == {102, 103, 104, 3, 4, 5, 6, 7, 8, 9, 100, 101}  # every stored row is sampled, the last one too


def test_buffer_state_restores_the_same_buffer():
    data = dataset(10)
    buffer = ReplayBuffer(data, capacity=12)
    for value in range(100, 115):  # more than one full turn
        buffer.add(online_transition(value))
    restored = ReplayBuffer(data, capacity=12)
    restored.load_state(buffer.state(), "the checkpoint")
    assert restored.num_added == buffer.num_added
    for k in data:
        assert torch.equal(restored.data[k], buffer.data[k])
    with pytest.raises(SystemExit, match="the checkpoint does not fit this dataset and --buffer-size: its buffer "
                                         "holds 10 dataset rows in 12, this one 10 in 20"):
        ReplayBuffer(data, capacity=20).load_state(buffer.state(), "the checkpoint")


def test_balanced_batch_takes_half_from_each_part():
    data = dataset(50, reward=0.0)
    online = ReplayBuffer({k: v[:0] for k, v in data.items()}, capacity=8)  # empty, as --balanced-sampling makes it
    assert draw_batch(online, data, 64, online=False)["rewards"].eq(0).all()  # offline: the dataset only
    online.add(online_transition(7))  # sampling with replacement works from the first online transition
    batch = draw_batch(online, data, 64, online=True)
    assert batch["rewards"][:32].eq(0).all() and batch["rewards"][32:].eq(1).all()
    assert batch["observations"][32:, 0].eq(7).all()
    together = ReplayBuffer(data, capacity=60)  # without --balanced-sampling (no dataset apart): the buffer only
    together.add(online_transition(7))
    assert set(draw_batch(together, None, 5000, online=True)["observations"][:, 0].tolist()) == set(range(50)) | {7}


@pytest.mark.parametrize("terminated, truncated, terminal, mask", [
    (False, False, 0.0, 1.0),  # mid-episode
    (True, False, 1.0, 0.0),   # the task was solved: no bootstrapping past it
    (False, True, 1.0, 1.0),   # the time limit cut the episode: an episode boundary, but bootstrap
    (True, True, 1.0, 0.0),
])
def test_transition_masks_and_terminals(terminated, truncated, terminal, mask):
    t = online_transition(0, terminated=terminated, truncated=truncated)
    assert (t["terminals"], t["masks"]) == (terminal, mask)


class CountingEnv:
    """obs = seed + drift + the sum of the actions since the reset: deterministic unless `drift` changed."""

    def __init__(self, drift=0.0):
        self.drift, self.obs = drift, None

    def reset(self, seed):
        self.obs = np.array([seed + self.drift])
        return self.obs, {}

    def step(self, action):
        self.obs = self.obs + action
        return self.obs, 0.0, False, False, {}


def test_resume_episode_replays_the_interrupted_episode_or_starts_a_new_one(capsys):
    noise = torch.Generator().manual_seed(5)
    torch.randn(3, generator=noise)  # the episode's noise stream, part-way through
    saved = {"done": False, "obs": torch.tensor([12.0]), "seed": 3, "ret": 1.5, "started": 4, "exploration": {},
             "actions": torch.tensor([[4.0], [5.0]]), "noise": noise.get_state()}
    cpu = torch.device("cpu")
    episode = resume_episode(CountingEnv(), saved, cpu)
    assert not episode.done and episode.obs.tolist() == [12.0] and (episode.ret, episode.started) == (1.5, 4)
    assert [a.tolist() for a in episode.actions] == [[4.0], [5.0]] and "warning" not in capsys.readouterr().out
    assert torch.equal(torch.randn(2, generator=episode.noise), torch.randn(2, generator=noise))  # where it was
    assert resume_episode(CountingEnv(drift=1.0), saved, cpu).done  # not reproduced: a new episode, with a warning
    assert "warning: replaying the interrupted training episode" in capsys.readouterr().out
    between = {**saved, "done": True, "obs": None, "noise": None}
    assert resume_episode(CountingEnv(), between, cpu).done  # between episodes: nothing to do


def flow_state(agent):
    return {k: v.clone() for k, v in agent.flow.state_dict().items()}


def test_frozen_flow_does_not_move_even_with_adam_momentum():
    """Offline updates build Adam momentum in the flow; online with train_flow=False it must not move at all
    (officially it drifts on that momentum), while the refinement, the critic and alpha keep learning."""
    for train_flow in (False, True):
        agent, args = tiny_agent(script=deflow_o2o)
        optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3)
        for seed in range(5):
            train_step(deflow_o2o, agent, optimizer, random_batch(seed=seed), args)
        flow, refine, alpha = flow_state(agent), agent.refine.net[0].weight.clone(), agent.log_alpha.item()
        for seed in range(5, 10):
            metrics = train_step(deflow_o2o, agent, optimizer, random_batch(seed=seed), args, train_flow=train_flow)
        flow_same = all(torch.equal(v, agent.flow.state_dict()[k]) for k, v in flow.items())
        assert flow_same == (not train_flow)
        assert not torch.equal(refine, agent.refine.net[0].weight) and agent.log_alpha.item() != alpha
        assert (metrics["actor/bc_flow_loss"].item() == 0) == (not train_flow)


# ---------------------------------------------------------------------------------------------------------------------
# End to end: 20 offline updates, then 230 online steps (cube-single episodes last 200 steps, so one training episode
# ends at step 220 and a second is under way). The buffer holds 300 rows, so online data wraps around over the dataset.
# ---------------------------------------------------------------------------------------------------------------------
def numbers(run_dir):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_csv(run_dir / "train.csv")]


def run_o2o(*flags, **kwargs):
    return run_script(*flags, script="deflow_o2o.py", **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cube_dataset):
    """A: 20 + 230 straight. B: stopped at step 150 (mid-episode, online), resumed to 250. D: deflow_offline.py for
    20 updates; E: D's checkpoint fine-tuned online for 30 steps; F: the same with --fix-bc-flow-online."""
    root = tmp_path_factory.mktemp("runs")
    flags = ["--env-name", ENV, "--dataset-path", cube_dataset, "--run-dir", root, "--offline-steps", 20,
             "--log-interval", 10, "--eval-interval", 50, "--eval-episodes", 1, *TINY_FLAGS]
    out = {"A": run_o2o(*flags, "--buffer-size", 300, "--online-steps", 230, "--exp-name", "A"),
           "B": run_o2o(*flags, "--buffer-size", 300, "--online-steps", 130, "--exp-name", "B"),
           "D": run_script(*flags, "--exp-name", "D")}
    out["D_dir"] = next(root.glob("*__D__*"))
    offline_checkpoint = out["D_dir"] / "checkpoint.pt"
    for name, extra in (("E", []), ("F", ["--fix-bc-flow-online"])):
        out[name] = run_o2o("--resume", offline_checkpoint, "--online-steps", 30, "--buffer-size", 300,
                            "--exp-name", name, *extra)
    for name in "ABEF":
        out[name + "_dir"] = next(root.glob(f"*__{name}__*"))
    out["B_resume"] = run_o2o("--resume", out["B_dir"] / "checkpoint.pt", "--online-steps", 230)
    return out


def test_logs_hold_both_phases_and_exploration(runs):
    run_dir = runs["A_dir"]
    assert [int(r["step"]) for r in read_csv(run_dir / "eval.csv")] == [1, 20, 50, 100, 150, 200, 250]
    train = read_csv(run_dir / "train.csv")
    assert [int(r["step"]) for r in train] == list(range(10, 251, 10))
    by_step = {int(r["step"]): r for r in train}
    assert by_step[210]["exploration/episodes"] == "0" and by_step[210]["exploration/success"] == "nan"
    assert by_step[220]["exploration/episodes"] == "1"  # the first training episode ended at step 220
    assert float(by_step[220]["exploration/episode.length"]) == 200
    assert float(by_step[220]["exploration/success"]) == 0.0
    assert "offline phase done; 230 online steps" in runs["A"].stdout


def test_online_transitions_in_the_checkpoint(runs):
    """230 online transitions in a 300-row buffer after 118 dataset rows: rows 118..299, then 0..47."""
    state = torch.load(runs["A_dir"] / "checkpoint.pt", weights_only=True)["buffer"]
    assert state["num_added"] == 230 and state["rows"].tolist() == list(range(118, 300)) + list(range(48))
    terminals, masks = state["data"]["terminals"], state["data"]["masks"]
    assert terminals.nonzero().flatten().tolist() == [199]  # the time limit at the 200th step
    assert masks.eq(1).all()  # truncation, not termination: every transition bootstraps
    obs, next_obs = state["data"]["observations"], state["data"]["next_observations"]
    assert torch.equal(obs[1:199], next_obs[:198])  # consecutive steps within the episode
    assert not torch.equal(obs[200], next_obs[199])  # a reset after the time limit


def test_resume_mid_episode_continues_exactly(runs):
    assert "at step 151" in runs["B_resume"].stdout and "warning" not in runs["B_resume"].stdout
    assert numbers(runs["B_dir"]) == numbers(runs["A_dir"])
    assert read_csv(runs["B_dir"] / "eval.csv") == read_csv(runs["A_dir"] / "eval.csv")


def test_an_offline_run_continued_online_is_one_o2o_run(runs):
    """deflow_offline.py for 20 updates, then deflow_o2o.py --resume: the same numbers as A, in a new run dir."""
    assert "continuing the deflow_offline.py run" in runs["E"].stdout
    from_offline = numbers(runs["E_dir"])
    assert [int(r["step"]) for r in from_offline] == [30, 40, 50]
    assert from_offline == [r for r in numbers(runs["A_dir"]) if int(r["step"]) in (30, 40, 50)]
    assert len(read_csv(runs["D_dir"] / "train.csv")) == 2  # the offline run's own logs are untouched


def test_fix_bc_flow_online_freezes_the_flow_in_the_script(runs):
    offline, moving, fixed = (torch.load(runs[run + "_dir"] / "checkpoint.pt", weights_only=True)["agent"]
                              for run in "DEF")
    flow_keys = [k for k in offline if k.startswith("flow.")]
    assert all(torch.equal(fixed[k], offline[k]) for k in flow_keys)
    assert not all(torch.equal(moving[k], offline[k]) for k in flow_keys)
    assert not torch.equal(fixed["refine.net.0.weight"], offline["refine.net.0.weight"])
    assert float(read_csv(runs["F_dir"] / "train.csv")[-1]["training/actor/bc_flow_loss"]) == 0.0


def test_visual_environments_are_refused_clearly():
    result = run_o2o("--env-name", "visual-cube-single-play-singletask-task1-v0", check=False)
    assert result.returncode != 0 and "deflow_pixels.py" in result.stderr and "Traceback" not in result.stderr


def test_a_checkpoint_of_the_older_o2o_layout_is_refused_clearly(runs, tmp_path):
    """deflow_o2o.py checkpoints from before the minimal rewrite stored the training episode under "online": without
    one, a checkpoint is a deflow_offline.py run's to go online from, and one past the offline phase is refused."""
    checkpoint = torch.load(runs["A_dir"] / "checkpoint.pt", weights_only=True)
    checkpoint["online"] = checkpoint.pop("episode")
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    result = run_o2o("--resume", tmp_path / "checkpoint.pt", "--online-steps", 240, check=False)
    assert result.returncode != 0 and "past --offline-steps" in result.stderr and "Traceback" not in result.stderr

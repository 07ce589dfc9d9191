"""What deflow_o2o.py's checkpoints hold besides the agent, so that a run resumes exactly online: the replay
buffer's online rows (the dataset part is loaded again, not saved) and the training episode under way (replayed)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch


def buffer_state(buffer) -> dict:
    """The rows online transitions were written to, their contents and the count."""
    rows = (buffer.initial_size + torch.arange(min(buffer.num_added, buffer.capacity))) % buffer.capacity
    return {"capacity": buffer.capacity, "initial_size": buffer.initial_size, "num_added": buffer.num_added,
            "rows": rows, "data": {k: v[rows.to(v.device)].cpu() for k, v in buffer.data.items()}}


def load_buffer_state(buffer, state: dict) -> None:
    if (state["capacity"], state["initial_size"]) != (buffer.capacity, buffer.initial_size):
        raise ValueError(f"its buffer holds {state['initial_size']} dataset rows in a capacity of {state['capacity']}"
                         f", this one {buffer.initial_size} in {buffer.capacity}")
    for k, v in buffer.data.items():
        v[state["rows"].to(v.device)] = state["data"][k].to(v.device)
    buffer.num_added = state["num_added"]


def new_episode() -> SimpleNamespace:
    """The training episode before the first: done, and exploration/* not a number yet."""
    exploration = {f"exploration/{k}": float("nan") for k in ("success", "episode.return", "episode.length")}
    return SimpleNamespace(done=True, obs=None, seed=None, noise=None, actions=[], ret=0.0, started=0,
                           exploration={**exploration, "exploration/episodes": 0})


def start_episode(env, episode: SimpleNamespace, seed: int, device) -> None:
    """Training episode k (1, 2, ...) resets, and draws its action noise, from SeedSequence([seed, 0, k]): no run's
    training episode is another's, an evaluation's ([seed, update, j], update >= 1) or logging's ([seed, 0, 0])."""
    reset_seed, noise_seed = np.random.SeedSequence([seed, 0, episode.started + 1]).generate_state(2)
    episode.seed, episode.actions, episode.ret = int(reset_seed), [], 0.0
    episode.noise = torch.Generator(device).manual_seed(int(noise_seed))
    episode.obs, _ = env.reset(seed=episode.seed)
    episode.started += 1


def episode_state(episode: SimpleNamespace, action_dim: int) -> dict:
    """The training episode (tensors, not numpy arrays or generators: checkpoints load with weights_only)."""
    return {**vars(episode), "obs": None if episode.obs is None else torch.as_tensor(episode.obs),
            "actions": torch.as_tensor(np.array(episode.actions).reshape(-1, action_dim)),
            "noise": None if episode.noise is None else episode.noise.get_state()}


def resume_episode(env, saved: dict, device) -> SimpleNamespace:
    """A checkpoint's training episode: the environment reset with its seed and its actions repeated (MuJoCo is
    deterministic), its noise stream where it was; where that does not reproduce its state (another machine or
    MuJoCo version) or the noise stream was on another device type (CPU <-> CUDA), a new episode, with a line."""
    actions = list(saved["actions"].numpy())
    episode = SimpleNamespace(**{**saved, "obs": None, "noise": None, "actions": actions})
    if not episode.done and saved["noise"].numel() != torch.Generator(device).get_state().numel():
        print("note: the interrupted training episode's noise stream was on another device type; starting a new "
              "episode")
        episode.done = True
    if not episode.done:
        episode.noise = torch.Generator(device).set_state(saved["noise"])
        episode.obs, _ = env.reset(seed=episode.seed)
        for action in episode.actions:
            episode.obs, *_ = env.step(action)
        if not np.array_equal(episode.obs, saved["obs"].numpy()):
            print("warning: replaying the interrupted training episode did not reproduce its state (another machine "
                  "or MuJoCo version?); starting a new episode, so the run no longer matches exactly")
            episode.done = True
    return episode

"""deflow_pixels.py: the IMPALA encoder, frame stacking, the random shift, the data on the device, gradient routing with
encoders, and the script end to end on a tiny dataset rendered by MuJoCo."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common.datasets
import common.visual
import deflow_pixels as dp
from common.datasets import DatasetError
from common.visual import load_visual_datasets
from tests.conftest import assert_compiled_update_equals_eager, losses_of, run_script, train_step

ENV = "visual-cube-single-play-singletask-task1-v0"
TINY = dict(actor_hidden_dims=(16,), refine_hidden_dims=(16,), value_hidden_dims=(16,), encoder_stack_sizes=(4, 4, 4),
            encoder_head_dims=(16,), batch_size=8)
TINY_FLAGS = ["--actor-hidden-dims", "16", "--refine-hidden-dims", "16", "--value-hidden-dims", "16",
              "--encoder-stack-sizes", "4", "4", "4", "--encoder-head-dims", "16", "--batch-size", "8", "--no-compile"]


def run_pixels(*flags, **kwargs):
    return run_script(*flags, script="deflow_pixels.py", **kwargs)


def same_window_starts(size: int) -> list[int]:
    """TF's SAME pooling written out (kernel 3, stride 2): output i looks at input rows [start, start + 2] with
    start = 2i - top, top = (total padding) // 2; rows outside the image are ignored."""
    out = -(-size // 2)
    top = max((out - 1) * 2 + 3 - size, 0) // 2
    return [2 * i - top for i in range(out)]


def reference_same_max_pool(x: np.ndarray) -> np.ndarray:
    starts = same_window_starts(x.shape[0])
    return np.array([[x[max(r, 0): r + 3, max(c, 0): c + 3].max() for c in starts] for r in starts])


def test_encoder_has_the_official_size_and_shapes():
    encoder = dp.ImpalaEncoder((64, 64, 9), (16, 32, 32), (512,))
    assert sum(p.numel() for p in encoder.parameters()) == 1_105_920  # SPEC 1.3
    frames = torch.randint(0, 256, (5, 64, 64, 9), dtype=torch.uint8)
    features = encoder(frames)
    assert features.shape == (5, 512) and features.dtype == torch.float32
    assert (features >= -0.2).all()  # GELU-activated head (GELU's minimum is about -0.17)
    assert encoder.head[0][0].in_features == 8 * 8 * 32


@pytest.mark.parametrize("size", [64, 32, 33, 7])
def test_max_pool_windows_follow_same_padding(size):
    x = torch.randn(size, size, generator=torch.Generator().manual_seed(size))
    ours = dp.max_pool_same(x[None, None])[0, 0].numpy()
    np.testing.assert_array_equal(ours, reference_same_max_pool(x.numpy()))
    if size % 2 == 0:  # PyTorch's symmetric padding shifts every window on even sizes: the pitfall SPEC 1.3 names
        symmetric = F.max_pool2d(x[None, None], 3, 2, padding=1)[0, 0].numpy()
        assert symmetric.shape == ours.shape and not np.array_equal(symmetric, ours)
    # a known input: increasing values, so each window's maximum is its bottom-right pixel (clipped to the image)
    ramp = torch.arange(size * size, dtype=torch.float32).reshape(1, 1, size, size)
    last = [min(i + 2, size - 1) for i in same_window_starts(size)]
    expected = torch.tensor([[r * size + c for c in last] for r in last], dtype=torch.float32)
    assert torch.equal(dp.max_pool_same(ramp)[0, 0], expected)


def frame_data(episode_lengths=(5, 4)):
    """Frames whose pixels all equal their frame index, in episodes of the given lengths."""
    n = sum(episode_lengths)
    frames = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 6, 6, 3).contiguous()
    starts = torch.cat([torch.full((length,), sum(episode_lengths[:e])) for e, length in enumerate(episode_lengths)])
    return frames, starts


def test_frame_stacking_clamps_at_episode_starts():
    frames, starts = frame_data()  # episode 0: frames 0..4, episode 1: frames 5..8
    idx = torch.tensor([0, 1, 2, 3, 5, 6, 7])
    stacked = dp.stack_frames(frames, starts, idx, 3)
    assert stacked.shape == (7, 6, 6, 9)
    oldest_first = stacked[:, 0, 0, ::3].tolist()  # one channel per frame
    assert oldest_first == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3], [5, 5, 5], [5, 5, 6], [5, 6, 7]]
    nxt = dp.stack_frames(frames, starts, idx + 1, 3)[:, 0, 0, ::3].tolist()  # [o_{t-1}, o_t, o_{t+1}], clamped
    assert nxt == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [5, 5, 6], [5, 6, 7], [6, 7, 8]]
    # the channels of one frame stay together, in RGB order
    rgb = torch.arange(9 * 6 * 6 * 3, dtype=torch.int64).reshape(9, 6, 6, 3) % 251
    stacked = dp.stack_frames(rgb.to(torch.uint8), starts, torch.tensor([3]), 3)[0]
    assert torch.equal(stacked[..., 3:6], rgb[2].to(torch.uint8)) and torch.equal(stacked[..., 6:9], rgb[3].to(torch.uint8))


def coordinate_images(batch=64, size=16):
    """Images whose channel 0 is the row index and channel 1 the column index of each pixel."""
    rows = torch.arange(size)[:, None].expand(size, size)
    cols = torch.arange(size)[None, :].expand(size, size)
    return torch.stack([rows, cols], dim=-1).to(torch.uint8)[None].expand(batch, -1, -1, -1).contiguous()


def test_random_shift_is_a_clamped_shift_shared_by_obs_and_next_obs():
    torch.manual_seed(0)
    images = coordinate_images()
    next_images = images.clone()
    next_images[..., 1] += 100  # different content, same geometry
    size, offsets = images.shape[1], set()
    for _ in range(20):
        obs, next_obs = dp.random_shift(images, next_images, p_aug=1.0)
        assert obs.dtype == torch.uint8 and obs.shape == images.shape
        dy = obs[:, size // 2, 0, 0].long() - size // 2  # the shift of each sample, read off its centre pixel
        dx = obs[:, 0, size // 2, 1].long() - size // 2
        assert dy.abs().max() <= 3 and dx.abs().max() <= 3
        offsets.update(zip(dy.tolist(), dx.tolist()))
        for b in range(len(obs)):  # every pixel moved by the same (dy, dx), edges replicated
            r = (torch.arange(size) + dy[b]).clamp(0, size - 1)
            c = (torch.arange(size) + dx[b]).clamp(0, size - 1)
            assert torch.equal(obs[b], images[b][r][:, c])
            assert torch.equal(next_obs[b], next_images[b][r][:, c])  # the same shift for s'
    assert len(offsets) == 49  # every offset in {-3..3}^2 occurs
    obs, next_obs = dp.random_shift(images, next_images, p_aug=0.0)
    assert torch.equal(obs, images) and torch.equal(next_obs, next_images)


def test_one_coin_per_batch():
    torch.manual_seed(1)
    images = coordinate_images(batch=32)
    shifted = [not torch.equal(dp.random_shift(images, images, p_aug=0.5)[0], images) for _ in range(200)]
    assert 70 < sum(shifted) < 130  # about half of the batches are shifted ...
    torch.manual_seed(2)
    for _ in range(50):  # ... and a shifted batch moves nearly all of its samples (1/49 draw the centre offset)
        obs = dp.random_shift(images, images, p_aug=0.5)[0]
        moved = sum(not torch.equal(o, i) for o, i in zip(obs, images))
        assert moved == 0 or moved > 20


def tiny_agent(seed=0, **overrides):
    torch.manual_seed(seed)
    args = dataclasses.replace(dp.Args(), **{**TINY, **overrides})
    return dp.DeFlowAgent((64, 64, 9), 5, args), args


def pixel_batch(batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"observations": torch.randint(0, 256, (batch, 64, 64, 9), dtype=torch.uint8, generator=g),
            "next_observations": torch.randint(0, 256, (batch, 64, 64, 9), dtype=torch.uint8, generator=g),
            "actions": torch.rand(batch, 5, generator=g) * 2 - 1, "rewards": -torch.rand(batch, generator=g),
            "masks": torch.ones(batch)}


def test_gradient_routing_reaches_each_encoder_from_its_own_loss_only():
    agent, args = tiny_agent()
    _, metrics = losses_of(agent, pixel_batch(), args, script=dp)
    terms = {"critic": metrics["critic/critic_loss"], "bc": metrics["actor/bc_flow_loss"],
             "refine": metrics["actor/actor_loss"] - metrics["actor/bc_flow_loss"] - metrics["actor/alpha_loss"]}
    owners = {"critic": agent.critic_encoder, "bc": agent.flow_encoder, "refine": agent.refine_encoder}
    for term, loss in terms.items():
        for owner, encoder in owners.items():
            grads = torch.autograd.grad(loss, list(encoder.parameters()), retain_graph=True, allow_unused=True)
            reached = any(g is not None and g.abs().sum() > 0 for g in grads)
            assert reached == (term == owner), (term, owner)
    assert not any(p.requires_grad for p in agent.target_critic.parameters())


def test_one_rollout_of_both_feature_sets_equals_the_two_rollouts():
    """The update's merged rollout (s' features and s features, 2B rows) gives the TD target and the base actions of
    two separate rollouts."""
    agent, args = tiny_agent(discount=0.5)
    batch, noise = pixel_batch(), dp.update_draws(8, 5, torch.device("cpu"))
    _, metrics = dp.deflow_losses(agent, batch, noise, args)
    with torch.no_grad():
        obs, next_obs = batch["observations"], batch["next_observations"]
        next_actions = dp.sample_actions(agent, next_obs, noise["next_base_noise"], args)
        next_q = agent.target_critic(agent.target_critic_encoder(next_obs), next_actions).mean(0)
        qs = agent.critic(agent.critic_encoder(obs), batch["actions"])
        critic_loss = (qs - (batch["rewards"] + 0.5 * next_q)).square().mean()
        base_actions = dp.flow_actions(agent.flow, agent.flow_encoder(obs), noise["base_noise"], args)
        distill_loss = agent.refine(agent.refine_encoder(obs), base_actions).square().mean()
    torch.testing.assert_close(metrics["critic/critic_loss"], critic_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["actor/distill_loss"], distill_loss, rtol=1e-5, atol=1e-7)


def test_update_moves_the_target_encoder_by_ema_only():
    agent, args = tiny_agent()
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.lr)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    train_step(dp, agent, optimizer, pixel_batch(), args)
    after = agent.state_dict()
    for name in before:
        if name.startswith("target_critic_encoder."):  # theta_bar <- tau theta_old + (1 - tau) theta_bar
            expected = torch.lerp(before[name], before[name.replace("target_critic_", "critic_", 1)], args.tau)
            torch.testing.assert_close(after[name], expected)
    assert not torch.equal(before["critic_encoder.convs.0.weight"], after["critic_encoder.convs.0.weight"])
    assert not torch.equal(before["flow_encoder.head.0.0.weight"], after["flow_encoder.head.0.0.weight"])


def test_encoders_run_once_per_observation_and_network():
    """Features are reused within an update: every Euler step, the base actions and the Q loss. (The logged `mse`,
    on logging steps only, is the policy's own call: it encodes s for the flow and the refinement once more.)"""
    agent, args = tiny_agent()
    for with_mse, extra in ((False, 0), (True, 1)):
        calls = dict.fromkeys(("flow", "refine", "critic", "target_critic"), 0)
        hooks = [getattr(agent, f"{name}_encoder").register_forward_hook(
            lambda *_, name=name: calls.update({name: calls[name] + 1})) for name in calls]
        losses_of(agent, pixel_batch(), args, script=dp, with_mse=with_mse)
        assert calls == {"flow": 2 + extra, "refine": 2 + extra, "critic": 1, "target_critic": 1}  # s and s'; s
        for hook in hooks:
            hook.remove()


def test_policy_is_batched_and_in_bounds():
    """pi(s) of a batch is each row's pi(s) alone. (The max-q and iterative samplers left the scripts.)"""
    agent, args = tiny_agent()
    obs, noise = pixel_batch(batch=4)["observations"], torch.randn(4, 5)
    actions = dp.sample_actions(agent, obs, noise, args)
    assert actions.shape == (4, 5) and actions.abs().max() <= 1
    rowwise = torch.cat([dp.sample_actions(agent, obs[i:i + 1], noise[i:i + 1], args) for i in range(4)])
    torch.testing.assert_close(actions, rowwise, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    """--compile on pixels: compiled == eager for 3 steps. Slow: compiling the convolutions takes minutes on a CPU."""
    frames = torch.randint(0, 256, (40, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = {"frames": frames, "starts": frame_data((20, 20))[1], "valid": torch.tensor([*range(19), *range(20, 39)]),
            "actions": torch.rand(40, 5) * 2 - 1, "rewards": -torch.rand(40), "masks": torch.ones(40)}
    assert_compiled_update_equals_eager(dp, lambda: tiny_agent(flow_steps=3), data, tolerance=1e-4)


def test_visual_dataset_on_the_device(visual_dataset):
    import ogbench

    env, train, val, report = load_visual_datasets(ENV, torch.device("cpu"), dataset_path=str(visual_dataset))
    assert "frames of 64x64x3 uint8" in report
    assert train["frames"].dtype == torch.uint8 and train["frames"].shape == (24, 64, 64, 3)
    assert train["valid"].tolist() == [*range(11), *range(12, 23)]  # the last frame of an episode has no next one
    assert train["starts"].tolist() == [0] * 12 + [12] * 12
    official, _ = ogbench.make_env_and_datasets(ENV, dataset_path=str(visual_dataset), dataset_only=True, cur_env=env)
    valid = train["valid"].numpy()  # the official regular dataset has exactly these transitions, in this order
    np.testing.assert_array_equal(official["observations"], train["frames"].numpy()[valid])
    np.testing.assert_array_equal(official["next_observations"], train["frames"].numpy()[valid + 1])
    np.testing.assert_array_equal(official["rewards"], train["rewards"].numpy()[valid])
    np.testing.assert_array_equal(official["masks"], train["masks"].numpy()[valid])
    np.testing.assert_allclose(np.clip(official["actions"], -1 + 1e-5, 1 - 1e-5), train["actions"].numpy()[valid])
    half = load_visual_datasets(ENV, torch.device("cpu"), dataset_path=str(visual_dataset), fraction=0.5)[1]
    assert len(half["frames"]) == 12 and torch.equal(half["frames"], train["frames"][:12])


def test_memory_check_names_a_fraction_that_fits(visual_dataset, monkeypatch):
    frame_bytes = 64 * 64 * 3
    free = common.visual.WORKING_MEMORY + 20 * frame_bytes  # room for 20 of the 36 frames
    monkeypatch.setattr(common.visual, "available_memory", lambda device: free)
    with pytest.raises(DatasetError, match=r"does not fit.*--dataset-fraction 0\.55") as error:
        load_visual_datasets(ENV, torch.device("cpu"), dataset_path=str(visual_dataset))
    assert "36 frames" in str(error.value)
    with pytest.raises(DatasetError, match="must be in"):
        load_visual_datasets(ENV, torch.device("cpu"), dataset_path=str(visual_dataset), fraction=0)


def test_state_and_visual_environments_name_the_right_script(visual_dataset, cube_dataset):
    with pytest.raises(DatasetError, match="deflow_offline.py"):
        load_visual_datasets("cube-single-play-singletask-task1-v0", torch.device("cpu"), dataset_path=str(cube_dataset))
    with pytest.raises(DatasetError, match="deflow_pixels.py"):
        common.datasets.load_env_and_datasets(ENV, dataset_path=str(visual_dataset))


def test_end_to_end_with_video_and_exact_resume(visual_dataset, tmp_path):
    """12 updates with evaluations (at 1 and 12) and videos, straight; then 6 updates and a resume to 12 without
    evaluation (evaluation draws from its own generators, so it does not change training): the same agent."""
    import imageio

    flags = ["--dataset-path", visual_dataset, *TINY_FLAGS, "--log-interval", "3", "--save-interval", "6",
             "--offline-steps", "12"]
    run_pixels(*flags, "--eval-interval", "12", "--eval-episodes", "2", "--eval-envs", "2",
               "--eval-max-episode-steps", "4", "--capture-video", "--run-dir", tmp_path / "straight")
    (run,) = (tmp_path / "straight").iterdir()
    eval_rows = (run / "eval.csv").read_text().splitlines()
    assert eval_rows[0] == "step,evaluation/success,evaluation/episode.return,evaluation/episode.length"
    assert [row.split(",")[0] for row in eval_rows[1:]] == ["1", "12"]
    assert [float(row.split(",")[3]) for row in eval_rows[1:]] == [4.0, 4.0]
    videos = sorted(p.name for p in (run / "videos").iterdir())
    assert videos == ["step00000001_episode0.mp4", "step00000012_episode0.mp4"]
    frames = imageio.mimread(run / "videos" / videos[0])
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3)  # the reset frame + 4 steps, as the agent sees them
    train_rows = (run / "train.csv").read_text().splitlines()
    assert len(train_rows) == 5 and "validation/actor/mse" in train_rows[0]  # steps 3, 6, 9, 12
    assert json.loads((run / "args.json").read_text())["frame_stack"] == 3

    run_pixels(*flags[:-1], "6", "--eval-interval", "0", "--run-dir", tmp_path / "resumed")
    (resumed,) = (tmp_path / "resumed").iterdir()
    run_pixels("--resume", resumed / "checkpoint.pt", "--offline-steps", "12")
    a = torch.load(run / "checkpoint.pt", weights_only=True)["agent"]
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)["agent"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "train.csv").read_text().split("\n")[1].split(",")[:5] == \
        (resumed / "train.csv").read_text().split("\n")[1].split(",")[:5]


def test_corrupt_dataset_is_refused_clearly(tmp_path):
    for name in ("bad.npz", "bad-val.npz"):
        (tmp_path / name).write_bytes(b"not a zip")
    result = run_pixels("--dataset-path", tmp_path / "bad.npz", check=False)
    assert result.returncode != 0 and "corrupt" in result.stderr and "Traceback" not in result.stderr

"""DeFlow, offline, from pixels on visual OGBench: the whole method and its run in one file.

Paper: "Decoupling Manifold Modeling and Value Maximization for Offline Policy Extraction"
(arXiv 2601.10471). Official code (JAX): github.com/muzhancun/DeFlow, on github.com/seohongpark/fql.
  1. A flow-matching policy v(s, x, t) models the behavior data: 10 Euler steps from noise, a_base.
  2. A refinement network f(s, a_base) adds a residual: a = clip(a_base + f(s, a_base), -1, 1).
  3. f climbs Q(s, a) while a Lagrange multiplier alpha keeps mean(f^2) near a target divergence.
  4. Two critics learn Q by TD, bootstrapping with the same flow + refinement policy.
  5. Pixels: s = the last --frame-stack 64x64 RGB frames, an IMPALA encoder for each network.
Run: python deflow_pixels.py --env-name visual-cube-single-play-singletask-task1-v0 --dataset-path
data/visual-cube-single-100ep.npz --generate-episodes 100 (no internet: generates it first);
--resume runs/<run> continues a run exactly. Recipes and deviations: README.md, docs/.
"""

import csv
import dataclasses
import math
import fcntl
import json
import os
import random
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from functools import partial
from typing import Literal, Optional

import gymnasium
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from gymnasium.vector import AutoresetMode
from numpy.random import SeedSequence
from tqdm import tqdm

from common.datasets import DatasetError, available_memory, data_fingerprint, make_env, optional
from common.visual import load_visual_datasets


# Networks. Flax conventions: Linear -> GELU(tanh) -> [LayerNorm(eps 1e-6)] per hidden layer,
# Xavier-uniform weights, zero biases, a plain Linear output.
# Copied from deflow_offline.py: GELU, mlp, VelocityField, Refinement, EnsembleLinear,
# EnsembleLayerNorm, Critic
class GELU(nn.Module):
    """Flax's tanh-GELU. A speed trick: compiled, as x * sigmoid(2u), the same function, and the
    compiled update 1.31x (4x128) and 1.17x (4x512) as fast as with F.gelu on a CPU."""

    def forward(self, x):
        if torch.compiler.is_compiling():
            return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
        return F.gelu(x, approximate="tanh")


def mlp(in_dim, hidden_dims, out_dim, layer_norm):
    layers = []
    for width in hidden_dims:
        layers += [nn.Linear(in_dim, width), GELU()]
        if layer_norm:
            layers.append(nn.LayerNorm(width, eps=1e-6))
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class VelocityField(nn.Module):
    """The BC flow's velocity v(s, x_t, t) -> R^A; t is a raw scalar (no embedding)."""

    def __init__(self, obs_dim, action_dim, hidden_dims, layer_norm):
        super().__init__()
        self.net = mlp(obs_dim + action_dim + 1, hidden_dims, action_dim, layer_norm)

    def forward(self, obs, x, t):
        return self.net(torch.cat([obs, x, t], dim=-1))


class Refinement(nn.Module):
    """f(s, a_base) -> R^A, unbounded: the residual on the flow's action (officially an
    ActorVectorField, the velocity field's class, called without t)."""

    def __init__(self, obs_dim, action_dim, hidden_dims, layer_norm):
        super().__init__()
        self.net = mlp(obs_dim + action_dim, hidden_dims, action_dim, layer_norm)

    def forward(self, obs, base_actions):
        return self.net(torch.cat([obs, base_actions], dim=-1))


class EnsembleLinear(nn.Module):
    """`members` Linear layers as one batched matmul: (members, B, in) -> (members, B, out)."""

    def __init__(self, members, in_dim, out_dim):
        super().__init__()
        bound = (6 / (in_dim + out_dim)) ** 0.5  # Xavier-uniform, each member
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(members, 1, out_dim))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleLayerNorm(nn.Module):
    def __init__(self, members, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, 1, width))
        self.bias = nn.Parameter(torch.zeros(members, 1, width))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * self.weight + self.bias


class Critic(nn.Module):
    """Two independently initialised Q networks, run as one."""

    def __init__(self, obs_dim, action_dim, hidden_dims, layer_norm, members=2):
        super().__init__()
        layers = []
        in_dim = obs_dim + action_dim
        for width in hidden_dims:
            layers += [EnsembleLinear(members, in_dim, width), GELU()]
            if layer_norm:
                layers.append(EnsembleLayerNorm(members, width))
            in_dim = width
        layers.append(EnsembleLinear(members, in_dim, 1))
        self.members, self.net = members, nn.Sequential(*layers)

    def forward(self, obs, actions):  # (B, obs_dim), (B, A) -> (2, B), float32 also under bf16
        x = torch.cat([obs, actions], dim=-1)
        x = self.net[:-1](x.expand(self.members, *x.shape))
        with torch.autocast(x.device.type, enabled=False):
            return self.net[-1](x.float()).squeeze(-1)


def conv3x3(in_channels, out_channels):
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)  # SAME for 3x3 at stride 1
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def max_pool_same(x):
    """3x3 max-pool, stride 2, TF/Flax SAME padding: bottom/right first (on even sizes all of it),
    unlike MaxPool2d(3, 2, padding=1), which pads both sides and shifts every window by a pixel."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad's order: width (left, right), then height
        total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), 3, 2)


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv0, self.conv1 = conv3x3(channels, channels), conv3x3(channels, channels)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class ImpalaEncoder(nn.Module):
    """IMPALA-small: per stack conv 3x3 -> max-pool 3x3/2 (SAME) -> residual block; ReLU, flatten,
    an MLP head with GELU after its last layer too. uint8 frames (B, H, W, C) in, scaled to [0, 1];
    1,105,920 parameters at 64x64x9, as officially."""

    def __init__(self, image_shape, stack_sizes, head_dims):
        super().__init__()
        height, width, channels = image_shape
        self.convs, self.blocks = nn.ModuleList(), nn.ModuleList()
        for size in stack_sizes:
            self.convs.append(conv3x3(channels, size))
            self.blocks.append(ResidualBlock(size))
            channels, height, width = size, -(-height // 2), -(-width // 2)
        flat = height * width * channels
        self.head = nn.Sequential(mlp(flat, head_dims[:-1], head_dims[-1], False), GELU())

    def forward(self, frames):
        x = frames.permute(0, 3, 1, 2).float() / 255.0
        for conv, block in zip(self.convs, self.blocks):
            x = block(max_pool_same(conv(x)))
        return self.head(F.relu(x).permute(0, 2, 3, 1).flatten(1))  # flattened (H, W, C) like Flax


class DeFlowAgent(nn.Module):
    """Every learned tensor: one state_dict is the whole agent, encoders and log_alpha included.
    An encoder for each network (the target critic's: a copy of the critic's), called once each."""

    def __init__(self, image_shape, action_dim, args):
        super().__init__()
        encoder = partial(ImpalaEncoder, image_shape, args.encoder_stack_sizes,
                          args.encoder_head_dims)
        obs_dim = args.encoder_head_dims[-1]  # the networks' input: features
        self.flow_encoder = encoder()
        self.flow = VelocityField(obs_dim, action_dim, args.actor_hidden_dims,
                                  args.actor_layer_norm)
        self.refine_encoder = encoder()
        self.refine = Refinement(obs_dim, action_dim, args.refine_hidden_dims,
                                 args.actor_layer_norm)
        self.critic_encoder = encoder()
        self.critic = Critic(obs_dim, action_dim, args.value_hidden_dims, args.layer_norm)
        self.target_critic_encoder = encoder()
        self.target_critic = Critic(obs_dim, action_dim, args.value_hidden_dims, args.layer_norm)
        self.target_critic_encoder.load_state_dict(self.critic_encoder.state_dict())
        self.target_critic_encoder.requires_grad_(False)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)  # the EMA moves it (officially in Adam, no grad)
        self.log_alpha = nn.Parameter(torch.ones(1))  # official init 1.0, i.e. alpha = e


# The policy. Its N(0, I) noise is an input: the update draws it from torch's global stream,
# evaluation from each episode's own.
# Copied from deflow_offline.py: flow_actions, refine_actions
def flow_actions(flow, obs, noise, args):
    """a_base = clip(x_K, -1, 1): x_0 = noise, x_{i+1} = x_i + v(s, x_i, i/K) / K, K flow steps.
    Never differentiated; --precision bf16-rollouts runs its matmuls in bfloat16."""
    x, steps = noise, args.flow_steps
    with torch.autocast(x.device.type, torch.bfloat16, enabled="bf16" in args.precision):
        for i in range(steps):
            t = torch.full((*x.shape[:-1], 1), i / steps, device=x.device)
            x = x + flow(obs, x, t) / steps
    return x.clamp(-1, 1)  # clipped only at the end


def refine_actions(agent, obs, base_actions):
    return (base_actions + agent.refine(obs, base_actions)).clamp(-1, 1)


def sample_actions(agent, obs, noise, args):
    """pi(s) = clip(a_base + f(s, a_base), -1, 1) of frames obs (B, H, W, C), each encoded once."""
    base_actions = flow_actions(agent.flow, agent.flow_encoder(obs), noise, args)
    return refine_actions(agent, agent.refine_encoder(obs), base_actions)


# Copied from deflow_offline.py: flow_matching_loss, update_draws
def flow_matching_loss(flow, obs, actions, x_0, t):
    """Rectified path from noise x_0 to the action: x_t = (1 - t) x_0 + t a, velocity a - x_0."""
    x_t = (1 - t) * x_0 + t * actions
    return (flow(obs, x_t, t) - (actions - x_0)).square().mean()


def update_draws(batch_size, action_dim, device, generator=None, mse_rng=None):
    """An update's noise (officially a key per use), from `generator` (None: torch's global
    stream); with mse_rng, the logged mse's too. Passed in, so that compiled code draws the same."""
    noise = torch.randn((3, batch_size, action_dim), device=device, generator=generator)
    draws = {"next_base_noise": noise[0], "x_0": noise[1], "base_noise": noise[2],
             "t": torch.rand((batch_size, 1), device=device, generator=generator)}
    if mse_rng is not None:
        draws["mse_noise"] = torch.randn((batch_size, action_dim), device=device, generator=mse_rng)
    return draws


# The losses. Who learns from what (one backward of the sum, one Adam step):
#   critic    <- critic_loss                   (TD to r + gamma * mask * Q_target(s', pi(s')))
#   flow      <- bc_flow_loss                  (flow matching on the dataset's actions)
#   refine    <- sg(alpha) * distill + q_loss  (stay near a_base, climb Q through the action only)
#   log_alpha <- alpha_loss                    (alpha rises while distill > delta, else falls)
#   target    <- nothing; the EMA of the critic's pre-step weights
def deflow_losses(agent, batch, draws, args):
    """(total loss, metrics under the official names) of a batch and its noise."""
    obs, next_obs, actions = batch["observations"], batch["next_observations"], batch["actions"]
    flow_features = agent.flow_encoder(obs)  # the flow's encoder learns from the flow-matching loss

    with torch.no_grad():  # the flow rollouts a_base(s') for the TD target and a_base(s), 2B rows
        noise = torch.cat([draws["next_base_noise"], draws["base_noise"]])
        features = torch.cat([agent.flow_encoder(next_obs), flow_features.detach()])
        next_base_actions, base_actions = flow_actions(agent.flow, features, noise, args).chunk(2)
        next_actions = refine_actions(agent, agent.refine_encoder(next_obs), next_base_actions)
        next_qs = agent.target_critic(agent.target_critic_encoder(next_obs), next_actions)
        next_q = next_qs.min(dim=0).values if args.q_agg == "min" else next_qs.mean(dim=0)
        target_q = batch["rewards"] + args.discount * batch["masks"] * next_q
    critic_features = agent.critic_encoder(obs)
    qs = agent.critic(critic_features, actions)
    critic_loss = (qs - target_q).square().mean()

    bc_flow_loss = flow_matching_loss(agent.flow, flow_features, actions, draws["x_0"], draws["t"])

    refinement = agent.refine(agent.refine_encoder(obs), base_actions)  # a_base has no gradient
    # D = mean over batch and action dims of f^2, held near delta; logged under its official name,
    # distill_loss (nothing is distilled).
    divergence = refinement.float().square().mean()
    if args.use_lagrange:
        alpha = agent.log_alpha.exp()
        alpha_loss = -(agent.log_alpha * (divergence.detach() - args.target_divergence)).sum()
    else:
        alpha = torch.tensor(args.alpha, device=obs.device)  # official: alpha^2 here (a bug)
        alpha_loss = torch.zeros((), device=obs.device)
    penalty = alpha.detach().squeeze() * divergence

    # Q through the refined action only: the critic's weights and features enter as constants.
    policy_actions = (base_actions + refinement).clamp(-1, 1)
    frozen_critic = {name: p.detach() for name, p in agent.critic.named_parameters()}
    inputs = (critic_features.detach(), policy_actions)
    q = torch.func.functional_call(agent.critic, frozen_critic, inputs).mean(dim=0)
    q_loss = -q.mean()
    if args.normalize_q_loss:
        q_loss = q_loss / q.abs().mean().detach()

    actor_loss = bc_flow_loss + penalty + q_loss + alpha_loss
    metrics = {
        "critic/critic_loss": critic_loss, "critic/q_mean": qs.mean(), "critic/q_max": qs.max(),
        "critic/q_min": qs.min(), "actor/actor_loss": actor_loss,
        "actor/bc_flow_loss": bc_flow_loss, "actor/distill_loss": divergence,
        "actor/q_loss": q_loss, "actor/q": q.mean(), "actor/alpha_loss": alpha_loss,
        "actor/alpha_value": alpha.detach().squeeze(),
    }
    if "mse_noise" in draws:  # a third rollout, on logging steps only (officially every update)
        with torch.no_grad():
            mse_actions = sample_actions(agent, obs, draws["mse_noise"], args)
            metrics["actor/mse"] = (mse_actions - actions).square().mean()
    return critic_loss + actor_loss, metrics


def update(agent, optimizer, loss, args):
    """One gradient step on the summed loss; the target critic's EMA uses the pre-step weights:
    theta_target <- tau * theta + (1 - tau) * theta_target."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        target = [*agent.target_critic_encoder.parameters(), *agent.target_critic.parameters()]
        critic = [*agent.critic_encoder.parameters(), *agent.critic.parameters()]
        torch._foreach_lerp_(target, critic, args.tau)
    optimizer.step()


# Batches, assembled on the device from uint8 frames (each stored once): stacked by index, shifted.
def stack_frames(frames, starts, idx, frame_stack):
    """[o_{t-k+1}, ..., o_t] on the channel axis per frame index t, each index clamped to the first
    frame of t's episode (whose first observation repeats its first frame): (B, H, W, 3k) uint8."""
    offsets = torch.arange(frame_stack - 1, -1, -1, device=idx.device)
    rows = torch.maximum(idx[:, None] - offsets, starts[idx][:, None])  # (B, k), oldest first
    return frames[rows].permute(0, 2, 3, 1, 4).flatten(3)  # (B, k, H, W, 3) -> (B, H, W, k * 3)


def random_shift(obs, next_obs, p_aug, pad=3, generator=None):
    """With probability p_aug (one coin per batch): edge-pad by `pad` and crop back at an offset per
    sample in {0..2 pad}^2, the same for obs and next_obs (by clamped indexing: the same pixels)."""
    batch, height, width = obs.shape[:3]
    apply = torch.rand((), device=obs.device, generator=generator) < p_aug
    offsets = torch.randint(0, 2 * pad + 1, (2, batch, 1), device=obs.device, generator=generator)
    dy, dx = torch.where(apply, offsets, pad).unbind(0)  # tails: the centre, no shift
    rows = (torch.arange(height, device=obs.device) + dy - pad).clamp(0, height - 1)  # (B, H)
    cols = (torch.arange(width, device=obs.device) + dx - pad).clamp(0, width - 1)  # (B, W)
    b = torch.arange(batch, device=obs.device)[:, None, None]
    rows, cols = rows[:, :, None], cols[:, None, :]
    return obs[b, rows, cols], next_obs[b, rows, cols]


def sample_batch(data, batch_size, frame_stack, p_aug, generator=None):
    valid = data["valid"]
    idx = valid[torch.randint(len(valid), (batch_size,), generator=generator, device=valid.device)]
    obs = stack_frames(data["frames"], data["starts"], idx, frame_stack)
    next_obs = stack_frames(data["frames"], data["starts"], idx + 1, frame_stack)  # o_{t-k+2..t+1}
    obs, next_obs = random_shift(obs, next_obs, p_aug, generator=generator)
    return {"observations": obs, "next_observations": next_obs, "actions": data["actions"][idx],
            "rewards": data["rewards"][idx], "masks": data["masks"][idx]}


# ------------------------------------------------------------------------------------------------
# The run: arguments, evaluation, checkpoints and logs, then the training loop.
@dataclasses.dataclass
class Args:
    exp_name: str = "deflow_pixels"  # experiment name (part of the run folder's name)
    seed: int = 0  # seed of python, numpy, torch and evaluation episodes (not of generated data)
    env_name: str = "visual-cube-single-play-singletask-task1-v0"
    """visual OGBench visual-<dataset>-singletask[-taskN]-v0 (the paper's pixel tasks are task1)"""
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'
    run_dir: str = "runs"  # where run folders go (args.json, train.csv, eval.csv, checkpoint.pt)
    resume: Optional[str] = None  # a run's folder (or checkpoint.pt): continue it exactly
    track: bool = False  # also log to Weights & Biases (honours WANDB_MODE=offline)
    wandb_project_name: str = "deflow"  # wandb project
    wandb_entity: Optional[str] = None  # wandb entity (team); None: your default
    dataset_dir: str = "~/.ogbench/data"  # where OGBench datasets are found (or downloaded to)
    dataset_path: Optional[str] = None  # a local training .npz instead (validation: <name>-val.npz)
    generate_episodes: int = 0  # generate a missing --dataset-path: N oracle episodes (0: never)
    num_workers: int = 1  # processes for --generate-episodes
    dataset_fraction: float = 1.0
    """train on the first fraction of the episodes (train and val): 1M frames need 12 GB"""
    offline_steps: int = 500_000  # number of gradient updates
    log_interval: int = 5000  # log training and validation losses every N updates (0: at the end)
    eval_interval: int = 100_000  # evaluate at update 1, every N updates and at the end (0: never)
    eval_episodes: int = 50  # episodes per evaluation
    eval_envs: int = 8  # environments run side by side in evaluation (about 0.2 GB each)
    eval_workers: bool = False  # step the evaluation environments in processes of their own
    capture_video: bool = False  # write the first --video-episodes of evaluations to <run>/videos
    video_episodes: int = 1  # evaluation episodes recorded by --capture-video (at most --eval-envs)
    eval_max_episode_steps: Optional[int] = None
    """cut evaluation episodes at this many steps (None: the task's own); for quick checks only"""
    save_interval: Optional[int] = None
    """checkpoint.pt every N updates (None: a tenth of the run; 0: end only), 30 min and the end"""
    lr: float = 3e-4  # Adam learning rate (log_alpha's too)
    batch_size: int = 256  # transitions per update (one batch for critic and actor)
    actor_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)  # hidden widths: the BC flow
    refine_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)  # hidden widths: the refinement
    value_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)  # hidden widths: each critic
    frame_stack: int = 3
    """frames on the channel axis (dataset: clamped at episode starts; env: reset frame repeated)"""
    p_aug: float = 0.5
    """probability that a batch is randomly shifted (one coin per batch; edge-pad 3, crop back)"""
    encoder_stack_sizes: tuple[int, ...] = (16, 32, 32)
    """IMPALA stacks: conv 3x3, max-pool 3x3/2, residual block (official impala_small: 16 32 32)"""
    encoder_head_dims: tuple[int, ...] = (512,)
    """MLP head of each encoder, GELU after every layer (official impala_small: 512)"""
    layer_norm: bool = True  # LayerNorm in the critics
    actor_layer_norm: bool = False  # LayerNorm in the flow and the refinement network
    discount: float = 0.99  # discount factor gamma
    tau: float = 0.005  # target critic EMA rate
    q_agg: Literal["mean", "min"] = "mean"  # the TD target's aggregate of the two target critics
    flow_steps: int = 10  # Euler steps of the BC flow
    target_divergence: float = 0.001
    """delta, the trust region of mean(refinement^2) (0.0005 for the puzzles; no 'auto' here)"""
    use_lagrange: bool = True  # learn the penalty weight alpha (every recipe); else fixed --alpha
    alpha: float = 10.0  # fixed penalty weight (with --no-use-lagrange only)
    normalize_q_loss: bool = True  # divide the Q loss by mean|Q| (every official recipe sets it)
    compile: bool = True  # torch.compile the losses (CUDA graphs on CUDA); --no-compile: eager
    precision: Literal["tf32", "float32", "bf16-rollouts", "bf16"] = "tf32"
    """tf32: float32 with TF32 matmuls on CUDA (as JAX); float32: strict; bf16-rollouts, bf16:
    bfloat16 matmuls in the flow's rollouts or everywhere (where bfloat16 is native)"""


# Copied from deflow_offline.py: MAY_CHANGE, INF, COUNTS, STEPS, WIDTHS, BOUNDS, parse_args,
#   setup, check_memory, compiled
# A resumed run may change how long and how it runs and where its data is; not the rest.
MAY_CHANGE = {"resume", "device", "track", "wandb_project_name", "wandb_entity", "dataset_dir",
              "dataset_path", "generate_episodes", "num_workers", "offline_steps", "online_steps",
              "log_interval", "eval_interval", "eval_episodes", "eval_envs", "eval_workers",
              "eval_max_episode_steps", "capture_video", "video_episodes", "save_interval",
              "compile", "precision", "lr"}
INF = float("inf")
COUNTS = ("batch_size flow_steps eval_episodes eval_envs num_workers buffer_size frame_stack "
          "eval_max_episode_steps").split()
STEPS = ("offline_steps online_steps log_interval eval_interval save_interval video_episodes "
         "generate_episodes iav_queries").split()
WIDTHS = ("actor_hidden_dims refine_hidden_dims value_hidden_dims encoder_stack_sizes "
          "encoder_head_dims").split()
# Every number's range (low, high, whether low itself is excluded), checked before any work.
BOUNDS = {**dict.fromkeys(COUNTS + WIDTHS, (1, INF, False)),
          **dict.fromkeys(STEPS, (0, INF, False)), "seed": (0, 2**32 - 1, False),
          "lr": (0, INF, True), "discount": (0, 1, True), "tau": (0, 1, True),
          "p_aug": (0, 1, False), "target_divergence": (0, INF, False),
          "iav_scale": (0, INF, True), "alpha": (0, INF, False)}


def parse_args():
    """(args, checkpoint or None); with --resume, the checkpoint's settings are the defaults and
    only MAY_CHANGE's may differ. Every problem is one line, before any file is touched."""
    args, checkpoint = tyro.cli(Args, description=__doc__.split("\n")[0]), None
    if args.resume:
        checkpoint, fields = load_checkpoint(args.resume), set(Args.__dataclass_fields__)
        saved = Args(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in checkpoint["args"].items() if k in fields})
        saved.resume, crossing = checkpoint["path"], checkpoint["script"] != SCRIPT
        saved.run_dir = str(Path(saved.resume).parent.parent)  # where the run is now
        if crossing:  # deflow_o2o.py going online from a deflow_offline.py run: a run of its own
            saved.exp_name = args.exp_name
        args = tyro.cli(Args, default=saved, description=__doc__.split("\n")[0])
        args.resume = saved.resume  # (given a run folder: its checkpoint.pt)
        if Path(args.run_dir).resolve() == Path(saved.run_dir).resolve():  # ("./runs" is "runs")
            args.run_dir = saved.run_dir
        if args.target_divergence == "auto" and (Path(args.resume).parent / "iav.json").exists():
            args.target_divergence = saved.target_divergence  # an auto run's own delta
        fixed = fields - MAY_CHANGE - ({"exp_name", "run_dir"} if crossing else set())
        for name in checkpoint["args"].keys() & fixed:
            if getattr(args, name) != getattr(saved, name):
                sys.exit(f"error: --{name.replace('_', '-')} cannot change on resume (the run's is "
                         f"{getattr(saved, name)}, given {getattr(args, name)}): a run keeps its "
                         "task, data, seed, networks, method and folder; start a new run instead")
        step, online = checkpoint["step"], "episode" in checkpoint  # (o2o: its training episode)
        if online and step > saved.offline_steps and args.offline_steps != saved.offline_steps:
            sys.exit(f"error: --offline-steps cannot change once a run is online (it went online "
                     f"after update {saved.offline_steps})")
        if args.offline_steps + getattr(args, "online_steps", 0) < step:
            sys.exit(f"error: the run is at update {step}: give at least {step} updates")
    for name, (low, high, open_low) in BOUNDS.items():
        values, flag = getattr(args, name, None), "--" + name.replace("_", "-")
        if values == ():
            sys.exit(f"error: {flag} needs at least one width")
        for value in values if isinstance(values, tuple) else [values]:
            if isinstance(value, (int, float)) and not (  # (None and 'auto' pass)
                    (low < value if open_low else low <= value) and value <= high and value < INF):
                bound = f"{'(' if open_low else '['}{low}, {high}{']' if high < INF else ')'}"
                off = "; --eval-interval 0 turns evaluation off" if name == "eval_episodes" else ""
                sys.exit(f"error: {flag} must be in {bound} (got {value}){off}")
    return args, checkpoint


def setup(args):
    """Seeds, MuJoCo's renderer (EGL unless MUJOCO_GL says), the device and its precision."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    cudas = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if args.device not in ["auto", "cpu", *cudas] + ["cuda"] * bool(cudas):
        sys.exit(f"error: --device {args.device} is not here; give auto, cpu" +
                 (f", cuda or {', '.join(cudas)}" if cudas else " (no CUDA device is visible)"))
    cuda = args.device == "auto" and bool(cudas)
    device = torch.device("cuda" if cuda else "cpu" if args.device == "auto" else args.device)
    tf32 = device.type == "cuda" and args.precision != "float32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    print(f"--precision {args.precision} on {device}: " + ("TF32 matmuls and convolutions (as JAX)"
          if tf32 else "strict float32") + (", bfloat16 matmuls" * ("bf16" in args.precision)))
    return device


def check_memory(args, device, agent, data_bytes=0, sample_floats=0):
    """Refuse what cannot fit: the (meta) agent with grads and Adam, a batch's activations, data."""
    widths = sum(sum(getattr(args, name, ())) for name in WIDTHS)
    need = 16 * sum(p.numel() for p in agent.parameters()) + data_bytes + 12 * args.batch_size * (
        widths * (2 * args.flow_steps + 8) + sample_floats)
    if need > (free := available_memory(device)):
        sys.exit(f"error: --batch-size {args.batch_size}, these widths and the data need about "
                 f"{need / 2**30:.1f} GiB on {device}, which has {free / 2**30:.1f} GiB free; "
                 "lower them or use another device")


def compiled(losses, args, device):
    """--compile: fused kernels (CUDA graphs on CUDA); no C++ compiler or Triton: one line."""
    if not args.compile:
        return losses
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1, device=device))
    except torch._dynamo.exc.BackendCompilerFailed as e:
        sys.exit(f"error: torch.compile does not work here ({str(e).strip().splitlines()[0]}); "
                 "run with --no-compile (the eager code: the same results, slower)")
    print("--compile: the first update and the first logging step compile first (a minute each)")
    return torch.compile(losses, mode="reduce-overhead" if device.type == "cuda" else None)


# Evaluation, as OGBench reports it: the mean success at the last step (and return, length) of
# --eval-episodes independent episodes, envs.num_envs side by side, one batched policy(agent, obs,
# noise, args) call a step; returns (metrics, {episode: video frames} of the first video_episodes).
# Episode j of the evaluation at update `step` resets, and draws its noise, from SeedSequence([seed,
# step, j]) (officially unseeded resets): no two episodes of any evaluation of any run share either.
# Copied from deflow_offline.py: EvaluationEnv, make_eval_envs, evaluate
class EvaluationEnv(gymnasium.Wrapper):
    """Reset without a seed, parks (autoreset-off vectors may not step it); info: only success."""

    def __init__(self, env):
        super().__init__(env)
        self.parked, self.obs = False, env.observation_space.sample()

    def reset(self, *, seed=None, options=None):
        self.parked = seed is None
        if not self.parked:
            self.obs, _ = self.env.reset(seed=seed)
        return self.obs, {}

    def step(self, action):
        if self.parked:
            return self.obs, 0.0, False, False, {}
        self.obs, reward, terminated, truncated, info = self.env.step(action)
        success = {k: float(info[k]) for k in ("success",) if k in info}
        return self.obs, reward, terminated, truncated, success


def make_eval_envs(args, num_envs):
    """In this process, or (--eval-workers) in its own each; pixels: the last frames, channels."""
    stack = getattr(args, "frame_stack", 1)

    def make(index):
        env = make_env(args.env_name, getattr(args, "eval_max_episode_steps", None))
        if stack > 1:  # the last frames (at first the reset one repeated), oldest first
            height, width, channels = env.observation_space.shape
            space = gymnasium.spaces.Box(0, 255, (height, width, channels * stack), np.uint8)
            env = gymnasium.wrappers.FrameStackObservation(env, stack, padding_type="reset")
            env = gymnasium.wrappers.TransformObservation(
                env, lambda frames: np.concatenate(frames, axis=-1), space)
        env = EvaluationEnv(env)
        if args.capture_video:
            env = optional("video", "--capture-video").VideoFrames(env, index)
        return env

    fns = [lambda i=i: make(i) for i in range(num_envs)]
    if args.eval_workers:
        return gymnasium.vector.AsyncVectorEnv(fns, context="spawn",
                                               autoreset_mode=AutoresetMode.DISABLED)
    return gymnasium.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)


@torch.no_grad()
def evaluate(agent, envs, args, step, policy=sample_actions, noise_shape=(), video_episodes=0):
    n, todo, running, results, videos = envs.num_envs, list(range(args.eval_episodes)), {}, [], {}
    free, record = np.ones(n, dtype=bool), np.arange(n) < video_episodes
    while todo or running:  # running: environment -> its episode, in start order
        seeds = [None] * n  # a new episode on each free environment; where none is left, parked
        for i in np.flatnonzero(free)[:len(todo)]:
            j = todo.pop(0)
            reset_seed, noise_seed = SeedSequence([args.seed, step, j]).generate_state(2)
            seeds[i], noise = int(reset_seed), torch.Generator().manual_seed(int(noise_seed))
            running[i] = {"episode": j, "return": 0.0, "length": 0, "noise": noise}
        if free.any():
            obs, _ = envs.reset(seed=seeds, options={"reset_mask": free, "record": record})
            free[:], record[:] = False, False
        ids, shape = list(running), (*noise_shape, *envs.single_action_space.shape)
        noise = torch.stack([torch.randn(shape, generator=running[i]["noise"]) for i in ids])
        obs_now = torch.as_tensor(obs[ids], dtype=torch.float32, device=agent.log_alpha.device)
        actions = np.zeros(envs.action_space.shape, dtype=np.float32)  # (parked: ignored)
        actions[ids] = policy(agent, obs_now, noise.to(obs_now.device), args).float().cpu().numpy()
        obs, rewards, terminated, truncated, info = envs.step(actions)
        for i in ids:
            e = running[i]
            e["return"], e["length"] = e["return"] + rewards[i], e["length"] + 1
            if terminated[i] or truncated[i]:  # success at the last step, as OGBench
                results.append((info.get("success", [np.nan] * n)[i], e["return"], e["length"]))
                if "frames" in info and info["_frames"][i]:
                    videos[e["episode"]] = np.stack(info["frames"][i])
                free[i] = True
                del running[i]
    success, episode_return, length = np.mean(results, axis=0).tolist()
    metrics = {"success": success, "episode.return": episode_return, "episode.length": length}
    if "/" in args.env_name:  # D4RL (a Minari id): also 100 x the D4RL score
        from common.d4rl import normalized_return
        metrics["episode.normalized_return"] = normalized_return(args.env_name, episode_return)
    return metrics, videos


# Checkpoints: <run>/checkpoint.pt, written atomically (a temporary file, then a rename): the args,
# the step, the agent, Adam, the random streams, the data's fingerprint (the data may move, not
# change) and the script. Never with a NaN or inf; on load, the CRC-32 of every tensor is checked.
# Copied from deflow_offline.py: SCRIPT, atomic_write, write_json, load_checkpoint, last_good,
#   save_checkpoint, restore, checkpoint_due, Logger, check_finite
SCRIPT = Path(__file__).name


def atomic_write(path, write):
    with open(path.with_name(path.name + ".tmp"), "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def write_json(path, value):
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=2).encode()))


def load_checkpoint(path):  # (a run folder: its checkpoint.pt)
    path = Path(path) / "checkpoint.pt" if Path(path).is_dir() else Path(path)
    if not path.is_file():
        sys.exit(f"error: checkpoint {path} does not exist (give runs/<run> or its checkpoint.pt)")
    try:  # torch.save writes a zip, a CRC-32 for each tensor: a changed byte is found
        with zipfile.ZipFile(path) as zf:
            problem = (bad := zf.testzip()) and f"CRC-32 mismatch in {bad}"
        checkpoint = {} if problem else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises many different errors
        checkpoint, problem = {}, f"{type(e).__name__}: {e}"
    if not isinstance(checkpoint, dict) or {"args", "step", "agent", "script"} - checkpoint.keys():
        sys.exit(f"error: {path} is corrupt or not a DeFlow checkpoint ({problem or 'other keys'});"
                 " resume from another checkpoint or start a new run")
    script = checkpoint["script"]  # deflow_o2o.py may go online from a deflow_offline.py run
    if script != SCRIPT and (script, SCRIPT) != ("deflow_offline.py", "deflow_o2o.py"):
        sys.exit(f"error: {path} is a {script} run's checkpoint; resume it with {script}")
    return {**checkpoint, "path": str(path)}


def last_good(run_dir, saved):
    return f"the last good checkpoint: {run_dir}/checkpoint.pt, of update {saved}" if saved else \
        f"no checkpoint was written in {run_dir}"


def save_checkpoint(run_dir, step, agent, optimizer, log_rng, args, data, saved, **extra):
    adam = [(f"Adam's {k}", v) for state in optimizer.state.values() for k, v in state.items()]
    if bad := [k for k, v in [*agent.state_dict().items(), *adam] if not v.isfinite().all()]:
        sys.exit(f"error: at update {step}, {bad[0]} and {len(bad) - 1} more tensors are NaN or "
                 f"inf: not saved; {last_good(run_dir, saved)}. Lower --lr or check the dataset.")
    cuda = torch.cuda.get_rng_state(log_rng.device) if log_rng.device.type == "cuda" else None
    rng = {"torch": torch.get_rng_state(), "cuda": cuda, "log": log_rng.get_state()}
    state = {"args": dataclasses.asdict(args), "step": step, "agent": agent.state_dict(),
             "optimizer": optimizer.state_dict(), "data": data, "script": SCRIPT, "rng": rng,
             **extra}
    atomic_write(run_dir / "checkpoint.pt", lambda f: torch.save(state, f))
    return step


def restore(checkpoint, agent, optimizer, log_rng, args, data):
    """Load the agent, Adam (at this --lr) and the random streams; the step to continue from."""
    path, step, rng = args.resume, checkpoint["step"], checkpoint["rng"]
    if checkpoint["data"] != data:
        sys.exit(f"error: {path} was trained on other data ({checkpoint['data']}) than given here "
                 f"({data}); resume with the run's dataset (--dataset-path or --dataset-dir)")
    try:
        agent.load_state_dict(checkpoint["agent"])
    except RuntimeError as e:
        sys.exit(f"error: checkpoint {path} does not fit this environment/network: "
                 f"{' '.join(str(e).split())[:400]}")
    optimizer.load_state_dict(checkpoint["optimizer"])
    if (lr := optimizer.param_groups[0]["lr"]) != args.lr:
        print(f"--lr {args.lr:g} replaces the checkpoint's {lr:g}")
    for group in optimizer.param_groups:
        group["lr"] = args.lr
    if rng["log"].numel() == log_rng.get_state().numel():  # the same device type
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and log_rng.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], log_rng.device)
        log_rng.set_state(rng["log"])
    else:  # CPU <-> CUDA: new streams from [seed, step, 2**32 - 1] (no episode's words)
        seeds = SeedSequence([args.seed, step, 2**32 - 1]).generate_state(2)
        torch.manual_seed(int(seeds[0]))
        log_rng.manual_seed(int(seeds[1]))
        print(f"note: {path} was written on another device type: random number generator states do"
              f" not carry over, so training and logging continue from new streams seeded by (seed,"
              f" step {step}); everything else continues exactly")
    return step + 1


def checkpoint_due(args, step, is_end, total_steps, last_save):
    """Every --save-interval (None: a tenth; 0: none), after 30 min without one, and at the end."""
    every = max(1, total_steps // 10) if args.save_interval is None else args.save_interval
    return is_end or bool(every) and (step % every == 0 or time.monotonic() - last_save > 1800)


# Logs: <run_dir>/<env>__<exp_name>__<seed>__<time>_<random>/ (a resumed run: its folder) holds
# args.json, train.csv, eval.csv (a row per logging step or evaluation; --track: also to wandb).
class Logger:
    def __init__(self, args, resume_step=None):
        if resume_step:
            self.dir = Path(args.resume).parent
        else:  # a new folder of its own, even for two runs started in one second
            Path(args.run_dir).mkdir(parents=True, exist_ok=True)
            env = args.env_name.replace("/", "-")  # (D4RL ids have slashes)
            name = f"{env}__{args.exp_name}__{args.seed}__{time.time():.0f}_"
            self.dir = Path(tempfile.mkdtemp(prefix=name, dir=args.run_dir))
            os.umask(umask := os.umask(0))  # readable as mkdir makes folders (mkdtemp: owner only)
            os.chmod(self.dir, 0o777 & ~umask)
        self.lock = open(self.dir / "lock", "a+")  # one process a run; the OS frees it if it dies
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f"error: the run {self.dir} is in use by process "
                     f"{(self.dir / 'lock').read_text().strip()}; let it end or stop it first")
        self.lock.truncate(0)
        print(os.getpid(), file=self.lock, flush=True)
        for path in [self.dir / "train.csv", self.dir / "eval.csv"] if resume_step else []:
            if path.exists():  # one history: the rows logged after the checkpoint go
                lines = [line for line in open(path)
                         if not line[0].isdigit() or int(line.split(",")[0]) <= resume_step]
                atomic_write(path, lambda f: f.write("".join(lines).encode()))
        write_json(self.dir / "args.json", dataclasses.asdict(args))
        self.wandb, self.start = None, time.time()
        self.last = (resume_step or 0, self.start)  # (step, time) of the last train.csv row
        if args.track:
            import wandb
            self.wandb = wandb
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, id=self.dir.name,
                       name=self.dir.name, config=dataclasses.asdict(args), dir=str(self.dir),
                       resume="allow")

    def log(self, csv_name, step, row):
        """A row of train.csv (+ seconds per update, since the start) or eval.csv; printed."""
        if csv_name == "train.csv":
            now = time.time()
            row["time/epoch_time"] = (now - self.last[1]) / (step - self.last[0])
            row["time/total_time"], self.last = now - self.start, (step, now)
        path, row = self.dir / csv_name, {"step": step, **row}
        fields = next(csv.reader(open(path))) if path.exists() else list(row)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fields, extrasaction="ignore", lineterminator="\n")
            writer.writeheader() if f.tell() == 0 else None
            writer.writerow(row)
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        shown = [f"training/{k}" for k in ("critic/critic_loss", "actor/bc_flow_loss", "actor/q",
                                           "actor/distill_loss", "actor/alpha_value", "actor/mse")]
        text = [f"{k.split('/')[-1]} {v:.4g}" for k, v in row.items()
                if k in shown or k.startswith("evaluation/")]
        tqdm.write(f"step {step}: " + "  ".join(text))


def check_finite(metrics, first_bad, step, run_dir, saved):
    """first_bad: per loss term, the first step it was NaN or inf, kept on the device (no host
    sync); with run_dir (a logging or checkpoint step), stop the run naming them."""
    values = torch.stack([v.detach() for k, v in metrics.items() if k != "actor/mse"])
    first_bad = torch.where((first_bad == 0) & ~values.isfinite(), step, first_bad)
    if run_dir is not None and first_bad.any():
        names = [k for k in metrics if k != "actor/mse"]
        bad = sorted((s, name) for s, name in zip(first_bad.tolist(), names) if s > 0)
        sys.exit(f"error: training/{bad[0][1]} became non-finite at step {bad[0][0]} (non-finite "
                 f"since: {', '.join(f'{n} at {s}' for s, n in bad)}); nothing of it was saved: "
                 f"{last_good(run_dir, saved)}. Check the dataset for NaNs or lower --lr.")
    return first_bad


if __name__ == "__main__":
    args, checkpoint = parse_args()
    device = setup(args)
    try:  # uint8 frames, each once, on the training device (the loader checks the memory first)
        env, train_data, val_data, memory = load_visual_datasets(
            args.env_name, device, args.dataset_dir, args.dataset_path, args.generate_episodes,
            args.num_workers, args.dataset_fraction)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    height, width, channels = train_data["frames"].shape[1:]
    image_shape = (height, width, channels * args.frame_stack)
    action_dim = env.action_space.shape[-1]
    with torch.device("meta"):  # the agent's size, allocating nothing (the frames are in place)
        check_memory(args, device, DeFlowAgent(image_shape, action_dim, args),
                     sample_floats=8 * math.prod(image_shape))  # (the encoders' maps)
    if args.eval_interval:
        eval_envs = make_eval_envs(args, max(1, min(args.eval_envs, args.eval_episodes)))
        print(f"{eval_envs.num_envs} evaluation environments side by side")

    agent = DeFlowAgent(image_shape, action_dim, args).to(device)
    trained = [p for p in agent.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=args.lr, fused=True)
    log_rng = torch.Generator(device).manual_seed(  # validation, mse: apart from training's stream
        int(SeedSequence([args.seed, 0, 0]).generate_state(1)[0]))
    data_id = data_fingerprint(train_data, val_data)
    start_step = restore(checkpoint, agent, optimizer, log_rng, args, data_id) if checkpoint else 1
    losses = compiled(deflow_losses, args, device)
    bf16 = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    train_losses, val_losses, policy = bf16(losses), bf16(deflow_losses), bf16(sample_actions)
    logger = Logger(args, checkpoint["step"] if checkpoint else None)
    print(f"{'resuming' if checkpoint else 'new run'} {logger.dir} at step {start_step}: {memory}, "
          f"{len(train_data['valid'])} transitions, images {'x'.join(map(str, image_shape))}, "
          f"delta {args.target_divergence:.3g}")

    first_bad, last_save = torch.zeros((), dtype=torch.long, device=device), time.monotonic()
    saved = start_step - 1  # the update of the last checkpoint (0: none)
    for step in tqdm(range(start_step, args.offline_steps + 1), initial=start_step - 1,
                     total=args.offline_steps, smoothing=0.1, dynamic_ncols=True):
        is_end = step == args.offline_steps
        is_log_step = is_end or args.log_interval > 0 and step % args.log_interval == 0
        is_save_step = checkpoint_due(args, step, is_end, args.offline_steps, last_save)
        if args.compile:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten
        batch = sample_batch(train_data, args.batch_size, args.frame_stack, args.p_aug)
        draws = update_draws(args.batch_size, action_dim, device,
                             mse_rng=log_rng if is_log_step else None)
        loss, metrics = train_losses(agent, batch, draws, args)
        update(agent, optimizer, loss, args)
        first_bad = check_finite(metrics, first_bad, step,
                                 logger.dir if is_log_step or is_save_step else None, saved)
        if is_log_step:
            row = {f"training/{k}": v.item() for k, v in metrics.items()}
            with torch.no_grad():
                val_batch = sample_batch(val_data, args.batch_size, args.frame_stack, args.p_aug,
                                         log_rng)
                val_draws = update_draws(args.batch_size, action_dim, device, log_rng, log_rng)
                _, val_metrics = val_losses(agent, val_batch, val_draws, args)
            row.update({f"validation/{k}": v.item() for k, v in val_metrics.items()})
            logger.log("train.csv", step, row)
        if args.eval_interval and (step == 1 or step % args.eval_interval == 0 or is_end):
            videos_at = args.video_episodes if args.capture_video else 0
            eval_metrics, videos = evaluate(agent, eval_envs, args, step, policy,
                                            video_episodes=videos_at)
            logger.log("eval.csv", step, {f"evaluation/{k}": v for k, v in eval_metrics.items()})
            if videos:
                optional("video").write_videos(logger.dir / "videos", videos, step)
        if is_save_step:
            saved = save_checkpoint(logger.dir, step, agent, optimizer, log_rng, args, data_id,
                                    saved)
            last_save = time.monotonic()
    print(f"done: {logger.dir}")
    if logger.wandb is not None:
        logger.wandb.finish()

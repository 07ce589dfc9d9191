"""DeFlow, offline, from pixels on visual OGBench: the whole method in one file.

Paper: "Decoupling Manifold Modeling and Value Maximization for Offline Policy Extraction" (arXiv 2601.10471).
Official code (JAX): github.com/muzhancun/DeFlow, agents/deflow.py + main.py (built on FQL, github.com/seohongpark/fql).

DeFlow in four lines:
  1. A multi-step flow-matching policy mu(s, x, t) models the behavior data (the "manifold"): plain BC, 10 Euler steps.
  2. A refinement network f(s, a_base) adds a residual to the flow's action: a = clip(a_base + f(s, a_base)).
  3. f is trained to maximize Q(s, a) while a Lagrange multiplier alpha keeps mean(f^2) near a target divergence delta.
  4. A 2-member critic ensemble learns Q by TD, bootstrapping with the same flow + refinement policy.

What pixels add (this file is deflow_offline.py plus these; diff the two to see exactly where):
  5. s is the last --frame-stack 64x64 RGB frames, stacked on the channel axis (uint8, 64x64x9 with the recipes' 3).
  6. The flow, the refinement network and the critic each read s through an IMPALA-small encoder of their own (the
     critic's is shared by both ensemble members; the target critic has an EMA copy of it). Each network encodes an
     observation once and reuses the features, e.g. for all 10 Euler steps.
  7. With probability --p-aug (one coin per batch) the batch is randomly shifted: edge-pad 3, crop back at a random
     offset per sample, the same offset for s and s'.
  The data stay uint8 on the training device, every frame once; batches are stacked and shifted there.

Run (see README.md for datasets; MuJoCo renders the evaluation frames: without a display set MUJOCO_GL=egl or osmesa):
  python deflow_pixels.py --env-name visual-cube-single-play-singletask-task1-v0   # official data (12 GB), downloads
  python deflow_pixels.py --env-name visual-cube-single-play-singletask-task1-v0 \\
      --dataset-path data/visual-cube-single-100ep.npz --generate-episodes 100     # no internet: generate locally
  python deflow_pixels.py ... --dataset-fraction 0.5                               # half the episodes, half the memory
  python deflow_pixels.py --resume runs/<run>/checkpoint.pt                         # continue a run exactly
  python deflow_pixels.py --help                                                   # every flag

Paper recipes (500k steps, impala_small, --p-aug 0.5, --frame-stack 3, normalize_q_loss=True, use_lagrange=True,
discount 0.99, q_agg mean; note the paper's pixel tasks are task1, not the default task):
  task                                          --target-divergence
  visual-cube-single-play-singletask-task1-v0   0.001
  visual-cube-double-play-singletask-task1-v0   0.001
  visual-scene-play-singletask-task1-v0         0.001
  visual-puzzle-3x3-play-singletask-task1-v0    0.0005
  visual-puzzle-4x4-play-singletask-task1-v0    0.0005

Deviations from the official code (everything else follows it):
  - The dataset is stored as frames, each once, on the training device, and a batch is stacked from frame indices
    (clamped to the episode's first frame, as officially); officially observations and next observations are two
    host arrays (24 GB for 1M frames). --dataset-fraction (new) keeps the first part of the episodes, and the script
    checks the memory first. Rewards and masks come from OGBench's relabel_dataset, as officially.
  - The random shift is done by clamped indexing, which equals edge padding and cropping; the coin is drawn every
    step (no shift means the centre offset), so the step has no host decision in it.
  - Features are computed once per observation and network within an update: the base actions and the `mse` metric
    reuse the flow's features of s, the Q loss reuses the critic's features of s (detached, with the critic's weights
    as constants, as officially). The values are the same as officially, where each call re-encodes.
  - --encoder-stack-sizes / --encoder-head-dims (new) size the encoder; the defaults are the official impala_small.
  - --eval-max-episode-steps (new, default: the task's own length) shortens evaluation episodes for quick checks.
  - --target-divergence auto (IAV) is not offered here: the IAV heuristic's nearest neighbours are in state space.
  - Fixed-alpha path (--no-use-lagrange, used by no recipe): the penalty weight is alpha, not alpha^2 (official bug).
  - --normalize-q-loss defaults to True (every official recipe sets it; the official default is False).
  - The refinement network's width is its own flag (--refine-hidden-dims); the default equals the official 4x512.
  - The target critic is kept out of the optimizer (officially it sits in Adam but never gets a gradient: same result).
  - The `actor/mse` metric (a third 10-step flow rollout) is computed only on logging steps, not on every update.
  - Evaluation runs --eval-envs episodes side by side with one batched policy call per step. Episode j is reset with
    seed (seed + j) and draws its noise from its own generator seeded (seed + j), so an evaluation consumes no
    training randomness, every evaluation sees the same start states, and an episode's result does not depend on
    the episodes beside it; there is also a final evaluation at the last step. (Officially episodes run one by one,
    the eval RNG comes from numpy's global RNG and resets are unseeded.)
  - --capture-video (new) writes the first --video-episodes evaluation episodes as mp4 files (the frames the agent
    sees, 64x64), in videos/ of the run.
  - The same update, computed in fewer and larger operations (the numbers agree up to float rounding, tested): the
    update's two no-gradient 10-step flow rollouts (pi(s') for the TD target, the base actions at s) run as one
    rollout over 2B rows of encoder features; the features' part of the flow's first layer is computed once per
    rollout, not at each Euler step; the 2 critics are one batched matmul per layer; Adam is PyTorch's fused Adam.
    The update's noise is one N(0, I) draw of shape (3, B, A) plus t ~ U[0, 1) of shape (B, 1), made outside the
    losses (officially the JAX key is split per use): the same distributions, other numbers.
  - --compile (new, on by default; --no-compile runs the eager code) runs the losses' forward and backward (encoders
    included) through torch.compile, and on CUDA replays them as CUDA graphs. The eager code below is the reference
    it must match (tests/test_pixels.py). Compiled, the tanh-GELU is written as x * sigmoid(2u), the same function.
  - --precision (new; float32 by default, as officially) can run the no-gradient rollouts' matmuls, or every matmul
    and convolution, in bfloat16 (torch.autocast; weights, Adam and the losses stay float32).
  - OGBench >= 1.2 semantics (success judged on the pre-step state), as the installed package does.
  - --eval-sampler max-q / iterative exist officially (sample_actions_max_q, sample_actions_iterative_refinement) but
    no command reaches them. Here they are flags, batched over states, and max-q takes the argmax of Q (the official
    code takes the argmin, against its own docstring). Defaults N = 10 and K = 5 are the official ones.
  - A non-finite loss stops the run with the step and the term (checked on the device, read at log intervals).
  - Checkpoints are one resumable file (args, step, all modules incl. log_alpha, Adam state, RNG states).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections import deque
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from common.datasets import DatasetError, load_visual_datasets
from common.envs import EnvPool


@dataclasses.dataclass
class Args:
    # --- run ---
    exp_name: str = "deflow_pixels"
    """name of this experiment (part of the run directory name)"""
    seed: int = 0
    """seed of python, numpy, torch and the evaluation episodes"""
    env_name: str = "visual-cube-single-play-singletask-task1-v0"
    """visual OGBench single-task environment (visual-<dataset>-singletask[-taskN]-v0); the paper uses task1"""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'"""
    run_dir: str = "runs"
    """folder that holds one sub-folder per run (args.json, train.csv, eval.csv, checkpoint.pt, videos/)"""
    resume: Optional[str] = None
    """checkpoint.pt of an earlier run: continue it exactly (same settings unless a flag here overrides one)"""
    track: bool = False
    """also log to Weights & Biases (honours WANDB_MODE=offline)"""
    wandb_project_name: str = "deflow"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team); None means your default"""

    # --- data ---
    dataset_dir: str = "~/.ogbench/data"
    """where official OGBench datasets are looked for and downloaded to"""
    dataset_path: Optional[str] = None
    """a local training .npz instead (its validation file is the same name with -val.npz)"""
    generate_episodes: int = 0
    """if --dataset-path does not exist, render it first with this many oracle episodes (a few frames/s on a CPU)"""
    num_workers: int = 1
    """processes for --generate-episodes"""
    dataset_fraction: float = 1.0
    """train on the first fraction of the episodes (train and val files); 1M frames need 12 GB on the device"""

    # --- schedule (official defaults for pixels) ---
    offline_steps: int = 500_000
    """number of gradient updates"""
    log_interval: int = 5000
    """log training and validation losses every this many updates"""
    eval_interval: int = 100_000
    """evaluate at update 1, every this many updates and at the end (0: never)"""
    eval_episodes: int = 50
    """episodes per evaluation"""
    eval_envs: int = 8
    """environments that run the evaluation episodes side by side (one batched policy call per step); each holds
    about 0.15-0.2 GB of memory (manipulation tasks), and the results do not depend on how many"""
    eval_workers: int = 0
    """processes that step (and render) the evaluation environments (0: this one); worth it with cores to spare"""
    eval_max_episode_steps: Optional[int] = None
    """cut evaluation episodes at this many steps (None: the task's own length); for quick checks only"""
    capture_video: bool = False
    """write the first --video-episodes episodes of every evaluation as mp4 files in <run>/videos/"""
    video_episodes: int = 1
    """evaluation episodes recorded by --capture-video"""
    save_interval: int = 500_000
    """write checkpoint.pt every this many updates (and always at the end)"""

    # --- pixels (official recipe values) ---
    frame_stack: int = 3
    """frames stacked on the channel axis (dataset: clamped at episode starts; environment: reset frame repeated)"""
    p_aug: float = 0.5
    """probability that a batch is randomly shifted (one coin per batch; pad 3 by edge replication, then crop)"""
    encoder_stack_sizes: tuple[int, ...] = (16, 32, 32)
    """IMPALA stacks: conv 3x3 + max-pool 3x3/2 + one residual block each (official impala_small: 16 32 32)"""
    encoder_head_dims: tuple[int, ...] = (512,)
    """MLP head of each encoder, GELU after every layer (official impala_small: 512)"""

    # --- agent (official names and defaults) ---
    lr: float = 3e-4
    """Adam learning rate (one Adam over every trained parameter, encoders and log_alpha included)"""
    batch_size: int = 256
    """transitions per update (the same batch feeds the critic and the actor)"""
    actor_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """hidden widths of the BC flow velocity field mu"""
    refine_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """hidden widths of the refinement network f (officially the same as the actor's)"""
    value_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """hidden widths of each critic"""
    layer_norm: bool = True
    """LayerNorm in the critics"""
    actor_layer_norm: bool = False
    """LayerNorm in the flow and refinement networks"""
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """target critic EMA rate (critic encoder included)"""
    q_agg: Literal["mean", "min"] = "mean"
    """how the TD target aggregates the 2 target critics (the actor always uses the mean)"""
    flow_steps: int = 10
    """Euler steps of the BC flow"""
    target_divergence: float = 0.001
    """delta: the Lagrangian keeps mean(refinement^2) near this (0.0005 for the puzzles, see the recipes above)"""
    use_lagrange: bool = True
    """learn the penalty weight alpha by the Lagrangian (every recipe); off: fixed --alpha"""
    alpha: float = 10.0
    """fixed penalty weight, only with --no-use-lagrange"""
    normalize_q_loss: bool = True
    """scale the Q loss by 1 / mean|Q| (every official recipe sets this)"""

    # --- speed (changes no math) ---
    compile: bool = True
    """torch.compile the losses (forward and backward); on CUDA also replay them as CUDA graphs. The first update
    compiles for a minute or so; --no-compile runs the eager reference code"""
    precision: Literal["float32", "bf16-rollouts", "bf16"] = "float32"
    """matmul precision: float32 (official); bf16-rollouts: the matmuls of the no-gradient flow rollouts (TD target,
    base actions, evaluation) in bfloat16; bf16: every matmul in bfloat16 (autocast; weights, Adam and the losses
    stay float32). Pays only where bfloat16 is native (GPUs; CPUs with AVX-512 BF16 or AMX): elsewhere it is
    emulated and several times slower than float32"""

    # --- evaluation-time action selection (training always uses the plain sampler) ---
    eval_sampler: Literal["flow", "max-q", "iterative"] = "flow"
    """flow: the paper's pi(s); max-q: the best of --num-samples by Q, refined; iterative: best of --refine-steps"""
    num_samples: int = 10
    """flow samples per state for --eval-sampler max-q"""
    refine_steps: int = 5
    """refinements for --eval-sampler iterative (candidates: this many + 1)"""


# ---------------------------------------------------------------------------------------------------------------------
# Networks. Flax conventions: Linear -> GELU(tanh) -> [LayerNorm(eps 1e-6)] per hidden layer, Xavier-uniform weights
# (convolutions too), zero biases, plain Linear output.
# ---------------------------------------------------------------------------------------------------------------------
class GELU(nn.Module):
    """Flax's default GELU, the tanh approximation: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). Under
    torch.compile it is written as x * sigmoid(2u), the same function: a CPU compiles that into a kernel about twice as
    fast as tanh's, while in eager mode PyTorch's own gelu kernel is the faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2 sqrt(2/pi) = 1.5957...
        return F.gelu(x, approximate="tanh")


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: Optional[int], layer_norm: bool) -> nn.Sequential:
    """out_dim None: no output layer, the last hidden layer's activation is the output (Flax's activate_final)."""
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers += [nn.Linear(in_dim, width), GELU()]
        if layer_norm:
            layers.append(nn.LayerNorm(width, eps=1e-6))
        in_dim = width
    if out_dim is not None:
        layers.append(nn.Linear(in_dim, out_dim))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)  # SAME for 3x3 at stride 1
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3 max-pool, stride 2, TF/Flax SAME padding: the padding goes to the bottom/right first (on even sizes all of
    it), unlike MaxPool2d(3, 2, padding=1), which pads both sides and so shifts every window by one pixel."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: width (left, right), then height (top, bottom)
        total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), 3, 2)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv0, self.conv1 = conv3x3(channels, channels), conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class ImpalaEncoder(nn.Module):
    """IMPALA-small: per stack conv 3x3 -> max-pool 3x3/2 (SAME) -> residual block; ReLU, flatten, MLP head + GELU.

    Input: uint8 frames (B, H, W, C), channel-last as OGBench gives them; scaled to [0, 1] here. With 64x64x9 input
    and the default sizes it has 1,105,920 parameters, as officially."""

    def __init__(self, image_shape: tuple[int, int, int], stack_sizes: tuple[int, ...], head_dims: tuple[int, ...]):
        super().__init__()
        height, width, channels = image_shape
        self.convs, self.blocks = nn.ModuleList(), nn.ModuleList()
        for size in stack_sizes:
            self.convs.append(conv3x3(channels, size))
            self.blocks.append(ResidualBlock(size))
            channels, height, width = size, -(-height // 2), -(-width // 2)
        self.head = mlp(height * width * channels, head_dims, None, layer_norm=False)
        self.out_dim = head_dims[-1]

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2).float() / 255.0
        for conv, block in zip(self.convs, self.blocks):
            x = block(max_pool_same(conv(x)))
        x = F.relu(x).permute(0, 2, 3, 1).flatten(1)  # flattened (H, W, C) like Flax, so the head's rows line up
        return self.head(x)


class VectorField(nn.Module):
    """mu(s, x, t) -> R^A when use_time (the BC flow); f(s, a) -> R^A, unbounded, when not (the refinement).
    forward() takes the features self.encoder(frames), so that one encoding serves many calls (the Euler steps)."""

    def __init__(self, image_shape: tuple[int, int, int], action_dim: int, args: Args, hidden_dims: tuple[int, ...],
                 use_time: bool):
        super().__init__()
        self.action_dim = action_dim
        self.encoder = ImpalaEncoder(image_shape, args.encoder_stack_sizes, args.encoder_head_dims)
        self.net = mlp(self.encoder.out_dim + action_dim + int(use_time), hidden_dims, action_dim,
                       args.actor_layer_norm)

    def forward(self, features: torch.Tensor, actions: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        inputs = [features, actions] if t is None else [features, actions, t]  # t: raw scalar in [0, 1), no embedding
        return self.net(torch.cat(inputs, dim=-1))


class EnsembleLinear(nn.Module):
    """`members` independent Linear layers in one: (members, B, in) -> (members, B, out) by one batched matmul.
    Each member's weight is Xavier-uniform for its own fan-in and fan-out (as nn.Linear under mlp()'s init)."""

    def __init__(self, members: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = math.sqrt(6 / (in_dim + out_dim))
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(members, 1, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleLayerNorm(nn.Module):
    """LayerNorm (eps 1e-6) with a scale and shift of each member's own: (members, B, width)."""

    def __init__(self, members: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, 1, width))
        self.bias = nn.Parameter(torch.zeros(members, 1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * self.weight + self.bias


class Critic(nn.Module):
    """Two independently initialised Q networks on one shared encoder; forward(features, actions) -> (2, B). The two
    run together: every layer holds both members' weights and is one batched matmul (the same numbers as two MLPs)."""

    def __init__(self, image_shape: tuple[int, int, int], action_dim: int, args: Args, members: int = 2):
        super().__init__()
        self.encoder = ImpalaEncoder(image_shape, args.encoder_stack_sizes, args.encoder_head_dims)
        layers: list[nn.Module] = []
        in_dim = self.encoder.out_dim + action_dim
        for width in args.value_hidden_dims:
            layers += [EnsembleLinear(members, in_dim, width), GELU()]
            if args.layer_norm:
                layers.append(EnsembleLayerNorm(members, width))
            in_dim = width
        layers.append(EnsembleLinear(members, in_dim, 1))
        self.members, self.net = members, nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([features, actions], dim=-1)
        rows = x.reshape(-1, x.shape[-1])  # any leading shape (B or B x N), as rows
        return self.net(rows.expand(self.members, *rows.shape)).reshape(self.members, *x.shape[:-1])


class DeFlowAgent(nn.Module):
    """Holds every learned tensor, so one state_dict is the whole agent (encoders and log_alpha included)."""

    def __init__(self, image_shape: tuple[int, int, int], action_dim: int, args: Args):
        super().__init__()
        self.flow = VectorField(image_shape, action_dim, args, args.actor_hidden_dims, use_time=True)
        self.refine = VectorField(image_shape, action_dim, args, args.refine_hidden_dims, use_time=False)
        self.critic = Critic(image_shape, action_dim, args)
        self.target_critic = Critic(image_shape, action_dim, args)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)  # moved only by the EMA (its encoder too)
        self.log_alpha = nn.Parameter(torch.ones(1))  # official init 1.0, i.e. alpha = e ~ 2.72


# ---------------------------------------------------------------------------------------------------------------------
# The policy: Euler-integrate the BC flow from noise, then add one refinement. The flow and the refinement network
# each encode the frames once.
# ---------------------------------------------------------------------------------------------------------------------
def flow_actions(flow: VectorField, features: torch.Tensor, noise: torch.Tensor, flow_steps: int) -> torch.Tensor:
    """a_base = clip(x_K, -1, 1), x_0 = noise, x_{i+1} = x_i + mu(s, x_i, i/K) / K. Clipped only at the end.

    mu's first layer is W [e, x, t] + b = W_e e + (W_x x + b + t W_t) for the features e of s. The part of e is the
    same at every Euler step, so it is computed once; the rest of mu is flow.net[1:]. (The same numbers as calling
    flow(features, x, t) K times.)"""
    first, rest = flow.net[0], flow.net[1:]
    w_e, w_x, w_t = first.weight.split([features.shape[-1], noise.shape[-1], 1], dim=1)
    features_part = F.linear(features, w_e)
    x = noise
    for i in range(flow_steps):
        t = i / flow_steps
        x = x + rest(features_part + F.linear(x, w_x, first.bias + t * w_t[:, 0])) / flow_steps
    return x.clamp(-1, 1)


def refine_actions(agent: DeFlowAgent, flow_features: torch.Tensor, refine_features: torch.Tensor,
                   noise: torch.Tensor, flow_steps: int) -> torch.Tensor:
    """pi(s) from features: clip(a_base + f(s, a_base), -1, 1)."""
    base_actions = flow_actions(agent.flow, flow_features, noise, flow_steps)
    return (base_actions + agent.refine(refine_features, base_actions)).clamp(-1, 1)


# The samplers take their noise as an input (fresh N(0, I) per call; no temperature), so that the caller decides where
# it comes from: the global stream in the update, one stream per episode in evaluation.
def sample_actions(agent: DeFlowAgent, obs: torch.Tensor, noise: torch.Tensor, flow_steps: int) -> torch.Tensor:
    """pi(s) for uint8 frames obs (B, H, W, C), noise (B, A)."""
    return refine_actions(agent, agent.flow.encoder(obs), agent.refine.encoder(obs), noise, flow_steps)


def sample_actions_max_q(agent: DeFlowAgent, obs: torch.Tensor, noise: torch.Tensor, flow_steps: int) -> torch.Tensor:
    """Refine the base action with the highest ensemble-mean Q among N flow samples per state; noise (B, N, A)."""
    n = noise.shape[1]
    base_actions = flow_actions(agent.flow, agent.flow.encoder(obs)[:, None], noise, flow_steps)  # (B, N, A)
    qs = agent.critic(agent.critic.encoder(obs)[:, None].expand(-1, n, -1), base_actions)  # (2, B, N)
    best = qs.mean(dim=0).argmax(dim=1)  # official code: argmin (a bug)
    base_actions = base_actions[torch.arange(obs.shape[0], device=obs.device), best]
    return (base_actions + agent.refine(agent.refine.encoder(obs), base_actions)).clamp(-1, 1)


def sample_actions_iterative(agent: DeFlowAgent, obs: torch.Tensor, noise: torch.Tensor, flow_steps: int,
                             refine_steps: int) -> torch.Tensor:
    """a_0 = base action, a_{k+1} = clip(a_k + f(s, a_k)); keep the highest ensemble-mean Q of a_0..a_K (batched)."""
    refine_features = agent.refine.encoder(obs)
    candidates = [flow_actions(agent.flow, agent.flow.encoder(obs), noise, flow_steps)]
    for _ in range(refine_steps):
        candidates.append((candidates[-1] + agent.refine(refine_features, candidates[-1])).clamp(-1, 1))
    candidates = torch.stack(candidates, dim=1)  # (B, K + 1, A)
    critic_features = agent.critic.encoder(obs)[:, None].expand(-1, refine_steps + 1, -1)
    best = agent.critic(critic_features, candidates).mean(dim=0).argmax(dim=1)
    return candidates[torch.arange(obs.shape[0], device=obs.device), best]


def eval_actions(agent: DeFlowAgent, obs: torch.Tensor, noise: torch.Tensor, args: Args) -> torch.Tensor:
    """The --eval-sampler's action; noise has shape eval_noise_shape(args, A) per state."""
    if args.eval_sampler == "max-q":
        return sample_actions_max_q(agent, obs, noise, args.flow_steps)
    if args.eval_sampler == "iterative":
        return sample_actions_iterative(agent, obs, noise, args.flow_steps, args.refine_steps)
    return sample_actions(agent, obs, noise, args.flow_steps)


def eval_noise_shape(args: Args, action_dim: int) -> tuple[int, ...]:
    return (args.num_samples, action_dim) if args.eval_sampler == "max-q" else (action_dim,)


def flow_matching_loss(flow: VectorField, features: torch.Tensor, actions: torch.Tensor, x_0: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:
    """Rectified path from noise x_0 to the action: x_t = (1 - t) x_0 + t a, target velocity a - x_0."""
    x_t = (1 - t) * x_0 + t * actions
    return (flow(features, x_t, t) - (actions - x_0)).square().mean()


# ---------------------------------------------------------------------------------------------------------------------
# The update. Who learns from what (one backward of the sum, one Adam step):
#   critic (+ its encoder)  <- critic_loss                  (TD to r + gamma * m * Q_target(s', pi(s')))
#   flow (+ its encoder)    <- bc_flow_loss                 (flow matching on dataset actions)
#   refine (+ its encoder)  <- sg(alpha) * distill + q_loss (stay near a_base, climb Q through the action only)
#   log_alpha               <- alpha_loss                   (raise alpha when distill > delta, lower it when below)
#   target (+ its encoder)  <- nothing; EMA of the critic's pre-step weights
# ---------------------------------------------------------------------------------------------------------------------
def autocast(args: Args, device: torch.device, rollout: bool):
    """bfloat16 matmuls where --precision asks for them: bf16 everywhere, bf16-rollouts in the no-gradient rollouts."""
    enabled = args.precision == "bf16" or (rollout and args.precision == "bf16-rollouts")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def update_noise(batch_size: int, action_dim: int, device: torch.device, with_mse: bool = False) -> dict:
    """The update's random draws, made here and passed in, so that eager and --compile use the same numbers: N(0, I)
    noise for the TD target's next actions, the flow-matching start x_0 and the base actions (and, with_mse, for the
    `mse` metric's policy actions), and the flow-matching time t ~ U[0, 1), one per sample."""
    noise = torch.randn((3 + with_mse, batch_size, action_dim), device=device)
    draws = {"next_actions": noise[0], "x_0": noise[1], "base_actions": noise[2]}
    if with_mse:
        draws["mse"] = noise[3]
    return {**draws, "t": torch.rand((batch_size, 1), device=device)}


def deflow_losses(agent: DeFlowAgent, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor], args: Args):
    """Return (total loss, metrics dict of 0-d tensors) for one batch and its draws (update_noise). Official metric
    names; `actor/mse` when noise has its draw. The unit that --compile compiles (forward and backward)."""
    obs, next_obs, actions = batch["observations"], batch["next_observations"], batch["actions"]
    flow_features = agent.flow.encoder(obs)  # trains the flow's encoder through the flow-matching loss below

    # The update's two 10-step flow rollouts, both without gradient and independent of each other: pi(s') for the TD
    # target and the base actions at s. One rollout over 2B rows of the flow's features (s' rows first) does both. No
    # gradient reaches the flow (or its encoder) through a_base.
    with torch.no_grad(), autocast(args, obs.device, rollout=True):
        next_flow_features = agent.flow.encoder(next_obs)
        next_base_actions, base_actions = flow_actions(
            agent.flow, torch.cat([next_flow_features, flow_features.detach()]),
            torch.cat([noise["next_actions"], noise["base_actions"]]), args.flow_steps).chunk(2)

    # Critic: TD target with the current policy and the target critic (and its encoder), all without gradient.
    with torch.no_grad():
        next_actions = (next_base_actions + agent.refine(agent.refine.encoder(next_obs), next_base_actions)).clamp(-1, 1)
        next_qs = agent.target_critic(agent.target_critic.encoder(next_obs), next_actions)
        next_q = next_qs.min(dim=0).values if args.q_agg == "min" else next_qs.mean(dim=0)
        target_q = batch["rewards"] + args.discount * batch["masks"] * next_q
    critic_features = agent.critic.encoder(obs)
    qs = agent.critic(critic_features, actions)
    critic_loss = (qs - target_q).square().mean()

    # Flow matching from noise x_0 to the dataset action.
    bc_flow_loss = flow_matching_loss(agent.flow, flow_features, actions, noise["x_0"], noise["t"])

    # Refinement of the base actions (from the rollout above).
    refine_features = agent.refine.encoder(obs)
    refinement = agent.refine(refine_features, base_actions)
    distill_loss = refinement.square().mean()  # D: mean over batch and action dims (per-dimension size)

    if args.use_lagrange:
        alpha = agent.log_alpha.exp()
        alpha_loss = -(agent.log_alpha * (distill_loss.detach() - args.target_divergence)).sum()
    else:
        alpha = torch.tensor(args.alpha, device=actions.device)
        alpha_loss = torch.zeros((), device=actions.device)
    penalty = alpha.detach().squeeze() * distill_loss

    # Q loss through the refined action only: the critic's weights (and its features of s) are constants here.
    policy_actions = (base_actions + refinement).clamp(-1, 1)
    frozen_critic = {name: p.detach() for name, p in agent.critic.named_parameters()}
    q = torch.func.functional_call(agent.critic, frozen_critic, (critic_features.detach(), policy_actions)).mean(dim=0)
    q_loss = -q.mean()
    if args.normalize_q_loss:
        q_loss = q_loss / q.abs().mean().detach()

    actor_loss = bc_flow_loss + penalty + q_loss + alpha_loss
    metrics = {
        "critic/critic_loss": critic_loss, "critic/q_mean": qs.mean(), "critic/q_max": qs.max(), "critic/q_min": qs.min(),
        "actor/actor_loss": actor_loss, "actor/bc_flow_loss": bc_flow_loss, "actor/distill_loss": distill_loss,
        "actor/q_loss": q_loss, "actor/q": q.mean(), "actor/alpha_loss": alpha_loss,
        "actor/alpha_value": alpha.detach().squeeze(),
    }
    if "mse" in noise:  # a third rollout, on logging steps only
        with torch.no_grad(), autocast(args, obs.device, rollout=True):
            policy = refine_actions(agent, flow_features.detach(), refine_features.detach(), noise["mse"],
                                    args.flow_steps)
            metrics["actor/mse"] = (policy - actions).square().mean()
    return critic_loss + actor_loss, metrics


def update(agent: DeFlowAgent, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], args: Args,
           with_mse: bool = False, losses=deflow_losses) -> dict[str, torch.Tensor]:
    """One DeFlow update: draws, losses (`losses`: deflow_losses or its compiled twin), one backward, target EMA from
    the pre-step critic, one Adam step."""
    noise = update_noise(*batch["actions"].shape, batch["actions"].device, with_mse)
    with autocast(args, batch["actions"].device, rollout=False):
        loss, metrics = losses(agent, batch, noise, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():  # theta_target <- tau * theta + (1 - tau) * theta_target, with theta before this step
        torch._foreach_lerp_(list(agent.target_critic.parameters()), list(agent.critic.parameters()), args.tau)
    optimizer.step()
    return {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Batches, assembled on the device from uint8 frames: frame stacking by index, then the random shift.
# ---------------------------------------------------------------------------------------------------------------------
def stack_frames(frames: torch.Tensor, starts: torch.Tensor, idx: torch.Tensor, frame_stack: int) -> torch.Tensor:
    """[o_{t-k+1}, ..., o_t] on the channel axis for each frame index t in idx, each index clamped to the first frame
    of t's episode (so an episode's first observation repeats its first frame). Returns (B, H, W, 3k) uint8."""
    offsets = torch.arange(frame_stack - 1, -1, -1, device=idx.device)
    rows = torch.maximum(idx[:, None] - offsets, starts[idx][:, None])  # (B, k)
    return frames[rows].permute(0, 2, 3, 1, 4).flatten(3)  # (B, k, H, W, 3) -> (B, H, W, k * 3), oldest first


def random_shift(obs: torch.Tensor, next_obs: torch.Tensor, p_aug: float, pad: int = 3):
    """With probability p_aug (one coin for the whole batch): pad every image by `pad` pixels with edge replication and
    crop it back at an offset drawn per sample in {0..2 pad}^2, the same offset for obs and next_obs. Done as clamped
    indexing (identical to padding + cropping), on uint8; tails of the coin use the centre offset, i.e. no shift."""
    batch, height, width = obs.shape[:3]
    apply = torch.rand((), device=obs.device) < p_aug
    offsets = torch.randint(0, 2 * pad + 1, (2, batch, 1), device=obs.device)
    dy, dx = torch.where(apply, offsets, pad).unbind(0)
    rows = (torch.arange(height, device=obs.device) + dy - pad).clamp(0, height - 1)  # (B, H)
    cols = (torch.arange(width, device=obs.device) + dx - pad).clamp(0, width - 1)  # (B, W)
    b = torch.arange(batch, device=obs.device)[:, None, None]
    return obs[b, rows[:, :, None], cols[:, None, :]], next_obs[b, rows[:, :, None], cols[:, None, :]]


def sample_batch(data: dict[str, torch.Tensor], batch_size: int, frame_stack: int,
                 p_aug: float) -> dict[str, torch.Tensor]:
    """Uniform transitions t -> t + 1, stacked and shifted on the data's device: no host round trip."""
    valid = data["valid"]
    idx = valid[torch.randint(len(valid), (batch_size,), device=valid.device)]
    obs = stack_frames(data["frames"], data["starts"], idx, frame_stack)
    next_obs = stack_frames(data["frames"], data["starts"], idx + 1, frame_stack)  # [o_{t-k+2}, ..., o_t, o_{t+1}]
    obs, next_obs = random_shift(obs, next_obs, p_aug)
    return {"observations": obs, "next_observations": next_obs, "actions": data["actions"][idx],
            "rewards": data["rewards"][idx], "masks": data["masks"][idx]}


def train_step(agent: DeFlowAgent, optimizer: torch.optim.Optimizer, data: dict[str, torch.Tensor], args: Args,
               with_mse: bool = False, losses=deflow_losses) -> dict[str, torch.Tensor]:
    """One training iteration: a batch assembled on the device, then the update."""
    batch = sample_batch(data, args.batch_size, args.frame_stack, args.p_aug)
    return update(agent, optimizer, batch, args, with_mse, losses)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: success at the last step of each episode (episodes end at success), as OGBench reports it. The episodes
# run envs.num_envs at a time with one batched policy call per step; each keeps its last frame_stack frames (filled
# with the reset frame at reset). Episode j is reset with seed + j and draws its noise from its own generator seeded
# with seed + j, so its result does not depend on which episodes run beside it. Returns the metrics and the frames of
# the first `video_episodes` episodes.
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(agent: DeFlowAgent, envs: EnvPool, num_episodes: int, args: Args, seed: int, policy=eval_actions,
             video_episodes: int = 0) -> tuple[dict[str, float], dict[int, np.ndarray]]:
    device = agent.log_alpha.device
    noise_shape = eval_noise_shape(args, agent.flow.action_dim)
    episodes = iter(range(num_episodes))
    running = {}  # env index -> the state of the episode it runs
    finished, videos = [], {}  # (success, return, length) of each finished episode; episode -> frames
    while True:
        starts = {}  # free environments start the next episodes
        for i in range(envs.num_envs):
            if i not in running and (episode := next(episodes, None)) is not None:
                starts[i] = episode
        if starts:
            for i, frame in envs.reset({i: seed + episode for i, episode in starts.items()}).items():
                running[i] = {"frames": deque([frame] * args.frame_stack, maxlen=args.frame_stack),
                              "noise": torch.Generator().manual_seed(seed + starts[i]), "return": 0.0, "length": 0,
                              "video": [frame] if starts[i] < video_episodes else None, "episode": starts[i]}
        if not running:
            break
        obs = torch.as_tensor(np.stack([np.concatenate(e["frames"], axis=-1) for e in running.values()]),
                              device=device)
        noise = torch.stack([torch.randn(noise_shape, generator=e["noise"]) for e in running.values()]).to(device)
        with autocast(args, device, rollout=True):
            actions = policy(agent, obs, noise, args).float().cpu().numpy()
        steps = envs.step({i: np.clip(action, -1, 1) for i, action in zip(running, actions)})
        for i, (frame, reward, terminated, truncated, success) in steps.items():
            state = running[i]
            state["frames"].append(frame)
            state["return"], state["length"] = state["return"] + reward, state["length"] + 1
            if state["video"] is not None:
                state["video"].append(frame)
            if terminated or truncated:
                finished.append((success, state["return"], state["length"]))
                if state["video"] is not None:
                    videos[state["episode"]] = np.stack(state["video"])
                del running[i]
    success, episode_return, length = np.mean(finished, axis=0)
    metrics = {"success": float(success), "episode.return": float(episode_return), "episode.length": float(length)}
    return metrics, videos


# ---------------------------------------------------------------------------------------------------------------------
# Files: every write is atomic (temporary file, then rename) or a whole appended line, so a crash loses nothing.
# ---------------------------------------------------------------------------------------------------------------------
def atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_video(path: Path, frames: np.ndarray, fps: int = 15) -> None:
    """frames (T, H, W, 3) uint8 -> mp4 (H.264 through imageio's ffmpeg), written to a temporary name first."""
    import imageio

    tmp = path.with_name(f".tmp-{path.name}")  # keeps the .mp4 suffix, which tells ffmpeg the format
    imageio.mimwrite(tmp, list(frames), fps=fps, macro_block_size=1)
    os.replace(tmp, path)


def append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    fields = list(row) if new else next(csv.reader(open(path)))
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_csv(path: Path, last_step: int) -> None:
    """On resume, drop rows logged after the checkpoint so the run's logs stay one consistent history."""
    if not path.exists():
        return
    with open(path) as f:
        rows = list(csv.DictReader(f))
        fields = list(rows[0]) if rows else []
    kept = [r for r in rows if int(r["step"]) <= last_step]
    if not kept:
        path.unlink()
        return

    def write(f):
        f.write((",".join(fields or []) + "\n").encode())
        for r in kept:
            f.write((",".join(r[k] for k in fields) + "\n").encode())

    atomic_write(path, write)


def check_compiler(device: torch.device) -> None:
    """--compile needs a C++ compiler (CPU) or Triton (CUDA): a one-line function compiled first turns a missing one
    into one clear line instead of a traceback at the first update."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1, device=device))
    except torch._dynamo.exc.BackendCompilerFailed as e:
        sys.exit(f"error: torch.compile does not work here ({str(e).strip().splitlines()[0]}); "
                 f"run with --no-compile (the eager code: the same results, slower)")


def parse_args() -> tuple[Args, Optional[dict]]:
    """The command line; with --resume, the checkpoint's settings become the defaults that flags still override."""
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    if not args.resume:
        return args, None
    checkpoint = load_checkpoint(args.resume)
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["args"].items()}
    return tyro.cli(Args, default=Args(**{**saved, "resume": args.resume})), checkpoint


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        sys.exit(f"error: checkpoint {path} does not exist (look in runs/<run>/checkpoint.pt)")
    except Exception as e:  # a truncated or foreign file raises many different errors
        sys.exit(f"error: checkpoint {path} is corrupt or not a DeFlow checkpoint ({type(e).__name__}: {e})")


if __name__ == "__main__":
    args, checkpoint = parse_args()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.frame_stack < 1 or not 0 <= args.p_aug <= 1:
        sys.exit(f"error: --frame-stack must be >= 1 and --p-aug in [0, 1] (got {args.frame_stack}, {args.p_aug})")

    # Environment and data: uint8 frames on the training device, each stored once; the loader checks the memory.
    try:
        _, train_data, val_data, memory = load_visual_datasets(
            args.env_name, device, args.dataset_dir, args.dataset_path, args.generate_episodes, args.num_workers,
            args.seed, args.dataset_fraction)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    print(f"dataset: {memory}")
    num_eval_envs = max(1, min(args.eval_envs, args.eval_episodes)) if args.eval_interval > 0 else 0
    eval_envs = EnvPool(args.env_name, num_eval_envs, args.eval_workers, args.eval_max_episode_steps)
    if num_eval_envs:
        print(f"{eval_envs.describe()}; --eval-envs sets how many")
    height, width, channels = train_data["frames"].shape[1:]
    image_shape = (height, width, channels * args.frame_stack)
    action_dim = train_data["actions"].shape[-1]

    agent = DeFlowAgent(image_shape, action_dim, args).to(device)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.lr, fused=True)
    start_step = 1
    if checkpoint is not None:
        try:
            agent.load_state_dict(checkpoint["agent"])
        except RuntimeError as e:
            sys.exit(f"error: checkpoint {args.resume} does not fit this environment/network "
                     f"(images {image_shape}, actions {action_dim}): {' '.join(str(e).split())[:400]}")
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        start_step = checkpoint["step"] + 1
        run_dir = Path(args.resume).parent
        for name in ("train.csv", "eval.csv"):
            truncate_csv(run_dir / name, checkpoint["step"])
        print(f"resuming {run_dir} at step {start_step}")
    else:
        run_name = f"{args.env_name}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = Path(args.run_dir) / run_name
        run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "args.json", lambda f: f.write(json.dumps(dataclasses.asdict(args), indent=2).encode()))
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_dir.name, id=run_dir.name,
                   config=dataclasses.asdict(args), dir=str(run_dir), resume="allow")
    print(f"{args.env_name}: {len(train_data['valid'])} train / {len(val_data['valid'])} val transitions, "
          f"images {'x'.join(map(str, image_shape))}, actions {action_dim}, delta {args.target_divergence:.3g}, "
          f"device {device}, {sum(p.numel() for p in agent.parameters() if p.requires_grad):,} trained parameters "
          f"-> {run_dir}")

    def log(name: str, row: dict, step: int) -> None:
        append_csv(run_dir / name, {"step": step, **row})
        if args.track:
            wandb.log(row, step=step)

    def save_checkpoint(step: int) -> None:
        state = {"args": dataclasses.asdict(args), "step": step, "agent": agent.state_dict(),
                 "optimizer": optimizer.state_dict(),
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
        atomic_write(run_dir / "checkpoint.pt", lambda f: torch.save(state, f))

    # --compile: the losses (forward and backward) as fused kernels, the same math. On CUDA "reduce-overhead" also
    # records them as CUDA graphs and replays them. The batch and the noise are drawn outside, eagerly, on the device.
    losses_fn = deflow_losses
    if args.compile:
        check_compiler(device)
        losses_fn = torch.compile(deflow_losses, mode="reduce-overhead" if device.type == "cuda" else None)
        print("--compile: the first update and the first logging step compile first (up to a minute each; "
              "--no-compile skips this)")

    # Non-finite losses are recorded on the device (first bad step per term) and read at log intervals only.
    first_bad_step = None
    start_time = last_log_time = time.time()
    last_log_step = start_step - 1
    progress = tqdm(range(start_step, args.offline_steps + 1), initial=start_step - 1, total=args.offline_steps,
                    smoothing=0.1, dynamic_ncols=True)
    for step in progress:
        is_log_step = step % args.log_interval == 0 or step == args.offline_steps
        if args.compile:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten now
        metrics = train_step(agent, optimizer, train_data, args, is_log_step, losses_fn)

        checked = [name for name in metrics if name != "actor/mse"]  # the same terms on every step
        values = torch.stack([metrics[name] for name in checked])
        if first_bad_step is None:
            first_bad_step = torch.zeros_like(values, dtype=torch.long)
        first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(values), step, first_bad_step)

        is_save_step = step % args.save_interval == 0 or step == args.offline_steps
        if is_log_step or is_save_step:
            if first_bad_step.any():
                bad = [(int(s), name) for s, name in zip(first_bad_step.tolist(), checked) if s > 0]
                s, name = min(bad)
                sys.exit(f"error: training/{name} became non-finite at step {s} (now {metrics[name].item()}; "
                         f"non-finite since: {', '.join(f'{n} at {t}' for t, n in sorted(bad))}). Nothing was saved "
                         f"after step {s}; the last checkpoint in {run_dir} (if any) is intact. "
                         f"Check the dataset for NaNs or lower --lr.")
        if is_log_step:
            with torch.no_grad(), autocast(args, device, rollout=False):  # validation batches are shifted too
                val_batch = sample_batch(val_data, args.batch_size, args.frame_stack, args.p_aug)
                val_noise = update_noise(args.batch_size, action_dim, device, with_mse=True)
                _, val_metrics = deflow_losses(agent, val_batch, val_noise, args)
            now = time.time()
            row = {f"training/{k}": v.item() for k, v in metrics.items()}
            row.update({f"validation/{k}": v.item() for k, v in val_metrics.items()})
            row["time/epoch_time"] = (now - last_log_time) / (step - last_log_step)
            row["time/total_time"] = now - start_time
            last_log_time, last_log_step = now, step
            log("train.csv", row, step)
            progress.set_postfix(critic=f"{row['training/critic/critic_loss']:.3g}",
                                 alpha=f"{row['training/actor/alpha_value']:.3g}")
            tqdm.write(f"step {step}: critic_loss {row['training/critic/critic_loss']:.4f}  "
                       f"bc_flow_loss {row['training/actor/bc_flow_loss']:.4f}  "
                       f"distill_loss {row['training/actor/distill_loss']:.2e}  "
                       f"alpha {row['training/actor/alpha_value']:.3f}  q {row['training/actor/q']:.3f}  "
                       f"mse {row['training/actor/mse']:.4f}")
        if args.eval_interval > 0 and (step == 1 or step % args.eval_interval == 0 or step == args.offline_steps):
            eval_metrics, videos = evaluate(agent, eval_envs, args.eval_episodes, args, args.seed,
                                            video_episodes=args.video_episodes if args.capture_video else 0)
            log("eval.csv", {f"evaluation/{k}": v for k, v in eval_metrics.items()}, step)
            for episode, frames in videos.items():
                (run_dir / "videos").mkdir(exist_ok=True)
                write_video(run_dir / "videos" / f"step{step:08d}_episode{episode}.mp4", frames)
            tqdm.write(f"step {step}: evaluation/success {eval_metrics['success']:.3f} "
                       f"(return {eval_metrics['episode.return']:.1f}, length {eval_metrics['episode.length']:.0f}, "
                       f"{args.eval_episodes} episodes{f', {len(videos)} videos' if videos else ''})")
        if is_save_step:
            save_checkpoint(step)
    progress.close()
    eval_envs.close()
    print(f"done: {run_dir}")
    if args.track:
        wandb.finish()

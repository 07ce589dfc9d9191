"""DeFlow, offline-to-online, on state-based OGBench: the whole method in one file.

Paper: "Decoupling Manifold Modeling and Value Maximization for Offline Policy Extraction" (arXiv 2601.10471).
Official code (JAX): github.com/muzhancun/DeFlow, agents/deflow.py + main.py (built on FQL, github.com/seohongpark/fql).

DeFlow in four lines:
  1. A multi-step flow-matching policy mu(s, x, t) models the behavior data (the "manifold"): plain BC, 10 Euler steps.
  2. A refinement network f(s, a_base) adds a residual to the flow's action: a = clip(a_base + f(s, a_base)).
  3. f is trained to maximize Q(s, a) while a Lagrange multiplier alpha keeps mean(f^2) near a target divergence delta.
  4. A 2-member critic ensemble learns Q by TD, bootstrapping with the same flow + refinement policy.

What online fine-tuning adds (this file is deflow_offline.py plus these; diff the two to see exactly where):
  5. After --offline-steps updates on the dataset, --online-steps iterations each take one environment step with the
     current policy (flow sample + refinement, no extra exploration noise) and then make one update, the same update.
  6. The replay buffer starts as the dataset (on the training device) and grows by online transitions, FIFO-circular
     at --buffer-size; --balanced-sampling draws half of each batch from the dataset and half from online data.
  7. --fix-bc-flow-online freezes the BC flow online; the refinement, critic and alpha keep learning.
  No hyperparameter changes between the phases: the Lagrangian lets the refinement move as the critic improves.

Run (see README.md for datasets):
  python deflow_o2o.py --env-name scene-play-singletask-v0                            # official data, downloads
  python deflow_o2o.py --env-name cube-single-play-singletask-task1-v0 \\
      --dataset-path data/cube-single-100ep.npz --generate-episodes 100               # no internet: generate locally
  python deflow_o2o.py --resume runs/<run>/checkpoint.pt                               # continue a run exactly
  python deflow_o2o.py --resume runs/<offline run>/checkpoint.pt --online-steps 100000 # fine-tune an offline run
  python deflow_o2o.py --help                                                         # every flag

Paper recipes (state-based OGBench, 1M steps; every recipe keeps normalize_q_loss=True, use_lagrange=True):
  env family                      --discount   --q-agg   --target-divergence
  antmaze-large-navigate          0.99         min       0.01
  antmaze-giant-navigate          0.995        min       0.01
  humanoidmaze-medium/large-nav.  0.995        mean      0.001
  antsoccer-arena-navigate        0.995        mean      0.01
  cube-single/double-play         0.99         mean      0.001
  scene-play                      0.99         mean      0.001
  puzzle-3x3/4x4-play             0.99         mean      0.005
D4RL through Minari (--env-name is the Minari dataset id; 500k steps: --offline-steps 500000):
  D4RL/antmaze/{umaze, umaze-diverse, medium-play, medium-diverse, large-play, large-diverse}-v1
                                  0.99         mean      0.015
  D4RL/pen/{human, cloned, expert}-v2
                                  0.99         min       0.01
  D4RL/{door, hammer, relocate}/{human, cloned, expert}-v2
                                  0.99         min       0.001

Paper offline-to-online recipe: the offline recipe of the family plus 1M online steps (the defaults here).

Deviations from the official code (everything else follows it):
  - --fix-bc-flow-online truly freezes the flow: no gradient and no optimizer step (officially only its loss is zeroed,
    and Adam's momentum keeps moving it for a few hundred steps).
  - Once the buffer is full, all --buffer-size rows are sampled (officially the last row is never sampled after the
    first wrap-around: an off-by-one in FQL's ReplayBuffer.size).
  - Training episodes are reset with seed (seed + 1,000,000 + episode index), so online runs are reproducible and
    a resumed run replays the interrupted episode's actions to continue it exactly. Officially resets are unseeded.
  - `exploration/*` holds the success, return and length of the last finished training episode (officially every
    key of its final info dict, most of them raw state arrays).
  - Fixed-alpha path (--no-use-lagrange, used by no recipe): the penalty weight is alpha, not alpha^2 (official bug).
  - --normalize-q-loss defaults to True (every official recipe sets it; the official default is False).
  - The refinement network's width is its own flag (--refine-hidden-dims); the default equals the official 4x512.
  - The target critic is kept out of the optimizer (officially it sits in Adam but never gets a gradient: same result).
  - The `actor/mse` metric (a third 10-step flow rollout) is computed only on logging steps, not on every update.
  - Evaluation runs --eval-envs episodes side by side with one batched policy call per step, on environments of
    its own. Episode j is reset with seed (seed + j) and draws its noise from its own generator seeded (seed + j),
    so an evaluation consumes no training randomness, every evaluation sees the same start states, and an episode's
    result does not depend on the episodes beside it; there are also evaluations at the end of the offline phase
    and at the last step. (Officially episodes run one by one, the eval RNG comes from numpy's global RNG and
    resets are unseeded.)
  - --capture-video (new) writes the first --video-episodes evaluation episodes as mp4 files (MuJoCo renders of
    200x200) in videos/ of the run.
  - The same update, computed in fewer and larger operations (the numbers agree up to float rounding, tested): the
    update's two no-gradient 10-step flow rollouts (pi(s') for the TD target, the base actions at s) run as one
    rollout over 2B rows; the observation's part of the flow's first layer is computed once per rollout, not at each
    Euler step; the 2 critics are one batched matmul per layer; Adam is PyTorch's fused Adam. The update's noise is
    one N(0, I) draw of shape (3, B, A) plus t ~ U[0, 1) of shape (B, 1), made outside the losses (officially the
    JAX key is split per use): the same distributions, other numbers.
  - --compile (new, on by default; --no-compile runs the eager code) runs the losses' forward and backward through
    torch.compile, and on CUDA replays them as CUDA graphs. The eager code below is the reference it must match
    (tests/test_speed.py). Compiled, the tanh-GELU is written as x * sigmoid(2u), the same function (class GELU).
  - --precision (new; float32 by default, as officially) can run the no-gradient rollouts' matmuls, or every matmul,
    in bfloat16 (torch.autocast; weights, Adam and the losses stay float32). See README "Speed" for what it was
    measured to change.
  - OGBench >= 1.2 semantics (success judged on the pre-step state), as the installed package does.
  - D4RL comes from Minari's datasets and gymnasium-robotics' environments (the official code's d4rl package and
    mujoco-py no longer install), with the official conventions (common/d4rl.py): AntMaze rewards - 1 (also
    online), masks from true terminations only, terminals at every episode boundary; Adroit rewards unchanged. The
    AntMaze observation is D4RL's 29 numbers [x, y, qpos[2:], qvel] (Minari's achieved_goal + observation; the goal
    is not observed, as in D4RL), and AntMaze evaluation episodes end at the goal as in D4RL. There is no validation
    split, so no validation/* metrics; evaluation/episode.normalized_return is 100 x the D4RL score (AntMaze: 100 x
    the success rate). Minari's datasets are regenerated, not D4RL's files: numbers compare with the paper only
    approximately.
  - --eval-sampler max-q / iterative exist officially (sample_actions_max_q, sample_actions_iterative_refinement) but
    no command reaches them. Here they are flags, batched over states, and max-q takes the argmax of Q (the official
    code takes the argmin, against its own docstring). Defaults N = 10 and K = 5 are the official ones.
  - --target-divergence auto is new: delta = c x IAV, the heuristic of the paper's README, which has no code
    officially (common/iav.py: k = 5, raw observations, the query itself excluded, population variance).
  - A non-finite loss stops the run with the step and the term (checked on the device, read at log intervals).
  - Checkpoints are one resumable file (args, step, all modules incl. log_alpha, Adam state, RNG states, the online
    part of the replay buffer and the state of the current training episode).
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
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from common.d4rl import normalized_return, reward_offset, run_name_of
from common.datasets import DatasetError, load_env_and_datasets
from common.envs import EnvPool
from common.iav import auto_target_divergence


@dataclasses.dataclass
class Args:
    # --- run ---
    exp_name: str = "deflow_o2o"
    """name of this experiment (part of the run directory name)"""
    seed: int = 0
    """seed of python, numpy, torch and the evaluation episodes"""
    env_name: str = "cube-double-play-singletask-v0"
    """OGBench single-task environment (<dataset>-singletask[-taskN]-v0; no -taskN means the default task), or a
    Minari dataset id such as D4RL/antmaze/large-play-v1 or D4RL/pen/cloned-v2 (the paper's D4RL tasks)"""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'"""
    run_dir: str = "runs"
    """folder that holds one sub-folder per run (args.json, train.csv, eval.csv, checkpoint.pt)"""
    resume: Optional[str] = None
    """checkpoint.pt to continue exactly (flags here override its settings); of deflow_offline.py: go online"""
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
    """if --dataset-path does not exist, generate it first with this many oracle episodes (0: never generate)"""
    num_workers: int = 1
    """processes for --generate-episodes"""

    # --- schedule (official defaults) ---
    offline_steps: int = 1_000_000
    """gradient updates on the dataset before going online"""
    online_steps: int = 1_000_000
    """then this many iterations of one environment step + one gradient update"""
    buffer_size: int = 2_000_000
    """replay buffer capacity: dataset + online transitions (at least dataset size + 1), FIFO-circular"""
    balanced_sampling: bool = False
    """online, draw half of each batch from the dataset and half from a separate online buffer of --buffer-size"""
    log_interval: int = 5000
    """log training and validation losses every this many updates"""
    eval_interval: int = 100_000
    """evaluate at update 1, every this many updates (global counter), at the end of each phase (0: never)"""
    eval_episodes: int = 50
    """episodes per evaluation"""
    eval_envs: int = 8
    """environments that run the evaluation episodes side by side (one batched policy call per step); each holds
    about 0.15-0.2 GB of memory (manipulation tasks), and the results do not depend on how many"""
    eval_workers: int = 0
    """processes that step the evaluation environments (0: this one); worth it where cores are to spare"""
    capture_video: bool = False
    """write the first --video-episodes episodes of every evaluation as mp4 files in <run>/videos/ (MuJoCo renders
    them: without a display set MUJOCO_GL=egl or osmesa; a CPU renders a few frames/s)"""
    video_episodes: int = 1
    """evaluation episodes recorded by --capture-video"""
    save_interval: int = 1_000_000
    """write checkpoint.pt every this many updates (and always at the end)"""

    # --- agent (official names and defaults) ---
    lr: float = 3e-4
    """Adam learning rate (one Adam over every trained parameter, log_alpha included)"""
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
    """target critic EMA rate"""
    q_agg: Literal["mean", "min"] = "mean"
    """how the TD target aggregates the 2 target critics (the actor always uses the mean)"""
    flow_steps: int = 10
    """Euler steps of the BC flow"""
    target_divergence: Union[float, Literal["auto"]] = 0.001
    """delta: the Lagrangian keeps mean(refinement^2) near this; 'auto': --iav-scale x the dataset's IAV (README)"""
    iav_scale: Optional[float] = None
    """c in delta = c x IAV for --target-divergence auto; None: 0.1 for manipulation, 1.0 for navigation"""
    iav_queries: int = 10_000
    """query states for the IAV of --target-divergence auto (0: every transition)"""
    use_lagrange: bool = True
    """learn the penalty weight alpha by the Lagrangian (every recipe); off: fixed --alpha"""
    alpha: float = 10.0
    """fixed penalty weight, only with --no-use-lagrange"""
    normalize_q_loss: bool = True
    """scale the Q loss by 1 / mean|Q| (every official recipe sets this)"""
    fix_bc_flow_online: bool = False
    """freeze the BC flow online (no gradient, no optimizer step); the refinement, critic and alpha keep learning"""

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
# Networks. Flax conventions: Linear -> GELU(tanh) -> [LayerNorm(eps 1e-6)] per hidden layer, Xavier-uniform weights,
# zero biases, plain Linear output.
# ---------------------------------------------------------------------------------------------------------------------
class GELU(nn.Module):
    """Flax's default GELU, the tanh approximation: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). Under
    torch.compile it is written as x * sigmoid(2u), the same function: a CPU compiles that into a kernel about twice as
    fast as tanh's, while in eager mode PyTorch's own gelu kernel is the faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2 sqrt(2/pi) = 1.5957...
        return F.gelu(x, approximate="tanh")


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int, layer_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
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


class VectorField(nn.Module):
    """mu(s, x, t) -> R^A when use_time (the BC flow); f(s, a) -> R^A, unbounded, when not (the refinement)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: tuple[int, ...], layer_norm: bool, use_time: bool):
        super().__init__()
        self.action_dim = action_dim
        self.net = mlp(obs_dim + action_dim + int(use_time), hidden_dims, action_dim, layer_norm)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        inputs = [obs, actions] if t is None else [obs, actions, t]  # t: raw scalar in [0, 1), no embedding
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
    """Two independently initialised Q networks on the same input; returns shape (2, B). The two run together: every
    layer holds both members' weights and is one batched matmul (the same numbers as two separate MLPs)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: tuple[int, ...], layer_norm: bool, members: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        in_dim = obs_dim + action_dim
        for width in hidden_dims:
            layers += [EnsembleLinear(members, in_dim, width), GELU()]
            if layer_norm:
                layers.append(EnsembleLayerNorm(members, width))
            in_dim = width
        layers.append(EnsembleLinear(members, in_dim, 1))
        self.members, self.net = members, nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, actions], dim=-1)
        rows = x.reshape(-1, x.shape[-1])  # any leading shape (B or B x N), as rows
        return self.net(rows.expand(self.members, *rows.shape)).reshape(self.members, *x.shape[:-1])


class DeFlowAgent(nn.Module):
    """Holds every learned tensor, so one state_dict is the whole agent (log_alpha included)."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.flow = VectorField(obs_dim, action_dim, args.actor_hidden_dims, args.actor_layer_norm, use_time=True)
        self.refine = VectorField(obs_dim, action_dim, args.refine_hidden_dims, args.actor_layer_norm, use_time=False)
        self.critic = Critic(obs_dim, action_dim, args.value_hidden_dims, args.layer_norm)
        self.target_critic = Critic(obs_dim, action_dim, args.value_hidden_dims, args.layer_norm)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)  # moved only by the EMA
        self.log_alpha = nn.Parameter(torch.ones(1))  # official init 1.0, i.e. alpha = e ~ 2.72


# ---------------------------------------------------------------------------------------------------------------------
# The policy: Euler-integrate the BC flow from noise, then add one refinement.
# ---------------------------------------------------------------------------------------------------------------------
def flow_actions(flow: VectorField, obs: torch.Tensor, noise: torch.Tensor, flow_steps: int) -> torch.Tensor:
    """a_base = clip(x_K, -1, 1), x_0 = noise, x_{i+1} = x_i + mu(s, x_i, i/K) / K. Clipped only at the end.

    mu's first layer is W [s, x, t] + b = W_s s + (W_x x + b + t W_t). The part of s is the same at every Euler step,
    so it is computed once; the rest of mu is flow.net[1:]. (The same numbers as calling flow(obs, x, t) K times.)"""
    first, rest = flow.net[0], flow.net[1:]
    w_s, w_x, w_t = first.weight.split([obs.shape[-1], noise.shape[-1], 1], dim=1)
    obs_part = F.linear(obs, w_s)
    x = noise
    for i in range(flow_steps):
        t = i / flow_steps
        x = x + rest(obs_part + F.linear(x, w_x, first.bias + t * w_t[:, 0])) / flow_steps
    return x.clamp(-1, 1)


# The samplers take their noise as an input (fresh N(0, I) per call; no temperature), so that the caller decides where
# it comes from: the global stream in the update, one stream per episode in evaluation.
def sample_actions(agent: DeFlowAgent, obs: torch.Tensor, noise: torch.Tensor, flow_steps: int) -> torch.Tensor:
    """pi(s) = clip(a_base + f(s, a_base), -1, 1), a_base = the flow's action from `noise` (shape (..., A))."""
    return refine_actions(agent, obs, flow_actions(agent.flow, obs, noise, flow_steps))


def refine_actions(agent: DeFlowAgent, obs: torch.Tensor, base_actions: torch.Tensor) -> torch.Tensor:
    """One refinement of the flow's actions: clip(a_base + f(s, a_base), -1, 1)."""
    return (base_actions + agent.refine(obs, base_actions)).clamp(-1, 1)


def sample_actions_max_q(agent: DeFlowAgent, obs: torch.Tensor, noise: torch.Tensor, flow_steps: int) -> torch.Tensor:
    """Refine the base action with the highest ensemble-mean Q among N flow samples per state; noise (B, N, A)."""
    obs_n = obs[:, None].expand(-1, noise.shape[1], -1)
    base_actions = flow_actions(agent.flow, obs_n, noise, flow_steps)  # (B, N, A)
    best = agent.critic(obs_n, base_actions).mean(dim=0).argmax(dim=1)  # official code: argmin (a bug)
    return refine_actions(agent, obs, base_actions[torch.arange(obs.shape[0], device=obs.device), best])


def sample_actions_iterative(agent: DeFlowAgent, obs: torch.Tensor, noise: torch.Tensor, flow_steps: int,
                             refine_steps: int) -> torch.Tensor:
    """a_0 = base action, a_{k+1} = clip(a_k + f(s, a_k)); keep the highest ensemble-mean Q of a_0..a_K (batched)."""
    candidates = [flow_actions(agent.flow, obs, noise, flow_steps)]
    for _ in range(refine_steps):
        candidates.append((candidates[-1] + agent.refine(obs, candidates[-1])).clamp(-1, 1))
    candidates = torch.stack(candidates, dim=1)  # (B, K + 1, A)
    best = agent.critic(obs[:, None].expand(-1, refine_steps + 1, -1), candidates).mean(dim=0).argmax(dim=1)
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


def flow_matching_loss(flow: VectorField, obs: torch.Tensor, actions: torch.Tensor, x_0: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:
    """Rectified path from noise x_0 to the action: x_t = (1 - t) x_0 + t a, target velocity a - x_0."""
    x_t = (1 - t) * x_0 + t * actions
    return (flow(obs, x_t, t) - (actions - x_0)).square().mean()


# ---------------------------------------------------------------------------------------------------------------------
# The update. Who learns from what (one backward of the sum, one Adam step):
#   critic    <- critic_loss                       (TD to r + gamma * m * Q_target(s', pi(s')))
#   flow      <- bc_flow_loss                      (flow matching on dataset actions)
#   refine    <- sg(alpha) * distill + q_loss      (stay near a_base, climb Q through the action only)
#   log_alpha <- alpha_loss                        (raise alpha when distill > delta, lower it when below)
#   target    <- nothing; EMA of the critic's pre-step weights
# Online the update is the same; with --fix-bc-flow-online the flow gets no loss at all (train_flow=False), so it
# has no gradient and Adam, which skips parameters whose .grad is None, leaves it exactly where it was.
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


def deflow_losses(agent: DeFlowAgent, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor], args: Args,
                  train_flow: bool = True):
    """Return (total loss, metrics dict of 0-d tensors) for one batch and its draws (update_noise). Official metric
    names; `actor/mse` when noise has its draw. The unit that --compile compiles (forward and backward)."""
    obs, next_obs, actions = batch["observations"], batch["next_observations"], batch["actions"]

    # The update's two 10-step flow rollouts, both without gradient and independent of each other: pi(s') for the TD
    # target and the base actions at s. One rollout over 2B rows (s' rows first) does both, with half the calls.
    with torch.no_grad(), autocast(args, obs.device, rollout=True):
        next_base_actions, base_actions = flow_actions(
            agent.flow, torch.cat([next_obs, obs]), torch.cat([noise["next_actions"], noise["base_actions"]]),
            args.flow_steps).chunk(2)

    # Critic: TD target with the current policy and the target critic, all without gradient.
    with torch.no_grad():
        next_actions = refine_actions(agent, next_obs, next_base_actions)
        next_qs = agent.target_critic(next_obs, next_actions)
        next_q = next_qs.min(dim=0).values if args.q_agg == "min" else next_qs.mean(dim=0)
        target_q = batch["rewards"] + args.discount * batch["masks"] * next_q
    qs = agent.critic(obs, actions)
    critic_loss = (qs - target_q).square().mean()

    # Flow matching. Frozen flow: no loss (logged as 0, as officially).
    if train_flow:
        bc_flow_loss = flow_matching_loss(agent.flow, obs, actions, noise["x_0"], noise["t"])
    else:
        bc_flow_loss = torch.zeros((), device=obs.device)

    # Refinement of the base actions (from the rollout above: no gradient reaches the flow through a_base).
    refinement = agent.refine(obs, base_actions)
    distill_loss = refinement.square().mean()  # D: mean over batch and action dims (per-dimension size)

    if args.use_lagrange:
        alpha = agent.log_alpha.exp()
        alpha_loss = -(agent.log_alpha * (distill_loss.detach() - args.target_divergence)).sum()
    else:
        alpha = torch.tensor(args.alpha, device=obs.device)
        alpha_loss = torch.zeros((), device=obs.device)
    penalty = alpha.detach().squeeze() * distill_loss

    # Q loss through the refined action only: the critic's weights are used as constants here.
    policy_actions = (base_actions + refinement).clamp(-1, 1)
    frozen_critic = {name: p.detach() for name, p in agent.critic.named_parameters()}
    q = torch.func.functional_call(agent.critic, frozen_critic, (obs, policy_actions)).mean(dim=0)
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
            metrics["actor/mse"] = (sample_actions(agent, obs, noise["mse"], args.flow_steps) - actions).square().mean()
    return critic_loss + actor_loss, metrics


def update(agent: DeFlowAgent, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], args: Args,
           with_mse: bool = False, train_flow: bool = True, losses=deflow_losses) -> dict[str, torch.Tensor]:
    """One DeFlow update: draws, losses (`losses`: deflow_losses or its compiled twin), one backward, target EMA from
    the pre-step critic, one Adam step."""
    noise = update_noise(*batch["actions"].shape, batch["actions"].device, with_mse)
    with autocast(args, batch["actions"].device, rollout=False):
        loss, metrics = losses(agent, batch, noise, args, train_flow)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():  # theta_target <- tau * theta + (1 - tau) * theta_target, with theta before this step
        torch._foreach_lerp_(list(agent.target_critic.parameters()), list(agent.critic.parameters()), args.tau)
    optimizer.step()
    return {k: v.detach() for k, v in metrics.items()}


def sample_batch(data: dict[str, torch.Tensor], batch_size: int, size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Uniform indices into the first `size` rows (default: all), drawn on the data's device: no host round trip."""
    first = next(iter(data.values()))
    idx = torch.randint(len(first) if size is None else size, (batch_size,), device=first.device)
    return {k: v[idx] for k, v in data.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Online data. FQL's replay buffer semantics: preallocated on the training device, filled from an initial dataset,
# written FIFO-circular (after the last row, the next transition overwrites row 0), sampled uniformly from what is
# stored. A transition stores terminals = done (episode boundary) and masks = 1 - terminated (0 only when the episode
# really ended, not when the time limit cut it), the same convention as the OGBench datasets.
# ---------------------------------------------------------------------------------------------------------------------
class ReplayBuffer:
    def __init__(self, initial: dict[str, torch.Tensor], capacity: int):
        self.initial_size = len(initial["observations"])
        if capacity < self.initial_size:
            raise ValueError(f"buffer capacity {capacity} is smaller than its initial data ({self.initial_size})")
        self.data = {}
        for k, v in initial.items():
            self.data[k] = torch.zeros((capacity, *v.shape[1:]), dtype=v.dtype, device=v.device)
            self.data[k][: self.initial_size] = v
        self.capacity = capacity
        self.num_added = 0  # online transitions written so far (the buffer's whole history after the initial data)

    @property
    def size(self) -> int:
        return min(self.initial_size + self.num_added, self.capacity)

    @property
    def pointer(self) -> int:
        """The row the next transition goes to."""
        return (self.initial_size + self.num_added) % self.capacity

    def add(self, transition: dict[str, np.ndarray | float]) -> None:
        row = self.pointer
        for k, v in transition.items():
            self.data[k][row] = torch.as_tensor(v, dtype=self.data[k].dtype)
        self.num_added += 1

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        return sample_batch(self.data, batch_size, self.size)

    def written_rows(self) -> torch.Tensor:
        """Rows that hold online transitions (all rows once the buffer has wrapped around completely)."""
        count = min(self.num_added, self.capacity)
        return (self.initial_size + torch.arange(count)) % self.capacity

    def online_state(self) -> dict:
        """What a checkpoint needs besides the dataset: the online rows and the write count."""
        rows = self.written_rows()
        return {"capacity": self.capacity, "initial_size": self.initial_size, "num_added": self.num_added,
                "rows": rows, "data": {k: v[rows.to(v.device)].cpu() for k, v in self.data.items()}}

    def load_online_state(self, state: dict) -> None:
        if (state["capacity"], state["initial_size"]) != (self.capacity, self.initial_size):
            raise ValueError(f"the checkpoint's buffer holds {state['initial_size']} dataset rows in a capacity of "
                             f"{state['capacity']}, this one {self.initial_size} in {self.capacity}")
        for k, v in self.data.items():
            v[state["rows"].to(v.device)] = state["data"][k].to(v.device)
        self.num_added = state["num_added"]


def balanced_batch(dataset: dict[str, torch.Tensor], buffer: ReplayBuffer, batch_size: int) -> dict[str, torch.Tensor]:
    """--balanced-sampling: the first half of the batch from the dataset, the rest from the online buffer."""
    half = batch_size // 2
    offline_part, online_part = sample_batch(dataset, half), buffer.sample(batch_size - half)
    return {k: torch.cat([offline_part[k], online_part[k]]) for k in offline_part}


def transition(obs, action, reward, terminated: bool, truncated: bool, next_obs) -> dict:
    return {"observations": obs, "actions": action, "rewards": reward, "terminals": float(terminated or truncated),
            "masks": 1.0 - float(terminated), "next_observations": next_obs}


def replay_episode(env, seed: int, actions: list[np.ndarray]):
    """Reset with the episode's seed and repeat its actions: MuJoCo is deterministic, so this restores the
    environment exactly where a checkpoint left it (used on resume). Returns the current observation."""
    obs, _ = env.reset(seed=seed)
    for action in actions:
        obs, *_ = env.step(action)
    return obs


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: success at the last step of each episode (episodes end at success), as OGBench reports it. The episodes
# run envs.num_envs at a time with one batched policy call per step. Episode j is reset with seed + j and draws its
# noise from its own generator seeded with seed + j, so its result does not depend on which episodes run beside it.
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(agent: DeFlowAgent, envs: EnvPool, num_episodes: int, args: Args, seed: int, policy=eval_actions,
             video_episodes: int = 0) -> tuple[dict[str, float], dict[int, np.ndarray]]:
    device = agent.log_alpha.device
    noise_shape = eval_noise_shape(args, agent.flow.action_dim)
    episodes = iter(range(num_episodes))
    running = {}  # env index -> the state of the episode it runs
    finished, videos = [], {}  # (success, return, length) of each finished episode; episode -> rendered frames
    while True:
        starts = {}  # free environments start the next episodes
        for i in range(envs.num_envs):
            if i not in running and (episode := next(episodes, None)) is not None:
                starts[i] = episode
        if starts:
            for i, obs in envs.reset({i: seed + episode for i, episode in starts.items()}).items():
                running[i] = {"obs": obs, "noise": torch.Generator().manual_seed(seed + starts[i]), "return": 0.0,
                              "length": 0, "episode": starts[i], "video": [] if starts[i] < video_episodes else None}
            render(envs, running, list(starts))
        if not running:
            break
        obs = torch.as_tensor(np.stack([e["obs"] for e in running.values()]), dtype=torch.float32, device=device)
        noise = torch.stack([torch.randn(noise_shape, generator=e["noise"]) for e in running.values()]).to(device)
        with autocast(args, device, rollout=True):
            actions = policy(agent, obs, noise, args).float().cpu().numpy()
        steps = envs.step({i: np.clip(action, -1, 1) for i, action in zip(running, actions)})
        render(envs, running, list(steps))
        for i, (next_obs, reward, terminated, truncated, success) in steps.items():
            state = running[i]
            state["obs"], state["return"], state["length"] = next_obs, state["return"] + reward, state["length"] + 1
            if terminated or truncated:
                finished.append((success, state["return"], state["length"]))
                if state["video"] is not None:
                    videos[state["episode"]] = np.stack(state["video"])
                del running[i]
    success, episode_return, length = np.mean(finished, axis=0)
    metrics = {"success": float(success), "episode.return": float(episode_return), "episode.length": float(length)}
    if (score := normalized_return(args.env_name, float(episode_return))) is not None:  # D4RL: 100 x the D4RL score
        metrics["episode.normalized_return"] = score
    return metrics, videos


def render(envs: EnvPool, running: dict, indices: list[int]) -> None:
    """Append a rendered frame to the video of each episode among `indices` that is being recorded."""
    recorded = [i for i in indices if running[i]["video"] is not None]
    if recorded:
        for i, frame in envs.render(recorded).items():
            running[i]["video"].append(frame)


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
    if "buffer" not in checkpoint:  # a deflow_offline.py run: name the online run after this script
        saved["exp_name"] = Args().exp_name
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
    if args.env_name.startswith("visual-"):
        sys.exit(f"error: online fine-tuning from pixels is not supported (nor is it officially); train "
                 f"{args.env_name} offline with deflow_pixels.py, or use the state-based {args.env_name[7:]}")

    # Environment and data (the dataset lives on the training device: a batch is one gather, no copy).
    try:
        env, train_np, val_np = load_env_and_datasets(args.env_name, args.dataset_dir, args.dataset_path,
                                                      args.generate_episodes, args.num_workers, args.seed)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    # Evaluation has environments of its own: evaluating never disturbs the training episode.
    num_eval_envs = max(1, min(args.eval_envs, args.eval_episodes)) if args.eval_interval > 0 else 0
    eval_envs = EnvPool(args.env_name, num_eval_envs, args.eval_workers)
    if num_eval_envs:
        print(f"{eval_envs.describe()}; --eval-envs sets how many")
    train_data = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in train_np.items()}
    val_data = None  # D4RL has no validation split: then no validation/* metrics
    if val_np is not None:
        val_data = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in val_np.items()}
    obs_dim, action_dim = train_np["observations"].shape[-1], train_np["actions"].shape[-1]
    iav_report = None
    if args.target_divergence == "auto":  # delta = c x IAV of this dataset; a resumed run keeps the saved delta
        iav_report = auto_target_divergence(args.env_name, train_np["observations"], train_np["actions"],
                                            args.iav_scale, args.iav_queries, args.seed, device)
        args.target_divergence, args.iav_scale = iav_report["target_divergence"], iav_report["scale"]
        print(iav_report["message"])

    # Replay buffer. Default: the dataset is the buffer's first rows and online data follows (the dataset is then
    # held only there). Balanced: the dataset stays apart and online data goes to an empty buffer of its own.
    try:
        if args.balanced_sampling:
            buffer = ReplayBuffer({k: v[:0] for k, v in train_data.items()}, args.buffer_size)
        else:
            buffer = ReplayBuffer(train_data, max(args.buffer_size, len(train_np["actions"]) + 1))
            train_data = None
    except torch.OutOfMemoryError:
        sys.exit(f"error: a replay buffer of {args.buffer_size:,} transitions does not fit on {device}; "
                 f"lower --buffer-size or use another device")
    buffer_gb = sum(v.numel() * v.element_size() for v in buffer.data.values()) / 1e9

    def draw_batch(online: bool) -> dict[str, torch.Tensor]:
        if not args.balanced_sampling:
            return buffer.sample(args.batch_size)  # offline, the buffer holds exactly the dataset
        if online:
            return balanced_batch(train_data, buffer, args.batch_size)
        return sample_batch(train_data, args.batch_size)

    agent = DeFlowAgent(obs_dim, action_dim, args).to(device)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.lr, fused=True)
    act_generator = torch.Generator(device).manual_seed(args.seed)  # noise of online actions (resumable stream)
    # The current training episode: reset with a known seed and its actions kept, so a resume can replay it.
    obs, done, episode_seed, episode_actions, episode_return, episodes_started = None, True, None, [], 0.0, 0
    exploration = {"exploration/success": float("nan"), "exploration/episode.return": float("nan"),
                   "exploration/episode.length": float("nan"), "exploration/episodes": 0}
    start_step = 1
    from_offline = checkpoint is not None and "buffer" not in checkpoint  # written by deflow_offline.py
    if checkpoint is not None:
        try:
            agent.load_state_dict(checkpoint["agent"])
            if not from_offline:
                buffer.load_online_state(checkpoint["buffer"])
        except (RuntimeError, ValueError) as e:
            sys.exit(f"error: checkpoint {args.resume} does not fit this environment/dataset/network "
                     f"(obs {obs_dim}, actions {action_dim}): {' '.join(str(e).split())[:400]}")
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        start_step = checkpoint["step"] + 1
    if checkpoint is not None and not from_offline:
        act_generator.set_state(checkpoint["rng"]["act"])
        saved = checkpoint["online"]
        episodes_started, exploration = saved["episodes_started"], saved["exploration"]
        if not saved["done"]:  # mid-episode: bring the training environment back to where it was
            episode_seed, episode_return = saved["episode_seed"], saved["episode_return"]
            episode_actions = list(saved["episode_actions"].numpy())
            obs = replay_episode(env, episode_seed, episode_actions)
            done = False
            if not np.array_equal(obs, saved["obs"].numpy()):
                print("warning: replaying the interrupted training episode did not reproduce its state (another "
                      "machine or MuJoCo version?); starting a new episode, so the run no longer matches exactly")
                done = True
        run_dir = Path(args.resume).parent
        for name in ("train.csv", "eval.csv"):
            truncate_csv(run_dir / name, checkpoint["step"])
        print(f"resuming {run_dir} at step {start_step}")
    else:
        run_name = f"{run_name_of(args.env_name)}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = Path(args.run_dir) / run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        if from_offline:  # an offline run goes on in a run directory of its own (its logs have other columns)
            print(f"continuing the deflow_offline.py run {Path(args.resume).parent} from step {start_step} in {run_dir}")
    atomic_write(run_dir / "args.json", lambda f: f.write(json.dumps(dataclasses.asdict(args), indent=2).encode()))
    if iav_report is not None:
        atomic_write(run_dir / "iav.json", lambda f: f.write(json.dumps(iav_report, indent=2).encode()))
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_dir.name, id=run_dir.name,
                   config=dataclasses.asdict(args), dir=str(run_dir), resume="allow")
    print(f"{args.env_name}: {len(train_np['actions'])} train / "
          f"{len(val_np['actions']) if val_np is not None else 'no'} val transitions, "
          f"obs {obs_dim}, actions {action_dim}, delta {args.target_divergence:.3g}, device {device}, "
          f"{sum(p.numel() for p in agent.parameters() if p.requires_grad):,} trained parameters, replay buffer "
          f"{buffer.capacity:,} transitions ({buffer_gb:.2f} GB{', balanced' if args.balanced_sampling else ''}) "
          f"-> {run_dir}")

    def log(name: str, row: dict, step: int) -> None:
        append_csv(run_dir / name, {"step": step, **row})
        if args.track:
            wandb.log(row, step=step)

    def save_checkpoint(step: int) -> None:
        online_state = {"done": done, "obs": None if obs is None else torch.as_tensor(obs),
                        "episode_seed": episode_seed, "episode_return": episode_return,
                        "episode_actions": torch.as_tensor(np.array(episode_actions).reshape(-1, action_dim)),
                        "episodes_started": episodes_started, "exploration": exploration}
        state = {"args": dataclasses.asdict(args), "step": step, "agent": agent.state_dict(),
                 "optimizer": optimizer.state_dict(), "buffer": buffer.online_state(), "online": online_state,
                 "rng": {"torch": torch.get_rng_state(), "act": act_generator.get_state(),
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
    total_steps = args.offline_steps + args.online_steps
    start_time = last_log_time = time.time()
    last_log_step, env_time, env_steps = start_step - 1, 0.0, 0
    progress = tqdm(range(start_step, total_steps + 1), initial=start_step - 1, total=total_steps,
                    smoothing=0.1, dynamic_ncols=True)
    for step in progress:
        online = step > args.offline_steps
        if online:  # one environment step with the current policy, stored before the update
            env_start = time.perf_counter()
            if done:
                episode_seed = args.seed + 1_000_000 + episodes_started  # never one of evaluation's seeds (seed + j)
                episodes_started += 1
                obs, _ = env.reset(seed=episode_seed)
                episode_actions, episode_return = [], 0.0
            with torch.no_grad(), autocast(args, device, rollout=True):
                obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
                noise = torch.randn((1, action_dim), device=device, generator=act_generator)
                action = sample_actions(agent, obs_t, noise, args.flow_steps)[0].float().cpu().numpy()
            next_obs, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            # stored in the dataset's reward convention (D4RL AntMaze: r - 1, as the dataset); returns stay raw
            buffer.add(transition(obs, action, reward + reward_offset(args.env_name), terminated, truncated, next_obs))
            episode_actions.append(action)
            episode_return += float(reward)
            obs = next_obs
            if done:
                exploration = {"exploration/success": float(info.get("success", float("nan"))),
                               "exploration/episode.return": episode_return,
                               "exploration/episode.length": len(episode_actions),
                               "exploration/episodes": episodes_started}
            env_time += time.perf_counter() - env_start
            env_steps += 1

        is_phase_end = step in (args.offline_steps, total_steps)
        is_log_step = step % args.log_interval == 0 or is_phase_end
        if args.compile:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten now
        metrics = update(agent, optimizer, draw_batch(online), args, is_log_step,
                         train_flow=not (online and args.fix_bc_flow_online), losses=losses_fn)

        checked = [name for name in metrics if name != "actor/mse"]  # the same terms on every step
        values = torch.stack([metrics[name] for name in checked])
        if first_bad_step is None:
            first_bad_step = torch.zeros_like(values, dtype=torch.long)
        first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(values), step, first_bad_step)

        is_save_step = step % args.save_interval == 0 or step == total_steps
        if is_log_step or is_save_step:
            if first_bad_step.any():
                bad = [(int(s), name) for s, name in zip(first_bad_step.tolist(), checked) if s > 0]
                s, name = min(bad)
                sys.exit(f"error: training/{name} became non-finite at step {s} (now {metrics[name].item()}; "
                         f"non-finite since: {', '.join(f'{n} at {t}' for t, n in sorted(bad))}). Nothing was saved "
                         f"after step {s}; the last checkpoint in {run_dir} (if any) is intact. "
                         f"Check the dataset for NaNs or lower --lr.")
        if is_log_step:
            val_metrics = {}
            if val_data is not None:
                with torch.no_grad(), autocast(args, device, rollout=False):
                    val_batch = sample_batch(val_data, args.batch_size)
                    val_noise = update_noise(args.batch_size, action_dim, device, with_mse=True)
                    _, val_metrics = deflow_losses(agent, val_batch, val_noise, args)
            now = time.time()
            row = {f"training/{k}": v.item() for k, v in metrics.items()}
            row.update({f"validation/{k}": v.item() for k, v in val_metrics.items()})
            row["time/epoch_time"] = (now - last_log_time) / (step - last_log_step)
            row["time/env_time"] = env_time / env_steps if env_steps else float("nan")  # acting + env.step
            row["time/total_time"] = now - start_time
            row.update(exploration)
            last_log_time, last_log_step, env_time, env_steps = now, step, 0.0, 0
            log("train.csv", row, step)
            progress.set_postfix(phase="online" if online else "offline",
                                 critic=f"{row['training/critic/critic_loss']:.3g}",
                                 alpha=f"{row['training/actor/alpha_value']:.3g}")
            tqdm.write(f"step {step}: critic_loss {row['training/critic/critic_loss']:.4f}  "
                       f"bc_flow_loss {row['training/actor/bc_flow_loss']:.4f}  "
                       f"distill_loss {row['training/actor/distill_loss']:.2e}  "
                       f"alpha {row['training/actor/alpha_value']:.3f}  q {row['training/actor/q']:.3f}  "
                       f"mse {row['training/actor/mse']:.4f}" +
                       (f"  | {exploration['exploration/episodes']} training episodes, last: success "
                        f"{exploration['exploration/success']:.0f}, return "
                        f"{exploration['exploration/episode.return']:.1f}" if online else ""))
        if args.eval_interval > 0 and (step == 1 or step % args.eval_interval == 0 or is_phase_end):
            eval_metrics, videos = evaluate(agent, eval_envs, args.eval_episodes, args, args.seed,
                                            video_episodes=args.video_episodes if args.capture_video else 0)
            log("eval.csv", {f"evaluation/{k}": v for k, v in eval_metrics.items()}, step)
            for episode, frames in videos.items():
                (run_dir / "videos").mkdir(exist_ok=True)
                write_video(run_dir / "videos" / f"step{step:08d}_episode{episode}.mp4", frames)
            score = eval_metrics.get("episode.normalized_return")
            tqdm.write(f"step {step} ({'online' if online else 'offline'}): evaluation/success "
                       f"{eval_metrics['success']:.3f} "
                       + (f"normalized_return {score:.1f} " if score is not None else "") +
                       f"(return {eval_metrics['episode.return']:.1f}, "
                       f"length {eval_metrics['episode.length']:.0f}, {args.eval_episodes} episodes"
                       f"{f', {len(videos)} videos' if videos else ''})")
        if is_save_step:
            save_checkpoint(step)
        if step == args.offline_steps and args.online_steps > 0:
            tqdm.write(f"step {step}: offline phase done, going online for {args.online_steps} environment steps"
                       + (" with the BC flow frozen" if args.fix_bc_flow_online else ""))
    progress.close()
    print(f"done: {run_dir}")
    if args.track:
        wandb.finish()

"""DeFlow, offline-to-online, on state-based OGBench and D4RL: the whole method and run in one file.

Paper: "Decoupling Manifold Modeling and Value Maximization for Offline Policy Extraction"
(arXiv 2601.10471). Official code (JAX): github.com/muzhancun/DeFlow, on github.com/seohongpark/fql.
  1. A flow-matching policy v(s, x, t) models the behavior data: 10 Euler steps from noise, a_base.
  2. A refinement network f(s, a_base) adds a residual: a = clip(a_base + f(s, a_base), -1, 1).
  3. f climbs Q(s, a) while a Lagrange multiplier alpha keeps mean(f^2) near a target divergence.
  4. Two critics learn Q by TD, bootstrapping with the same flow + refinement policy.
  5. Online: one environment step of pi into the replay buffer (the dataset first), one update.
Run: python deflow_o2o.py --env-name cube-single-play-singletask-task1-v0 --dataset-path
data/cube-single-100ep.npz --generate-episodes 100 (no internet: generates the data first);
--resume runs/<run> continues a run exactly (a deflow_offline.py run: goes online). Recipes and
deviations: README.md, docs/.
"""

import csv
import dataclasses
import fcntl
import json
import os
import random
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Optional, Union

import gymnasium
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from gymnasium.vector import AutoresetMode
from numpy.random import SeedSequence
from tqdm import tqdm

from common.datasets import DatasetError, available_memory, data_fingerprint, load_env_and_datasets
from common.datasets import make_env, optional


# Networks. Flax conventions: Linear -> GELU(tanh) -> [LayerNorm(eps 1e-6)] per hidden layer,
# Xavier-uniform weights, zero biases, a plain Linear output.
# Copied from deflow_offline.py: GELU, mlp, VelocityField, Refinement, EnsembleLinear,
# EnsembleLayerNorm, Critic, DeFlowAgent, flow_actions, refine_actions, sample_actions,
# flow_matching_loss, update_draws
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


class DeFlowAgent(nn.Module):
    """Every learned tensor: one state_dict is the whole agent, log_alpha included."""

    def __init__(self, obs_dim, action_dim, args):
        super().__init__()
        self.flow = VelocityField(obs_dim, action_dim, args.actor_hidden_dims,
                                  args.actor_layer_norm)
        self.refine = Refinement(obs_dim, action_dim, args.refine_hidden_dims,
                                 args.actor_layer_norm)
        self.critic = Critic(obs_dim, action_dim, args.value_hidden_dims, args.layer_norm)
        self.target_critic = Critic(obs_dim, action_dim, args.value_hidden_dims, args.layer_norm)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)  # the EMA moves it (officially in Adam, no grad)
        self.log_alpha = nn.Parameter(torch.ones(1))  # official init 1.0, i.e. alpha = e


# The policy. Its N(0, I) noise is an input: the update draws it from torch's global stream,
# evaluation from each episode's own.
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
    """pi(s) = clip(a_base + f(s, a_base), -1, 1)."""
    return refine_actions(agent, obs, flow_actions(agent.flow, obs, noise, args))


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
# Online the same. --fix-bc-flow-online: no flow loss, so no gradient and Adam skips it (officially
# only the loss is zeroed, and Adam's momentum still moves the flow).
def deflow_losses(agent, batch, draws, args, train_flow=True):
    """(total loss, metrics under the official names) of a batch and its noise."""
    obs, next_obs, actions = batch["observations"], batch["next_observations"], batch["actions"]

    with torch.no_grad():  # the flow rollouts a_base(s') for the TD target and a_base(s), 2B rows
        noise = torch.cat([draws["next_base_noise"], draws["base_noise"]])
        next_base_actions, base_actions = flow_actions(
            agent.flow, torch.cat([next_obs, obs]), noise, args).chunk(2)
        next_qs = agent.target_critic(next_obs, refine_actions(agent, next_obs, next_base_actions))
        next_q = next_qs.min(dim=0).values if args.q_agg == "min" else next_qs.mean(dim=0)
        target_q = batch["rewards"] + args.discount * batch["masks"] * next_q
    qs = agent.critic(obs, actions)
    critic_loss = (qs - target_q).square().mean()

    bc_flow_loss = torch.zeros((), device=obs.device)  # a frozen flow: no loss, logged as 0
    if train_flow:
        bc_flow_loss = flow_matching_loss(agent.flow, obs, actions, draws["x_0"], draws["t"])

    refinement = agent.refine(obs, base_actions)  # a_base has no gradient: none reaches the flow
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

    # Q through the refined action only: the critic's weights enter as constants.
    policy_actions = (base_actions + refinement).clamp(-1, 1)
    frozen_critic = {name: p.detach() for name, p in agent.critic.named_parameters()}
    q = torch.func.functional_call(agent.critic, frozen_critic, (obs, policy_actions)).mean(dim=0)
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


# Copied from deflow_offline.py: update, sample_batch
def update(agent, optimizer, loss, args):
    """One gradient step on the summed loss; the target critic's EMA uses the pre-step weights:
    theta_target <- tau * theta + (1 - tau) * theta_target."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        target, critic = agent.target_critic.parameters(), agent.critic.parameters()
        torch._foreach_lerp_(list(target), list(critic), args.tau)
    optimizer.step()


def sample_batch(data, batch_size, generator=None):
    idx = torch.randint(len(data["actions"]), (batch_size,), generator=generator,
                        device=data["actions"].device)
    return {k: v[idx] for k, v in data.items()}


# Online data, in FQL's replay buffer: preallocated on the training device, the initial data first,
# then written FIFO-circular (after the last row, row 0), sampled uniformly from the rows stored.
class ReplayBuffer:
    def __init__(self, initial, capacity):
        self.initial_size, self.num_added = len(initial["actions"]), 0  # online transitions, ever
        self.capacity = max(capacity, self.initial_size + 1)  # room for one online transition
        self.data = {k: v.new_zeros((self.capacity, *v.shape[1:])) for k, v in initial.items()}
        for k, v in initial.items():
            self.data[k][:self.initial_size] = v

    def add(self, transition):
        row = (self.initial_size + self.num_added) % self.capacity
        for k, v in transition.items():
            self.data[k][row] = torch.as_tensor(v, dtype=self.data[k].dtype)
        self.num_added += 1

    def sample(self, batch_size):  # every row stored (officially, once full, never the last one)
        size = min(self.initial_size + self.num_added, self.capacity)
        return sample_batch({k: v[:size] for k, v in self.data.items()}, batch_size)

    def state(self):  # for checkpoints: the online rows (the dataset part is loaded again)
        online = torch.arange(min(self.num_added, self.capacity))
        rows = (self.initial_size + online) % self.capacity
        return {"capacity": self.capacity, "initial_size": self.initial_size, "rows": rows,
                "num_added": self.num_added,
                "data": {k: v[rows.to(v.device)].cpu() for k, v in self.data.items()}}

    def load_state(self, state, source):
        if (state["capacity"], state["initial_size"]) != (self.capacity, self.initial_size):
            sys.exit(f"error: {source} does not fit this dataset and --buffer-size: its buffer "
                     f"holds {state['initial_size']} dataset rows in {state['capacity']}, this one "
                     f"{self.initial_size} in {self.capacity}")
        for k, v in self.data.items():
            v[state["rows"].to(v.device)] = state["data"][k].to(v.device)
        self.num_added = state["num_added"]


def transition(obs, action, reward, terminated, truncated, next_obs):
    """terminals = done (an episode boundary), masks = 1 - terminated (time limits bootstrap)."""
    return {"observations": obs, "actions": action, "rewards": reward, "masks": 1.0 - terminated,
            "terminals": float(terminated or truncated), "next_observations": next_obs}


def draw_batch(buffer, dataset, batch_size, online):
    """From the buffer; with --balanced-sampling (dataset apart): online, half from each."""
    if dataset is None or not online:
        return buffer.sample(batch_size) if dataset is None else sample_batch(dataset, batch_size)
    half = batch_size // 2
    first, second = sample_batch(dataset, half), buffer.sample(batch_size - half)
    return {k: torch.cat([first[k], second[k]]) for k in first}


# The training episode under way, in checkpoints so that a run resumes exactly online. Episode k
# (1, 2, ...) resets, and draws its action noise, from SeedSequence([seed, 0, k]) (officially
# unseeded): no run's training episode is another's, an evaluation's or logging's.
def new_episode():  # before the first: done, and exploration/* (the last finished one) not yet
    exploration = dict.fromkeys(["exploration/success", "exploration/episode.return",
                                 "exploration/episode.length"], float("nan"))
    return SimpleNamespace(done=True, obs=None, seed=None, noise=None, actions=[], ret=0.0,
                           started=0, exploration={**exploration, "exploration/episodes": 0})


def start_episode(env, episode, seed, device):
    reset_seed, noise_seed = SeedSequence([seed, 0, episode.started + 1]).generate_state(2)
    episode.seed, episode.actions, episode.ret = int(reset_seed), [], 0.0
    episode.noise = torch.Generator(device).manual_seed(int(noise_seed))
    episode.obs, _ = env.reset(seed=episode.seed)
    episode.started += 1


def episode_state(episode, action_dim):  # tensors: checkpoints load with weights_only
    obs = None if episode.obs is None else torch.as_tensor(episode.obs)
    noise = None if episode.noise is None else episode.noise.get_state()
    actions = torch.as_tensor(np.array(episode.actions).reshape(-1, action_dim))
    return {**vars(episode), "obs": obs, "noise": noise, "actions": actions}


def resume_episode(env, saved, device):
    """The environment reset with the episode's seed and its actions repeated (MuJoCo is
    deterministic), its noise stream where it was; a new episode, said in a line, where that does
    not reproduce its state (another machine or MuJoCo version) or the noise is another device's."""
    episode = SimpleNamespace(**{**saved, "obs": None, "actions": list(saved["actions"].numpy())})
    if not episode.done and saved["noise"].numel() != torch.Generator(device).get_state().numel():
        print("note: the interrupted training episode's noise stream was on another device type; "
              "starting a new episode")
        episode.done = True
    if not episode.done:
        episode.noise = torch.Generator(device).set_state(saved["noise"])
        episode.obs, _ = env.reset(seed=episode.seed)
        for action in episode.actions:
            episode.obs, *_ = env.step(action)
        if not np.array_equal(episode.obs, saved["obs"].numpy()):
            print("warning: replaying the interrupted training episode did not reproduce its state "
                  "(another machine or MuJoCo version?); starting a new episode, so the run no "
                  "longer matches exactly")
            episode.done = True
    return episode


# ------------------------------------------------------------------------------------------------
# The run: arguments, evaluation, checkpoints and logs, then the training loop.
@dataclasses.dataclass
class Args:
    exp_name: str = "deflow_o2o"  # experiment name (part of the run folder's name)
    seed: int = 0  # seed of python, numpy, torch and evaluation episodes (not of generated data)
    env_name: str = "cube-double-play-singletask-v0"  # OGBench task, or D4RL/antmaze/large-play-v1
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'
    run_dir: str = "runs"  # where run folders go (args.json, train.csv, eval.csv, checkpoint.pt)
    resume: Optional[str] = None
    """a run folder (or its checkpoint.pt): continue it exactly; deflow_offline.py's: go online"""
    track: bool = False  # also log to Weights & Biases (honours WANDB_MODE=offline)
    wandb_project_name: str = "deflow"  # wandb project
    wandb_entity: Optional[str] = None  # wandb entity (team); None: your default
    dataset_dir: str = "~/.ogbench/data"  # where OGBench datasets are found (or downloaded to)
    dataset_path: Optional[str] = None  # a local training .npz instead (validation: <name>-val.npz)
    generate_episodes: int = 0  # generate a missing --dataset-path: N oracle episodes (0: never)
    num_workers: int = 1  # processes for --generate-episodes
    offline_steps: int = 1_000_000  # gradient updates on the dataset before going online
    online_steps: int = 1_000_000  # then this many iterations of one env step + one update
    buffer_size: int = 2_000_000
    """replay buffer capacity: the dataset + online transitions (at least the dataset + 1), FIFO"""
    balanced_sampling: bool = False
    """online, half of each batch from the dataset, half from an online buffer of --buffer-size"""
    log_interval: int = 5000  # log training and validation losses every N updates (0: at the end)
    eval_interval: int = 100_000  # evaluate at update 1, every N and at each phase's end (0: never)
    eval_episodes: int = 50  # episodes per evaluation
    eval_envs: int = 8  # environments run side by side in evaluation (about 0.2 GB each)
    eval_workers: bool = False  # step the evaluation environments in processes of their own
    capture_video: bool = False  # write the first --video-episodes of evaluations to <run>/videos
    video_episodes: int = 1  # evaluation episodes recorded by --capture-video (at most --eval-envs)
    save_interval: Optional[int] = None
    """checkpoint.pt every N updates (None: a tenth of the run; 0: end only), 30 min and the end"""
    lr: float = 3e-4  # Adam learning rate (log_alpha's too)
    batch_size: int = 256  # transitions per update (one batch for critic and actor)
    actor_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)  # hidden widths: the BC flow
    refine_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)  # hidden widths: the refinement
    value_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)  # hidden widths: each critic
    layer_norm: bool = True  # LayerNorm in the critics
    actor_layer_norm: bool = False  # LayerNorm in the flow and the refinement network
    discount: float = 0.99  # discount factor gamma
    tau: float = 0.005  # target critic EMA rate
    q_agg: Literal["mean", "min"] = "mean"  # the TD target's aggregate of the two target critics
    flow_steps: int = 10  # Euler steps of the BC flow
    target_divergence: Union[float, Literal["auto"]] = 0.001
    """delta, the trust region of mean(refinement^2); 'auto': --iav-scale x the dataset's IAV"""
    iav_scale: Optional[float] = None
    """c in delta = c x IAV (--target-divergence auto); None: 0.1 manipulation, 1.0 navigation"""
    iav_queries: int = 10_000  # query states of the IAV estimate (0: all)
    use_lagrange: bool = True  # learn the penalty weight alpha (every recipe); else fixed --alpha
    alpha: float = 10.0  # fixed penalty weight (with --no-use-lagrange only)
    normalize_q_loss: bool = True  # divide the Q loss by mean|Q| (every official recipe sets it)
    fix_bc_flow_online: bool = False  # freeze the BC flow online (no loss, gradient or Adam step)
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
    from_offline = checkpoint is not None and "episode" not in checkpoint  # deflow_offline.py's
    resumed = checkpoint is not None and not from_offline  # this script's: continue in its folder
    device = setup(args)
    try:
        env, train_np, val_np = load_env_and_datasets(
            args.env_name, args.dataset_dir, args.dataset_path, args.generate_episodes,
            args.num_workers)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    obs_dim, action_dim = train_np["observations"].shape[-1], train_np["actions"].shape[-1]
    row_bytes = 4 * sum(v[0].size for v in train_np.values())  # a transition in the buffer
    with torch.device("meta"):  # the agent's size, allocating nothing
        check_memory(args, device, DeFlowAgent(obs_dim, action_dim, args), row_bytes * (
            max(args.buffer_size, len(train_np["actions"]) + 1) + 2 * len(train_np["actions"])))
    if args.eval_interval:
        eval_envs = make_eval_envs(args, max(1, min(args.eval_envs, args.eval_episodes)))
        print(f"{eval_envs.num_envs} evaluation environments side by side")
    train_data, val_data = ({k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in
                             data.items()} if data else None for data in (train_np, val_np))
    iav_report = None
    if args.target_divergence == "auto":  # delta = c x IAV of the dataset (a resumed run keeps its)
        iav = optional("iav", "--target-divergence auto")
        iav_report = iav.auto_target_divergence(args, train_np, device)  # sets --target-divergence
    data_id = data_fingerprint(train_np, val_np)
    # The buffer starts as the dataset (then held only there); balanced: empty, apart from it.
    empty = {k: v[:0] for k, v in train_data.items()}
    buffer = ReplayBuffer(empty if args.balanced_sampling else train_data, args.buffer_size)
    dataset_apart = train_data if args.balanced_sampling else None  # else held by the buffer only
    del train_data

    agent = DeFlowAgent(obs_dim, action_dim, args).to(device)
    trained = [p for p in agent.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=args.lr, fused=True)
    log_rng = torch.Generator(device).manual_seed(  # validation, mse: apart from training's stream
        int(SeedSequence([args.seed, 0, 0]).generate_state(1)[0]))
    start_step = restore(checkpoint, agent, optimizer, log_rng, args, data_id) if checkpoint else 1
    if from_offline and start_step - 1 > args.offline_steps:
        sys.exit(f"error: {args.resume} is at update {start_step - 1}, past --offline-steps "
                 f"{args.offline_steps}; give --offline-steps {start_step - 1} to go online there")
    episode = new_episode()  # the training episode under way (exploration/*: the last finished)
    if resumed:  # its online rows and training episode too
        buffer.load_state(checkpoint["buffer"], args.resume)
        episode = resume_episode(env, checkpoint["episode"], device)
    losses = compiled(deflow_losses, args, device)
    bf16 = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    train_losses, val_losses, policy = bf16(losses), bf16(deflow_losses), bf16(sample_actions)
    logger = Logger(args, checkpoint["step"] if resumed else None)
    if iav_report is not None:
        write_json(logger.dir / "iav.json", iav_report)
    if from_offline:  # offline_run.json: where its offline evaluations are (tools.plot draws them)
        write_json(logger.dir / "offline_run.json", {"checkpoint": os.path.abspath(args.resume)})
        print(f"continuing the deflow_offline.py run of {args.resume} in a run folder of its own")
    print(f"{'resuming' if resumed else 'new run'} {logger.dir} at step {start_step}: "
          f"{data_id}, delta {args.target_divergence:.3g}; replay buffer of {buffer.capacity:,}")

    reward_offset = -1.0 if args.env_name.startswith("D4RL/antmaze/") else 0.0  # as in the dataset
    total_steps = args.offline_steps + args.online_steps
    first_bad, last_save = torch.zeros((), dtype=torch.long, device=device), time.monotonic()
    saved = start_step - 1 if resumed else 0  # the update of the last checkpoint (0: none)
    for step in tqdm(range(start_step, total_steps + 1), initial=start_step - 1,
                     total=total_steps, smoothing=0.1, dynamic_ncols=True):
        online = step > args.offline_steps
        if online:  # one environment step of the current policy, stored before the update
            if episode.done:  # episode k: reset seed and noise from SeedSequence([seed, 0, k])
                start_episode(env, episode, args.seed, device)
            with torch.no_grad():
                obs = torch.as_tensor(episode.obs, dtype=torch.float32, device=device)[None]
                noise = torch.randn((1, action_dim), device=device, generator=episode.noise)
                action = policy(agent, obs, noise, args)[0].float().cpu().numpy()
            next_obs, reward, terminated, truncated, info = env.step(action)
            buffer.add(transition(episode.obs, action, reward + reward_offset, terminated,
                                  truncated, next_obs))  # rewards as the data's; returns raw
            episode.obs, episode.done = next_obs, terminated or truncated
            episode.ret += float(reward)
            episode.actions.append(action)
            if episode.done:  # officially exploration/* is every key of the final info dict
                episode.exploration = {"exploration/success": float(info.get("success", "nan")),
                                       "exploration/episode.return": float(episode.ret),
                                       "exploration/episode.length": len(episode.actions),
                                       "exploration/episodes": episode.started}
        is_end = step in (args.offline_steps, total_steps)  # the end of each phase
        is_log_step = is_end or args.log_interval > 0 and step % args.log_interval == 0
        is_save_step = checkpoint_due(args, step, is_end, total_steps, last_save)
        if args.compile:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten
        batch = draw_batch(buffer, dataset_apart, args.batch_size, online)
        draws = update_draws(args.batch_size, action_dim, device,
                             mse_rng=log_rng if is_log_step else None)
        loss, metrics = train_losses(agent, batch, draws, args,
                                     not (online and args.fix_bc_flow_online))
        update(agent, optimizer, loss, args)
        first_bad = check_finite(metrics, first_bad, step,
                                 logger.dir if is_log_step or is_save_step else None, saved)
        if is_log_step:
            row = {f"training/{k}": v.item() for k, v in metrics.items()}
            if val_data is not None:
                with torch.no_grad():
                    val_batch = sample_batch(val_data, args.batch_size, log_rng)
                    val_draws = update_draws(args.batch_size, action_dim, device, log_rng, log_rng)
                    _, val_metrics = val_losses(agent, val_batch, val_draws, args)
                row.update({f"validation/{k}": v.item() for k, v in val_metrics.items()})
            logger.log("train.csv", step, {**row, **episode.exploration})
        if args.eval_interval and (step == 1 or step % args.eval_interval == 0 or is_end):
            videos_at = args.video_episodes if args.capture_video else 0
            eval_metrics, videos = evaluate(agent, eval_envs, args, step, policy,
                                            video_episodes=videos_at)
            logger.log("eval.csv", step, {f"evaluation/{k}": v for k, v in eval_metrics.items()})
            if videos:
                optional("video").write_videos(logger.dir / "videos", videos, step)
        if is_save_step:
            saved = save_checkpoint(logger.dir, step, agent, optimizer, log_rng, args, data_id,
                                    saved, buffer=buffer.state(),
                                    episode=episode_state(episode, action_dim))
            last_save = time.monotonic()
        if step == args.offline_steps < total_steps:
            frozen = ", the BC flow frozen" if args.fix_bc_flow_online else ""
            tqdm.write(f"step {step}: offline phase done; {args.online_steps} online steps{frozen}")
    print(f"done: {logger.dir}")
    if logger.wandb is not None:
        logger.wandb.finish()

"""DeFlow, offline-to-online, on state-based OGBench and D4RL: the whole method in one file.

Paper: "Decoupling Manifold Modeling and Value Maximization for Offline Policy Extraction"
(arXiv 2601.10471). Official code (JAX): github.com/muzhancun/DeFlow, on github.com/seohongpark/fql.
  1. A flow-matching policy v(s, x, t) models the behavior data: 10 Euler steps from noise, a_base.
  2. A refinement network f(s, a_base) adds a residual: a = clip(a_base + f(s, a_base), -1, 1).
  3. f climbs Q(s, a) while a Lagrange multiplier alpha keeps mean(f^2) near a target divergence.
  4. Two critics learn Q by TD, bootstrapping with the same flow + refinement policy.
  5. Online: one environment step of pi into the replay buffer (the dataset first), one update.
Run:
  python deflow_o2o.py --env-name cube-single-play-singletask-task1-v0 \\
      --dataset-path data/cube-single-100ep.npz --generate-episodes 100  # no internet: generate it
  python deflow_o2o.py --resume runs/<run>/checkpoint.pt  # exactly; deflow_offline.py's: go online
Recipes: README.md. Deviations from the official code: docs/deviations.md. Speed: docs/speed.md.
"""

import dataclasses
import os
import sys
from typing import Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.datasets import DatasetError, load_env_and_datasets
from common.envs import EvaluationEpisodes, make_eval_envs
from common.online import buffer_state, episode_state, load_buffer_state, new_episode
from common.online import resume_episode, start_episode
from common.runs import Checkpoints, NonFiniteWatch, RunLog, compiled, logging_stream, parse_args
from common.runs import start


@dataclasses.dataclass
class Args:
    exp_name: str = "deflow_o2o"
    """experiment name (part of the run folder's name)"""
    seed: int = 0
    """seed of python, numpy, torch and evaluation episodes (never of generated data)"""
    env_name: str = "cube-double-play-singletask-v0"
    """OGBench <dataset>-singletask[-taskN]-v0, or a D4RL (Minari) id: D4RL/antmaze/large-play-v1"""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'"""
    run_dir: str = "runs"
    """folder of the run folders (args.json, train.csv, eval.csv, checkpoint.pt)"""
    resume: Optional[str] = None
    """checkpoint.pt of a run: continue it exactly (flags here override its settings); of a
    deflow_offline.py run: go online from it"""
    track: bool = False
    """also log to Weights & Biases (honours WANDB_MODE=offline)"""
    wandb_project_name: str = "deflow"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team); None: your default"""
    dataset_dir: str = "~/.ogbench/data"
    """where official OGBench datasets are looked for (and downloaded to)"""
    dataset_path: Optional[str] = None
    """a local training .npz instead (validation: the same name with -val.npz)"""
    generate_episodes: int = 0
    """generate a missing --dataset-path first with this many oracle episodes (0: never)"""
    num_workers: int = 1
    """processes for --generate-episodes"""
    offline_steps: int = 1_000_000
    """gradient updates on the dataset before going online"""
    online_steps: int = 1_000_000
    """then this many iterations of one environment step + one gradient update"""
    buffer_size: int = 2_000_000
    """replay buffer capacity: the dataset + online transitions (at least the dataset + 1), FIFO"""
    balanced_sampling: bool = False
    """online, half of each batch from the dataset, half from an online buffer of --buffer-size"""
    log_interval: int = 5000
    """log training and validation losses every this many updates (0: at the end only)"""
    eval_interval: int = 100_000
    """evaluate at update 1, every this many updates and at the end of each phase (0: never)"""
    eval_episodes: int = 50
    """episodes per evaluation"""
    eval_envs: int = 8
    """environments run side by side in evaluation (about 0.2 GB each)"""
    eval_workers: bool = False
    """step the evaluation environments in processes of their own (gymnasium's AsyncVectorEnv)"""
    capture_video: bool = False
    """write the first --video-episodes episodes of each evaluation to <run>/videos/"""
    video_episodes: int = 1
    """evaluation episodes recorded by --capture-video (the first ones, at most --eval-envs)"""
    save_interval: Optional[int] = None
    """checkpoint.pt every N updates (None: a tenth of the run; 0: end only), 30 min and the end"""
    lr: float = 3e-4
    """Adam learning rate (log_alpha's too)"""
    batch_size: int = 256
    """transitions per update (one batch for critic and actor)"""
    actor_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """hidden widths of the BC flow's velocity field"""
    refine_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """hidden widths of the refinement network (officially the actor's)"""
    value_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """hidden widths of each critic"""
    layer_norm: bool = True
    """LayerNorm in the critics"""
    actor_layer_norm: bool = False
    """LayerNorm in the flow and the refinement network"""
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """target critic EMA rate"""
    q_agg: Literal["mean", "min"] = "mean"
    """the TD target's aggregate of the two target critics (the actor takes the mean)"""
    flow_steps: int = 10
    """Euler steps of the BC flow"""
    target_divergence: Union[float, Literal["auto"]] = 0.001
    """delta, the trust region of mean(refinement^2); 'auto': --iav-scale x the dataset's IAV"""
    iav_scale: Optional[float] = None
    """c in delta = c x IAV (--target-divergence auto); None: 0.1 manipulation, 1.0 navigation"""
    iav_queries: int = 10_000
    """query states of the IAV estimate (0: all)"""
    use_lagrange: bool = True
    """learn the penalty weight alpha (every recipe); --no-use-lagrange: fixed --alpha"""
    alpha: float = 10.0
    """fixed penalty weight (with --no-use-lagrange only)"""
    normalize_q_loss: bool = True
    """divide the Q loss by mean|Q| (every official recipe sets it)"""
    fix_bc_flow_online: bool = False
    """freeze the BC flow online (no loss, no gradient, no Adam step); the rest keeps learning"""
    compile: bool = True
    """torch.compile the losses (CUDA graphs on CUDA); --no-compile: the eager reference code"""
    precision: Literal["tf32", "float32", "bf16-rollouts", "bf16"] = "tf32"
    """tf32: float32 with TF32 matmuls on CUDA (as JAX); float32: strict; bf16-rollouts, bf16:
    bfloat16 matmuls in the no-gradient rollouts or everywhere (where bfloat16 is native)"""


# Networks. Flax conventions: Linear -> GELU(tanh) -> [LayerNorm(eps 1e-6)] per hidden layer,
# Xavier-uniform weights, zero biases, a plain Linear output.
class GELU(nn.Module):
    """Flax's tanh-GELU; compiled, as x * sigmoid(2u): the same function, and the compiled update
    1.31x (4x128) and 1.17x (4x512) as fast as with F.gelu on a CPU (docs/speed.md)."""

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
    """f(s, a_base) -> R^A, unbounded: the residual on the flow's action (officially the same class
    as the velocity field, ActorVectorField, called without t)."""

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
def flow_actions(flow, obs, noise, flow_steps):
    """a_base = clip(x_K, -1, 1): x_0 = noise, x_{i+1} = x_i + v(s, x_i, i/K) / K."""
    x = noise
    for i in range(flow_steps):
        t = torch.full((*x.shape[:-1], 1), i / flow_steps, device=x.device)
        x = x + flow(obs, x, t) / flow_steps
    return x.clamp(-1, 1)  # clipped only at the end


def refine_actions(agent, obs, base_actions):
    return (base_actions + agent.refine(obs, base_actions)).clamp(-1, 1)


def sample_actions(agent, obs, noise, flow_steps):
    """pi(s) = clip(a_base + f(s, a_base), -1, 1)."""
    return refine_actions(agent, obs, flow_actions(agent.flow, obs, noise, flow_steps))


def flow_matching_loss(flow, obs, actions, x_0, t):
    """Rectified path from noise x_0 to the action: x_t = (1 - t) x_0 + t a, velocity a - x_0."""
    x_t = (1 - t) * x_0 + t * actions
    return (flow(obs, x_t, t) - (actions - x_0)).square().mean()


def autocast(args, device, rollout):
    """bfloat16 matmuls where --precision asks for them."""
    enabled = args.precision == "bf16" or (rollout and args.precision == "bf16-rollouts")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def update_draws(batch_size, action_dim, device, generator=None, mse_rng=None):
    """The update's random numbers, drawn outside the losses (eager and compiled code see the same)
    from `generator` (None: torch's global stream); with mse_rng, the logged mse's noise too."""
    noise = torch.randn((3, batch_size, action_dim), device=device, generator=generator)
    draws = {"next_base_noise": noise[0], "x_0": noise[1], "base_noise": noise[2],  # officially a
             "t": torch.rand((batch_size, 1), device=device, generator=generator)}  # key per use
    if mse_rng is not None:
        draws["mse_noise"] = torch.randn((batch_size, action_dim), device=device, generator=mse_rng)
    return draws


# The update. Who learns from what (one backward of the sum, one Adam step):
#   critic    <- critic_loss                   (TD to r + gamma * mask * Q_target(s', pi(s')))
#   flow      <- bc_flow_loss                  (flow matching on the dataset's actions)
#   refine    <- sg(alpha) * distill + q_loss  (stay near a_base, climb Q through the action only)
#   log_alpha <- alpha_loss                    (alpha rises while distill > delta, else falls)
#   target    <- nothing; the EMA of the critic's pre-step weights
# Online the same. --fix-bc-flow-online: no flow loss, so no gradient and Adam skips it (officially
# only the loss is zeroed, and Adam's momentum still moves the flow).
def deflow_losses(agent, batch, draws, args, train_flow=True):
    """(total loss, metrics under the official names) of a batch and its draws: --compile's part."""
    obs, next_obs, actions = batch["observations"], batch["next_observations"], batch["actions"]

    # The no-gradient flow rollouts a_base(s') for the TD target and a_base(s), as one of 2B rows.
    with torch.no_grad(), autocast(args, obs.device, rollout=True):
        noise = torch.cat([draws["next_base_noise"], draws["base_noise"]])
        next_base_actions, base_actions = flow_actions(
            agent.flow, torch.cat([next_obs, obs]), noise, args.flow_steps).chunk(2)

    with torch.no_grad():
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
        with torch.no_grad(), autocast(args, obs.device, rollout=True):
            mse_actions = sample_actions(agent, obs, draws["mse_noise"], args.flow_steps)
            metrics["actor/mse"] = (mse_actions - actions).square().mean()
    return critic_loss + actor_loss, metrics


def update(agent, optimizer, batch, args, log_rng=None, train_flow=True, losses=deflow_losses):
    """Draws, losses (deflow_losses or its compiled twin), one backward, the target EMA, one Adam
    step; with log_rng (a logging step), also the logged mse, its noise drawn from log_rng."""
    draws = update_draws(*batch["actions"].shape, batch["actions"].device, mse_rng=log_rng)
    with autocast(args, batch["actions"].device, rollout=False):
        loss, metrics = losses(agent, batch, draws, args, train_flow)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():  # theta_target <- tau * theta + (1 - tau) * theta_target, theta pre-step
        target, critic = agent.target_critic.parameters(), agent.critic.parameters()
        torch._foreach_lerp_(list(target), list(critic), args.tau)
    optimizer.step()
    return {k: v.detach() for k, v in metrics.items()}


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


# Evaluation, as OGBench reports it: the mean success at the last step (and return, length) of
# num_episodes independent episodes, envs.num_envs side by side, one batched policy call a step.
# Episode j of the evaluation at update `step` resets, and draws its noise, from SeedSequence([seed,
# step, j]) (officially unseeded resets): no two episodes of any evaluation of any run share either.
@torch.no_grad()
def evaluate(agent, envs, num_episodes, args, seed, step, video_episodes=0, policy=sample_actions,
             noise_shape=()):
    """(metrics, {episode: video frames} of the first video_episodes); envs: make_eval_envs's;
    policy(agent, obs, noise (B, *noise_shape, A), flow_steps)."""
    device = agent.log_alpha.device
    episodes = EvaluationEpisodes(envs, num_episodes, seed, step, video_episodes, noise_shape)
    for obs, noise in episodes:  # the running episodes' observations and noise
        with autocast(args, device, rollout=True):
            obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
            actions = policy(agent, obs, noise.to(device), args.flow_steps)
        episodes.step(actions.float().cpu().numpy())
    metrics = episodes.metrics()
    if "/" in args.env_name:  # D4RL (a Minari id): also 100 x the D4RL score
        from common.d4rl import normalized_return

        score = normalized_return(args.env_name, metrics["episode.return"])
        metrics["episode.normalized_return"] = score
    return metrics, episodes.videos


if __name__ == "__main__":
    args, checkpoint = parse_args(Args, __doc__)
    from_offline = checkpoint is not None and "episode" not in checkpoint  # deflow_offline.py's
    resumed = checkpoint is not None and not from_offline  # this script's: continue in its folder
    device = start(args)  # seeds python, numpy and torch; the device and its --precision

    try:
        env, train_np, val_np = load_env_and_datasets(
            args.env_name, args.dataset_dir, args.dataset_path, args.generate_episodes,
            args.num_workers)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    if args.eval_interval:  # environments of their own
        num_envs = max(1, min(args.eval_envs, args.eval_episodes))
        eval_envs, where = make_eval_envs(args.env_name, num_envs, args.eval_workers,
                                          record=args.capture_video)
        print(where)
    train_data, val_data = ({k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in
                             data.items()} if data else None for data in (train_np, val_np))
    obs_dim, action_dim = train_np["observations"].shape[-1], train_np["actions"].shape[-1]
    iav_report = None
    if args.target_divergence == "auto":  # delta = c x IAV of the dataset (a resumed run keeps its)
        from common.iav import auto_target_divergence

        iav_report = auto_target_divergence(args, train_np, device)  # sets --target-divergence
    try:  # the buffer starts as the dataset (then held only there); balanced: empty, apart from it
        empty = {k: v[:0] for k, v in train_data.items()}
        buffer = ReplayBuffer(empty if args.balanced_sampling else train_data, args.buffer_size)
    except torch.OutOfMemoryError:
        sys.exit(f"error: a replay buffer of {args.buffer_size:,} transitions does not fit on "
                 f"{device}; lower --buffer-size or use another device")
    dataset_apart = train_data if args.balanced_sampling else None  # else held by the buffer only
    del train_data

    agent = DeFlowAgent(obs_dim, action_dim, args).to(device)
    trained = [p for p in agent.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=args.lr, fused=True)
    log_rng = logging_stream(args.seed, device)  # validation, mse: apart from training's (torch's)
    checkpoints = Checkpoints(args, train_np["actions"])
    start_step = checkpoints.restore(checkpoint, agent, optimizer, log_rng) if checkpoint else 1
    if from_offline and start_step - 1 > args.offline_steps:
        sys.exit(f"error: {args.resume} is at update {start_step - 1}, past --offline-steps "
                 f"{args.offline_steps}; give --offline-steps {start_step - 1} to go online there")
    episode = new_episode()  # the training episode under way (exploration/*: the last finished)
    if resumed:  # its online rows and training episode too
        try:
            load_buffer_state(buffer, checkpoint["buffer"])
        except ValueError as e:
            sys.exit(f"error: {args.resume} does not fit this dataset and --buffer-size: {e}")
        episode = resume_episode(env, checkpoint["episode"], device)
    losses_fn = compiled(deflow_losses, args, device)  # --compile: the same losses, fused kernels
    run = RunLog(args, checkpoint["step"] if resumed else None)
    if iav_report is not None:
        run.json("iav.json", iav_report)
    if from_offline:  # offline_run.json: where its offline evaluations are (tools.plot draws them)
        run.json("offline_run.json", {"checkpoint": os.path.abspath(args.resume)})
        print(f"continuing the deflow_offline.py run of {args.resume} in a run folder of its own")
    val_size = len(val_np["actions"]) if val_np else "no"
    print(f"{'resuming' if resumed else 'new run'} {run.dir} at step {start_step}: "
          f"{len(train_np['actions'])} train / {val_size} val transitions, "
          f"delta {args.target_divergence:.3g}; replay buffer of {buffer.capacity:,}")

    reward_offset = -1.0 if args.env_name.startswith("D4RL/antmaze/") else 0.0  # as in the dataset
    total_steps = args.offline_steps + args.online_steps
    watch = NonFiniteWatch(skip=("actor/mse",))
    for step in tqdm(range(start_step, total_steps + 1), initial=start_step - 1,
                     total=total_steps, smoothing=0.1, dynamic_ncols=True):
        online = step > args.offline_steps
        if online:  # one environment step of the current policy, stored before the update
            if episode.done:  # episode k: reset seed and noise from SeedSequence([seed, 0, k])
                start_episode(env, episode, args.seed, device)  # (officially unseeded)
            with torch.no_grad(), autocast(args, device, rollout=True):
                obs = torch.as_tensor(episode.obs, dtype=torch.float32, device=device)[None]
                noise = torch.randn((1, action_dim), device=device, generator=episode.noise)
                action = sample_actions(agent, obs, noise, args.flow_steps)[0].float().cpu().numpy()
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
        is_save_step = checkpoints.due(step, is_end)
        if args.compile:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten
        batch = draw_batch(buffer, dataset_apart, args.batch_size, online)
        metrics = update(agent, optimizer, batch, args, log_rng if is_log_step else None,
                         not (online and args.fix_bc_flow_online), losses_fn)
        watch.update(metrics, step)
        if is_log_step or is_save_step:
            watch.check(run.dir)  # a host sync: only here
        if is_log_step:
            row = {f"training/{k}": v.item() for k, v in metrics.items()}
            if val_data is not None:
                with torch.no_grad(), autocast(args, device, rollout=False):
                    val_batch = sample_batch(val_data, args.batch_size, log_rng)
                    val_draws = update_draws(args.batch_size, action_dim, device, log_rng, log_rng)
                    _, val_metrics = deflow_losses(agent, val_batch, val_draws, args)
                row.update({f"validation/{k}": v.item() for k, v in val_metrics.items()})
            run.training(step, row, episode.exploration)  # + seconds per update; printed
        if args.eval_interval and (step == 1 or step % args.eval_interval == 0 or is_end):
            video_episodes = args.video_episodes if args.capture_video else 0
            eval_metrics, videos = evaluate(agent, eval_envs, args.eval_episodes, args, args.seed,
                                            step, video_episodes)
            run.evaluation(step, eval_metrics, videos)
        if is_save_step:
            checkpoints.save(run.dir, step, agent, optimizer, log_rng, buffer=buffer_state(buffer),
                             episode=episode_state(episode, action_dim))
        if step == args.offline_steps < total_steps:
            frozen = ", the BC flow frozen" if args.fix_bc_flow_online else ""
            tqdm.write(f"step {step}: offline phase done; {args.online_steps} online steps{frozen}")
    print(f"done: {run.dir}")
    run.finish()

"""One update of each script against the official JAX DeFlow, to float rounding: a check anyone can re-run.

    pip install -r requirements-parity.txt       # JAX, flax, optax, distrax (CPU), beside the project's requirements
    git clone https://github.com/muzhancun/DeFlow official && git clone https://github.com/seohongpark/fql
    cp -r fql/envs official/                     # as the official README asks (this tool imports agents/, utils/)
    python -m tools.parity --official official   # about 3 minutes on a 2-core CPU

Each update case builds the official agent (agents/deflow.py) at small sizes and moves its target critic off the
critic (so that the TD target and the EMA really use two networks); maps every official parameter into the script's
own agent (strict, every tensor both ways); and runs one update of each from the same batch and the same random
draws (the official key tree's, handed to the script's deflow_losses instead of its update_draws). It compares every logged
metric, every gradient of the total loss, the parameters after Adam and the target critic after the EMA, and prints
one line per case and group: the largest relative difference and its tolerance (docs/deviations.md, "Parity with the
official code", says why each is what it is). Exit status 0 when every group is within, 1 otherwise.

Cases: mean and min (deflow_offline.py, --q-agg mean / min), pixels (deflow_pixels.py: impala_debug encoders, 16x16x9
frames), o2o (deflow_o2o.py's update) and o2o-fixed (its online update with --fix-bc-flow-online); frames (frame
stacking against the official Dataset.sample) and shift (the random shift against the official batched_random_crop).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import tempfile
from typing import Optional

import numpy as np
import torch
import tyro

CASES = ("mean", "min", "pixels", "o2o", "o2o-fixed", "frames", "shift")
# Relative tolerances, float32 rounding with room (docs/deviations.md); a change of math is orders of magnitude above.
TOLERANCES = {"metrics": 1e-5, "gradients": 1e-5, "parameters after Adam": 2e-5, "target after EMA": 1e-6,
              "equal": 0.0}
B, A = 64, 3  # batch and action sizes of the update cases
STATE, PIXELS = dict(actor_hidden_dims=(64,) * 4, value_hidden_dims=(64,) * 4), dict(
    actor_hidden_dims=(32, 32), value_hidden_dims=(32, 32), encoder="impala_debug")
UPDATES = {  # case: (script, official config, observation shape)
    "mean": ("deflow_offline", dict(STATE, q_agg="mean"), (5,)),
    "min": ("deflow_offline", dict(STATE, q_agg="min"), (5,)),
    "pixels": ("deflow_pixels", dict(PIXELS, q_agg="mean"), (16, 16, 9)),
    "o2o": ("deflow_o2o", dict(STATE, q_agg="mean"), (5,)),
    "o2o-fixed": ("deflow_o2o", dict(STATE, q_agg="mean", fix_bc_flow_online=True, offline_steps=0), (5,)),
}
ENCODERS = {"flow_encoder": "modules_actor_bc_flow_encoder", "refine_encoder": "modules_refine_onestep_flow/encoder",
            "critic_encoder": "modules_critic/encoder", "target_critic_encoder": "modules_target_critic/encoder"}
DRAWS = {"next_actions": "next_base_noise", "x_0": "x_0", "base_actions": "base_noise", "t": "t", "mse": "mse_noise"}


@dataclasses.dataclass
class Args:
    official: str
    """checkout of github.com/muzhancun/DeFlow with FQL's envs/ copied in, as its README asks (see above)"""
    cases: tuple[str, ...] = CASES
    """cases to run: mean min pixels o2o o2o-fixed frames shift"""
    project: Optional[str] = None
    """another checkout (or a changed copy) of this project to compare instead of this one"""
    compile: bool = False
    """the losses through torch.compile, as --compile runs them on a CPU"""
    verbose: bool = False
    """also one line per parameter tensor"""


# Parameter names: a script's state_dict key -> (the official flax name, layout). Layouts: "T" nn.Linear's weight
# (out, in) is the kernel transposed; "conv" Conv2d's (out, in, kh, kw) is the kernel (kh, kw, in, out) transposed;
# "" the same numbers (biases, LayerNorms, log_alpha; the critic's ensemble layers: (2, in, out), (2, 1, out)).
def mlp_names(prefix: str, sequential, flax_prefix: str) -> dict:
    """The n-th Linear (or EnsembleLinear) of an MLP is flax's Dense_n, the n-th LayerNorm its LayerNorm_n."""
    names, counts = {}, {"Dense": 0, "LayerNorm": 0}
    for i, layer in enumerate(sequential):
        kind = type(layer).__name__.removeprefix("Ensemble").replace("Linear", "Dense")
        if kind in counts:
            flax = f"{flax_prefix}/{kind}_{counts[kind]}"
            weight = "T" if type(layer).__name__ == "Linear" else ""
            names[f"{prefix}.{i}.weight"] = (f"{flax}/kernel", weight) if kind == "Dense" else (f"{flax}/scale", "")
            names[f"{prefix}.{i}.bias"] = (f"{flax}/bias", "")
            counts[kind] += 1
    return names


def encoder_names(prefix: str, encoder, flax_prefix: str) -> dict:
    names = {}
    for i in range(len(encoder.convs)):  # official stack_blocks_i: Conv_0, max-pool, residual block (Conv_1, Conv_2)
        convs = ((f"convs.{i}", "Conv_0"), (f"blocks.{i}.conv0", "Conv_1"), (f"blocks.{i}.conv1", "Conv_2"))
        for ours, theirs in convs:
            names[f"{prefix}.{ours}.weight"] = (f"{flax_prefix}/stack_blocks_{i}/{theirs}/kernel", "conv")
            names[f"{prefix}.{ours}.bias"] = (f"{flax_prefix}/stack_blocks_{i}/{theirs}/bias", "")
    return {**names, **mlp_names(f"{prefix}.head.0", encoder.head[0], f"{flax_prefix}/MLP_0")}


def name_map(agent) -> dict:
    """Every tensor of a script's DeFlowAgent -> (its official flax name, layout)."""
    names = {**mlp_names("flow.net", agent.flow.net, "modules_actor_bc_flow/mlp"),
             **mlp_names("refine.net", agent.refine.net, "modules_refine_onestep_flow/mlp"),
             **mlp_names("critic.net", agent.critic.net, "modules_critic/value_net"),
             **mlp_names("target_critic.net", agent.target_critic.net, "modules_target_critic/value_net"),
             "log_alpha": ("modules_log_alpha/value", "")}
    for ours, theirs in ENCODERS.items():
        if hasattr(agent, ours):
            names.update(encoder_names(ours, getattr(agent, ours), theirs))
    return names


LAYOUTS = {"T": (lambda x: x.T, lambda x: x.T), "conv": (lambda x: x.transpose(3, 2, 0, 1),
                                                         lambda x: x.transpose(2, 3, 1, 0)), "": (lambda x: x,) * 2}


def to_torch(array: np.ndarray, layout: str, shape) -> torch.Tensor:
    return torch.tensor(np.ascontiguousarray(LAYOUTS[layout][0](np.asarray(array)))).reshape(shape)


def to_flax(tensor: torch.Tensor, layout: str, shape) -> np.ndarray:
    return np.ascontiguousarray(LAYOUTS[layout][1](tensor.detach().cpu().numpy())).reshape(shape)


def script_agent(script, config: dict, obs_shape: tuple):
    """The script's agent and Args at the official config's sizes (lr 1e-3: Adam's step well above rounding)."""
    hidden, value = config["actor_hidden_dims"], config["value_hidden_dims"]
    args = dataclasses.replace(script.Args(), actor_hidden_dims=hidden, refine_hidden_dims=hidden, lr=1e-3,
                               value_hidden_dims=value, q_agg=config["q_agg"], batch_size=B, precision="float32")
    if "encoder" in config:  # official impala_debug: stacks (4, 4), one residual block each, an MLP head of 512
        args = dataclasses.replace(args, encoder_stack_sizes=(4, 4), encoder_head_dims=(512,))
    return script.DeFlowAgent(obs_shape if "encoder" in config else obs_shape[0], A, args), args


# ---------------------------------------------------------------------------------------------------------------------
def official_update(config: dict, obs_shape: tuple) -> dict:
    """One official update() from a fixed batch: the parameters before and after, the gradients of total_loss, the
    info dict, the batch and the draws of the official key tree (update -> total_loss -> critic_loss / actor_loss)."""
    import flax
    import jax

    from agents.deflow import DeFlowAgent, get_config

    rs = np.random.RandomState(0)
    observations = (lambda: rs.randint(0, 256, (B, *obs_shape)).astype(np.uint8)) if len(obs_shape) == 3 else \
        (lambda: rs.randn(B, *obs_shape).astype(np.float32))
    batch = {"observations": observations(), "next_observations": observations(),
             "actions": np.clip(rs.randn(B, A) * 0.6, -1 + 1e-5, 1 - 1e-5).astype(np.float32),
             "rewards": -rs.rand(B).astype(np.float32), "masks": (rs.rand(B) > 0.3).astype(np.float32)}
    cfg = get_config()
    cfg.update(dict(config, normalize_q_loss=True, lr=1e-3))
    agent = DeFlowAgent.create(0, batch["observations"][:1], batch["actions"][:1], cfg)
    params = dict(agent.network.params)  # the target critic moved off the critic (officially created equal)
    leaves, tree = jax.tree_util.tree_flatten(params["modules_target_critic"])
    keys = jax.random.split(jax.random.PRNGKey(123), len(leaves))
    params["modules_target_critic"] = jax.tree_util.tree_unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    agent = agent.replace(network=agent.network.replace(params=params))

    _, loss_rng = jax.random.split(agent.rng)  # update(): new_rng, rng
    _, actor_rng, critic_rng = jax.random.split(loss_rng, 3)  # total_loss()
    _, sample_rng = jax.random.split(critic_rng)  # critic_loss(): sample_actions(next_observations, sample_rng)
    next_seed, _ = jax.random.split(sample_rng)  # sample_actions(): action_seed, noise_seed
    rng, x_rng, t_rng = jax.random.split(actor_rng, 3)  # actor_loss()
    rng, noise_rng = jax.random.split(rng)  # actor_loss(): the base actions' noise
    mse_seed, _ = jax.random.split(rng)  # actor_loss(): sample_actions(observations, rng), the mse metric
    draws = {"next_actions": jax.random.normal(next_seed, (B, A)), "x_0": jax.random.normal(x_rng, (B, A)),
             "base_actions": jax.random.normal(noise_rng, (B, A)), "t": jax.random.uniform(t_rng, (B, 1)),
             "mse": jax.random.normal(mse_seed, (B, A))}

    flat = lambda tree: {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}  # noqa
    grads = jax.grad(lambda p: agent.total_loss(batch, p, rng=loss_rng)[0])(agent.network.params)
    new_agent, info = agent.update(batch)
    return {"batch": batch, "before": flat(agent.network.params), "after": flat(new_agent.network.params),
            "grads": flat(grads), "draws": {k: np.asarray(v) for k, v in draws.items()},
            "metrics": {k: float(v) for k, v in info.items() if not k.startswith("grad/")}}  # grad/*: not logged


def relative(difference: np.ndarray, theirs: np.ndarray) -> float:
    """max |difference| / max |theirs| over a tensor (0 where both are 0)."""
    scale, largest = float(np.abs(theirs).max()), float(np.abs(difference).max())
    return largest / scale if scale > 0 else (0.0 if largest == 0 else float("inf"))


def compare_update(case: str, official: dict, args: Args) -> dict:
    """{group: (largest relative difference, where)} of the script's update against the official one."""
    script_name, config, obs_shape = UPDATES[case]
    script = importlib.import_module(script_name)
    torch.manual_seed(0)
    agent, script_args = script_agent(script, config, obs_shape)
    names, state = name_map(agent), agent.state_dict()
    before, after, grads = official["before"], official["after"], official["grads"]
    if set(names) != set(state) or sorted(f for f, _ in names.values()) != sorted(before):
        raise SystemExit(f"error: the parameter map is not one to one: ours unmapped {set(state) - set(names)}, "
                         f"official unmapped {set(before) - {f for f, _ in names.values()}}")
    agent.load_state_dict({k: to_torch(before[f], layout, state[k].shape) for k, (f, layout) in names.items()})
    assert all(np.array_equal(to_flax(v, *names[k][1:], before[names[k][0]].shape), before[names[k][0]])
               for k, v in agent.state_dict().items()), "the parameter map does not round-trip"

    batch = {k: torch.tensor(v) for k, v in official["batch"].items()}
    draws = {DRAWS[k]: torch.tensor(v) for k, v in official["draws"].items()}
    losses = torch.compile(script.deflow_losses) if args.compile else script.deflow_losses
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=script_args.lr, fused=True)
    frozen = (False,) if config.get("fix_bc_flow_online") else ()  # o2o's train_flow
    loss, metrics = losses(agent, batch, draws, script_args, *frozen)  # the official draws
    script.update(agent, optimizer, loss, script_args)
    if set(metrics) != set(official["metrics"]):
        raise SystemExit(f"error: metric names differ: {set(metrics) ^ set(official['metrics'])}")
    worst = {"metrics": max((abs(v.item() - official["metrics"][k]) / max(abs(official["metrics"][k]), 1e-12), k)
                            for k, v in metrics.items())}
    params = dict(agent.named_parameters())
    step = lambda g: script_args.lr * g.astype(np.float64) / (np.abs(g.astype(np.float64)) + 1e-8)  # noqa: E731
    groups = {"gradients": [], "parameters after Adam": [], "target after EMA": []}
    for key, (flax, layout) in names.items():
        p = params[key]
        new = to_flax(p, layout, after[flax].shape)
        if p.requires_grad:
            g = np.zeros_like(grads[flax]) if p.grad is None else to_flax(p.grad, layout, grads[flax].shape)
            groups["gradients"].append((relative(g - grads[flax], grads[flax]), flax))
            # Adam's first step is lr g / (|g| + eps): where |g| is near eps = 1e-8 it turns the gradients' rounding
            # into a visible difference. What the two gradients alone make of the step is taken off first.
            excess = np.maximum(np.abs(new - after[flax]) - np.abs(step(g) - step(grads[flax])), 0)
            groups["parameters after Adam"].append((relative(excess, after[flax]), flax))
        else:  # the target critic: the EMA of the critic's parameters before the step
            groups["target after EMA"].append((relative(new - after[flax], after[flax]), flax))
        if args.verbose:
            print(f"    {case:10s} {flax:64s} " + "  ".join(f"{g} {e[-1][0]:.1e}" for g, e in groups.items()
                                                           if e and e[-1][1] == flax))
    return {**worst, **{group: max(errors) for group, errors in groups.items()}}


def compare_frames() -> dict:
    """Frame stacking (3 frames) of every transition of a file with episodes of 5, 2, 7 and 3 frames: the official
    Dataset.sample of the regular dataset OGBench loads, against the script's stack_frames on its frame index."""
    import ogbench.utils
    from utils.datasets import Dataset

    from common.visual import episode_starts
    from deflow_pixels import stack_frames

    rs = np.random.RandomState(1)
    terminals = np.concatenate([np.r_[np.zeros(n - 1), 1] for n in (5, 2, 7, 3)]).astype(np.float32)
    frames = rs.randint(0, 256, (len(terminals), 4, 4, 3)).astype(np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "frames.npz")
        np.savez(path, observations=frames, actions=np.zeros((len(frames), 2), np.float32), terminals=terminals)
        dataset = Dataset.create(**ogbench.utils.load_dataset(path, ob_dtype=np.uint8))
    dataset.frame_stack = 3
    theirs = dataset.sample(dataset.size, idxs=np.arange(dataset.size))
    starts, valid = (torch.tensor(x) for x in episode_starts(terminals))
    obs, next_obs = (stack_frames(torch.tensor(frames), starts, idx, 3).numpy() for idx in (valid, valid + 1))
    equal = np.array_equal(obs, theirs["observations"]) and np.array_equal(next_obs, theirs["next_observations"])
    return {"equal": (0.0 if equal else float("inf"), f"{len(valid)} stacked transitions")}


def compare_shift() -> dict:
    """The random shift (pad 3, crop back) of 8 frames and their next frames at the script's offsets, against the
    official batched_random_crop at the same offsets."""
    from utils.datasets import batched_random_crop

    from deflow_pixels import random_shift

    rs = np.random.RandomState(2)
    obs, next_obs = (torch.tensor(rs.randint(0, 256, (8, 10, 12, 6)).astype(np.uint8)) for _ in range(2))
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    ours = random_shift(obs, next_obs, p_aug=1.0, generator=generator)
    generator.set_state(state)  # the script's draws again: the coin, then the (dy, dx) offsets
    torch.rand((), generator=generator)
    offsets = torch.randint(0, 7, (2, 8, 1), generator=generator)[:, :, 0].T.numpy()
    crop_froms = np.concatenate([offsets, np.zeros((8, 1), np.int64)], axis=1)
    theirs = [np.asarray(batched_random_crop(x.numpy(), crop_froms, 3)) for x in (obs, next_obs)]
    equal = all(np.array_equal(a.numpy(), b) for a, b in zip(ours, theirs))
    return {"equal": (0.0 if equal else float("inf"), "8 shifted frame stacks and their next ones")}


def main(args: Args) -> bool:
    """Run the cases, print one line per case and group; True when all are within their tolerances."""
    if args.project:  # import the scripts (and their common/) from there
        sys.path.insert(0, os.path.abspath(args.project))
    sys.path.insert(1 if args.project else 0, os.path.abspath(args.official))
    if not os.path.exists(os.path.join(args.official, "agents", "deflow.py")):
        raise SystemExit(f"error: {args.official} is not a checkout of the official code (no agents/deflow.py)")
    try:
        import distrax, flax, jax, ml_collections, optax  # noqa: F401, E401  (all the official code needs)
    except ImportError as e:
        raise SystemExit(f"error: {e.name} is missing: pip install -r requirements-parity.txt")
    jax.config.update("jax_platforms", "cpu")
    torch.set_num_threads(1)
    dumps, ok = {}, True
    print(f"{'case':10s} {'group':22s} {'largest relative difference':>28s}   tolerance   where")
    for case in args.cases:
        if case in UPDATES:
            script, config, obs_shape = UPDATES[case]
            key = repr((config, obs_shape))  # o2o's official update is mean's: computed once
            dumps[key] = dumps.get(key) or official_update(config, obs_shape)
            result = compare_update(case, dumps[key], args)
        elif case in ("frames", "shift"):
            result = compare_frames() if case == "frames" else compare_shift()
        else:
            raise SystemExit(f"error: unknown case {case!r} (cases: {' '.join(CASES)})")
        for group, (error, where) in result.items():
            within = error <= TOLERANCES[group]
            ok &= within
            print(f"{case:10s} {group:22s} {error:28.1e}   {TOLERANCES[group]:9.0e}   {where}"
                  f"{'' if within else '   MISMATCH'}", flush=True)
    print("all within tolerance" if ok else "MISMATCH: the update differs from the official one beyond rounding")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main(tyro.cli(Args, description=__doc__.split("\n\n")[0])) else 1)

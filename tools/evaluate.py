"""Evaluate a checkpoint of any of the three scripts, with the paper's policy or the official code's other samplers.

    python -m tools.evaluate runs/<run>/checkpoint.pt                          # the paper's policy, 50 episodes
    python -m tools.evaluate runs/<run>/checkpoint.pt --sampler max-q          # best of 10 flow samples by Q
    python -m tools.evaluate runs/<run>/checkpoint.pt --sampler iterative --refine-steps 5

The samplers (training and online acting always use the paper's policy, `flow`):
  - flow: pi(s) = clip(a_base + f(s, a_base)), the scripts' evaluation; the same episodes and numbers as theirs.
  - max-q: --num-samples flow samples per state, keep the one whose ensemble-mean Q is highest, refine it once.
    (The official `sample_actions_max_q` takes the argmin, against its own docstring; no official command uses it.)
  - iterative: a_0 = a_base, a_{k+1} = clip(a_k + f(s, a_k)) for --refine-steps steps; keep the highest-Q one of
    a_0..a_K (the official `sample_actions_iterative_refinement`, batched over states).
The defaults N = 10 and K = 5 are the official ones. The checkpoint's script is found from its settings: visual-*
environments are deflow_pixels.py's, everything else has deflow_offline.py's networks (deflow_o2o.py's too).
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro

from common.datasets import make_env


@dataclasses.dataclass
class Args:
    checkpoint: tyro.conf.Positional[str]
    """checkpoint.pt of a run of deflow_offline.py, deflow_o2o.py or deflow_pixels.py"""
    sampler: Literal["flow", "max-q", "iterative"] = "flow"
    """flow: the paper's pi(s); max-q: the best of --num-samples by Q, refined; iterative: best of --refine-steps"""
    num_samples: int = 10
    """flow samples per state for --sampler max-q"""
    refine_steps: int = 5
    """refinements for --sampler iterative (candidates: this many + 1)"""
    episodes: int = 50
    """evaluation episodes"""
    envs: int = 8
    """environments run side by side"""
    seed: Optional[int] = None
    """episode j resets and draws noise from SeedSequence([seed, checkpoint's update, j]); None: the run's --seed
    (its own evaluation at that update), another seed: a set of episodes independent of it"""
    device: str = "cpu"
    """'cpu', 'cuda' or 'cuda:N'"""
    out: Optional[str] = None
    """also write the metrics here as JSON"""


def script_of(run_args: dict):
    if run_args["env_name"].startswith("visual-"):
        import deflow_pixels

        return deflow_pixels
    import deflow_offline

    return deflow_offline


def inputs(agent, obs):
    """What the flow, the refinement network and the critic read: the observations, or (pixels) their encodings."""
    if hasattr(agent, "flow_encoder"):
        return agent.flow_encoder(obs), agent.refine_encoder(obs), agent.critic_encoder(obs)
    return obs, obs, obs


def best_by_q(agent, critic_input, candidates):
    """candidates (B, N, A) -> the one of each row with the highest ensemble-mean Q (B, A)."""
    batch, n, action_dim = candidates.shape
    q = agent.critic(critic_input.repeat_interleave(n, 0), candidates.reshape(batch * n, action_dim)).mean(0)
    return candidates[torch.arange(batch, device=candidates.device), q.reshape(batch, n).argmax(1)]


def sample_max_q(script, agent, obs, noise, run_args):
    """noise (B, N, A): N flow samples per state; refine the one with the highest Q."""
    flow_input, refine_input, critic_input = inputs(agent, obs)
    batch, n, action_dim = noise.shape
    base = script.flow_actions(agent.flow, flow_input.repeat_interleave(n, 0), noise.reshape(batch * n, action_dim),
                               run_args)
    best = best_by_q(agent, critic_input, base.reshape(batch, n, action_dim))
    return (best + agent.refine(refine_input, best)).clamp(-1, 1)


def sample_iterative(script, agent, obs, noise, run_args, refine_steps):
    flow_input, refine_input, critic_input = inputs(agent, obs)
    candidates = [script.flow_actions(agent.flow, flow_input, noise, run_args)]
    for _ in range(refine_steps):
        candidates.append((candidates[-1] + agent.refine(refine_input, candidates[-1])).clamp(-1, 1))
    return best_by_q(agent, critic_input, torch.stack(candidates, dim=1))


def main(args: Args) -> dict:
    import deflow_offline  # (every script's load_checkpoint is the same)

    checkpoint = deflow_offline.load_checkpoint(args.checkpoint)
    script = script_of(checkpoint["args"])
    fields = {field.name for field in dataclasses.fields(script.Args)}
    run_args = script.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["args"].items()
                              if k in fields})
    seed = run_args.seed if args.seed is None else args.seed
    run_args = dataclasses.replace(run_args, seed=seed, eval_episodes=args.episodes, eval_workers=False,
                                   capture_video=False)
    weights = [v for k, v in checkpoint["agent"].items() if k.startswith("refine.net.") and k.endswith(".weight")]
    action_dim = weights[-1].shape[0]  # the refinement network's output layer
    if script.__name__ == "deflow_pixels":
        height, width, channels = make_env(run_args.env_name).observation_space.shape
        agent = script.DeFlowAgent((height, width, channels * run_args.frame_stack), action_dim, run_args)
    else:
        agent = script.DeFlowAgent(weights[0].shape[1] - action_dim, action_dim, run_args)
    agent.load_state_dict(checkpoint["agent"])
    agent.to(args.device).eval()
    envs = script.make_eval_envs(run_args, max(1, min(args.envs, args.episodes)))
    policy, noise_shape = script.sample_actions, ()
    if args.sampler == "max-q":
        policy, noise_shape = partial(sample_max_q, script), (args.num_samples,)
    elif args.sampler == "iterative":
        policy = partial(sample_iterative, script, refine_steps=args.refine_steps)
    metrics, _ = script.evaluate(agent, envs, run_args, checkpoint["step"], policy, noise_shape)
    envs.close()
    result = {"checkpoint": args.checkpoint, "step": checkpoint["step"], "sampler": args.sampler,
              "episodes": args.episodes, "seed": seed, **{f"evaluation/{k}": v for k, v in metrics.items()}}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("MUJOCO_GL", "egl")  # pixels: MuJoCo renders the frames; without a display, through EGL
    main(tyro.cli(Args))

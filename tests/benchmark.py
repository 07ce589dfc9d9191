"""Speed benchmark, run on request (not part of the test suite):

    python -m tests.benchmark            # on CUDA when present, else the CPU; prints a table, writes it to --out

It measures, side by side in one run:
  - updates/s of deflow_offline.py's training step (batch draw + update), eager and --compile, at each --widths
    (4 layers per network, batch 256, 10 flow steps, cube-single's 28-dim observations and 5-dim actions);
  - the critic ensemble's forward + backward, as the scripts run it (a Python loop over 2 MLPs) and vmapped over
    stacked weights (the alternative the scripts would use if it were faster);
  - seconds for --eval-episodes evaluation episodes of a real OGBench environment at paper size (4x512, untrained,
    so every episode runs to the time limit): one environment at a time, and all side by side (one batched policy
    call per step), eager, --compile, and stepped in one worker process per core (--eval-workers). All give the
    same per-episode results (tests/test_speed.py).
Timings exclude compilation, which is reported apart ("compile s": the warm-up calls).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import time
from pathlib import Path

import torch
import tyro

import deflow_offline
from common.envs import EnvPool

OBS_DIM, ACTION_DIM = 28, 5  # cube-single


@dataclasses.dataclass
class Args:
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'"""
    widths: tuple[int, ...] = (512, 256)
    """hidden width of every network (4 hidden layers each); 512 is the paper's"""
    updates: int = 50
    """timed updates per row, after 3 warm-up updates"""
    eval_episodes: int = 50
    """evaluation episodes per row (0: skip the evaluation rows)"""
    env_name: str = "cube-single-play-singletask-task1-v0"
    """OGBench environment of the evaluation rows"""
    out: str = "runs/benchmark-{device}.md"
    """where the table goes ({device} is replaced)"""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agent_of_width(width: int, device: torch.device) -> tuple[deflow_offline.DeFlowAgent, deflow_offline.Args]:
    torch.manual_seed(0)
    hidden = (width,) * 4
    args = dataclasses.replace(deflow_offline.Args(), actor_hidden_dims=hidden, refine_hidden_dims=hidden,
                               value_hidden_dims=hidden)
    return deflow_offline.DeFlowAgent(OBS_DIM, ACTION_DIM, args).to(device), args


def timed(fn, warmup: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the warm-up calls, calls per second afterwards)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return warm, repeats / (time.perf_counter() - start)


def update_rows(width: int, args: Args, device: torch.device) -> list[tuple[str, str, str]]:
    g = torch.Generator().manual_seed(0)
    n = 100_000
    data = {"observations": torch.randn(n, OBS_DIM, generator=g), "actions": torch.rand(n, ACTION_DIM, generator=g),
            "rewards": -torch.rand(n, generator=g), "masks": torch.ones(n),
            "next_observations": torch.randn(n, OBS_DIM, generator=g)}
    data = {k: v.to(device) for k, v in data.items()}
    rows, speeds = [], {}
    for compiled in (False, True):
        agent, agent_args = agent_of_width(width, device)
        optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=3e-4)
        step_fn = deflow_offline.train_step
        if compiled:
            step_fn = torch.compile(step_fn, mode="reduce-overhead" if device.type == "cuda" else None)

        def one_update():
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            step_fn(agent, optimizer, data, agent_args)

        warm, speeds[compiled] = timed(one_update, 3, args.updates, device)
        rows.append((f"update 4x{width}, {'--compile' if compiled else 'eager'}", f"{speeds[compiled]:.2f} updates/s",
                     f"compile s {warm:.0f}" if compiled else ""))
    rows[-1] = (*rows[-1][:2], rows[-1][2] + f"; {speeds[True] / speeds[False]:.2f}x eager")
    return rows


def critic_rows(width: int, args: Args, device: torch.device) -> list[tuple[str, str, str]]:
    """Forward + backward of the 2-member critic on a batch of 256: the scripts' loop vs vmap over stacked weights."""
    agent, _ = agent_of_width(width, device)
    critic = agent.critic
    obs, actions = torch.randn(256, OBS_DIM, device=device), torch.rand(256, ACTION_DIM, device=device)
    params, buffers = torch.func.stack_module_state(list(critic.members))
    base = copy.deepcopy(critic.members[0]).to("meta")
    x = torch.cat([obs, actions], dim=-1)

    def member(p, b, inputs):
        return torch.func.functional_call(base, (p, b), (inputs,)).squeeze(-1)

    def loop():
        critic(obs, actions).sum().backward()

    def vmapped():
        torch.func.vmap(member, in_dims=(0, 0, None))(params, buffers, x).sum().backward()

    speeds = {name: timed(fn, 3, 5 * args.updates, device)[1] for name, fn in (("loop", loop), ("vmap", vmapped))}
    return [(f"critic fwd+bwd 4x{width}, {name}", f"{speed:.1f} calls/s", "") for name, speed in speeds.items()]


def evaluation_rows(args: Args, device: torch.device) -> list[tuple[str, str, str]]:
    agent, agent_args = agent_of_width(512, device)
    rows = []
    workers = os.cpu_count() or 1
    for num_envs, compiled, num_workers in ((1, False, 0), (args.eval_episodes, False, 0),
                                            (args.eval_episodes, True, 0), (args.eval_episodes, False, workers)):
        envs = EnvPool(args.env_name, num_envs, num_workers)
        envs.reset({i: 0 for i in range(num_envs)})  # wait until every worker has made its environments
        policy, note = deflow_offline.eval_actions, ""
        if compiled:
            policy = torch.compile(deflow_offline.eval_actions, dynamic=True)
            start = time.perf_counter()
            deflow_offline.evaluate(agent, envs, 2, agent_args, seed=10_000, policy=policy)[0]  # compile
            note = f"compile s {time.perf_counter() - start:.0f}; "
        start = time.perf_counter()
        result = deflow_offline.evaluate(agent, envs, args.eval_episodes, agent_args, seed=0, policy=policy)[0]
        seconds = time.perf_counter() - start
        envs.close()
        layout = "one by one (1 env)" if num_envs == 1 else f"{num_envs} envs side by side"
        layout += f" in {num_workers} worker processes" if num_workers else ""
        rows.append((f"evaluation, {layout}{', --compile' if compiled else ''}",
                     f"{seconds:.1f} s / {args.eval_episodes} episodes",
                     note + f"success {result['success']:.2f}, mean length {result['episode.length']:.0f}"))
    return rows


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    header = f"DeFlow speed on {device} ({name}), torch {torch.__version__}, batch 256, 10 flow steps"
    print(header, flush=True)
    rows = []
    for width in args.widths:
        for row in update_rows(width, args, device) + critic_rows(width, args, device):
            print("  ".join(row), flush=True)
            rows.append(row)
    if args.eval_episodes > 0:
        for row in evaluation_rows(args, device):
            print("  ".join(row), flush=True)
            rows.append(row)
    lines = [header, "", "| what | speed | notes |", "|---|---|---|"] + [f"| {' | '.join(row)} |" for row in rows]
    table = "\n".join(lines)
    out = Path(args.out.format(device=device.type))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(f"written to {out}")

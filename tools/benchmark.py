"""Speed benchmark, run on request (not part of the test suite):

    python -m tools.benchmark                          # this checkout; on CUDA when present, else the CPU
    python -m tools.benchmark --baseline ../deflow-old # and another checkout of this project, side by side

It measures, in one run, and writes the tables to --out (docs/speed.md shows them):
  - Training: updates/s of deflow_offline.py's training iteration (batch draw, noise, losses, backward, target EMA,
    Adam) at each --widths (4 hidden layers in every network, batch 256, 10 flow steps, cube-single's 28-dim
    observations and 5-dim actions, random data): eager, --compile (the default --precision tf32: TF32 matmuls on
    CUDA), on CUDA also --compile with strict float32, and --compile with --precision bf16-rollouts and bf16 (where
    bfloat16 is native: CUDA, or a CPU with AVX-512 BF16 or AMX); with --baseline, that checkout's eager
    and --compile as well. The variants run interleaved, a block of updates each in turn for --rounds rounds, so
    that a slow spell of a shared machine hits them alike. Each cell is
    the median block; a ratio is the median of the per-round ratios to the first column. Compilation is excluded
    (warm-up calls) and reported apart.
  - With --tricks, what the two speed rewrites measured for the scripts pay, each changed alone on top of --compile:
    the GELU written plainly (nn.GELU, without the scripts' x * sigmoid(2u) when compiled, which they keep), and the
    flow's first layer split so that the observation's part W_s s is computed once per rollout instead of at every
    Euler step (the same math; the scripts leave it out).
  - GFLOP/s achieved: the matmul FLOPs of one update (forward and backward, counted by torch.utils.flop_counter on
    the eager update) times updates/s.
  - Evaluation: seconds and resident memory of --eval-episodes episodes on a real environment with an untrained 4x512
    agent (so every episode runs to its time limit): the default number of environments side by side (with the
    scripts' eager policy, and compiled) and 50 side by side (the old default); this checkout only.
  - The peak resident memory of the benchmark process.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import tyro
from torch.utils.flop_counter import FlopCounterMode

import deflow_offline

OBS_DIM, ACTION_DIM = 28, 5  # cube-single


@dataclasses.dataclass
class Args:
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'"""
    widths: tuple[int, ...] = (128, 256, 512)
    """hidden width of every network (4 hidden layers each); 512 is the paper's"""
    baseline: str | None = None
    """another checkout of this project (e.g. a git worktree of an older commit) to time side by side"""
    rounds: int = 7
    """rounds of timed blocks (one block per variant per round)"""
    block_seconds: float = 2.0
    """about how long one block of updates takes"""
    eval_episodes: int = 50
    """evaluation episodes per evaluation row (0: no evaluation rows)"""
    eval_rounds: int = 3
    """times each evaluation row runs (in turns)"""
    env_name: str = "cube-single-play-singletask-task1-v0"
    """OGBench environment of the evaluation rows"""
    tricks: bool = False
    """also time the two speed rewrites (see above), each changed alone on top of --compile"""
    out: str = "runs/benchmark-{device}.md"
    """where the tables go ({device} is replaced)"""


def resident_gb(pid: int | str = "self") -> float:
    """Resident memory of a process in GB, from /proc (Linux); 0.0 elsewhere."""
    try:
        return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:")) / 1e6
    except (OSError, StopIteration):
        return 0.0


def make_eval_envs(env_name: str, num_envs: int):
    return deflow_offline.make_eval_envs(dataclasses.replace(deflow_offline.Args(), env_name=env_name), num_envs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_baseline(path: str):
    """deflow_offline.py of another checkout, as its own module, with that checkout's own common/ package."""
    spec = importlib.util.spec_from_file_location("baseline_deflow_offline", Path(path) / "deflow_offline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    ours = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "common"}
    sys.path.insert(0, str(Path(path).resolve()))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
        for name in [name for name in sys.modules if name.split(".")[0] == "common"]:
            del sys.modules[name]
        sys.modules.update(ours)
    return module


def make_step(script, width: int, device: torch.device, compiled: bool, precision: str = "tf32"):
    """A fresh agent of `width` and a function doing one training iteration on it, as the script's main loop does
    (with its --precision's TF32 setting on CUDA: the variants take turns)."""
    torch.manual_seed(0)
    hidden = (width,) * 4
    args = dataclasses.replace(script.Args(), actor_hidden_dims=hidden, refine_hidden_dims=hidden,
                               value_hidden_dims=hidden)
    agent = script.DeFlowAgent(OBS_DIM, ACTION_DIM, args).to(device)
    params = [p for p in agent.parameters() if p.requires_grad]
    mode = "reduce-overhead" if device.type == "cuda" else None
    if not hasattr(script, "update"):  # an older checkout: its whole training step compiled, its Adam
        optimizer = torch.optim.Adam(params, lr=args.lr)
        step_fn = torch.compile(script.train_step, mode=mode) if compiled else script.train_step
        return lambda data: step_fn(agent, optimizer, data, args), agent, args, optimizer
    args.precision, tf32 = precision, device.type == "cuda" and precision != "float32"
    batch_size = args.batch_size
    optimizer = torch.optim.Adam(params, lr=args.lr, fused=True)
    losses = torch.compile(script.deflow_losses, mode=mode) if compiled else script.deflow_losses
    if "loss" in inspect.signature(script.update).parameters:  # the scripts' loop: losses, then update()
        losses = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")(losses)

        def update(agent, optimizer, batch, args, losses):
            loss, metrics = losses(agent, batch, script.update_draws(batch_size, ACTION_DIM, device), args)
            script.update(agent, optimizer, loss, args)
            return metrics
    else:  # an older checkout: update(..., losses=) draws, computes and steps
        update = script.update

    def step(data):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        return update(agent, optimizer, script.sample_batch(data, batch_size), args, losses=losses)

    return step, agent, args, optimizer


def split_flow_actions(flow, obs, noise, args):
    """flow_actions with the flow's first layer W [s, x, t] + b split as W_s s + (W_x x + b + t W_t): W_s s once."""
    first, rest, flow_steps = flow.net[0], flow.net[1:], args.flow_steps
    w_s, w_x, w_t = first.weight.split([obs.shape[-1], noise.shape[-1], 1], dim=1)
    obs_part = torch.nn.functional.linear(obs, w_s)
    x = noise
    for i in range(flow_steps):
        velocity = rest(obs_part + torch.nn.functional.linear(x, w_x, first.bias + i / flow_steps * w_t[:, 0]))
        x = x + velocity / flow_steps
    return x.clamp(-1, 1)


def with_trick(trick: str):
    """A copy of this checkout's deflow_offline module with one rewrite changed: "plain-gelu" or "split"."""
    spec = importlib.util.spec_from_file_location(f"deflow_offline_{trick}", Path(deflow_offline.__file__))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if trick == "plain-gelu":
        module.GELU = lambda: torch.nn.GELU(approximate="tanh")
    else:
        module.flow_actions = split_flow_actions
    return module


def update_flops(width: int, data: dict, device: torch.device) -> int:
    """Matmul FLOPs of one eager update (forward and backward) of this checkout."""
    step, *_ = make_step(deflow_offline, width, device, compiled=False)
    with FlopCounterMode(display=False) as counter:
        step(data)
    return counter.get_total_flops()


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively (CUDA, or a CPU with AVX-512 BF16 / AMX); elsewhere they are emulated
    and many times slower than float32, so the bf16 rows are left out."""
    return device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def training_rows(args: Args, device: torch.device, baseline) -> tuple[list[str], list[list[str]], list[list[str]]]:
    variants = [("eager", deflow_offline, False, "tf32"), ("--compile", deflow_offline, True, "tf32")]
    if device.type == "cuda":  # TF32 is the default there (as JAX's); this is --precision float32
        variants.append(("--compile, strict float32", deflow_offline, True, "float32"))
    if native_bf16(device):
        variants += [("--compile, bf16-rollouts", deflow_offline, True, "bf16-rollouts"),
                     ("--compile, bf16", deflow_offline, True, "bf16")]
    if args.tricks:
        variants += [("--compile, plain GELU", with_trick("plain-gelu"), True, "tf32"),
                     ("--compile, first layer split", with_trick("split"), True, "tf32")]
    if baseline is not None:
        variants = [("baseline eager", baseline, False, "tf32"), ("baseline --compile", baseline, True, "tf32"),
                    *variants]
    g = torch.Generator().manual_seed(0)
    n = 100_000
    data = {"observations": torch.randn(n, OBS_DIM, generator=g), "actions": torch.rand(n, ACTION_DIM, generator=g),
            "rewards": -torch.rand(n, generator=g), "masks": torch.ones(n),
            "next_observations": torch.randn(n, OBS_DIM, generator=g)}
    data = {k: v.to(device) for k, v in data.items()}
    speed_rows, flop_rows = [], []
    for width in args.widths:
        steps, notes = [], []
        for name, script, compiled, precision in variants:
            step = make_step(script, width, device, compiled, precision)[0]
            start = time.perf_counter()
            for _ in range(3):
                step(data)
            sync(device)
            warm = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(3):
                step(data)
            sync(device)
            block = max(3, round(args.block_seconds * 3 / (time.perf_counter() - start)))
            steps.append((step, block))
            notes.append(f"{name} compiled in {warm:.0f} s" if compiled else "")
            print(f"  4x{width} {name}: ready (block of {block} updates)", flush=True)
        speeds = [[] for _ in variants]
        for _ in range(args.rounds):
            for (step, block), measured in zip(steps, speeds):
                start = time.perf_counter()
                for _ in range(block):
                    step(data)
                sync(device)
                measured.append(block / (time.perf_counter() - start))
        flops = update_flops(width, data, device)
        cells, flop_cells = [], []
        for measured in speeds:
            ratio = statistics.median(m / first for m, first in zip(measured, speeds[0]))
            median = statistics.median(measured)
            cells.append(f"{median:.1f}" + ("" if measured is speeds[0] else f" ({ratio:.2f}x)"))
            flop_cells.append(f"{median * flops / 1e9:.0f}")
        speed_rows.append([f"4x{width}", *cells])
        flop_rows.append([f"4x{width} ({flops / 1e9:.2f} GFLOP per update)", *flop_cells])
        print("  " + " | ".join(speed_rows[-1]) + "   " + "; ".join(note for note in notes if note), flush=True)
    return [name for name, *_ in variants], speed_rows, flop_rows


def evaluation_rows(args: Args, device: torch.device) -> list[list[str]]:
    """Each layout's environments are made once (their memory measured then); the rows take turns, --eval-rounds
    times. This checkout only: an older one evaluates on its own environment pool (time it in its own checkout)."""
    default_envs = deflow_offline.Args().eval_envs
    make_eval_envs(args.env_name, 1).close()  # imports MuJoCo and OGBench first, as the scripts' loading does
    pools, memory = {}, {}
    for num_envs in (default_envs, 50):
        before = resident_gb()
        pools[num_envs] = make_eval_envs(args.env_name, num_envs)
        memory[num_envs] = resident_gb() - before
    rows = [(default_envs, deflow_offline, False), (default_envs, deflow_offline, True), (50, deflow_offline, False)]
    runs = []
    for num_envs, script, compiled in rows:
        hidden = (512,) * 4
        agent_args = dataclasses.replace(script.Args(), actor_hidden_dims=hidden, refine_hidden_dims=hidden,
                                         value_hidden_dims=hidden)
        torch.manual_seed(0)
        agent = script.DeFlowAgent(OBS_DIM, ACTION_DIM, agent_args).to(device)
        policy = getattr(script, "eval_actions", script.sample_actions)  # an older checkout: eval_actions
        policy = torch.compile(policy, dynamic=True) if compiled else policy
        if compiled:  # compiles
            script.evaluate(agent, pools[num_envs], dataclasses.replace(agent_args, eval_episodes=2 * num_envs,
                                                                        seed=10_000), 1, policy)
        runs.append((script, agent, dataclasses.replace(agent_args, eval_episodes=args.eval_episodes), policy, []))
    for _ in range(args.eval_rounds):
        for (num_envs, *_), (script, agent, agent_args, policy, seconds) in zip(rows, runs):
            start = time.perf_counter()
            result = script.evaluate(agent, pools[num_envs], agent_args, 1, policy)[0]
            seconds.append(time.perf_counter() - start)
            assert result["episode.length"] == 200  # untrained: every episode runs to the time limit
    out = []
    for (num_envs, script, compiled), (*_, seconds) in zip(rows, runs):
        code = "this code"
        layout = f"{num_envs} side by side" + (" (default)" if num_envs == default_envs else "")
        out.append([layout, f"{code}, {'compiled' if compiled else 'eager'}",
                    f"{statistics.median(seconds):.1f} ({', '.join(f'{x:.1f}' for x in seconds)})",
                    f"{memory[num_envs]:.2f}"])
        print("  " + " | ".join(out[-1]), flush=True)
    for pool in pools.values():
        pool.close()
    return out


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header)] + [f"| {' | '.join(row)} |" for row in rows]


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    # Every variant and width compiles deflow_losses anew (other agent, other precision): more than torch.compile's
    # default of 8 versions of one function, after which it would silently run the rest eagerly.
    torch._dynamo.config.recompile_limit = 64
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} {torch.backends.cpu.get_cpu_capability()}, " \
        f"{torch.get_num_threads()} threads" + ("" if native_bf16(device) else ", no native bfloat16: no bf16 rows")
    title = (f"DeFlow speed on {device} ({name}), torch {torch.__version__}, batch 256, 10 flow steps, "
             f"{args.rounds} rounds of ~{args.block_seconds:.0f} s blocks per variant")
    print(title, flush=True)
    baseline = load_baseline(args.baseline) if args.baseline else None
    names, speed_rows, flop_rows = training_rows(args, device, baseline)
    training_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux
    lines = [title, "", "Training, updates/s (ratio to the first column):", ""]
    lines += table(["networks", *names], speed_rows)
    lines += ["", "Training, matmul GFLOP/s achieved:", ""] + table(["networks", *names], flop_rows)
    if args.eval_episodes > 0:
        eval_rows = evaluation_rows(args, device)
        lines += ["", f"Evaluation of {args.eval_episodes} episodes on {args.env_name} with an untrained 4x512 agent "
                  f"(every episode runs its 200 steps); seconds: the median of {args.eval_rounds} runs taken in turns "
                  f"(each run):", ""]
        lines += table(["environments", "policy", "seconds", "environments' resident memory (GB)"], eval_rows)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    lines += ["", f"Peak resident memory of the benchmark process: {training_peak_gb:.1f} GB after the training rows, "
              f"{peak_gb:.1f} GB in all"]
    out = Path(args.out.format(device=device.type))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[1:]))
    print(f"written to {out}")

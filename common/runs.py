"""A run's command line and files, the same in the three scripts; none of it is DeFlow. Files are written atomically
(a temporary file, then a rename) or as whole CSV lines: a crash or a kill leaves nothing half-written."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import tyro
from tqdm import tqdm


def parse_args(args_class, doc: str):
    """(args, checkpoint or None) from tyro's command line (--help: the first line of `doc`); a bad count or range is
    one line. With --resume, the checkpoint's settings are the defaults flags override, but only those of MAY_CHANGE:
    a run keeps its task, data, seed, networks and method (one line naming the flag, before any file is touched). The
    run's name is this script's (or --exp-name) when another script wrote it (deflow_o2o.py going online from a
    deflow_offline.py run)."""
    description = doc.strip().split("\n")[0]
    args = tyro.cli(args_class, description=description)
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        saved = dataclasses.replace(saved_args(args_class, checkpoint), resume=args.resume)
        if checkpoint.get("script", Path(sys.argv[0]).name) != Path(sys.argv[0]).name:
            saved.exp_name = args.exp_name
        args = tyro.cli(args_class, default=saved, description=description)
        for name in checkpoint["args"].keys() & {f.name for f in dataclasses.fields(args)} - MAY_CHANGE:
            if getattr(args, name) != getattr(saved, name):
                sys.exit(f"error: --{name.replace('_', '-')} cannot change on resume (the run's is "
                         f"{getattr(saved, name)}, given {getattr(args, name)}): a run keeps its task, data, seed, "
                         f"networks and method settings; start a new run for other ones")
    for name, (low, high) in BOUNDS.items():
        values = getattr(args, name, None)
        for value in values if isinstance(values, tuple) else [values]:
            if value is not None and not low <= value <= high:
                bound = f"at least {low}" if high == float("inf") else f"in [{low}, {high}]"
                sys.exit(f"error: --{name.replace('_', '-')} must be {bound} (got {value})"
                         + ("; --eval-interval 0 turns evaluation off" if name == "eval_episodes" else ""))
    return args, checkpoint


# What a resumed run may change: how long and how it runs, where its data and logs are. The rest is fixed.
MAY_CHANGE = {"resume", "exp_name", "device", "run_dir", "track", "wandb_project_name", "wandb_entity", "dataset_dir",
              "dataset_path", "generate_episodes", "num_workers", "offline_steps", "online_steps", "log_interval",
              "eval_interval", "eval_episodes", "eval_envs", "eval_workers", "eval_max_episode_steps", "capture_video",
              "video_episodes", "save_interval", "compile", "precision", "lr"}
BOUNDS = {"p_aug": (0, 1), **{name: (1, float("inf")) for name in (  # (low, high) of counts and a probability
    "eval_episodes eval_envs batch_size flow_steps num_workers buffer_size frame_stack eval_max_episode_steps "
    "actor_hidden_dims refine_hidden_dims value_hidden_dims encoder_stack_sizes encoder_head_dims").split()},
    **{name: (0, float("inf")) for name in ("offline_steps online_steps log_interval eval_interval save_interval "
                                            "video_episodes generate_episodes iav_queries").split()}}


def saved_args(args_class, checkpoint: dict):
    """A checkpoint's settings as `args_class` (JSON lists back to tuples; settings it has no field for dropped)."""
    fields = {field.name for field in dataclasses.fields(args_class)}
    return args_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["args"].items()
                         if k in fields})


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        sys.exit(f"error: checkpoint {path} does not exist (look in runs/<run>/checkpoint.pt)")
    except Exception as e:  # a truncated or foreign file raises many different errors
        sys.exit(f"error: checkpoint {path} is corrupt or not a DeFlow checkpoint ({type(e).__name__}: {e})")


def atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def data_fingerprint(actions) -> str:
    """What identifies a run's training data wherever its file lies: its size and a hash of its actions."""
    array = np.ascontiguousarray(actions.cpu().numpy() if torch.is_tensor(actions) else actions)
    return f"{len(array)} transitions, actions sha1 {hashlib.sha1(array.tobytes()).hexdigest()[:12]}"


class Checkpoints:
    """<run>/checkpoint.pt, one file written atomically: every --save-interval updates (None: a tenth of the run, so a
    killed run loses at most a tenth of its updates), at least every MINUTES minutes, and at the end (--save-interval
    0: at the end only). It holds the args, the step, the agent, Adam, the random streams and the data's fingerprint;
    `save(..., **extra)` adds a script's own (deflow_o2o.py: the replay buffer and the training episode)."""

    MINUTES = 30

    def __init__(self, args, actions):
        self.args, self.data, self.last = args, data_fingerprint(actions), time.monotonic()
        total_steps = args.offline_steps + getattr(args, "online_steps", 0)
        self.interval = max(1, total_steps // 10) if args.save_interval is None else args.save_interval

    def due(self, step: int, is_end: bool) -> bool:
        late = time.monotonic() - self.last > 60 * self.MINUTES
        if is_end or self.interval and (step % self.interval == 0 or late):
            self.last = time.monotonic()
            return True
        return False

    def save(self, run_dir: Path, step: int, agent, optimizer, log_rng: torch.Generator, **extra) -> None:
        cuda = torch.cuda.get_rng_state(log_rng.device) if log_rng.device.type == "cuda" else None
        state = {"args": dataclasses.asdict(self.args), "step": step, "agent": agent.state_dict(),
                 "optimizer": optimizer.state_dict(), "data": self.data, "script": Path(sys.argv[0]).name,
                 "rng": {"torch": torch.get_rng_state(), "cuda": cuda, "log": log_rng.get_state()}, **extra}
        atomic_write(run_dir / "checkpoint.pt", lambda f: torch.save(state, f))

    def restore(self, checkpoint: dict, agent, optimizer, log_rng: torch.Generator) -> int:
        """Load a checkpoint's agent, Adam (at this --lr) and random streams; return the step to continue from. Random
        streams are device-specific: from another device type (CPU <-> CUDA) they restart, seeded by (seed, step)."""
        path, step, rng = self.args.resume, checkpoint["step"], checkpoint["rng"]
        if checkpoint.get("data", self.data) != self.data:
            sys.exit(f"error: {path} was trained on other data ({checkpoint['data']}) than given here ({self.data}); "
                     "resume with the run's dataset (--dataset-path or --dataset-dir)")
        try:
            agent.load_state_dict(checkpoint["agent"])
        except RuntimeError as e:
            sys.exit(f"error: checkpoint {path} does not fit this environment/network: "
                     f"{' '.join(str(e).split())[:400]}")
        optimizer.load_state_dict(checkpoint["optimizer"])
        if (lr := optimizer.param_groups[0]["lr"]) != self.args.lr:
            print(f"--lr {self.args.lr:g} replaces the checkpoint's {lr:g}")
        for group in optimizer.param_groups:
            group["lr"] = self.args.lr
        if rng.get("log") is None or rng["log"].numel() == log_rng.get_state().numel():  # the same device type
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and log_rng.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], log_rng.device)
            if rng.get("log") is not None:  # (older checkpoints have none)
                log_rng.set_state(rng["log"])
        else:  # [seed, step, 2**32 - 1]: no evaluation episode's or training episode's words (common.envs, o2o)
            training, logging = np.random.SeedSequence([self.args.seed, step, 2**32 - 1]).generate_state(2)
            torch.manual_seed(int(training))
            log_rng.manual_seed(int(logging))
            print(f"note: {path} was written on another device type ({'CUDA' if rng['log'].numel() < 100 else 'CPU'})"
                  f": random number generator states do not carry over, so training and logging continue from new "
                  f"streams seeded by (seed, step {step}); everything else continues exactly")
        return step + 1


def start(args) -> torch.device:
    """Seed python, numpy and torch with --seed; MuJoCo renders without a display (EGL) unless MUJOCO_GL says
    otherwise; the device, and its precision: TF32 matmuls and convolutions on CUDA (JAX's default on GPUs) unless
    --precision float32. Prints the precision."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    tf32 = device.type == "cuda" and args.precision != "float32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    bf16 = {"bf16-rollouts": "rollouts' matmuls in bfloat16, the rest ", "bf16": "matmuls in bfloat16, the rest "}
    rest = "TF32 matmuls and convolutions (as JAX on a GPU; --precision float32: strict)" if tf32 else "strict float32"
    print(f"--precision {args.precision} on {device}: {bf16.get(args.precision, '')}{rest}")
    return device


def logging_stream(seed: int, device: torch.device) -> torch.Generator:
    """The validation batches' and the logged mse's random stream, apart from training's (SeedSequence([seed, 0, 0]);
    evaluation episodes: [seed, update, j]): logging never changes training."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, 0, 0]).generate_state(1)[0]))


def compiled(losses, args, device: torch.device):
    """--compile: torch.compile(losses) (CUDA graphs on CUDA); without a C++ compiler (CPU) or Triton (CUDA), one
    line naming --no-compile instead of a traceback."""
    if not args.compile:
        return losses
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1, device=device))
    except torch._dynamo.exc.BackendCompilerFailed as e:
        sys.exit(f"error: torch.compile does not work here ({str(e).strip().splitlines()[0]}); "
                 f"run with --no-compile (the eager code: the same results, slower)")
    print("--compile: the first update and the first logging step compile first (a minute or so each)")
    return torch.compile(losses, mode="reduce-overhead" if device.type == "cuda" else None)


def run_name_of(env_name: str) -> str:  # the environment's part of a run folder's name
    return env_name.replace("/", "-")  # (D4RL ids have slashes)


class RunLog:
    """The run folder (<run_dir>/<env>__<exp_name>__<seed>__<time>/, on resume the checkpoint's): args.json,
    train.csv, eval.csv, checkpoint.pt, videos/; rows also go to Weights & Biases with --track."""

    def __init__(self, args, resume_step: int | None = None):
        name = f"{run_name_of(args.env_name)}__{args.exp_name}__{args.seed}__{int(time.time())}"
        self.dir = Path(args.run_dir) / name if resume_step is None else Path(args.resume).parent
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in [self.dir / "train.csv", self.dir / "eval.csv"] if resume_step is not None else []:
            if path.exists():  # one consistent history: the rows logged after the checkpoint go
                lines = [line for line in open(path) if not line[0].isdigit() or int(line.split(",")[0]) <= resume_step]
                atomic_write(path, lambda f: f.write("".join(lines).encode()))
        self.json("args.json", dataclasses.asdict(args))
        self.last_step, self.start_time = resume_step or 0, time.time()
        self.last_time, self.wandb = self.start_time, None
        if args.track:
            import wandb

            self.wandb = wandb
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=self.dir.name, id=self.dir.name,
                       config=dataclasses.asdict(args), dir=str(self.dir), resume="allow")

    def json(self, name: str, value) -> None:
        atomic_write(self.dir / name, lambda f: f.write(json.dumps(value, indent=2).encode()))

    def write(self, csv_name: str, row: dict, step: int) -> None:
        path, row = self.dir / csv_name, {"step": step, **row}
        fields = next(csv.reader(open(path))) if path.exists() else list(row)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def training(self, step: int, row: dict, after: dict | None = None) -> None:
        """train.csv's row at a logging step: `row`, the seconds per update since the last one and since the start,
        then `after`; the main losses printed."""
        now = time.time()
        times = {"time/epoch_time": (now - self.last_time) / (step - self.last_step),
                 "time/total_time": now - self.start_time}
        self.last_time, self.last_step = now, step
        self.write("train.csv", {**row, **times, **(after or {})}, step)
        values = {k.split("/")[-1]: v for k, v in row.items() if k.startswith("training/")}
        shown = ("critic_loss", "bc_flow_loss", "distill_loss", "alpha_value", "q", "mse")
        tqdm.write(f"step {step}: " + "  ".join(f"{k} {values[k]:.4g}" for k in shown))

    def evaluation(self, step: int, metrics: dict, videos: dict) -> None:
        """eval.csv's row, the videos ({episode: frames} -> videos/*.mp4) and a printed line."""
        self.write("eval.csv", {f"evaluation/{k}": v for k, v in metrics.items()}, step)
        self.videos(videos, step)
        tqdm.write(f"step {step}: evaluation/" + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()))

    def videos(self, videos: dict, step: int) -> None:
        if videos:
            from common.video import write_videos

            write_videos(self.dir / "videos", videos, step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class NonFiniteWatch:
    """The first step each loss term became NaN or inf, kept on the device (no host sync); check(), at log and save
    steps, stops the run naming them before anything of such a step is saved."""

    def __init__(self, skip: tuple[str, ...] = ()):
        self.skip, self.names, self.first_bad = skip, None, 0  # skip: terms that only some steps have

    def update(self, metrics: dict[str, torch.Tensor], step: int) -> None:
        self.names = self.names or [name for name in metrics if name not in self.skip]
        bad = ~torch.isfinite(torch.stack([metrics[name] for name in self.names]))
        self.first_bad = torch.where((self.first_bad == 0) & bad, step, self.first_bad)

    def check(self, run_dir: Path) -> None:
        if not torch.is_tensor(self.first_bad) or not self.first_bad.any():
            return
        bad = sorted((int(s), name) for s, name in zip(self.first_bad.tolist(), self.names) if s > 0)
        step, name = bad[0]
        sys.exit(f"error: training/{name} became non-finite at step {step} (non-finite since: "
                 f"{', '.join(f'{n} at {s}' for s, n in bad)}). Nothing was saved after step {step}; the last "
                 f"checkpoint in {run_dir} (if any) is intact. Check the dataset for NaNs or lower --lr.")

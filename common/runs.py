"""A run's command line and files, the same in the three scripts; none of it is DeFlow. Files are written atomically
(a temporary file, then a rename) or as whole CSV lines: a crash or a kill leaves nothing half-written."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import tyro


def parse_args(args_class, doc: str):
    """(args, checkpoint or None) from tyro's command line (--help: the first line of `doc`). With --resume, the
    checkpoint's settings are the defaults flags override, except the run's name when another script wrote it
    (deflow_o2o.py going online from a deflow_offline.py run): this script's, or --exp-name."""
    description = doc.strip().split("\n")[0]
    args = tyro.cli(args_class, description=description)
    if not args.resume:
        return args, None
    checkpoint = load_checkpoint(args.resume)
    default = dataclasses.replace(saved_args(args_class, checkpoint), resume=args.resume)
    if checkpoint.get("script", Path(sys.argv[0]).name) != Path(sys.argv[0]).name:
        default.exp_name = args.exp_name
    return tyro.cli(args_class, default=default, description=description), checkpoint


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


def save_checkpoint(path: Path, state: dict) -> None:  # and the script that wrote it (see parse_args)
    atomic_write(path, lambda f: torch.save({**state, "script": Path(sys.argv[0]).name}, f))


def rng_state(log_rng: torch.Generator) -> dict:  # torch's global streams (training) and log_rng (logging)
    cuda = torch.cuda.get_rng_state(log_rng.device) if log_rng.device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "log": log_rng.get_state()}


def restore(checkpoint: dict, path: str, agent: torch.nn.Module, optimizer, log_rng: torch.Generator) -> int:
    """Load a checkpoint's agent, optimizer and random streams (rng_state); return the step to continue from."""
    try:
        agent.load_state_dict(checkpoint["agent"])
    except RuntimeError as e:
        sys.exit(f"error: checkpoint {path} does not fit this environment/network: {' '.join(str(e).split())[:400]}")
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if checkpoint["rng"].get("cuda") is not None and log_rng.device.type == "cuda":
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], log_rng.device)
    if checkpoint["rng"].get("log") is not None:  # (older checkpoints have none)
        log_rng.set_state(checkpoint["rng"]["log"])
    return checkpoint["step"] + 1


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
        self.wandb = None
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

    def videos(self, videos: dict, step: int) -> None:  # {episode: frames} -> videos/*.mp4
        if videos:
            from common.video import write_videos

            write_videos(self.dir / "videos", videos, step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def check_compiler(device: torch.device) -> None:
    """--compile needs a C++ compiler (CPU) or Triton (CUDA): one clear line, not a traceback, when it is missing."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1, device=device))
    except torch._dynamo.exc.BackendCompilerFailed as e:
        sys.exit(f"error: torch.compile does not work here ({str(e).strip().splitlines()[0]}); "
                 f"run with --no-compile (the eager code: the same results, slower)")
    print("--compile: the first update and the first logging step compile first (a minute or so each)")


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

"""A run's command line and files, the same for the three scripts; none of it is DeFlow.

Every file is written atomically (a temporary file, then a rename) or as whole appended CSV lines, so a crash or a
kill never leaves a half-written checkpoint, args.json or video behind.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import tyro


def parse_args(args_class, description: str):
    """tyro's command line; with --resume, the checkpoint's settings are the defaults that flags still override.
    Returns (args, checkpoint or None). Settings a checkpoint holds that `args_class` has no field for are dropped."""
    args = tyro.cli(args_class, description=description)
    if not args.resume:
        return args, None
    checkpoint = load_checkpoint(args.resume)
    default = dataclasses.replace(saved_args(args_class, checkpoint), resume=args.resume)
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


def write_json(path: Path, value) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=2).encode()))


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def rng_state(device: torch.device, log_rng: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "log": log_rng.get_state()}


def restore(checkpoint: dict, path: str, agent: torch.nn.Module, optimizer, device: torch.device,
            log_rng: torch.Generator) -> int:
    """Load a checkpoint's agent, optimizer and random streams (training and logging); return the step to continue
    from."""
    try:
        agent.load_state_dict(checkpoint["agent"])
    except RuntimeError as e:
        sys.exit(f"error: checkpoint {path} does not fit this environment/network: {' '.join(str(e).split())[:400]}")
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    if checkpoint["rng"].get("log") is not None:  # (checkpoints of older versions have none)
        log_rng.set_state(checkpoint["rng"]["log"])
    return checkpoint["step"] + 1


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
    """On resume, drop the rows logged after the checkpoint, so that the logs stay one consistent history."""
    if not path.exists():
        return
    with open(path) as f:
        rows = list(csv.DictReader(f))
        fields = list(rows[0]) if rows else []
    kept = [r for r in rows if int(r["step"]) <= last_step]
    if not kept:
        path.unlink()
        return
    lines = [",".join(fields)] + [",".join(r[k] for k in fields) for r in kept]
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


class RunLog:
    """The run directory: <run_root>/<env>__<exp_name>__<seed>__<time>/ for a new run, the checkpoint's folder on
    resume (its CSVs cut back to the checkpoint's step). Holds args.json, train.csv, eval.csv, checkpoint.pt, videos/;
    rows also go to Weights & Biases with --track."""

    def __init__(self, args, env_label: str, resume_step: int | None = None):
        if resume_step is not None:
            self.dir = Path(args.resume).parent
            for name in ("train.csv", "eval.csv"):
                truncate_csv(self.dir / name, resume_step)
        else:
            self.dir = Path(args.run_dir) / f"{env_label}__{args.exp_name}__{args.seed}__{int(time.time())}"
            self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "args.json", dataclasses.asdict(args))
        self.wandb = None
        if args.track:
            import wandb

            self.wandb = wandb
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=self.dir.name, id=self.dir.name,
                       config=dataclasses.asdict(args), dir=str(self.dir), resume="allow")

    def json(self, name: str, value) -> None:
        write_json(self.dir / name, value)

    def write(self, csv_name: str, row: dict, step: int) -> None:
        append_csv(self.dir / csv_name, {"step": step, **row})
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def videos(self, videos: dict[int, np.ndarray], step: int) -> None:
        for episode, frames in videos.items():
            (self.dir / "videos").mkdir(exist_ok=True)
            write_video(self.dir / "videos" / f"step{step:08d}_episode{episode}.mp4", frames)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def check_compiler(device: torch.device) -> None:
    """--compile needs a C++ compiler (CPU) or Triton (CUDA): a one-line function compiled first turns a missing one
    into one clear line instead of a traceback at the first update. Then it says what compiling will cost."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1, device=device))
    except torch._dynamo.exc.BackendCompilerFailed as e:
        sys.exit(f"error: torch.compile does not work here ({str(e).strip().splitlines()[0]}); "
                 f"run with --no-compile (the eager code: the same results, slower)")
    print("--compile: the first update and the first logging step compile first (a minute or so each; --no-compile "
          "skips this)")


class NonFiniteWatch:
    """Records, on the device and without a host sync, the first step at which each loss term became NaN or inf;
    `check` reads that at log and save steps and stops the run naming the step and the term (before anything from a
    non-finite step is saved)."""

    def __init__(self, skip: tuple[str, ...] = ()):
        self.skip, self.names, self.first_bad = skip, None, None  # skip: terms that only some steps have

    def update(self, metrics: dict[str, torch.Tensor], step: int) -> None:
        if self.names is None:
            self.names = [name for name in metrics if name not in self.skip]
        values = torch.stack([metrics[name] for name in self.names])
        if self.first_bad is None:
            self.first_bad = torch.zeros_like(values, dtype=torch.long)
        self.first_bad = torch.where((self.first_bad == 0) & ~torch.isfinite(values), step, self.first_bad)

    def check(self, run_dir: Path) -> None:
        if self.first_bad is None or not self.first_bad.any():
            return
        bad = sorted((int(s), name) for s, name in zip(self.first_bad.tolist(), self.names) if s > 0)
        step, name = bad[0]
        sys.exit(f"error: training/{name} became non-finite at step {step} (non-finite since: "
                 f"{', '.join(f'{n} at {s}' for s, n in bad)}). Nothing was saved after step {step}; the last "
                 f"checkpoint in {run_dir} (if any) is intact. Check the dataset for NaNs or lower --lr.")

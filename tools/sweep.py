"""Many runs: one script over tasks x seeds, on this machine or a SLURM cluster, through submitit.

    python -m tools.sweep --script deflow_offline.py --env-names cube-single-play --seeds 0 1 2 --jobs 2 \\
        --recipe paper -- --offline-steps 100000         # flags after -- go to every run unchanged
    python -m tools.sweep ... --executor slurm --partition gpu --gpus-per-job 1 --time-min 1440
    python -m tools.sweep ... --dry-run                 # print the commands only

Each job is the script's own command line (printed by --dry-run; runnable by hand). Job (task, seed) lives in
<sweep-dir>/<script>/<task>/seed<seed>/: the run directory the script makes there, and log.txt (the script's output).
A job that ended well leaves a file `finished` there. Rerunning the same sweep skips finished jobs, resumes a job
that has a checkpoint (--resume, exactly, as the scripts do) and starts the rest afresh (a run directory without a
checkpoint is moved to abandoned/ first). --save-interval makes the jobs checkpoint often enough to resume.

Local: --jobs at a time, each with the cores this process may use split between them (OMP_NUM_THREADS; `taskset -c 1
python -m tools.sweep ...` keeps a sweep on core 1), or with one GPU each when GPUs are visible (CUDA_VISIBLE_DEVICES).
SLURM: one job array, --jobs of its jobs at a time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import tyro

from tools import recipes, require

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Args:
    script: str = "deflow_offline.py"
    """the script every job runs (deflow_offline.py, deflow_o2o.py or deflow_pixels.py)"""
    env_names: tuple[str, ...] = ("cube-single-play",)
    """tasks; an OGBench dataset name without a task (cube-double-play) means its 5 tasks, D4RL/antmaze and
    D4RL/adroit their D4RL datasets"""
    seeds: tuple[int, ...] = (0,)
    """seeds of every task"""
    recipe: Literal["none", "paper"] = "none"
    """paper: each task's paper settings (discount, q-agg, target divergence; 500k updates for pixels and D4RL);
    flags after -- still override them"""
    sweep_dir: str = "sweeps/sweep"
    """where the jobs' run directories and logs go (rerun with the same folder to skip or resume)"""
    executor: Literal["local", "slurm"] = "local"
    """local: this machine; slurm: a SLURM cluster (sbatch through submitit)"""
    jobs: int = 1
    """jobs running at a time (SLURM: the job array's parallelism)"""
    save_interval: int = 50_000
    """checkpoint every this many updates (what a rerun resumes from)"""
    start_from: Optional[str] = None
    """another sweep's folder: each job starts from the deflow_offline.py checkpoint of its task and seed there
    (deflow_o2o.py goes online in a run folder of its own; deflow_offline.py continues a copy of that run, e.g. as an
    offline-only control: give it the larger --offline-steps after --)"""
    extend: bool = False
    """resume finished jobs too: with a larger --offline-steps or --online-steps after --, they run longer"""
    dry_run: bool = False
    """print the commands and exit"""
    poll_seconds: float = 10.0
    """how often the progress line is updated"""
    time_min: int = 7 * 24 * 60
    """time limit of each job in minutes (local and SLURM)"""
    partition: Optional[str] = None
    """SLURM partition (None: the cluster's default)"""
    gpus_per_job: int = 1
    """SLURM: GPUs per job"""
    cpus_per_job: int = 8
    """SLURM: CPUs per job"""
    mem_gb: int = 32
    """SLURM: memory per job in GB"""


@dataclasses.dataclass
class Job:
    env_name: str
    seed: int
    job_dir: Path
    command: list[str]
    state: str  # "finished", "resume" or "new"
    copy_from: Optional[str] = None  # --start-from with deflow_offline.py: the run folder to continue a copy of


def plan(args: Args, extra: list[str]) -> list[Job]:
    """One Job per task and seed, in the order given, with its command and its state on disk."""
    script = Path(args.script)
    if not (ROOT / script.name).exists() and not script.exists():
        sys.exit(f"error: no script {args.script} (deflow_offline.py, deflow_o2o.py or deflow_pixels.py)")
    jobs = []
    for env_name in recipes.expand(list(args.env_names)):
        recipe = []
        if args.recipe == "paper":
            try:
                recipe = recipes.recipe_flags(env_name)
            except KeyError as e:
                sys.exit(f"error: {e.args[0]}")
        for seed in args.seeds:
            job_dir = Path(args.sweep_dir).resolve() / script.stem / env_name.replace("/", "-") / f"seed{seed}"
            command = [sys.executable, str(ROOT / script.name), "--env-name", env_name, "--seed", str(seed),
                       "--run-dir", str(job_dir), "--save-interval", str(args.save_interval), *recipe, *extra]
            checkpoints = checkpoints_in(job_dir)
            finished = (job_dir / "finished").exists() and not args.extend
            state = "finished" if finished else "resume" if checkpoints else "new"
            copy_from = None
            if state == "new" and args.start_from:  # from another sweep's deflow_offline.py checkpoint
                source = start_checkpoint(args.start_from, env_name, seed)
                checkpoints = [source]
                if script.stem == "deflow_offline":  # continue a copy: the source run stays as it ended
                    copy_from, checkpoints = str(source.parent), [job_dir / source.parent.name / "checkpoint.pt"]
            if checkpoints and state != "finished":
                command += ["--resume", str(checkpoints[-1])]
            jobs.append(Job(env_name, seed, job_dir, command, state, copy_from))
    return jobs


def checkpoints_in(job_dir: Path) -> list[Path]:
    """The checkpoints of a job folder's run folders, oldest first."""
    return sorted(job_dir.glob("*/checkpoint.pt"), key=os.path.getmtime)


def start_checkpoint(sweep_dir: str, env_name: str, seed: int) -> Path:
    """--start-from: the latest deflow_offline.py checkpoint of (task, seed) in another sweep's folder."""
    folder = Path(sweep_dir).resolve() / "deflow_offline" / env_name.replace("/", "-") / f"seed{seed}"
    sources = checkpoints_in(folder)
    if not sources:
        sys.exit(f"error: --start-from {sweep_dir}: no deflow_offline.py checkpoint of {env_name} seed {seed} in "
                 f"{folder} (run that sweep first)")
    return sources[-1]


def run_job(command: list[str], job_dir: str, env: dict[str, str], copy_from: str | None = None) -> str:
    """What a submitit job runs: the script's command line, its output appended to log.txt; `finished` on success.
    copy_from: a run folder copied into job_dir first (the --resume in the command points into the copy)."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    if copy_from and not (job_dir / Path(copy_from).name).exists():  # copied whole or not at all
        shutil.copytree(copy_from, job_dir / "copying", dirs_exist_ok=True)
        os.replace(job_dir / "copying", job_dir / Path(copy_from).name)
    for run in [p for p in job_dir.iterdir() if p.is_dir() and p.name not in ("abandoned", "copying")]:
        if not (run / "checkpoint.pt").exists():  # runs that never wrote a checkpoint are set aside
            (job_dir / "abandoned").mkdir(exist_ok=True)
            shutil.move(str(run), job_dir / "abandoned" / run.name)
    with open(job_dir / "log.txt", "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, **env}).returncode
    if returncode != 0:
        raise RuntimeError(f"exit {returncode}; see {job_dir / 'log.txt'}")
    (job_dir / "finished").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return str(job_dir)


def local_resources(jobs: int) -> list[dict[str, str]]:
    """The environment of each of `jobs` slots: one GPU each when GPUs are visible, else a share of the cores."""
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        gpus = 0
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": str(slot % gpus)} for slot in range(jobs)]
    threads = str(max(1, len(os.sched_getaffinity(0)) // jobs))  # the cores this process may use (taskset -c)
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(jobs)]


def make_executor(args: Args):
    import submitit

    try:
        executor = submitit.AutoExecutor(folder=Path(args.sweep_dir) / "submitit", cluster=args.executor)
    except RuntimeError as e:  # e.g. --executor slurm where there is no srun
        sys.exit(f"error: {e} (--executor local runs the sweep on this machine)")
    executor.update_parameters(timeout_min=args.time_min, name=f"deflow-{Path(args.sweep_dir).name}")
    if args.executor == "slurm":
        executor.update_parameters(gpus_per_node=args.gpus_per_job, cpus_per_task=args.cpus_per_job,
                                   mem_gb=args.mem_gb, slurm_array_parallelism=args.jobs)
        if args.partition is not None:
            executor.update_parameters(slurm_partition=args.partition)
    return executor


def succeeded(handle) -> bool:
    """Whether a finished submitit job ended well (a job killed from outside has no result at all)."""
    try:
        return handle.exception() is None
    except Exception:  # submitit.core.utils.UncompletedJobError and the like
        return False


def run(args: Args, jobs: list[Job]) -> int:
    """Run the unfinished jobs; print done / running / failed while waiting. Returns the number of failed jobs."""
    import submitit

    todo = [job for job in jobs if job.state != "finished"]
    print(f"{len(jobs)} jobs: {len(jobs) - len(todo)} finished before (skipped), "
          f"{sum(j.state == 'resume' for j in todo)} to resume, {sum(j.state == 'new' for j in todo)} to start "
          f"({args.executor}, {args.jobs} at a time); logs in <sweep-dir>/<script>/<task>/seed<seed>/log.txt")
    executor = make_executor(args)
    waiting, active = list(todo), []  # active: (submitit job, Job, local slot)
    if args.executor == "slurm":  # one job array; SLURM keeps --jobs of them running
        env = {"OMP_NUM_THREADS": str(args.cpus_per_job)}
        try:
            with executor.batch():
                active = [(executor.submit(run_job, job.command, str(job.job_dir), env, job.copy_from), job, None)
                          for job in todo]
        except submitit.core.utils.FailedJobError as e:  # sbatch said no
            sys.exit(f"error: SLURM refused the job array ({' '.join(str(e).split())[-300:]}). Check --partition, "
                     "--gpus-per-job (0 on a partition without GPUs), --cpus-per-job, --mem-gb and --time-min.")
        if active:
            print(f"submitted SLURM job array {active[0][0].job_id.split('_')[0]}", flush=True)
        waiting = []
    slots = local_resources(args.jobs) if args.executor == "local" else []
    done, failed, last_line = len(jobs) - len(todo), [], None
    while waiting or active:
        for entry in [entry for entry in active if entry[0].done()]:
            active.remove(entry)
            if succeeded(entry[0]):
                done += 1
            else:
                failed.append(entry[1])
        busy = {slot for *_, slot in active}
        for slot in [s for s in range(args.jobs) if s not in busy][: len(waiting)]:  # local: refill at once
            job = waiting.pop(0)
            handle = executor.submit(run_job, job.command, str(job.job_dir), slots[slot], job.copy_from)
            active.append((handle, job, slot))
        counts = {"done": done, "running": len(active), "failed": len(failed), "waiting": len(waiting)}
        if args.executor == "slurm":  # SLURM knows which ones run; without accounting (sacct) it may not say
            states = [handle.state for handle, *_ in active]
            counts.update(running=states.count("RUNNING"), waiting=sum(s in ("PENDING", "REQUEUED") for s in states))
            counts["state unknown"] = len(states) - counts["running"] - counts["waiting"]
        line = ", ".join(f"{n} {name}" for name, n in counts.items())
        if line != last_line:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last_line = line
        if waiting or active:
            time.sleep(args.poll_seconds)
    for job in failed:
        print(f"failed: {job.env_name} seed {job.seed}: see {job.job_dir / 'log.txt'}")
    return len(failed)


def main(argv: list[str]) -> None:
    split = argv.index("--") if "--" in argv else len(argv)
    args = tyro.cli(Args, args=argv[:split], description=__doc__.split("\n\n")[0])
    extra = argv[split + 1 :]
    if "--dry-run" in extra:  # after --, it would go to every job's script, which would start for real (and fail)
        sys.exit("error: --dry-run is the launcher's flag: put it before --")
    require("submitit")
    jobs = plan(args, extra)
    if args.dry_run:
        for job in jobs:
            print(f"[{job.state}] {' '.join(job.command)}")
        return
    sys.exit(1 if run(args, jobs) else 0)


if __name__ == "__main__":
    main(sys.argv[1:])

"""A run's life (the scripts' run part): checkpoints written by default, killed and resumed exactly, what a resume may change,
checkpoints moving between device types, the precision choices, and counts a user can get wrong."""

import dataclasses
import re
import sys
from types import SimpleNamespace

import pytest
import torch

import deflow_o2o
import deflow_offline
import deflow_pixels
from deflow_offline import checkpoint_due, parse_args, setup
from tests.conftest import TINY_FLAGS, random_batch, read_csv, run_script, run_straight_and_killed, tiny_agent
from tests.test_pixels import pixel_batch, tiny_agent as tiny_pixel_agent

ENV = "cube-single-play-singletask-task1-v0"


def numbers(run_dir):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_csv(run_dir / "train.csv")]


def agent_state(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["agent"]


def same_agent(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_every_tenth_of_the_run_at_the_end_and_every_30_minutes(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(deflow_offline.time, "monotonic", lambda: clock[0])
    due = lambda interval, total: [s for s in range(1, total + 1) if checkpoint_due(  # noqa: E731
        SimpleNamespace(save_interval=interval), s, s == total, total, clock[0])]
    assert due(None, 1000) == list(range(100, 1001, 100))  # the default: a tenth of the run
    assert due(None, 25) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25] and due(None, 7) == list(range(1, 8))
    assert due(300, 1000) == [300, 600, 900, 1000] and due(0, 1000) == [1000]
    args, last_save = SimpleNamespace(save_interval=None), clock[0]
    assert not checkpoint_due(args, 1, False, 1000, last_save)
    clock[0] += 30 * 60 + 1  # half an hour since the last one: now (the loop then restarts the clock)
    assert checkpoint_due(args, 7, False, 1000, last_save) and not checkpoint_due(args, 8, False, 1000, clock[0])
    never = SimpleNamespace(save_interval=0)
    clock[0] += 3600
    assert not checkpoint_due(never, 7, False, 1000, last_save) and checkpoint_due(never, 1000, True, 1000, last_save)


def test_a_default_run_killed_midway_loses_at_most_a_tenth_and_resumes_exactly(tmp_path, cube_dataset):
    """No --save-interval: killed (SIGKILL) after its 300th update, the run has a checkpoint at a multiple of a tenth
    of its 1000 updates, and resuming it ends with the numbers and agent of a run never interrupted."""
    flags = ["--env-name", ENV, "--dataset-path", cube_dataset, "--offline-steps", 1000, "--log-interval", 100,
             "--eval-interval", 0, *TINY_FLAGS]
    straight, killed = run_straight_and_killed(tmp_path, flags, "step 300:")
    step = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert step % 100 == 0 and 200 <= step < 1000, step
    assert "resuming" in run_script("--resume", killed / "checkpoint.pt").stdout
    assert numbers(killed) == numbers(straight) and same_agent(agent_state(killed), agent_state(straight))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, cube_dataset):
    """20 updates, checkpointed at 10 and 20."""
    root = tmp_path_factory.mktemp("runs")
    run_script("--env-name", ENV, "--dataset-path", cube_dataset, "--run-dir", root, "--offline-steps", 20,
               "--log-interval", 10, "--eval-interval", 0, *TINY_FLAGS)
    (run_dir,) = root.iterdir()
    return run_dir


def files_of(run_dir):
    return {p.name: p.read_bytes() for p in run_dir.iterdir()}


def test_a_resume_that_changes_the_task_is_refused_before_touching_the_run(short_run):
    before = files_of(short_run)
    result = run_script("--resume", short_run / "checkpoint.pt", "--env-name",
                        "cube-single-play-singletask-task2-v0", "--offline-steps", 30, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert ("--env-name cannot change on resume (the run's is cube-single-play-singletask-task1-v0, given "
            "cube-single-play-singletask-task2-v0)") in result.stderr
    assert files_of(short_run) == before


@pytest.mark.parametrize("flags, message", [
    (["--seed", "3"], "--seed cannot change on resume (the run's is 0, given 3)"),
    (["--value-hidden-dims", "64", "64"], "--value-hidden-dims cannot change on resume (the run's is (32, 32), given "
                                          "(64, 64))"),
    (["--discount", "0.995"], "--discount cannot change"),
    (["--q-agg", "min"], "--q-agg cannot change"),
    (["--batch-size", "64"], "--batch-size cannot change"),
    (["--target-divergence", "auto"], "--target-divergence cannot change"),
])
def test_flags_a_resume_may_not_change(short_run, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(sys, "argv", ["deflow_offline.py", "--resume", str(short_run / "checkpoint.pt"), *flags])
    with pytest.raises(SystemExit) as exit_:
        parse_args()
    assert message in str(exit_.value)


def test_flags_a_resume_may_change_and_lr_reaches_adam(short_run, tmp_path):
    """Steps, intervals, device, compile, precision, evaluation, --lr: the new --lr is Adam's from the first update."""
    copy = tmp_path / short_run.name
    copy.mkdir()
    for name, data in files_of(short_run).items():
        (copy / name).write_bytes(data)
    result = run_script("--resume", copy / "checkpoint.pt", "--offline-steps", 25, "--lr", 0.01, "--log-interval", 5,
                        "--save-interval", 0, "--device", "cpu", "--precision", "float32", "--eval-interval", 25,
                        "--eval-episodes", 1, "--dataset-dir", tmp_path)
    assert "--lr 0.01 replaces the checkpoint's 0.0003" in result.stdout
    checkpoint = torch.load(copy / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 25 and checkpoint["args"]["lr"] == 0.01
    assert [group["lr"] for group in checkpoint["optimizer"]["param_groups"]] == [0.01]


def test_a_resume_on_other_data_is_refused(short_run, cube_dataset, tmp_path):
    """The dataset may move (--dataset-path is free to change), but it must be the run's: another file is refused."""
    import shutil

    other = tmp_path / "other.npz"
    shutil.copy(cube_dataset.with_name(cube_dataset.stem + "-val.npz"), other)  # the validation file as training data
    shutil.copy(cube_dataset.with_name(cube_dataset.stem + "-val.npz"), tmp_path / "other-val.npz")
    before = files_of(short_run)
    result = run_script("--resume", short_run / "checkpoint.pt", "--offline-steps", 30, "--dataset-path", other,
                        check=False)
    assert result.returncode != 0 and "was trained on other data (118 + " in result.stderr
    assert "Traceback" not in result.stderr and files_of(short_run) == before


def test_a_checkpoint_of_another_device_type_resumes_and_says_what_restarts(short_run, tmp_path):
    """A checkpoint whose random streams are CUDA's (a CUDA generator state is 16 bytes, a CPU one 5056) resumes on
    the CPU: one line says the streams restart, seeded by (seed, step), and two such resumes give the same numbers."""
    checkpoint = torch.load(short_run / "checkpoint.pt", weights_only=True)
    checkpoint["rng"]["log"] = checkpoint["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    resumed = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for file, data in files_of(short_run).items():
            (tmp_path / name / file).write_bytes(data)
        torch.save(checkpoint, tmp_path / name / "checkpoint.pt")
        result = run_script("--resume", tmp_path / name / "checkpoint.pt", "--offline-steps", 30)
        assert "was written on another device type: random number generator states do not carry over, so " \
               "training and logging continue from new streams seeded by (seed, step 20)" in result.stdout
        resumed.append(tmp_path / name)
    assert numbers(resumed[0]) == numbers(resumed[1]) and len(numbers(resumed[0])) == 3
    assert same_agent(agent_state(resumed[0]), agent_state(resumed[1]))


def test_an_o2o_training_episode_from_another_device_type_starts_anew(capsys):
    from deflow_o2o import resume_episode

    saved = {"done": False, "obs": torch.zeros(1), "seed": 3, "ret": 0.5, "started": 2, "exploration": {},
             "actions": torch.zeros(4, 1), "noise": torch.zeros(16, dtype=torch.uint8)}  # a CUDA generator's state
    episode = resume_episode(None, saved, torch.device("cpu"))
    assert episode.done and episode.started == 2
    assert "noise stream was on another device type; starting a new episode" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--eval-episodes", "0"], "--eval-episodes must be in [1, inf) (got 0); --eval-interval 0 turns evaluation off"),
    (["--eval-envs", "0"], "--eval-envs must be in [1, inf) (got 0)"),
    (["--batch-size", "0"], "--batch-size must be in [1, inf) (got 0)"),
    (["--flow-steps", "0"], "--flow-steps must be in [1, inf) (got 0)"),
    (["--offline-steps", "-5"], "--offline-steps must be in [0, inf) (got -5)"),
    (["--log-interval", "-1"], "--log-interval must be in [0, inf) (got -1)"),
    (["--save-interval", "-1"], "--save-interval must be in [0, inf) (got -1)"),
    (["--actor-hidden-dims", "64", "0"], "--actor-hidden-dims must be in [1, inf) (got 0)"),
])
def test_bad_counts_are_one_line(monkeypatch, flags, message):
    monkeypatch.setattr(sys, "argv", ["deflow_offline.py", *flags])
    with pytest.raises(SystemExit) as exit_:
        parse_args()
    assert str(exit_.value) == f"error: {message}"


def test_bad_counts_of_the_other_scripts(monkeypatch):
    for script, flags, message in ((deflow_o2o, ["--online-steps", "-1"], "--online-steps must be in [0, inf)"),
                                   (deflow_o2o, ["--buffer-size", "0"], "--buffer-size must be in [1, inf)"),
                                   (deflow_pixels, ["--frame-stack", "0"], "--frame-stack must be in [1, inf)"),
                                   (deflow_pixels, ["--p-aug", "1.5"], "--p-aug must be in [0, 1] (got 1.5)")):
        monkeypatch.setattr(sys, "argv", [script.__name__ + ".py", *flags])
        with pytest.raises(SystemExit, match=re.escape(message)):
            script.parse_args()


def test_eval_episodes_zero_end_to_end_is_one_line():
    result = run_script("--env-name", ENV, "--eval-episodes", 0, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: --eval-episodes must be in [1, inf) (got 0); "
                                                      "--eval-interval 0 turns evaluation off")


def test_precision_sets_tf32_on_cuda_only_unless_strict(capsys, monkeypatch):
    """--precision tf32 (the default) turns TF32 on for CUDA's matmuls and convolutions, as JAX computes float32 on a
    GPU; float32 turns it off; a CPU has no TF32. (Only the backend flags are set here: no GPU needed.)"""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # (no CUDA memory is touched)
    try:
        for precision, device, tf32 in (("tf32", "cuda", True), ("float32", "cuda", False), ("bf16", "cuda", True),
                                        ("tf32", "cpu", False)):
            assert setup(SimpleNamespace(seed=0, device=device, precision=precision)) == torch.device(device)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
            line = capsys.readouterr().out
            assert line.startswith(f"--precision {precision} on {device}: ") and ("TF32" in line) == tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert deflow_offline.Args().precision == deflow_o2o.Args().precision == deflow_pixels.Args().precision == "tf32"


@pytest.mark.parametrize("script", [deflow_offline, deflow_o2o, deflow_pixels])
def test_bf16_keeps_q_and_every_loss_in_float32(script):
    """--precision bf16 runs matmuls in bfloat16 (autocast), but the critic's outputs, Q and every loss and metric
    are float32: Q of about -80 in bfloat16 would move in steps of 0.25-0.5."""
    if script is deflow_pixels:
        agent, args = tiny_pixel_agent(precision="bf16")
        batch = pixel_batch()
        features = agent.critic_encoder(batch["observations"])
    else:
        agent, args = tiny_agent(script=script, precision="bf16")
        batch = random_batch()
        features = batch["observations"]
    with torch.no_grad():
        agent.critic.net[-1].bias.fill_(-80.0)
    with torch.autocast("cpu", torch.bfloat16):
        qs = agent.critic(features, batch["actions"])
        hidden = agent.critic.net[0](torch.cat([features, batch["actions"]], -1).expand(2, -1, -1))
    assert hidden.dtype == torch.bfloat16  # autocast is on: the matmuls run in bfloat16
    assert qs.dtype == torch.float32 and len(set(qs.flatten().tolist())) > 8  # not rounded to a bfloat16 grid
    draws = script.update_draws(*batch["actions"].shape, torch.device("cpu"), mse_rng=torch.Generator())
    with torch.autocast("cpu", torch.bfloat16):  # as the scripts' loop runs the losses under --precision bf16
        loss, metrics = script.deflow_losses(agent, batch, draws, args)
    assert loss.dtype == torch.float32
    assert {name: value.dtype for name, value in metrics.items()} == dict.fromkeys(metrics, torch.float32)
    assert dataclasses.asdict(args)["precision"] == "bf16"

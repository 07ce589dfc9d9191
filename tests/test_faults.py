"""Faults and bad input, as an adversarial user brings them: each is refused in one line before any file is touched
(every file of the run folder stays as it was), or, for a kill, the resumed run ends as one never interrupted.
docs/reliability.md lists them with what each gets."""

import fcntl
import os
import shutil
import sys

import pytest
import torch

import deflow_o2o
import deflow_offline
import deflow_pixels
from tests.conftest import TINY_FLAGS, read_csv, run_script, run_straight_and_killed

ENV = "cube-single-play-singletask-task1-v0"


def files_of(run_dir):
    return {p.name: p.read_bytes() for p in run_dir.iterdir()}


def refused(*flags, script="deflow_offline.py"):
    """The last line of a run that must fail cleanly."""
    result = run_script(*flags, script=script, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def numbers(run_dir, name="train.csv"):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_csv(run_dir / name)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, cube_dataset):
    """An offline run of 6 updates and an o2o run of 4 + 4 (checkpoints at every update), to copy and resume."""
    root = tmp_path_factory.mktemp("runs")
    flags = ["--env-name", ENV, "--dataset-path", cube_dataset, "--run-dir", root, "--log-interval", 2,
             "--eval-interval", 0, "--save-interval", 1, *TINY_FLAGS]
    run_script(*flags, "--offline-steps", 6, "--exp-name", "off")
    run_script(*flags, "--offline-steps", 4, "--online-steps", 4, "--exp-name", "o2o", script="deflow_o2o.py")
    return {name: next(root.glob(f"*__{name}__*")) for name in ("off", "o2o")}


@pytest.fixture
def run(base, tmp_path):
    """A fresh copy of a base run folder: {name: its folder}."""
    out = {}
    for name, source in base.items():
        shutil.copytree(source, tmp_path / source.name)
        out[name] = tmp_path / source.name
    return out


@pytest.mark.parametrize("flags, script, message", [
    (["--offline-steps", 9], "deflow_offline.py", "is a deflow_o2o.py run's checkpoint; resume it with deflow_o2o.py"),
    (["--offline-steps", 9], "deflow_pixels.py", "is a deflow_o2o.py run's checkpoint; resume it with deflow_o2o.py"),
    (["--run-dir", "elsewhere"], "deflow_o2o.py", "--run-dir cannot change on resume"),
    (["--exp-name", "other"], "deflow_o2o.py", "--exp-name cannot change on resume"),
    (["--offline-steps", 4, "--online-steps", 3], "deflow_o2o.py", "error: the run is at update 8: give at least 8"),
    (["--offline-steps", 6], "deflow_o2o.py", "--offline-steps cannot change once a run is online (it went online "
                                              "after update 4)"),
])
def test_an_o2o_checkpoint_refuses_what_it_cannot_do_and_keeps_its_files(run, flags, script, message):
    before = files_of(run["o2o"])
    assert message in refused("--resume", run["o2o"], *flags, script=script)
    assert files_of(run["o2o"]) == before


def test_an_offline_checkpoint_refuses_fewer_steps_and_other_validation_data(run, cube_dataset, tmp_path):
    before = files_of(run["off"])
    assert "the run is at update 6: give at least 6 updates" in refused("--resume", run["off"], "--offline-steps", 5)
    other = tmp_path / "data" / "same-train.npz"  # the same training file, other validation data
    other.parent.mkdir()
    shutil.copy(cube_dataset, other)
    shutil.copy(cube_dataset, other.with_name("same-train-val.npz"))
    line = refused("--resume", run["off"], "--offline-steps", 8, "--dataset-path", other)
    assert "was trained on other data" in line and files_of(run["off"]) == before


def test_resume_takes_a_run_folder_and_keeps_one_line_ending(run):
    result = run_script("--resume", run["off"], "--offline-steps", 8, "--log-interval", 1)
    assert "resuming" in result.stdout and torch.load(run["off"] / "checkpoint.pt", weights_only=True)["step"] == 8
    for name in ("train.csv", "args.json"):
        assert b"\r" not in (run["off"] / name).read_bytes()


def test_a_damaged_or_foreign_checkpoint_is_refused_in_one_line(run, tmp_path):
    data = bytearray((run["off"] / "checkpoint.pt").read_bytes())
    weight = torch.load(run["off"] / "checkpoint.pt", weights_only=True)["agent"]["flow.net.0.weight"]
    position = bytes(data).find(weight.flatten()[5:9].numpy().tobytes())
    assert position > 0
    data[position] ^= 1  # one bit inside a weight
    cases = {"changed": bytes(data), "truncated": bytes(data[: len(data) // 2])}
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    cases["foreign"] = (tmp_path / "foreign.pt").read_bytes()
    for case, content in cases.items():
        (run["off"] / "checkpoint.pt").write_bytes(content)
        before = files_of(run["off"])
        line = refused("--resume", run["off"] / "checkpoint.pt", "--offline-steps", 9)
        assert "is corrupt or not a DeFlow checkpoint" in line, case
        assert ("CRC-32 mismatch" in line) == (case == "changed") and files_of(run["off"]) == before
    assert "does not exist" in refused("--resume", tmp_path / "nothing")


def test_a_second_process_on_a_run_is_refused_and_a_killed_owner_leaves_no_lock(run):
    with open(run["off"] / "lock", "a+") as lock:  # this test process holds the run, as a running script would
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        print(12345, file=lock, flush=True)
        before = files_of(run["off"])
        line = refused("--resume", run["off"], "--offline-steps", 8)
        assert line == f"error: the run {run['off']} is in use by process 12345; let it end or stop it first"
        assert files_of(run["off"]) == before
    assert "resuming" in run_script("--resume", run["off"], "--offline-steps", 7).stdout  # released: it runs


def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(deflow_offline.time, "time", lambda: 1.8e9)  # one second for both
    args = deflow_offline.Args(run_dir=str(tmp_path), env_name=ENV)
    first, second = deflow_offline.Logger(args), deflow_offline.Logger(args)
    assert first.dir != second.dir and first.dir.name.startswith(f"{ENV}__deflow_offline__0__1800000000_")
    assert sorted(p.name for p in first.dir.iterdir()) == ["args.json", "lock"]
    umask = os.umask(0o022)  # folders as mkdir makes them (tempfile.mkdtemp's alone would be 0o700)
    try:
        assert os.stat(deflow_offline.Logger(args).dir).st_mode & 0o777 == 0o755
    finally:
        os.umask(umask)


def test_a_checkpoint_never_holds_a_nan(run):
    """--lr 1e39 overflows float32 in Adam's step: the weights after update 7 are inf. The checkpoint of update 6
    stays, byte for byte, and the line names it."""
    before = files_of(run["off"])
    line = refused("--resume", run["off"], "--offline-steps", 9, "--lr", "1e39")
    assert line.startswith("error: at update 7, ") and "are NaN or inf: not saved" in line
    assert f"the last good checkpoint: {run['off']}/checkpoint.pt, of update 6" in line
    assert files_of(run["off"])["checkpoint.pt"] == before["checkpoint.pt"]


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed must be in [0, 4294967295] (got -1)"),
    (["--seed", "4294967296"], "--seed must be in [0, 4294967295] (got 4294967296)"),
    (["--lr", "nan"], "--lr must be in (0, inf) (got nan)"),
    (["--lr", "inf"], "--lr must be in (0, inf) (got inf)"),
    (["--lr", "-1"], "--lr must be in (0, inf) (got -1.0)"),
    (["--discount", "1.5"], "--discount must be in (0, 1] (got 1.5)"),
    (["--discount", "-1"], "--discount must be in (0, 1] (got -1.0)"),
    (["--tau", "2"], "--tau must be in (0, 1] (got 2.0)"),
    (["--tau", "-0.5"], "--tau must be in (0, 1] (got -0.5)"),
    (["--target-divergence", "-1"], "--target-divergence must be in [0, inf) (got -1.0)"),
    (["--iav-scale", "-1"], "--iav-scale must be in (0, inf) (got -1.0)"),
    (["--alpha", "-5"], "--alpha must be in [0, inf) (got -5.0)"),
    (["--actor-hidden-dims"], "--actor-hidden-dims needs at least one width"),
])
def test_a_meaningless_flag_is_one_line(monkeypatch, flags, message):
    monkeypatch.setattr(sys, "argv", ["deflow_offline.py", *flags])
    with pytest.raises(SystemExit) as exit_:
        deflow_offline.parse_args()
    assert str(exit_.value) == f"error: {message}"


@pytest.mark.parametrize("device", ["gpu", "cuda", "cuda:1", "mps"])
def test_a_device_that_is_not_here_is_one_line(device):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = refused("--device", device, "--env-name", ENV)
    assert line == f"error: --device {device} is not here; give auto, cpu (no CUDA device is visible)"


@pytest.mark.parametrize("flags, script", [
    (["--batch-size", "10000000000"], "deflow_offline.py"),
    (["--value-hidden-dims", "10000000", "10000000"], "deflow_offline.py"),
    (["--buffer-size", "100000000000"], "deflow_o2o.py"),
])
def test_sizes_that_cannot_fit_say_what_they_need(tmp_path, cube_dataset, flags, script):
    line = refused("--env-name", ENV, "--dataset-path", cube_dataset, "--run-dir", tmp_path, *flags, script=script)
    assert " GiB on cpu, which has " in line and "GiB free; lower them or use another device" in line
    assert not list(tmp_path.iterdir())  # no run folder


def test_auto_on_the_resume_of_an_auto_run_is_the_run_s_delta(tmp_path, cube_dataset):
    flags = ["--env-name", ENV, "--dataset-path", cube_dataset, "--run-dir", tmp_path, "--offline-steps", 2,
             "--log-interval", 1, "--eval-interval", 0, "--target-divergence", "auto", "--iav-queries", 50, *TINY_FLAGS]
    run_script(*flags)
    (run_dir,) = tmp_path.iterdir()
    delta = torch.load(run_dir / "checkpoint.pt", weights_only=True)["args"]["target_divergence"]
    assert "resuming" in run_script("--resume", run_dir, "--offline-steps", 3, "--target-divergence", "auto").stdout
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["args"]["target_divergence"] == delta


def test_killed_during_an_evaluation_or_a_checkpoint_write_resumes_to_the_same_numbers(tmp_path, cube_dataset):
    """Killed as the evaluation of update 20 starts (after its log line), with a half-written checkpoint.pt.tmp left
    as a kill during the write leaves it: the resume continues from update 10 and ends as the straight run."""
    flags = ["--env-name", ENV, "--dataset-path", cube_dataset, "--offline-steps", 30, "--log-interval", 10,
             "--eval-interval", 10, "--eval-episodes", 2, "--save-interval", 10, *TINY_FLAGS]
    straight, killed = run_straight_and_killed(tmp_path, flags, "step 20: critic_loss")
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 10
    (killed / "checkpoint.pt.tmp").write_bytes((killed / "checkpoint.pt").read_bytes()[:1000])
    assert "at step 11" in run_script("--resume", killed).stdout
    assert numbers(killed) == numbers(straight) and read_csv(killed / "eval.csv") == read_csv(straight / "eval.csv")


@pytest.mark.parametrize("script", ["deflow_o2o.py", "deflow_pixels.py"])
def test_killed_o2o_mid_episode_and_pixels_resume_to_the_same_numbers(tmp_path, cube_dataset, visual_dataset, script):
    if script == "deflow_o2o.py":  # killed online, mid-episode (episodes are 200 steps), after update 60's log
        flags = ["--env-name", ENV, "--dataset-path", cube_dataset, "--offline-steps", 20, "--online-steps", 60,
                 "--buffer-size", 500, "--log-interval", 10, "--eval-interval", 0, "--save-interval", 10, *TINY_FLAGS]
        line = "step 70: critic_loss"
    else:
        flags = ["--env-name", "visual-cube-single-play-singletask-task1-v0", "--dataset-path", visual_dataset,
                 "--offline-steps", 6, "--log-interval", 2, "--save-interval", 2, "--eval-interval", 0,
                 "--encoder-stack-sizes", 4, 4, "--encoder-head-dims", 16, *TINY_FLAGS, "--batch-size", 8]
        line = "step 4: critic_loss"
    straight, killed = run_straight_and_killed(tmp_path, flags, line, script)
    run_script("--resume", killed, script=script)
    assert numbers(killed) == numbers(straight)


def test_every_script_checks_the_same_bounds(monkeypatch):
    for script in (deflow_o2o, deflow_pixels):
        monkeypatch.setattr(sys, "argv", [script.__name__ + ".py", "--tau", "0"])
        with pytest.raises(SystemExit, match=r"--tau must be in \(0, 1\] \(got 0.0\)"):
            script.parse_args()

"""Real OGBench data: oracle generation, loading through ogbench with single-task relabeling, and clear errors."""

import urllib.error

import numpy as np
import pytest

import ogbench.utils
from common.datasets import ACTION_CLIP_EPS, KEYS, DatasetError, load_env_and_datasets
from common.generate import generate_dataset, generation_target


def test_generated_file_has_the_official_format(cube_dataset):
    with np.load(cube_dataset) as f:
        assert sorted(f.keys()) == ["actions", "generation", "observations", "qpos", "qvel", "terminals"]
        assert f["observations"].shape == (120, 28) and f["actions"].shape == (120, 5)
        assert f["terminals"].dtype == bool and f["observations"].dtype == np.float32
        assert f["terminals"].nonzero()[0].tolist() == [59, 119]  # each episode ends with terminal = 1
    with np.load(str(cube_dataset).replace(".npz", "-val.npz")) as f:
        assert len(f["actions"]) == 60  # max(1, episodes // 10) validation episodes


def test_loads_with_single_task_relabeling(cube_dataset):
    env, train, val = load_env_and_datasets("cube-single-play-singletask-task1-v0", dataset_path=str(cube_dataset))
    assert sorted(train) == sorted(KEYS) and sorted(val) == sorted(KEYS)
    n = 2 * 59  # the last observation of each episode only serves as a next observation
    assert train["observations"].shape == (n, 28) and train["next_observations"].shape == (n, 28)
    assert train["actions"].shape == (n, 5) and train["rewards"].shape == (n,)
    np.testing.assert_array_equal(train["observations"][1:59], train["next_observations"][:58])
    assert set(np.unique(train["rewards"])) <= {-1.0, 0.0}  # cube-single: success - 1
    np.testing.assert_array_equal(train["masks"], -train["rewards"])  # mask = 1 - success
    assert np.abs(train["actions"]).max() <= 1 - ACTION_CLIP_EPS
    assert train["terminals"].nonzero()[0].tolist() == [58, 117]
    assert env.observation_space.shape == (28,)


def test_navigate_generation_and_relabeling(tmp_path):
    path = tmp_path / "pointmaze.npz"
    generate_dataset("pointmaze-medium-navigate-v0", episodes=1, out=path, episode_length=40, progress=False)
    _, train, _ = load_env_and_datasets("pointmaze-medium-navigate-singletask-v0", dataset_path=str(path))
    assert train["actions"].shape == (39, 2) and set(np.unique(train["rewards"])) <= {-1.0, 0.0}


def test_generation_does_not_depend_on_worker_count(tmp_path):
    one = generate_dataset("puzzle-3x3-play-v0", 2, tmp_path / "a.npz", num_workers=1, episode_length=15, progress=False)
    two = generate_dataset("puzzle-3x3-play-v0", 2, tmp_path / "b.npz", num_workers=2, episode_length=15, progress=False)
    for path_a, path_b in zip(one, two):
        with np.load(path_a) as a, np.load(path_b) as b:
            assert "button_states" in a and a["button_states"].dtype == np.int64
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_unknown_environment_lists_the_families():
    with pytest.raises(DatasetError, match="Supported families: antmaze, humanoidmaze"):
        load_env_and_datasets("cheetah-run-v0")
    with pytest.raises(DatasetError, match="Did you mean one of: cube-single-play-singletask-task1-v0"):
        load_env_and_datasets("cube-single-play-singletask-task9-v0")
    with pytest.raises(ValueError, match="trained experts"):
        generation_target("antmaze-large-navigate-singletask-v0")


def test_missing_local_file_prints_the_generation_command(tmp_path):
    path = tmp_path / "missing.npz"
    with pytest.raises(DatasetError, match=f"python -m tools.generate --env-name cube-double-play-v0 .*--out {path}"):
        load_env_and_datasets("cube-double-play-singletask-v0", dataset_path=str(path))


def test_no_network_names_both_fixes(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(ogbench.utils.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError, match="could not be downloaded") as error:
        load_env_and_datasets("scene-play-singletask-v0", dataset_dir=str(tmp_path))
    assert "python -m tools.generate --env-name scene-play-v0" in str(error.value)
    assert "--generate-episodes" in str(error.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded is left behind


def test_corrupt_file(tmp_path, cube_dataset):
    path = tmp_path / "broken.npz"
    path.write_bytes(cube_dataset.read_bytes()[:5000])  # a truncated download
    (tmp_path / "broken-val.npz").write_bytes(b"not a zip file")
    with pytest.raises(DatasetError, match="corrupt or not an OGBench dataset"):
        load_env_and_datasets("cube-single-play-singletask-v0", dataset_path=str(path))


def test_dataset_of_another_environment(tmp_path):
    path = tmp_path / "pointmaze.npz"
    generate_dataset("pointmaze-medium-navigate-v0", episodes=1, out=path, episode_length=10, progress=False)
    # A valid OGBench file, but for a 2-D point maze: the shapes are checked before relabeling can fail obscurely.
    with pytest.raises(DatasetError, match=r"observations of shape \(2,\).*but cube-single-play-singletask-v0 has observations \(28,\)"):
        load_env_and_datasets("cube-single-play-singletask-v0", dataset_path=str(path))


def test_non_finite_values_stop_at_load_naming_the_array(tmp_path, cube_dataset):
    path = tmp_path / "nan.npz"
    with np.load(cube_dataset) as f:
        arrays = dict(f)
    arrays["observations"][[3, 7]] = np.nan
    arrays["observations"][9, 0] = np.inf
    np.savez_compressed(path, **arrays)
    (tmp_path / "nan-val.npz").write_bytes(cube_dataset.with_name(cube_dataset.stem + "-val.npz").read_bytes())
    with pytest.raises(DatasetError) as e:
        load_env_and_datasets("cube-single-play-singletask-task1-v0", dataset_path=str(path))
    message = str(e.value)
    assert "'observations' has NaN or inf values in 3 of" in message and "first: row 3" in message
    assert str(path) in message and "\n" not in message

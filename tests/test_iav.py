"""Beyond the paper: the intrinsic action variance (common/iav.py) and --target-divergence auto."""

import json

import numpy as np
import pytest
import torch

from common.datasets import load_env_and_datasets
from common.iav import default_iav_scale, estimate_iav, knn_action_variance
from tests.conftest import TINY_FLAGS, run_script

ENV = "cube-single-play-singletask-task1-v0"


def test_chunked_search_equals_brute_force():
    g = np.random.default_rng(0)
    obs, actions = g.normal(size=(300, 4)), g.normal(size=(300, 3))
    dist = ((obs[:, None] - obs[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)  # the query itself is no neighbour
    expected = actions[np.argsort(dist, axis=1)[:, :5]].var(axis=1).mean(-1)
    got = knn_action_variance(torch.tensor(obs, dtype=torch.float32), torch.tensor(actions, dtype=torch.float32),
                              torch.arange(300), k=5, query_chunk=7, key_chunk=11)  # chunks that split everything
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_known_answer_with_the_query_excluded():
    # Two far-apart clusters of 6 identical states: each query's 5 neighbours are exactly the other 5 of its cluster.
    obs = np.concatenate([np.zeros((6, 2)), np.full((6, 2), 100.0)])
    actions = np.zeros((12, 2))
    actions[5, 0] = 1.0  # one odd action: 5 queries see {0, 0, 0, 0, 1} (variance 0.16), the odd one sees only 0s
    # (5 * 0.16 + 0) / 6 in cluster 1, 0 in cluster 2, then / 2 action dims (the second dimension never varies).
    assert estimate_iav(obs, actions, num_queries=0)["iav"] == pytest.approx((5 * 0.16 / 6) / 2 / 2, rel=1e-5)


@pytest.mark.parametrize("mode", ["gaussian", "two-mode"])
def test_known_variance_on_synthetic_data(mode):
    g = np.random.default_rng(1)
    obs = g.uniform(size=(20000, 2))
    smooth = np.sin(3 * obs)  # actions = f(state) + noise; neighbours are so close that f barely varies among them
    if mode == "gaussian":
        noise, variance = 0.1 * g.normal(size=smooth.shape), 0.1 ** 2
    else:  # two behaviours per state, +-0.5: variance 0.25
        noise, variance = 0.5 * g.choice([-1.0, 1.0], size=(20000, 1)), 0.25
    # The population variance of k = 5 independent draws has expectation (k - 1) / k of the true variance.
    report = estimate_iav(obs, smooth + noise, num_queries=5000, num_groups=5)
    assert report["iav"] == pytest.approx(0.8 * variance, rel=0.05)
    assert report["num_queries"] == 5000 and len(report["group_estimates"]) == 5 and report["group_std"] > 0


def test_default_scale_by_family():
    assert default_iav_scale("cube-double-play-singletask-v0") == 0.1
    assert default_iav_scale("visual-puzzle-3x3-play-singletask-task1-v0") == 0.1
    assert default_iav_scale("antmaze-large-navigate-singletask-v0") == 1.0


@pytest.mark.parametrize("script, extra", [("deflow_offline.py", []), pytest.param(  # o2o: the same code, slow
    "deflow_o2o.py", ["--online-steps", 4], marks=pytest.mark.slow)])
def test_auto_target_divergence_end_to_end(tmp_path, cube_dataset, script, extra):
    result = run_script("--env-name", ENV, "--dataset-path", cube_dataset, "--run-dir", tmp_path, "--offline-steps", 4,
                        "--log-interval", 2, "--eval-interval", 4, "--eval-episodes", 1, "--target-divergence", "auto",
                        "--iav-queries", 0, *extra, *TINY_FLAGS, script=script)
    run_dir = next(tmp_path.glob("*__deflow_*"))
    _, train, _ = load_env_and_datasets(ENV, dataset_path=str(cube_dataset))
    delta = 0.1 * estimate_iav(train["observations"], train["actions"], num_queries=0)["iav"]
    saved = json.loads((run_dir / "args.json").read_text())
    assert saved["target_divergence"] == pytest.approx(delta) and saved["iav_scale"] == 0.1
    assert json.loads((run_dir / "iav.json").read_text())["target_divergence"] == pytest.approx(delta)
    assert "--target-divergence auto: delta = 0.1 x IAV" in result.stdout
    assert (run_dir / "eval.csv").read_text().count("\n") >= 2

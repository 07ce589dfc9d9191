"""Beyond the paper: the intrinsic action variance (common/iav.py), --target-divergence auto, --eval-sampler."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from common.datasets import load_env_and_datasets
from common.iav import default_iav_scale, estimate_iav, knn_action_variance
from deflow_offline import flow_actions, sample_actions_iterative, sample_actions_max_q
from tests.conftest import TINY_FLAGS, run_script, tiny_agent

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


class LinearQ(nn.Module):
    """A hand-made critic: Q(s, a) = a . w for both ensemble members, so the best action is known."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.tensor(w)

    def forward(self, obs, actions):
        q = actions @ self.w
        return torch.stack([q, q])


def constant_refinement(agent, shift):
    """Make f(s, a) = shift everywhere."""
    last = agent.refine.net[-1]
    nn.init.zeros_(last.weight)
    nn.init.constant_(last.bias, shift)


@pytest.mark.parametrize("w", [[1.0, 1.0], [-1.0, 0.5]])
def test_max_q_refines_the_highest_q_sample_per_state(w):
    agent, args = tiny_agent()
    agent.critic = LinearQ(w)
    constant_refinement(agent, 0.0)
    obs = torch.randn(4, 3)
    with torch.no_grad():
        noise = torch.randn((4, 10, 2))
        got = sample_actions_max_q(agent, obs, noise, args.flow_steps)
        samples = flow_actions(agent.flow, obs[:, None].expand(-1, 10, -1), noise, args.flow_steps)
    q = samples @ torch.tensor(w)
    torch.testing.assert_close(got, samples[torch.arange(4), q.argmax(1)])
    assert not torch.allclose(got, samples[torch.arange(4), q.argmin(1)])  # the official argmin picks another


def test_iterative_keeps_the_unrefined_action_among_its_candidates():
    agent, args = tiny_agent()
    constant_refinement(agent, 0.3)  # every refinement raises each action dimension by 0.3 (then clips)
    obs = torch.randn(6, 3)
    with torch.no_grad():
        noise = torch.randn((6, 2))
        a0 = flow_actions(agent.flow, obs, noise, args.flow_steps)
        agent.critic = LinearQ([-1.0, -1.0])  # prefers low actions: the unrefined a0 is the best candidate
        low = sample_actions_iterative(agent, obs, noise, args.flow_steps, 5)
        agent.critic = LinearQ([1.0, 1.0])  # prefers high actions: the fifth refinement
        high = sample_actions_iterative(agent, obs, noise, args.flow_steps, 5)
    torch.testing.assert_close(low, a0)
    torch.testing.assert_close(high, (a0 + 5 * 0.3).clamp(-1, 1))


@pytest.mark.parametrize("script, extra", [("deflow_offline.py", ["--eval-sampler", "max-q"]),
                                           ("deflow_o2o.py", ["--online-steps", 4, "--eval-sampler", "iterative"])])
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

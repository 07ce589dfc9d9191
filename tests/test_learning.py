"""DeFlow learns: a one-step task with a 2-D action whose data has three modes of different value. The refined policy
must move to the best mode and stay on the data; the BC flow alone keeps sampling every mode.

The modes are vertical bands (x in {-0.3, 0, 0.3}, y uniform in [-0.8, 0.8]) and the reward depends on x only, so the
best mode is reachable inside the data's support. (Modes separated by empty space would test the critic's
extrapolation, not DeFlow: a generic critic overestimates there and the refinement rightly stays away.)
Measured over seeds 0-2 at 2000 updates: DeFlow 68-86% at the best band, BC flow 19-21%, median distance to the
nearest dataset action < 0.015.
"""

import pytest
import torch

import deflow_offline
from deflow_offline import DeFlowAgent, flow_actions, sample_actions, sample_batch
from tests.conftest import NATIVE_BF16, tiny_args, train_step

MODES_X, BEST_X = torch.tensor([-0.3, 0.0, 0.3]), 0.3


def bandit_dataset(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = MODES_X[torch.randint(3, (n,), generator=g)] + 0.03 * torch.randn(n, generator=g)
    actions = torch.stack([x, torch.rand(n, generator=g) * 1.6 - 0.8], dim=1)
    obs = torch.zeros(n, 2)  # a single state
    return {"observations": obs, "next_observations": obs, "actions": actions,
            "rewards": -4 * (x - BEST_X).square(), "masks": torch.zeros(n)}  # masks 0: one step, no bootstrapping


@pytest.mark.parametrize("precision", ["float32", pytest.param("bf16", marks=[pytest.mark.slow, pytest.mark.skipif(
    not NATIVE_BF16, reason="bfloat16 is emulated on this CPU (no AVX-512 BF16 / AMX): minutes, and no --precision bf16 "
    "user would run here")])])
def test_deflow_picks_the_best_mode_and_stays_on_the_data(precision):
    """With every matmul in bfloat16 (--precision bf16) too: it must learn as well."""
    torch.manual_seed(0)
    data = bandit_dataset()
    # delta admits the jump between modes (batch-mean squared move ~0.075 per action dimension), little more.
    args = tiny_args(actor_hidden_dims=(64, 64), refine_hidden_dims=(64, 64), value_hidden_dims=(64, 64),
                     batch_size=256, target_divergence=0.1, lr=3e-3, precision=precision)
    agent = DeFlowAgent(2, 2, args)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.lr)
    for _ in range(2000):
        train_step(deflow_offline, agent, optimizer, sample_batch(data, args.batch_size), args)

    bf16 = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")  # as evaluation samples
    with torch.no_grad(), bf16:
        obs = torch.zeros(2000, 2)
        base = flow_actions(agent.flow, obs, torch.randn(2000, 2), args)
        policy = sample_actions(agent, obs, torch.randn(2000, 2), args)
    at_best = lambda a: ((a[:, 0] - BEST_X).abs() < 0.1).float().mean().item()  # noqa: E731
    distance_to_data = torch.cdist(policy, data["actions"]).min(dim=1).values

    assert at_best(base) < 0.4, f"the BC flow alone samples all three modes, got {at_best(base):.2f} at the best"
    assert at_best(policy) > 0.6, f"DeFlow should move to the best mode, got {at_best(policy):.2f}"
    assert distance_to_data.median() < 0.03, f"refined actions must stay on the data: {distance_to_data.median():.3f}"

"""The DeFlow math on synthetic tensors: flow matching, Euler sampler, Lagrangian, gradient routing, target EMA."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from deflow_offline import (Critic, VectorField, deflow_losses, flow_actions, flow_matching_loss, mlp,
                            sample_actions, update)
from tests.conftest import random_batch, tiny_agent


class Recorder(nn.Module):
    """A velocity field that returns a fixed function of time and records every input it is called with."""

    def __init__(self, velocity):
        super().__init__()
        self.velocity, self.calls = velocity, []

    def forward(self, obs, x, t):
        self.calls.append((obs, x.clone(), t.clone()))
        return self.velocity(x, t)


def test_flow_matching_interpolates_and_targets_velocity():
    obs, actions, x_0 = torch.randn(5, 3), torch.rand(5, 2) * 2 - 1, torch.randn(5, 2)
    t = torch.rand(5, 1)
    flow = Recorder(lambda x, t: torch.zeros_like(x))
    loss = flow_matching_loss(flow, obs, actions, x_0, t)
    _, x_t, t_seen = flow.calls[0]
    torch.testing.assert_close(x_t, (1 - t) * x_0 + t * actions)
    torch.testing.assert_close(t_seen, t)
    torch.testing.assert_close(loss, (actions - x_0).square().mean())  # a zero field misses the whole velocity
    exact = Recorder(lambda x, t: (actions - x_0))
    assert flow_matching_loss(exact, obs, actions, x_0, t).item() == 0.0


def test_euler_sampler_time_grid_shapes_and_final_clip():
    obs, noise = torch.randn(7, 3), torch.zeros(7, 2)
    # +3 on the first half, -3 on the second: an intermediate clip would end at -1, the final-only clip returns 0.
    flow = Recorder(lambda x, t: torch.where(t < 0.5, 3.0, -3.0).expand_as(x))
    out = flow_actions(flow, obs, noise, flow_steps=10)
    assert out.shape == (7, 2)
    assert [round(c[2][0].item(), 6) for c in flow.calls] == [i / 10 for i in range(10)]
    assert all(c[2].shape == (7, 1) for c in flow.calls)
    torch.testing.assert_close(out, torch.zeros(7, 2), atol=1e-6, rtol=0)
    big = flow_actions(Recorder(lambda x, t: torch.full_like(x, 50.0)), obs, noise, flow_steps=4)
    assert torch.all(big == 1.0)


def test_policy_adds_refinement_and_clips():
    agent, args = tiny_agent()
    with torch.no_grad():
        agent.refine.net[-1].bias.fill_(10.0)  # a huge refinement: the action must still be clipped to 1
    actions = sample_actions(agent, torch.randn(9, 3), torch.randn(9, 2), args.flow_steps)
    assert actions.shape == (9, 2) and torch.all(actions == 1.0)


def test_networks_follow_flax_conventions():
    net = mlp(4, (8, 8), 1, layer_norm=True)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "GELU", "LayerNorm", "Linear", "GELU", "LayerNorm", "Linear"]
    assert net[1].approximate == "tanh" and net[2].eps == 1e-6
    assert all(torch.all(m.bias == 0) for m in net if isinstance(m, nn.Linear))
    bound = (6 / (4 + 8)) ** 0.5
    assert net[0].weight.abs().max() <= bound and net[0].weight.abs().max() > 0.8 * bound
    critic = Critic(3, 2, (16,), True)
    assert critic(torch.randn(5, 3), torch.randn(5, 2)).shape == (2, 5)
    assert not torch.equal(critic.members[0][0].weight, critic.members[1][0].weight)
    assert VectorField(3, 2, (16,), False, use_time=False)(torch.randn(5, 3), torch.randn(5, 2)).shape == (5, 2)


@pytest.mark.parametrize("delta, direction", [(1e-6, +1), (10.0, -1)])
def test_alpha_rises_above_delta_and_falls_below(delta, direction):
    agent, args = tiny_agent(target_divergence=delta)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.lr)
    before = agent.log_alpha.item()
    for step in range(20):
        metrics = update(agent, optimizer, random_batch(seed=step), args)
        assert (metrics["actor/distill_loss"].item() > delta) == (direction > 0)
    change = agent.log_alpha.item() - before
    # Sign-driven Adam steps of about lr each (a little less when |D - delta| varies from batch to batch).
    assert change * direction > 0 and abs(change) == pytest.approx(20 * args.lr, rel=0.1)


def gradients(loss, groups):
    """{group: total |grad|} of `loss` w.r.t. each parameter group (0.0 where no gradient arrives)."""
    out = {}
    for name, params in groups.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[name] = sum(0.0 if g is None else g.abs().sum().item() for g in grads)
    return out


def test_gradient_routing():
    agent, args = tiny_agent()
    groups = {"critic": list(agent.critic.parameters()), "flow": list(agent.flow.parameters()),
              "refine": list(agent.refine.parameters()), "log_alpha": [agent.log_alpha]}
    total, m = deflow_losses(agent, random_batch(), args)
    alpha = m["actor/alpha_value"]
    receives = {
        "critic/critic_loss": {"critic"},
        "actor/bc_flow_loss": {"flow"},
        "refine penalty": {"refine"},
        "actor/q_loss": {"refine"},
        "actor/alpha_loss": {"log_alpha"},
    }
    terms = {k: m[k] for k in receives if k in m}
    terms["refine penalty"] = alpha * m["actor/distill_loss"]
    for term, allowed in receives.items():
        got = gradients(terms[term], groups)
        assert {g for g, v in got.items() if v > 0} == allowed, (term, got)
    # The total's gradient on each group is exactly the gradient of that group's own terms.
    full = torch.autograd.grad(total, groups["critic"], retain_graph=True)
    own = torch.autograd.grad(m["critic/critic_loss"], groups["critic"], retain_graph=True)
    for a, b in zip(full, own):
        torch.testing.assert_close(a, b)
    assert all(not p.requires_grad for p in agent.target_critic.parameters())


def test_target_ema_uses_pre_step_critic():
    agent, args = tiny_agent(tau=0.1)
    with torch.no_grad():
        for p in agent.target_critic.parameters():
            p.add_(torch.randn_like(p))  # make target and critic differ
    critic_before = copy.deepcopy(agent.critic.state_dict())
    target_before = copy.deepcopy(agent.target_critic.state_dict())
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-2)
    update(agent, optimizer, random_batch(), args)
    for k, target_after in agent.target_critic.state_dict().items():
        torch.testing.assert_close(target_after, 0.1 * critic_before[k] + 0.9 * target_before[k])
    assert any(not torch.equal(v, critic_before[k]) for k, v in agent.critic.state_dict().items())


def test_td_target_uses_masks_and_q_agg():
    agent, args = tiny_agent(discount=0.5)
    batch = random_batch()
    batch["masks"] = torch.zeros(32)  # no bootstrapping: the critic regresses onto the reward alone
    _, m = deflow_losses(agent, batch, args)
    qs = agent.critic(batch["observations"], batch["actions"])
    torch.testing.assert_close(m["critic/critic_loss"], (qs - batch["rewards"]).square().mean())
    for q_agg in ("mean", "min"):
        torch.manual_seed(1)
        agent_q, args_q = tiny_agent(q_agg=q_agg, discount=0.5)
        batch["masks"] = torch.ones(32)
        torch.manual_seed(2)
        _, m = deflow_losses(agent_q, batch, args_q)
        torch.manual_seed(2)
        next_noise = torch.randn(3, 32, 2)[0]  # the update draws its noise for 3 uses in one call, TD first
        next_actions = sample_actions(agent_q, batch["next_observations"], next_noise, args_q.flow_steps)
        next_qs = agent_q.target_critic(batch["next_observations"], next_actions)
        next_q = next_qs.min(0).values if q_agg == "min" else next_qs.mean(0)
        target = batch["rewards"] + 0.5 * next_q
        qs = agent_q.critic(batch["observations"], batch["actions"])
        torch.testing.assert_close(m["critic/critic_loss"], (qs - target).square().mean())


def test_fixed_alpha_path_uses_alpha_not_alpha_squared():
    agent, args = tiny_agent(use_lagrange=False, alpha=3.0)
    total, m = deflow_losses(agent, random_batch(), args)
    assert m["actor/alpha_value"].item() == 3.0 and m["actor/alpha_loss"].item() == 0.0
    expected = m["actor/bc_flow_loss"] + 3.0 * m["actor/distill_loss"] + m["actor/q_loss"]
    torch.testing.assert_close(m["actor/actor_loss"], expected)


def test_normalized_q_loss_divides_by_mean_abs_q():
    agent, args = tiny_agent()
    with torch.no_grad():
        for member in agent.critic.members:
            member[-1].bias.fill_(-50.0)  # every Q far below zero, so mean|q| = -mean(q)
    _, m = deflow_losses(agent, random_batch(), args)
    assert m["actor/q"].item() < 0
    torch.testing.assert_close(m["actor/q_loss"], torch.tensor(1.0))  # -mean(q) / mean|q|
    raw_args = dataclasses.replace(args, normalize_q_loss=False)
    _, m_raw = deflow_losses(agent, random_batch(), raw_args)
    torch.testing.assert_close(m_raw["actor/q_loss"], -m_raw["actor/q"])

"""The DeFlow math on synthetic tensors: flow matching, Euler sampler, Lagrangian, gradient routing, target EMA."""

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deflow_offline
from deflow_offline import (GELU, Critic, Refinement, VelocityField, deflow_losses, flow_actions, flow_matching_loss,
                            mlp, sample_actions, update_draws)
from tests.conftest import losses_of, random_batch, tiny_agent, train_step


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


def steps(k):
    """What flow_actions reads of the args: K and the precision."""
    return SimpleNamespace(flow_steps=k, precision="float32")


def euler_reference(flow, obs, noise, flow_steps):
    """The sampler as the paper writes it: x_{i+1} = x_i + mu(s, x_i, i/K) / K, one full call per step, clip at the end."""
    x = noise
    for i in range(flow_steps):
        x = x + flow(obs, x, torch.full((*obs.shape[:-1], 1), i / flow_steps)) / flow_steps
    return x.clamp(-1, 1)


def test_euler_sampler_equals_the_plain_loop_with_time_grid_and_final_clip():
    """flow_actions must equal K calls of the velocity field with t = i/K, clipped only at the end (a strong time input
    and big outputs make either mistake visible)."""
    torch.manual_seed(0)
    flow = VelocityField(3, 2, (16, 16), False)
    with torch.no_grad():
        flow.net[0].weight[:, -1] *= 20  # the velocity depends strongly on t
        flow.net[-1].weight *= 8  # and overshoots [-1, 1] on the way
    obs, noise = torch.randn(64, 3), torch.randn(64, 2)
    with torch.no_grad():
        fast, reference = flow_actions(flow, obs, noise, steps(10)), euler_reference(flow, obs, noise, 10)
        shifted_time = euler_reference(lambda o, x, t: flow(o, x, t + 0.1), obs, noise, 10)
        clipped_each_step = noise
        for i in range(10):
            clipped_each_step = (clipped_each_step + flow(obs, clipped_each_step, torch.full((64, 1), i / 10)) / 10)
            clipped_each_step = clipped_each_step.clamp(-1, 1)
    assert fast.shape == (64, 2) and fast.abs().max() <= 1
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    assert (fast - shifted_time).abs().max() > 1e-2 and (fast - clipped_each_step).abs().max() > 1e-2
    assert torch.equal(flow_actions(flow, obs[:1], torch.full((1, 2), 50.0), steps(4)), torch.ones(1, 2))


def test_policy_adds_refinement_and_clips():
    agent, args = tiny_agent()
    with torch.no_grad():
        agent.refine.net[-1].bias.fill_(10.0)  # a huge refinement: the action must still be clipped to 1
    actions = sample_actions(agent, torch.randn(9, 3), torch.randn(9, 2), args)
    assert actions.shape == (9, 2) and torch.all(actions == 1.0)


def test_q_loss_takes_the_refined_action_clipped():
    """The actor's Q term evaluates the critic at clip(a_base + f(s, a_base), -1, 1): with a huge refinement, at 1."""
    agent, args = tiny_agent()
    with torch.no_grad():
        agent.refine.net[-1].bias.fill_(10.0)
    batch = random_batch()
    _, m = losses_of(agent, batch, args)
    torch.testing.assert_close(m["actor/q"], agent.critic(batch["observations"], torch.ones(32, 2)).mean())


def test_networks_follow_flax_conventions():
    net = mlp(4, (8, 8), 1, layer_norm=True)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "GELU", "LayerNorm", "Linear", "GELU", "LayerNorm", "Linear"]
    assert net[2].eps == 1e-6
    assert all(torch.all(m.bias == 0) for m in net if isinstance(m, nn.Linear))
    bound = (6 / (4 + 8)) ** 0.5
    assert net[0].weight.abs().max() <= bound and net[0].weight.abs().max() > 0.8 * bound
    assert Refinement(3, 2, (16,), False)(torch.randn(5, 3), torch.randn(5, 2)).shape == (5, 2)


def test_gelu_is_flax_default_the_tanh_approximation_eager_and_compiled(monkeypatch):
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    flax = 0.5 * x * (1 + torch.tanh((2 / math.pi) ** 0.5 * (x + 0.044715 * x ** 3)))  # jax.nn.gelu(approximate=True)
    for net in (mlp(4, (8,), 1, layer_norm=False), Critic(3, 2, (8,), layer_norm=False).net):
        torch.testing.assert_close(net[1](x.float()).double(), flax, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the form torch.compile traces: x sigmoid(2u)
    torch.testing.assert_close(GELU()(x.float()).double(), flax, rtol=1e-5, atol=1e-6)
    assert (GELU()(x.float()) - F.gelu(x.float())).abs().max() > 1e-4  # and not the exact (erf) GELU


def test_critic_ensemble_is_two_independent_flax_mlps():
    """The batched critic computes what two separate mlp()s with its members' weights compute."""
    torch.manual_seed(0)
    critic = Critic(3, 2, (16, 16), layer_norm=True)
    kinds = [type(m).__name__ for m in critic.net]
    assert kinds == ["EnsembleLinear", "GELU", "EnsembleLayerNorm"] * 2 + ["EnsembleLinear"]
    first = critic.net[0].weight  # (members, in, out)
    assert first.shape == (2, 5, 16) and not torch.equal(first[0], first[1])
    bound = (6 / (5 + 16)) ** 0.5
    assert all(bound >= first[i].abs().max() > 0.8 * bound for i in range(2))
    assert all(torch.all(layer.bias == 0) for layer in critic.net if type(layer).__name__ == "EnsembleLinear")
    with torch.no_grad():  # give the LayerNorms of the two members different scales and shifts
        for layer in critic.net:
            if type(layer).__name__ == "EnsembleLayerNorm":
                layer.weight.normal_(1, 0.3), layer.bias.normal_(0, 0.3)
    obs, actions = torch.randn(7, 3), torch.randn(7, 2)
    expected = []
    for i in range(2):
        member = mlp(5, (16, 16), 1, layer_norm=True)
        with torch.no_grad():
            for separate, batched in zip(member, critic.net):
                if isinstance(separate, nn.Linear):
                    separate.weight.copy_(batched.weight[i].T), separate.bias.copy_(batched.bias[i, 0])
                elif isinstance(separate, nn.LayerNorm):
                    separate.weight.copy_(batched.weight[i, 0]), separate.bias.copy_(batched.bias[i, 0])
        expected.append(member(torch.cat([obs, actions], -1)).squeeze(-1))
    torch.testing.assert_close(critic(obs, actions), torch.stack(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("delta, direction", [(1e-6, +1), (10.0, -1)])
def test_alpha_rises_above_delta_and_falls_below(delta, direction):
    agent, args = tiny_agent(target_divergence=delta)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.lr)
    before = agent.log_alpha.item()
    for step in range(20):
        metrics = train_step(deflow_offline, agent, optimizer, random_batch(seed=step), args)
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
    total, m = losses_of(agent, random_batch(), args)
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
    train_step(deflow_offline, agent, optimizer, random_batch(), args)
    for k, target_after in agent.target_critic.state_dict().items():
        torch.testing.assert_close(target_after, 0.1 * critic_before[k] + 0.9 * target_before[k])
    assert any(not torch.equal(v, critic_before[k]) for k, v in agent.critic.state_dict().items())


def test_td_target_uses_masks_and_q_agg():
    agent, args = tiny_agent(discount=0.5)
    batch = random_batch()
    batch["masks"] = torch.zeros(32)  # no bootstrapping: the critic regresses onto the reward alone
    _, m = losses_of(agent, batch, args)
    qs = agent.critic(batch["observations"], batch["actions"])
    torch.testing.assert_close(m["critic/critic_loss"], (qs - batch["rewards"]).square().mean())
    for q_agg in ("mean", "min"):
        torch.manual_seed(1)
        agent_q, args_q = tiny_agent(q_agg=q_agg, discount=0.5)
        batch["masks"] = torch.ones(32)
        noise = update_draws(32, 2, torch.device("cpu"))
        _, m = deflow_losses(agent_q, batch, noise, args_q)
        next_actions = sample_actions(agent_q, batch["next_observations"], noise["next_base_noise"], args_q)
        next_qs = agent_q.target_critic(batch["next_observations"], next_actions)
        next_q = next_qs.min(0).values if q_agg == "min" else next_qs.mean(0)
        target = batch["rewards"] + 0.5 * next_q
        qs = agent_q.critic(batch["observations"], batch["actions"])
        torch.testing.assert_close(m["critic/critic_loss"], (qs - target).square().mean())


def test_one_rollout_over_2b_rows_gives_the_base_actions_of_their_own_rollout():
    """The TD target's half of the merged rollout is checked above; this is the other half: the refinement acts on the
    flow's action from noise["base_noise"] at s."""
    agent, args = tiny_agent()
    batch, noise = random_batch(), update_draws(32, 2, torch.device("cpu"))
    _, m = deflow_losses(agent, batch, noise, args)
    with torch.no_grad():
        base_actions = flow_actions(agent.flow, batch["observations"], noise["base_noise"], args)
        distill_loss = agent.refine(batch["observations"], base_actions).square().mean()
    torch.testing.assert_close(m["actor/distill_loss"], distill_loss, rtol=1e-5, atol=1e-8)


def test_fixed_alpha_path_uses_alpha_not_alpha_squared():
    agent, args = tiny_agent(use_lagrange=False, alpha=3.0)
    total, m = losses_of(agent, random_batch(), args)
    assert m["actor/alpha_value"].item() == 3.0 and m["actor/alpha_loss"].item() == 0.0
    expected = m["actor/bc_flow_loss"] + 3.0 * m["actor/distill_loss"] + m["actor/q_loss"]
    torch.testing.assert_close(m["actor/actor_loss"], expected)


def test_normalized_q_loss_divides_by_mean_abs_q():
    agent, args = tiny_agent()
    with torch.no_grad():
        agent.critic.net[-1].bias.fill_(-50.0)  # every Q far below zero, so mean|q| = -mean(q)
    _, m = losses_of(agent, random_batch(), args)
    assert m["actor/q"].item() < 0
    torch.testing.assert_close(m["actor/q_loss"], torch.tensor(1.0))  # -mean(q) / mean|q|
    raw_args = dataclasses.replace(args, normalize_q_loss=False)
    _, m_raw = losses_of(agent, random_batch(), raw_args)
    torch.testing.assert_close(m_raw["actor/q_loss"], -m_raw["actor/q"])

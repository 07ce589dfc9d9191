"""The method is written three times by design; tests/test_math.py checks deflow_offline.py's copy, and this file checks
that the other two compute exactly what it computes: from the same agent, batches and random numbers, one update of
deflow_o2o.py and of deflow_pixels.py (its encoders replaced by the identity, so that its networks see the state)
gives deflow_offline.py's metrics, gradients, Adam state, parameters and target critic, to the bit. A change to the
math of either copy fails here (python -m tools.parity compares deflow_offline.py with the official code)."""

import dataclasses

import pytest
import torch

import deflow_o2o
import deflow_offline
import deflow_pixels
from tests.conftest import TINY_NETS, random_batch, train_step

OBS_DIM, ACTION_DIM = 6, 3


def agent_of(script, **overrides):
    """deflow_offline.py's tiny agent with its target critic moved off the critic, as `script`'s agent."""
    args = dataclasses.replace(deflow_offline.Args(), batch_size=32, **TINY_NETS, **overrides)
    torch.manual_seed(0)
    reference = deflow_offline.DeFlowAgent(OBS_DIM, ACTION_DIM, args)
    with torch.no_grad():
        for p in reference.target_critic.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args = dataclasses.replace(script.Args(), **{f.name: getattr(args, f.name) for f in dataclasses.fields(args)
                                                 if hasattr(script.Args, f.name) and f.name != "env_name"})
    if script is deflow_offline:
        return reference, args
    if script is deflow_pixels:  # features of OBS_DIM, then encoders that pass the state through
        args = dataclasses.replace(args, encoder_stack_sizes=(2,), encoder_head_dims=(OBS_DIM,))
        agent = script.DeFlowAgent((4, 4, 3), ACTION_DIM, args)
        for name in ("flow_encoder", "refine_encoder", "critic_encoder", "target_critic_encoder"):
            setattr(agent, name, torch.nn.Identity())
    else:
        agent = script.DeFlowAgent(OBS_DIM, ACTION_DIM, args)
    agent.load_state_dict(reference.state_dict())
    return agent, args


def three_updates(script, **overrides):
    """Every number of three updates (the last a logging step, with the mse's rollout), masks of 0 and 1."""
    agent, args = agent_of(script, **overrides)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3, fused=True)
    torch.manual_seed(1)
    out = {}
    for step in range(3):
        batch = random_batch(batch_size=32, obs_dim=OBS_DIM, action_dim=ACTION_DIM, seed=step)
        batch["masks"] = (torch.rand(32, generator=torch.Generator().manual_seed(step)) > 0.3).float()
        log_rng = torch.Generator().manual_seed(2) if step == 2 else None
        metrics = train_step(script, agent, optimizer, batch, args, log_rng)
        out.update({f"{step}:{k}": v.detach() for k, v in metrics.items()})
        out.update({f"{step}:grad:{k}": p.grad for k, p in agent.named_parameters() if p.grad is not None})
    out.update({f"param:{k}": v for k, v in agent.state_dict().items()})
    for i, state in optimizer.state_dict()["state"].items():
        out.update({f"adam:{i}:{k}": v for k, v in state.items()})
    return out


@pytest.mark.parametrize("overrides", [dict(q_agg="mean"), dict(q_agg="min", tau=0.1, discount=0.9)],
                         ids=["mean", "min"])
@pytest.mark.parametrize("script", [deflow_o2o, deflow_pixels])
def test_the_update_is_deflow_offlines_to_the_bit(script, overrides):
    reference, copy = three_updates(deflow_offline, **overrides), three_updates(script, **overrides)
    assert reference.keys() == copy.keys() and "2:actor/mse" in copy
    different = [k for k in reference if not torch.equal(reference[k], copy[k])]
    assert not different, f"{script.__name__} differs from deflow_offline.py in {different[:8]}"


def test_o2o_builds_the_same_agent_from_the_same_seed():
    """The networks' layers and initialisation (Xavier-uniform weights, zero biases) of deflow_o2o.py are offline's."""
    args = dataclasses.replace(deflow_offline.Args(), **TINY_NETS)
    agents = []
    for script in (deflow_offline, deflow_o2o):
        torch.manual_seed(3)
        agents.append(script.DeFlowAgent(OBS_DIM, ACTION_DIM, args).state_dict())
    assert agents[0].keys() == agents[1].keys() and all(torch.equal(v, agents[1][k]) for k, v in agents[0].items())

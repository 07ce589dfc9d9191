"""tools.parity: its parameter map against the official parameter tree (always, no JAX needed), and the full
comparison with the official JAX code and its negative controls (where JAX and the official code are present)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import deflow_o2o
import deflow_offline
import deflow_pixels
from tests.conftest import ROOT
from tools.parity import UPDATES, name_map, script_agent, to_flax, to_torch

# The official agent's parameters (flax name: shape) at tools.parity's sizes, from DeFlowAgent.create() of
# muzhancun/DeFlow at d81dd59 (agents/deflow.py): "mean" for the state cases, "pixels" for impala_debug encoders.
OFFICIAL = json.loads((ROOT / "tests" / "official_parameters.json").read_text())


@pytest.mark.parametrize("script, case", [(deflow_offline, "mean"), (deflow_o2o, "o2o"), (deflow_pixels, "pixels")])
def test_the_parameter_map_is_the_official_tree_one_to_one_and_round_trips(script, case):
    _, config, obs_shape = UPDATES[case]
    agent, _ = script_agent(script, config, obs_shape)
    names, state = name_map(agent), agent.state_dict()
    assert set(names) == set(state)  # every tensor of ours mapped...
    official = OFFICIAL["pixels" if script is deflow_pixels else "mean"]
    assert sorted(flax for flax, _ in names.values()) == sorted(official)  # ...onto every official one, once each
    rs = np.random.RandomState(0)
    arrays = {flax: rs.randn(*shape).astype(np.float32) for flax, shape in official.items()}
    agent.load_state_dict({k: to_torch(arrays[f], layout, state[k].shape) for k, (f, layout) in names.items()})
    for key, tensor in agent.state_dict().items():
        flax, layout = names[key]
        assert np.array_equal(to_flax(tensor, layout, official[flax]), arrays[flax]), key
    # a transposition is not a reshape: the first layer's kernel is read as (in, out)
    kernel = arrays["modules_actor_bc_flow/mlp/Dense_0/kernel"]
    assert torch.equal(agent.flow.net[0].weight[:, 0], torch.tensor(kernel[0]))


OFFICIAL_CHECKOUT = os.environ.get("DEFLOW_OFFICIAL")
needs_official = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None or not OFFICIAL_CHECKOUT,
    reason="needs JAX and the official code: pip install -r requirements-parity.txt, then DEFLOW_OFFICIAL=<checkout "
           "of github.com/muzhancun/DeFlow> python -m pytest tests/test_parity.py (python -m tools.parity --help)")


def parity(*flags):
    return subprocess.run([sys.executable, "-m", "tools.parity", "--official", OFFICIAL_CHECKOUT, *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)


@needs_official
def test_every_script_equals_the_official_update():
    result = parity()
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "all within tolerance" in result.stdout
    assert {line.split()[0] for line in result.stdout.splitlines()[1:-1]} == set(UPDATES) | {"frames", "shift"}


@needs_official
@pytest.mark.parametrize("control, old, new, caught", [
    ("the EMA rate x 1.01", "torch._foreach_lerp_(list(target), list(online), args.tau)",
     "torch._foreach_lerp_(list(target), list(online), args.tau * 1.01)", {"target after EMA"}),
    ("+ 1e-3 in the Q loss's normaliser", "q_loss = q_loss / q.abs().mean().detach()",
     "q_loss = q_loss / (q.abs().mean().detach() + 1e-3)", {"metrics", "gradients"}),
    ("two noise draws swapped", 'torch.cat([draws["next_base_noise"], draws["base_noise"]])',
     'torch.cat([draws["base_noise"], draws["next_base_noise"]])', {"metrics", "gradients"}),
])
def test_a_small_change_to_the_math_fails_parity(tmp_path, control, old, new, caught):
    """Negative controls: a copy of the project with one small change to deflow_offline.py's math fails."""
    copy = tmp_path / "project"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".*", "runs", "data", "docs", "tests", "__pycache__"))
    text = (copy / "deflow_offline.py").read_text()
    assert text.count(old) == 1
    (copy / "deflow_offline.py").write_text(text.replace(old, new))
    result = parity("--project", str(copy), "--cases", "mean")
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    mismatched = {" ".join(line.split()[1:-4]) for line in result.stdout.splitlines() if line.endswith("MISMATCH")}
    assert caught <= mismatched, (control, result.stdout)

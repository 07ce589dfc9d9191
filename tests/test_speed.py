"""The fast paths change no math: --compile's training step, and evaluation with environments side by side."""

import torch

import deflow_offline
from common.envs import EnvPool
from deflow_offline import evaluate, train_step
from tests.conftest import TINY_FLAGS, random_batch, run_script, tiny_agent

ENV = "cube-single-play-singletask-task1-v0"


def test_compiled_training_step_equals_eager():
    """A few steps of torch.compile(train_step) against eager from the same state and seed: same losses, same
    parameters. Inductor draws its random numbers like eager only with fallback_random, which the test sets."""
    import torch._inductor.config

    data = {k: torch.cat([v, v + 0.5]) for k, v in random_batch(batch_size=64).items()}
    results = []
    with torch._inductor.config.patch(fallback_random=True):
        for step_fn in (train_step, torch.compile(train_step)):
            agent, args = tiny_agent(flow_steps=3)  # fewer Euler steps: the same graph, compiled sooner
            optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3)
            torch.manual_seed(7)
            metrics = [step_fn(agent, optimizer, data, args, with_mse=step == 2) for step in range(3)]
            results.append((metrics, agent.state_dict()))
    (eager_metrics, eager_state), (compiled_metrics, compiled_state) = results
    for eager, compiled in zip(eager_metrics, compiled_metrics):
        assert eager.keys() == compiled.keys()
        for name in eager:
            torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(eager_state["refine.net.0.weight"], tiny_agent(flow_steps=3)[0].refine.net[0].weight)


def test_side_by_side_evaluation_runs_every_episode_as_if_alone():
    """Episode j gets reset seed + j and its own noise stream wherever it runs. With the noise as the action (a
    batch-independent policy), every (noise, observation) pair must be the same with 1 environment, with 3, and with
    3 stepped in 2 worker processes."""
    agent, args = tiny_agent(obs_dim=28, action_dim=5, script=deflow_offline)
    seen = {}

    def noise_as_action(name):
        def policy(agent, obs, noise, args):
            seen.setdefault(name, []).extend(zip(map(bytes, noise.numpy()), map(bytes, obs.numpy())))
            return noise.clamp(-1, 1)
        return policy

    alone = evaluate(agent, EnvPool(ENV, 1), 4, args, seed=3, policy=noise_as_action("alone"))
    side_by_side = evaluate(agent, EnvPool(ENV, 3), 4, args, seed=3, policy=noise_as_action("side by side"))
    workers = EnvPool(ENV, 3, workers=2)
    in_workers = evaluate(agent, workers, 4, args, seed=3, policy=noise_as_action("workers"))
    workers.close()
    assert alone == side_by_side == in_workers
    assert len(seen["alone"]) == 4 * 200 and set(seen["alone"]) == set(seen["side by side"]) == set(seen["workers"])
    other_seed = evaluate(agent, EnvPool(ENV, 1), 1, args, seed=100, policy=noise_as_action("other"))
    assert other_seed["episode.length"] == 200 and not set(seen["other"]) & set(seen["alone"])


def test_side_by_side_policy_calls_match_one_state_at_a_time():
    """The batched policy call gives each state the action it gets alone (up to float rounding)."""
    agent, args = tiny_agent()
    obs, noise = torch.randn(5, 3), torch.randn(5, 2)
    with torch.no_grad():
        batched = deflow_offline.eval_actions(agent, obs, noise, args)
        alone = torch.cat([deflow_offline.eval_actions(agent, obs[i:i + 1], noise[i:i + 1], args) for i in range(5)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_compile_flag_end_to_end(tmp_path, cube_dataset):
    """deflow_o2o.py --compile through both phases (compiled update and evaluation policy), as a user runs it."""
    result = run_script("--env-name", ENV, "--dataset-path", cube_dataset, "--run-dir", tmp_path, "--offline-steps", 3,
                        "--online-steps", 3, "--log-interval", 3, "--eval-interval", 3, "--eval-episodes", 2,
                        "--flow-steps", 2, "--compile", *TINY_FLAGS, script="deflow_o2o.py", timeout=600)
    assert "--compile: the first update" in result.stdout
    run_dir = next(tmp_path.glob("*__deflow_o2o__*"))
    train = (run_dir / "train.csv").read_text().splitlines()
    assert len(train) == 3 and "nan" not in train[2].split(",")[1]  # steps 3 and 6, finite losses
    assert [line.split(",")[0] for line in (run_dir / "eval.csv").read_text().splitlines()[1:]] == ["1", "3", "6"]

"""The CUDA path, where CUDA exists (skipped elsewhere): --compile's CUDA graphs against the eager update, resume on
CUDA, a CUDA checkpoint resumed on the CPU, evaluation on CUDA, and the pixel memory check against what the GPU
allocates. On a GPU machine, with the benchmark: see docs/speed.md ("On a GPU")."""

import dataclasses

import pytest
import torch

import deflow_offline
import deflow_pixels
from tests.conftest import TINY_FLAGS, make_envs, random_batch, read_csv, run_script, tiny_agent, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; on a GPU machine: "
                                "python -m pytest tests/test_cuda.py (docs/speed.md)")
ENV = "cube-single-play-singletask-task1-v0"
CUDA = torch.device("cuda")


def train_on_cuda(losses, steps=40, compiled=False):
    """`steps` updates of a tiny agent of cube-single's shapes on CUDA in strict float32, logging every 10th (the
    `mse` rollout: another graph); returns the metrics of every step (read before the next step overwrites a CUDA
    graph's outputs) and the final agent."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    agent, args = tiny_agent(obs_dim=28, action_dim=5, precision="float32")
    agent.to(CUDA)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3, fused=True)
    data = {k: v.to(CUDA) for k, v in random_batch(batch_size=1024, obs_dim=28, action_dim=5).items()}
    torch.manual_seed(7)
    log_rng = torch.Generator(CUDA).manual_seed(8)
    history = []
    for step in range(1, steps + 1):
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        batch = deflow_offline.sample_batch(data, args.batch_size)
        metrics = train_step(deflow_offline, agent, optimizer, batch, args, log_rng if step % 10 == 0 else None, losses)
        history.append({k: v.item() for k, v in metrics.items()})
    return history, agent.state_dict()


def test_cuda_graphs_equal_the_eager_update():
    """--compile on CUDA (mode reduce-overhead: CUDA graphs) against the eager code, 40 updates from the same state
    and seed: the same losses and parameters, up to the rounding of other kernels."""
    from torch._dynamo.utils import counters

    eager_history, eager_state = train_on_cuda(deflow_offline.deflow_losses)
    compiled = torch.compile(deflow_offline.deflow_losses, mode="reduce-overhead")
    compiled_history, compiled_state = train_on_cuda(compiled, compiled=True)
    assert counters["inductor"]["cudagraph_skips"] == 0  # the graphs ran as CUDA graphs
    for eager, fast in zip(eager_history, compiled_history):
        assert eager.keys() == fast.keys()
        for name in eager:
            assert fast[name] == pytest.approx(eager[name], rel=1e-3, abs=1e-5), name
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-3, atol=1e-4, msg=name)


@pytest.fixture(scope="module")
def cuda_runs(tmp_path_factory, cube_dataset):
    """On CUDA: A 40 updates straight; B 20, then resumed to 40 on CUDA; C: B's checkpoint at 20 resumed on the CPU."""
    root = tmp_path_factory.mktemp("runs")
    flags = ["--env-name", ENV, "--dataset-path", cube_dataset, "--run-dir", root, "--log-interval", 10,
             "--eval-interval", 20, "--eval-episodes", 2, *TINY_FLAGS, "--device", "cuda"]
    out = {name: run_script(*flags, "--offline-steps", steps, "--exp-name", name) for name, steps in
           (("A", 40), ("B", 20))}
    for name in "AB":
        out[name + "_dir"] = next(root.glob(f"*__{name}__*"))
    checkpoint = torch.load(out["B_dir"] / "checkpoint.pt", weights_only=True)
    (root / "C").mkdir()
    torch.save(checkpoint, root / "C" / "checkpoint.pt")
    out["B_resume"] = run_script("--resume", out["B_dir"] / "checkpoint.pt", "--offline-steps", 40)
    out["C"] = run_script("--resume", root / "C" / "checkpoint.pt", "--offline-steps", 30, "--device", "cpu")
    out["C_dir"] = root / "C"
    return out


def test_run_on_cuda_prints_tf32_and_resumes_exactly(cuda_runs):
    assert "--precision tf32 on cuda: TF32 matmuls and convolutions" in cuda_runs["A"].stdout
    numbers = [[{k: v for k, v in row.items() if not k.startswith("time/")} for row in
                read_csv(cuda_runs[name] / "train.csv")] for name in ("A_dir", "B_dir")]
    assert numbers[0] == numbers[1] and len(numbers[0]) == 4
    assert read_csv(cuda_runs["A_dir"] / "eval.csv") == read_csv(cuda_runs["B_dir"] / "eval.csv")


def test_a_cuda_checkpoint_resumes_on_the_cpu(cuda_runs):
    assert "was written on another device type: random number generator states do not carry over" in cuda_runs["C"].stdout
    checkpoint = torch.load(cuda_runs["C_dir"] / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 30 and checkpoint["rng"]["log"].numel() > 100  # now a CPU run's streams
    assert all(torch.isfinite(v).all() for v in checkpoint["agent"].values())


def test_evaluation_on_cuda_gives_the_cpus_actions():
    """evaluate() with the agent on CUDA (states go to the device, actions come back): the same episodes and, in
    strict float32, the CPU's actions to float rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    agent, args = tiny_agent(obs_dim=28, action_dim=5, precision="float32")
    seen = {}
    for device in ("cpu", "cuda"):
        actions = seen.setdefault(device, [])

        def policy(agent, obs, noise, args):
            out = deflow_offline.sample_actions(agent, obs, noise, args)
            actions.append(out.cpu())
            return out

        args = dataclasses.replace(args, env_name=ENV, seed=0, eval_episodes=3)
        metrics, _ = deflow_offline.evaluate(agent.to(device), make_envs(2, max_episode_steps=5), args, 1, policy)
        assert metrics["episode.length"] == 5
    assert len(seen["cpu"]) == len(seen["cuda"]) == 10
    torch.testing.assert_close(seen["cuda"][0], seen["cpu"][0], rtol=1e-4, atol=1e-5)


def test_pixel_memory_check_matches_what_the_gpu_allocates(visual_dataset):
    """The frames take on the GPU what the memory check counts, and one paper-size update (impala_small, 4x512,
    batch 256; eager, then compiled with CUDA graphs) fits in the WORKING_MEMORY it keeps free next to them."""
    from common.visual import WORKING_MEMORY, load_visual_datasets

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    _, train, val, report = load_visual_datasets("visual-cube-single-play-singletask-task1-v0", CUDA,
                                                 dataset_path=str(visual_dataset))
    frames = sum(data["frames"].numel() for data in (train, val))
    allocated = torch.cuda.memory_allocated() - before
    assert f"{frames:,} frames of 64x64x3 uint8" in report
    assert frames <= allocated <= frames + 16 * 2**20  # the frames, plus the small per-frame arrays and rounding
    del train, val

    args = dataclasses.replace(deflow_pixels.Args(), precision="tf32")
    for compiled in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_reserved()
        torch.manual_seed(0)
        agent = deflow_pixels.DeFlowAgent((64, 64, 9), 5, args).to(CUDA)
        optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=3e-4, fused=True)
        losses = torch.compile(deflow_pixels.deflow_losses, mode="reduce-overhead") if compiled else \
            deflow_pixels.deflow_losses
        batch = {"observations": torch.randint(0, 256, (256, 64, 64, 9), dtype=torch.uint8, device=CUDA),
                 "next_observations": torch.randint(0, 256, (256, 64, 64, 9), dtype=torch.uint8, device=CUDA),
                 "actions": torch.rand(256, 5, device=CUDA) * 2 - 1, "rewards": -torch.rand(256, device=CUDA),
                 "masks": torch.ones(256, device=CUDA)}
        for step in range(3):
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            log_rng = torch.Generator(CUDA) if step == 2 else None
            train_step(deflow_pixels, agent, optimizer, batch, args, log_rng, losses)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_reserved() - start
        assert peak <= WORKING_MEMORY, f"compiled={compiled}: {peak / 2**30:.2f} GiB"
        del agent, optimizer, losses

"""Intrinsic action variance (IAV) of a dataset, and the trust-region size delta = c * IAV it suggests.

The DeFlow authors chose the target divergence delta by hand from "the average variance of actions among k-nearest
neighbors (k = 5) for each state, normalized by the action dimension", with c = 0.1 for manipulation (cube, scene:
IAV ~ 0.01 gives delta = 0.001) and c = 1.0 for navigation. Their code has no implementation; this one reads the
sentence as follows (the query itself excluded, raw observations, population variance: choices the sentence leaves
open):

    v_i = (1 / A) * sum_j Var_{n in kNN(i)} actions[n, j]     (population variance, ddof 0)
    IAV = mean of v_i over the query states

kNN(i) are the k nearest observations to observation i by Euclidean distance in raw observation space, i itself
excluded, searched exactly among all N transitions (brute force in chunks on the given device). The query states are
a uniform subsample without replacement (all of them when --iav-queries is 0 or >= N); its spread is reported as the
estimates of disjoint groups of the queries. Run it on a dataset alone:

    python -m common.iav --env-name cube-single-play-singletask-v0 --dataset-path data/cube-single-play-100ep.npz
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np
import torch

NAVIGATION = ("antmaze", "humanoidmaze", "antsoccer", "pointmaze")


def default_iav_scale(env_name: str) -> float:
    """c of delta = c * IAV: 1.0 for navigation/locomotion (also D4RL AntMaze), 0.1 for manipulation (cube, scene,
    puzzle; also Adroit)."""
    return 1.0 if env_name.removeprefix("visual-").removeprefix("D4RL/").startswith(NAVIGATION) else 0.1


@torch.no_grad()
def knn_action_variance(observations: torch.Tensor, actions: torch.Tensor, queries: torch.Tensor, k: int = 5,
                        query_chunk: int = 1024, key_chunk: int = 65536) -> torch.Tensor:
    """v_i for each query index in `queries`, shape (Q,). Memory: about query_chunk * key_chunk floats."""
    n = len(observations)
    if n <= k:
        raise ValueError(f"the IAV needs more than k = {k} transitions (got {n})")
    obs = observations - observations.mean(dim=0)  # the same distances, less float32 cancellation in |x|^2
    sq_norms = obs.square().sum(dim=1)
    out = []
    for q_start in range(0, len(queries), query_chunk):
        q_idx = queries[q_start:q_start + query_chunk]
        q_obs, rows = obs[q_idx], torch.arange(len(q_idx), device=obs.device)
        best_dist = torch.full((len(q_idx), k), float("inf"), device=obs.device)
        best_idx = torch.zeros((len(q_idx), k), dtype=torch.long, device=obs.device)
        for k_start in range(0, n, key_chunk):
            keys = obs[k_start:k_start + key_chunk]
            dist = sq_norms[q_idx, None] - 2 * q_obs @ keys.T + sq_norms[None, k_start:k_start + len(keys)]
            own = (q_idx >= k_start) & (q_idx < k_start + len(keys))  # a query is never its own neighbour
            dist[rows[own], q_idx[own] - k_start] = float("inf")
            chunk_dist, chunk_pos = dist.topk(min(k, len(keys)), dim=1, largest=False)
            best_dist, pick = torch.cat([best_dist, chunk_dist], 1).topk(k, dim=1, largest=False)
            best_idx = torch.cat([best_idx, chunk_pos + k_start], 1).gather(1, pick)
        out.append(actions[best_idx].var(dim=1, unbiased=False).mean(dim=-1))
    return torch.cat(out)


def estimate_iav(observations, actions, k: int = 5, num_queries: int = 10_000, num_groups: int = 5, seed: int = 0,
                 device: str | torch.device = "cpu") -> dict:
    """IAV of a dataset with its spread over `num_groups` disjoint query subsamples. Uses its own RNG."""
    start = time.time()
    obs = torch.as_tensor(np.asarray(observations), dtype=torch.float32, device=device)
    act = torch.as_tensor(np.asarray(actions), dtype=torch.float32, device=device)
    if obs.ndim != 2 or act.ndim != 2 or len(obs) != len(act):
        raise ValueError(f"the IAV needs (N, obs_dim) observations and (N, action_dim) actions, got "
                         f"{tuple(obs.shape)} and {tuple(act.shape)} (pixel observations: use a state vector)")
    n = len(obs)
    num_queries = n if num_queries <= 0 or num_queries >= n else num_queries
    queries = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num_queries].to(obs.device)
    v = knn_action_variance(obs, act, queries, k).double().cpu()
    groups = [float(g.mean()) for g in v.tensor_split(min(num_groups, num_queries))]
    return {"iav": float(v.mean()), "group_estimates": groups, "group_std": float(np.std(groups)),
            "k": k, "num_queries": num_queries, "num_transitions": n, "seconds": time.time() - start}


def auto_target_divergence(args, data: dict, device) -> dict:
    """--target-divergence auto for a script's `args` (env_name, iav_scale, iav_queries, seed) and its training
    arrays: sets args.target_divergence = scale * IAV and args.iav_scale (None: by family), prints a line and returns
    the estimate with 'scale', 'target_divergence' and that line as 'message'."""
    scale = default_iav_scale(args.env_name) if args.iav_scale is None else args.iav_scale
    report = estimate_iav(data["observations"], data["actions"], num_queries=args.iav_queries, seed=args.seed,
                          device=device)
    report.update(scale=scale, target_divergence=scale * report["iav"])
    groups = report["group_estimates"]
    report["message"] = (
        f"--target-divergence auto: delta = {scale:g} x IAV {report['iav']:.3e} = {report['target_divergence']:.3e} "
        f"(IAV over {report['num_queries']:,} query states of {report['num_transitions']:,}, k = {report['k']}; "
        f"{len(groups)} subsamples {min(groups):.3e}..{max(groups):.3e}; {report['seconds']:.1f} s)")
    args.target_divergence, args.iav_scale = report["target_divergence"], scale
    print(report["message"])
    return report


@dataclasses.dataclass
class Args:
    env_name: str = "cube-single-play-singletask-v0"
    """OGBench environment whose dataset to measure (any task of it: the IAV uses observations and actions only)"""
    dataset_dir: str = "~/.ogbench/data"
    """where official OGBench datasets are looked for"""
    dataset_path: Optional[str] = None
    """a local training .npz instead"""
    queries: int = 10_000
    """query states (0: all transitions)"""
    groups: int = 5
    """disjoint query subsamples whose estimates show the spread"""
    k: int = 5
    """neighbours per query state"""
    seed: int = 0
    """seed of the query subsample"""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda'"""


if __name__ == "__main__":
    import sys

    import tyro

    from common.datasets import DatasetError, load_env_and_datasets

    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        "cpu" if args.device == "auto" else args.device
    try:
        _, train, _ = load_env_and_datasets(args.env_name, args.dataset_dir, args.dataset_path)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    r = estimate_iav(train["observations"], train["actions"], args.k, args.queries, args.groups, args.seed, device)
    c = default_iav_scale(args.env_name)
    print(f"{args.env_name}: IAV {r['iav']:.4e} (subsamples: {', '.join(f'{g:.4e}' for g in r['group_estimates'])}; "
          f"std {r['group_std']:.1e}) over {r['num_queries']:,} queries of {r['num_transitions']:,} transitions, "
          f"k = {r['k']}, {r['seconds']:.1f} s on {device}; delta = {c:g} x IAV = {c * r['iav']:.4e}")

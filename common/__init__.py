"""Shared by the DeFlow scripts: data (OGBench loading and generation, D4RL through Minari), evaluation environments,
the IAV heuristic, and the tools around the scripts (recipes, sweeps, plots)."""

import os
import warnings

# MuJoCo renders only for pixels and videos; without a display its default (GLFW) warns on every import.
os.environ.setdefault("MUJOCO_GL", "egl")
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")

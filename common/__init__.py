"""What the three DeFlow scripts import, and nothing else: data (datasets: OGBench loading; generate: local dataset
generation; d4rl: D4RL through Minari), envs (evaluation environments side by side), iav (the IAV heuristic of
--target-divergence auto) and runs (a run's command line and files). The tools around the scripts are in tools/."""

import os
import warnings

# MuJoCo renders only for pixels and videos; without a display its default (GLFW) warns on every import.
os.environ.setdefault("MUJOCO_GL", "egl")
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")

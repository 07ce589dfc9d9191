"""Data plumbing shared by the DeFlow scripts: OGBench loading (datasets.py) and local generation (generate.py)."""

import os
import warnings

# MuJoCo renders only for pixels and videos; without a display its default (GLFW) warns on every import.
os.environ.setdefault("MUJOCO_GL", "egl")
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")

"""The tools around the three scripts, each run with `python -m tools.<name>` from the repository root:

    sweep      many runs (tasks x seeds) through submitit, here or as a SLURM job array; resumes stopped runs
    plot       learning curves (95% bands), results table (mean +- std over seeds), IQM, from the runs' CSVs
    recipes    the paper's per-task flags (the single source of the README's recipe table)
    evaluate   evaluate a checkpoint, also with the official code's other samplers (max-q, iterative refinement)
    benchmark  training and evaluation speed, optionally side by side with another checkout
    generate   OGBench 'play' (and pointmaze 'navigate') datasets with the oracles in the ogbench package
"""

import importlib
import sys


def require(*modules: str) -> None:
    """The tools' extra requirements (requirements-extra.txt): one line naming the install command if one is missing."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            sys.exit(f"error: {module} is missing; the tools need the extra requirements: "
                     "pip install -r requirements-extra.txt")

"""What the scripts import: runs, datasets, envs; only when asked for: visual (pixels), d4rl, iav (--target-divergence
auto), online (deflow_o2o.py's checkpoints), video (--capture-video), generate (--generate-episodes). Importing them
changes nothing in the process. Here: the two names the data modules (datasets, visual, d4rl, generate) share."""


class DatasetError(RuntimeError):
    """A problem with the environment name or the dataset; the message says how to fix it."""


def dataset_name_of(env_name: str) -> str:
    """'cube-single-play-singletask-task2-v0' -> 'cube-single-play-v0' (the file every task of it shares)."""
    parts = env_name.split("-")
    return "-".join(parts[: parts.index("singletask")] + parts[-1:] if "singletask" in parts else parts)

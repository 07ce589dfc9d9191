"""What the scripts import: runs, datasets, envs; only when asked for: visual (pixels), d4rl, iav (--target-divergence
auto), online (deflow_o2o.py's checkpoints), video (--capture-video). Importing them changes nothing in the process."""

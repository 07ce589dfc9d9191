"""The scripts' one shared helper, datasets.py (visual.py for pixels); the rest only behind flags that need it."""

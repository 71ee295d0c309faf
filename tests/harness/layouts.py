"""Key -> shape layouts of every released checkpoint (tests/data/checkpoint_layouts, read off the released files)."""
import json
import os

LAYOUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "checkpoint_layouts")


def load_layout(filename):
    """The json of one layout: {"keys": {name: shape}, ...}. Missing files are an error, not a skip."""
    with open(os.path.join(LAYOUT_DIR, filename)) as f:
        return json.load(f)

"""Regenerates example_workflows/, tests/data/stock_node_definitions.json and the README's workflow
table from the catalogue::

    python scripts/example_workflows /path/to/ComfyUI

A real ComfyUI server runs with the tests' stand-in model files linked in, so that its
``/object_info`` lists every file the workflows name (the stand-ins are the tests' own small
files: tests/harness/standins.py)."""
import os
import sys

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_DIR = os.path.dirname(SCRIPTS)


def object_info(comfy_root):
    """The server's node definitions with the stand-ins in its models folder."""
    sys.path.insert(1, os.path.join(PACK_DIR, "tests"))
    from harness import standins
    from harness.server import ComfyServer

    server = ComfyServer(comfy_root)
    standins.link_into(standins.ensure(comfy_root), server.models_dir)
    with server:
        return server.get("/object_info")


def main(argv):
    sys.path.insert(0, SCRIPTS)  # run as `python scripts/example_workflows`: the package itself
    from example_workflows.writer import README, readme_with_table, workflow_path, write_all

    for name in write_all(object_info(argv[1])):
        print("wrote", workflow_path(name))
    with open(README) as f:
        text = f.read()
    with open(README, "w") as f:
        f.write(readme_with_table(text))
    print("wrote the workflow table in", README)


if __name__ == "__main__":
    main(sys.argv)

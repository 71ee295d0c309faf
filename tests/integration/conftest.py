"""Integration tests run inside a real ComfyUI, named by XCTRL_COMFYUI_ROOT.

run_tests.sh starts one pytest process per ComfyUI runtime it found. Without a
runtime every test here is skipped, loudly.
"""
import os

import pytest

from harness import comfy_runtime

ROOT = os.environ.get("XCTRL_COMFYUI_ROOT")
SKIP_REASON = "no ComfyUI runtime: set COMFYUI_PATH (run_tests.sh) or XCTRL_COMFYUI_ROOT"

if ROOT:
    comfy_runtime.import_comfyui(ROOT)


def pytest_report_header(config):
    if ROOT:
        return f"ComfyUI {comfy_runtime.comfyui_version(ROOT)} at {ROOT}"
    return f"!!! {SKIP_REASON}: ALL INTEGRATION TESTS SKIPPED !!!"


def pytest_collection_modifyitems(config, items):
    if not ROOT:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def comfy_root():
    return ROOT


@pytest.fixture(scope="session")
def pack():
    """The pack as ComfyUI loaded it (with ComfyUI's built-in nodes initialised)."""
    return comfy_runtime.load_nodes()


@pytest.fixture(scope="session")
def server():
    from harness.server import ComfyServer

    with ComfyServer(ROOT) as s:
        yield s

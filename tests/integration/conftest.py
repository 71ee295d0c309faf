"""Integration tests run inside a real ComfyUI, named by XCTRL_COMFYUI_ROOT.

run_tests.sh starts one pytest process per ComfyUI runtime it found. Without a
runtime every test here is skipped, loudly.
"""
import os

import pytest

from harness import comfy_runtime, mi_setups

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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions run many times faster on one thread on this shared 2-core machine; a
    module asks for it with an autouse fixture of its own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory, pack):
    """model_folder("controlnet"): a temp folder registered for that ComfyUI model folder kind,
    one per kind for the session (file names must differ across test modules: folder_paths
    returns the first file of a name)."""
    import folder_paths

    made = {}

    def folder(kind):
        if kind not in made:
            made[kind] = tmp_path_factory.mktemp(kind)
            folder_paths.add_model_folder_path(kind, str(made[kind]))
        return made[kind]

    return folder


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, pack):
    """models/controlnet's first (default) folder while a training module runs: where training writes."""
    from harness.training_data import default_controlnet_folder

    with default_controlnet_folder(str(tmp_path_factory.mktemp("trained"))) as path:
        yield path


@pytest.fixture(scope="session")
def controlnet_dir(model_folder):
    return model_folder("controlnet")


@pytest.fixture(scope="session")
def nodes_mod(pack):
    """The ControlNeXt node module (modules testing other nodes name theirs)."""
    return comfy_runtime.pack_module("nodes.controlnext_nodes")


# Tiny models with stock ControlNets for the MIControlNet tests (harness/mi_setups.py), one per module.
def _mi_setup(family):
    @pytest.fixture(scope="module")
    def setup(pack):
        return getattr(mi_setups, f"{family}_setup")()
    return setup


mi_sd15, mi_sdxl, mi_sd3, mi_flux = (_mi_setup(f) for f in ("sd15", "sdxl", "sd3", "flux"))

"""Importing a real ComfyUI into the test process, headless and on the CPU.

One ComfyUI per process: the integration suite runs once per runtime, in its own
pytest process (scripts/run_tests.sh), with XCTRL_COMFYUI_ROOT naming the root.
"""
import asyncio
import os
import sys
import tempfile

PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_FOLDER_NAME = "xctrl-nodes"

_state = {}


class NotComfyUI(RuntimeError):
    pass


def check_root(root):
    for need in ("main.py", "nodes.py", "comfy"):
        if not os.path.exists(os.path.join(root, need)):
            raise NotComfyUI(
                f"'{root}' is not a ComfyUI folder (no {need} in it). Point COMFYUI_PATH at the folder that contains ComfyUI's main.py."
            )
    return os.path.abspath(root)


def comfyui_version(root):
    path = os.path.join(root, "comfyui_version.py")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def import_comfyui(root, cpu=True):
    """Puts ComfyUI on sys.path (in CPU mode unless asked otherwise) and imports its core. Idempotent."""
    if "root" in _state:
        if _state["root"] != root:
            raise RuntimeError(f"this process already imported ComfyUI from {_state['root']}")
        return _state["root"]
    root = check_root(root)
    sys.path.insert(0, root)
    # ComfyUI's nodes.py later puts ComfyUI/comfy on sys.path, where comfy/utils.py would
    # shadow the root's utils/ package: import the package first, as main.py does.
    import utils.extra_config  # noqa: F401
    import comfy.cli_args

    # Must happen before comfy.model_management is imported: it reads --cpu at import time.
    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.disable_all_custom_nodes = False
    import comfy.model_management  # noqa: F401
    import folder_paths  # noqa: F401

    _state["root"] = root
    _state["version"] = comfyui_version(root)
    return root


def imported_version():
    """The version of the ComfyUI this process imported ("unknown" before any)."""
    return _state.get("version", "unknown")


def pack_custom_nodes_dir():
    """A temporary custom_nodes folder holding only a link to this pack."""
    if "custom_nodes" not in _state:
        d = tempfile.mkdtemp(prefix="xctrl_custom_nodes_")
        os.symlink(PACK_DIR, os.path.join(d, PACK_FOLDER_NAME))
        _state["custom_nodes"] = d
    return _state["custom_nodes"]


def load_nodes():
    """Initialises ComfyUI's built-in nodes and this pack (through a temp custom_nodes dir).

    Returns the pack's module as ComfyUI loaded it.
    """
    if "pack" in _state:
        return _state["pack"]
    import folder_paths
    import nodes

    custom = pack_custom_nodes_dir()
    # Only our temp folder: other packs in the runtime's own custom_nodes stay out of the test.
    folder_paths.folder_names_and_paths["custom_nodes"] = ([custom], set())
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    mod_name = os.path.join(custom, PACK_FOLDER_NAME).replace(".", "_x_")
    pack = sys.modules.get(mod_name)
    if pack is None:
        raise RuntimeError(f"ComfyUI did not load the pack from {custom}: see the log above")
    _state["pack"] = pack
    return pack


def pack_module(dotted):
    """A submodule of the pack as ComfyUI loaded it, e.g. pack_module('nodes.controlnext')."""
    import importlib

    pack = load_nodes()
    return importlib.import_module(pack.__name__ + "." + dotted)


def run_prompt(prompt, outputs=None):
    """Validates and executes an API-format prompt with ComfyUI's own executor.

    Returns (executor, history-like outputs dict). Raises AssertionError with ComfyUI's
    validation message when the prompt is invalid.
    """
    import inspect

    import execution

    load_nodes()
    valid = asyncio.run(execution.validate_prompt("test", prompt, None))
    if not valid[0]:
        raise AssertionError(f"prompt invalid: {valid[1]} {valid[3]}")

    class _Server:
        client_id = None
        last_node_id = None
        last_prompt_id = None

        def send_sync(self, event, data, sid=None):
            pass

    # 0.8.0's executor needs cache_args (0.33.0 reads "ram_inactive" too, as main.py passes it);
    # 0.3.64 has cache_size instead.
    params = inspect.signature(execution.PromptExecutor).parameters
    kwargs = {"cache_args": {"lru": 0, "ram": 0, "ram_inactive": 0}} if "cache_args" in params else {}
    executor = execution.PromptExecutor(_Server(), **kwargs)
    executor.execute(prompt, "test", {}, outputs if outputs is not None else valid[2])
    return executor


def pack_node_classes():
    """{node id: class} of every node the pack registers (its V3 extension's node list)."""
    return {cls.GET_SCHEMA().node_id: cls for cls in load_nodes().NODES}


def node_result(node_class, *args, **kwargs):
    """Runs a V3 node's execute directly; returns its outputs as a tuple."""
    return node_class.execute(*args, **kwargs).result


def combo_options(node_class, name):
    """The choices of a combo input, as the node's V1 info lists them (either layout)."""
    inputs = node_class.INPUT_TYPES()
    spec = inputs.get("required", {}).get(name) or inputs.get("optional", {}).get(name)
    return spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])


def model_call(patcher, x, sigma, ctx, cond_or_uncond=(0,), y=None, sample_sigmas=None):
    """One model call as a sampler makes it, with the patcher's wrappers and patches installed."""
    import torch
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    to = dict(patcher.model_options["transformer_options"])
    to["wrappers"] = patcher.wrappers
    to["cond_or_uncond"] = list(cond_or_uncond)
    sigmas = torch.full((x.shape[0],), float(sigma))
    to["sigmas"] = sigmas
    if sample_sigmas is not None:
        to["sample_sigmas"] = sample_sigmas
    kw = {} if y is None else {"y": y}
    with torch.no_grad():
        return patcher.model.apply_model(x, sigmas, c_crossattn=ctx, transformer_options=to, **kw)


class OtherPacksReplacement:
    """A DiT block replacement as another pack would put it on a MODEL: it runs the block it replaces
    (``original_block``), changes the block's image output with ``change`` and records each call."""

    def __init__(self, block, index, change):
        self.block, self.index, self.change, self.calls = block, index, change, []

    def __deepcopy__(self, memo):  # clones of the MODEL (some ComfyUI releases deep-copy model_options) share it
        return self

    def __call__(self, args, extra):
        self.calls.append(args["img"].shape)
        out = extra["original_block"](args)
        return dict(out, img=self.change(out["img"]))

    def on(self, model):
        """A clone of ``model`` carrying this replacement."""
        model = model.clone()
        model.set_model_patch_replace(self, "dit", self.block, self.index)
        return model

"""The example workflows (example_workflows/*.json) end to end on the real ComfyUI server (main.py --cpu).

Random-weight stand-ins of the right architectures sit under the published file names in the
server's models folder (tests/harness/standins.py: what is reduced and why); the first run
generates them into a cache (about 3 minutes, 8 GB). Each workflow's API twin is what the
frontend would queue (scripts/example_workflows, tests/harness/workflow_runs.py), with the size, step and frame widgets
lowered (TEST_OVERRIDES) so that a run takes seconds to a few minutes on a CPU.
"""
import asyncio
import importlib
import json
import os
import re

import pytest

from harness import standins
from example_workflows import catalogue, ui_format, writer
from harness import workflow_runs

NAMES = sorted(catalogue.WORKFLOWS)


def missing_requirements(name, node_types):
    """What this ComfyUI lacks of a workflow's catalogue.REQUIRES: node types, and parts of core
    ("module:name") looked up in the ComfyUI this process imported (the server's release)."""
    missing = []
    for need in catalogue.REQUIRES.get(name, ()):
        module, _, attribute = need.rpartition(":")
        if not (hasattr(importlib.import_module(module), attribute) if module else need in node_types):
            missing.append(need)
    return missing


def skip_unless_available(name, node_types):
    """A workflow needing what this ComfyUI does not have (catalogue.REQUIRES) is skipped here, saying so."""
    missing = missing_requirements(name, node_types)
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}, which this ComfyUI does not have")


CORRUPT = "corrupt_controlnext.safetensors"
REFUSED_PICKLE = "refused_pickle.pth"  # a tensor file with a code payload
LORA = "some_lora.safetensors"
T2I = "t2i_adapter_canny.safetensors"
CHECKPOINT = "a_checkpoint.safetensors"
PAYLOAD_MARKER = "payload_ran"


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def standin_dir(comfy_root):
    return standins.ensure(comfy_root)


@pytest.fixture(scope="module")
def wf_server(comfy_root):
    """A server of its own, with the stand-ins, the input files and a corrupt control file."""

    def add_wrong_files(server):
        import torch
        from safetensors.torch import save_file

        folder = os.path.join(server.models_dir, "controlnet")
        with open(os.path.join(folder, CORRUPT), "wb") as f:
            f.write(b"\x00\x01 this is not a safetensors file" * 64)
        torch.save({"weight": torch.zeros(2), "extra": _RunsCodeWhenUnpickled(os.path.join(server.base, PAYLOAD_MARKER))},
                   os.path.join(folder, REFUSED_PICKLE))
        save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
                   "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4)}, os.path.join(folder, LORA))
        save_file({"adapter.body.0.block1.weight": torch.zeros(320, 320, 3, 3)}, os.path.join(folder, T2I))
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                   "first_stage_model.decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)}, os.path.join(folder, CHECKPOINT))

    with standins.server(comfy_root, add_wrong_files) as server:
        yield server


@pytest.fixture(scope="module")
def object_info(wf_server):
    return wf_server.get("/object_info")


# ----------------------------------------------------------------------------- the files
def test_workflow_folder_holds_one_json_and_thumbnail_per_use():
    files = set(os.listdir(writer.WORKFLOW_DIR))
    assert {f for f in files if f.endswith(".json")} == {catalogue.TITLES[n] + ".json" for n in NAMES}
    for name in NAMES:
        thumbnail = writer.workflow_path(name, ".jpg")
        assert os.path.isfile(thumbnail), f"thumbnail {thumbnail} missing"
        with open(thumbnail, "rb") as f:
            assert f.read(3) == b"\xff\xd8\xff", f"{thumbnail} is not a JPEG"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_file_is_what_the_builder_writes(name, object_info):
    """The committed UI file equals the one generated from its API description (so UI files and
    API twins cannot drift), with this server's definitions of the pack's nodes and the stock
    nodes' definitions recorded with the files (writer.STOCK_DEFINITIONS: another ComfyUI's stock
    nodes may differ; that the file runs here is test_workflow_converts_to_a_valid_prompt's)."""
    skip_unless_available(name, object_info)
    with open(writer.workflow_path(name)) as f:
        committed = json.load(f)
    assert committed.get("version") == 0.4
    fresh = json.loads(json.dumps(ui_format.to_ui(catalogue.WORKFLOWS[name](), writer.build_definitions(object_info))))
    assert committed == fresh, (
        f"{writer.workflow_path(name)} is out of date with the node definitions: regenerate with "
        "`python scripts/example_workflows /path/to/ComfyUI`"
    )


@pytest.fixture(scope="module")
def in_process_folders(pack, standin_dir, tmp_path_factory, comfy_root):
    """This test process's ComfyUI sees the stand-ins and the input files (for validate_prompt)."""
    import folder_paths

    for folder in standins.FILES:
        folder_paths.add_model_folder_path(folder, os.path.join(standin_dir, folder))
    folder_paths.filename_list_cache.clear()
    inputs = tmp_path_factory.mktemp("wf_input")
    workflow_runs.write_test_inputs(str(inputs), comfy_root)
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(inputs))
    yield
    folder_paths.set_input_directory(old)


def _node_info(cls):
    """The parts of /object_info the conversion reads, from this process's node classes."""
    if hasattr(cls, "GET_NODE_INFO_V1"):  # V3 nodes: exactly what /object_info serves
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()}, "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)}


@pytest.mark.parametrize("name", NAMES)
def test_workflow_converts_to_a_valid_prompt(name, in_process_folders):
    """UI file -> API prompt, validated by ComfyUI's execution.validate_prompt against the real
    node definitions: every node type exists, every widget value is valid, every link fits."""
    import execution
    import nodes

    skip_unless_available(name, nodes.NODE_CLASS_MAPPINGS)
    with open(writer.workflow_path(name)) as f:
        ui = json.load(f)
    info = {cls: _node_info(nodes.NODE_CLASS_MAPPINGS[cls]) for cls in {n["type"] for n in ui["nodes"]}
            if cls in nodes.NODE_CLASS_MAPPINGS}
    missing = {n["type"] for n in ui["nodes"]} - set(info) - set(ui_format.VIRTUAL_NODES)
    assert not missing, f"unknown node types {missing}"
    prompt = ui_format.to_api(ui, info)
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt("wf-" + name, prompt, None))
    assert ok, f"{name}: {error} {json.dumps(node_errors)[:3000]}"
    assert outputs, f"{name} has no output node"
    ours = {n["class_type"] for n in prompt.values() if n["class_type"].startswith("XCtrl")}
    assert ours, f"{name} uses none of the pack's nodes"


QWEN_FUN = "mi_qwen_image_fun_canny_depth"
# The keys core's Load ControlNet routes a Qwen-Image 2512 Fun ControlNet on (docs/mi_controlnet.md).
QWEN_FUN_ROUTING_KEYS = ("control_img_in.weight", "control_blocks.0.after_proj.weight")


def test_the_qwen_fun_workflow_requires_what_loads_its_controlnet(model_folder):
    """Every release lists the 2512 Fun ControlNet file in Load ControlNet; only some can load it, so
    the workflow's requirement is core's class: where catalogue.REQUIRES says this ComfyUI has it,
    Load ControlNet makes that class of a Fun ControlNet file, where it says not, the file does not load."""
    import folder_paths
    import nodes
    import torch
    from safetensors.torch import save_file

    from harness import qwen_controlnets

    (need,) = catalogue.REQUIRES[QWEN_FUN]
    met = not missing_requirements(QWEN_FUN, nodes.NODE_CLASS_MAPPINGS)
    sd = qwen_controlnets.fun_state_dict(0)  # None where core has no Fun ControlNet class to build it with
    if sd is None:
        sd = {key: torch.zeros(16, 16) for key in QWEN_FUN_ROUTING_KEYS}
    name = "qwen_fun_requirement.safetensors"
    save_file(sd, str(model_folder("controlnet") / name))
    folder_paths.filename_list_cache.clear()
    assert name in folder_paths.get_filename_list("controlnet")
    if met:
        (control,) = nodes.ControlNetLoader().load_controlnet(name)
        assert type(control).__name__ == need.rpartition(":")[2]
    else:
        with pytest.raises(RuntimeError, match="controlnet file is invalid"):  # what README tells users
            nodes.ControlNetLoader().load_controlnet(name)


LEGACY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "legacy_workflows")
LEGACY = sorted(f[:-5] for f in os.listdir(LEGACY_DIR) if f.endswith(".json"))


# The files as the 0.1.0 workflows named them (users renamed the generic names by hand then):
# the same stand-ins under those names.
LEGACY_FILES = {
    "checkpoints": {"v1-5-pruned-emaonly.safetensors": "v1-5-pruned-emaonly-fp16.safetensors"},
    "controlnet": {
        "controlnext_sd15_deepfashion_pose.safetensors": "controlnext_sd15_deepfashion_multiview_controlnet.safetensors",
        "controlnext_sd15_deepfashion_pose_unet.safetensors": "controlnext_sd15_deepfashion_multiview_unet.safetensors",
        "controlnext_sdxl_anime_canny.safetensors": "controlnext_sdxl_anime_canny_controlnet.safetensors",
        "controlnext_sdxl_anime_canny_unet.safetensors": "controlnext_sdxl_anime_canny_unet.safetensors",
        "controlnext_sdxl_vidit_depth.safetensors": "controlnext_sdxl_vidit_depth_controlnet.safetensors",
        "controlnext_sdxl_vidit_depth_unet.safetensors": "controlnext_sdxl_vidit_depth_unet.safetensors",
        "sdxl_encD_canny_48m.safetensors": "sdxl_encD_depth_48m.safetensors",
        "sd21_encD_depth_14m.ckpt": "sd21_encD_canny_14m.ckpt",
        "control_v11p_sd15_openpose.pth": "control_v11p_sd15_openpose_fp16.safetensors",
        "control_v11p_sd15_canny.pth": "control_v11p_sd15_canny_fp16.safetensors",
    },
}


@pytest.fixture(scope="module")
def legacy_folders(in_process_folders, standin_dir, tmp_path_factory):
    import folder_paths

    base = tmp_path_factory.mktemp("legacy_models")
    for folder, names in LEGACY_FILES.items():
        os.makedirs(base / folder)
        for old, new in names.items():
            os.symlink(os.path.join(standin_dir, folder, new), base / folder / old)
        folder_paths.add_model_folder_path(folder, str(base / folder))
    folder_paths.filename_list_cache.clear()


@pytest.mark.parametrize("name", LEGACY)
def test_workflows_saved_with_the_first_release_still_load(name, legacy_folders):
    """Workflow files users saved with XCtrl 0.1.0 (tests/data/legacy_workflows) still convert to a
    valid prompt: node IDs, input names and widget order are unchanged; inputs added since keep
    their defaults, as the frontend gives them to widgets a file does not mention."""
    import execution
    import nodes

    with open(os.path.join(LEGACY_DIR, name + ".json")) as f:
        ui = json.load(f)
    info = {cls: _node_info(nodes.NODE_CLASS_MAPPINGS[cls]) for cls in {n["type"] for n in ui["nodes"]}
            if cls in nodes.NODE_CLASS_MAPPINGS}
    assert not {n["type"] for n in ui["nodes"]} - set(info) - set(ui_format.VIRTUAL_NODES)
    prompt = ui_format.to_api(ui, info)
    ok, error, _, node_errors = asyncio.run(execution.validate_prompt("legacy-" + name, prompt, None))
    assert ok, f"{name}: {error} {json.dumps(node_errors)[:3000]}"


# ----------------------------------------------------------------------------- execution
def _error(history):
    msgs = history["status"].get("messages", [])
    errs = [m[1] for m in msgs if m[0] == "execution_error"]
    return errs[0] if errs else {"exception_message": json.dumps(msgs)[:3000]}


# Running every workflow on the real server takes ~10 minutes per ComfyUI on a 2-core CPU:
# run_tests.sh does it on the primary runtime (XCTRL_SERVER_WORKFLOWS=1) and validates the
# workflows on the others.
server_runs = pytest.mark.skipif(
    os.environ.get("XCTRL_SERVER_WORKFLOWS", "1") != "1",
    reason="workflow server runs happen on the primary ComfyUI only (XCTRL_SERVER_WORKFLOWS=1 to run them here)",
)


@server_runs
@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_on_the_server(name, wf_server, object_info):
    if name in catalogue.NOT_RUN:
        pytest.skip(f"{name} is validated, not run: {catalogue.NOT_RUN[name]}")
    skip_unless_available(name, object_info)
    prompt = workflow_runs.api_prompt(name, object_info, workflow_runs.TEST_OVERRIDES)
    history = wf_server.run_prompt(prompt, timeout=900)
    assert history["status"]["status_str"] == "success", f"{name}: {_error(history).get('exception_message')}\n" + wf_server.log()[-3000:]
    saved = [img for node_id, out in history["outputs"].items()
             if prompt[node_id]["class_type"] in ("SaveImage", "SaveAnimatedWEBP") for img in out.get("images", [])]
    assert saved, f"{name}: no saved image in {list(history['outputs'])}"
    for img in saved:
        path = os.path.join(wf_server.base, "output", img.get("subfolder", ""), img["filename"])
        assert os.path.getsize(path) > 0


def _run_with(server, object_info, workflow, seed, cls=None, values=None, overrides=None):
    """Runs a workflow's prompt with ``values`` given to every ``cls`` node (and ``overrides`` by input name)."""
    prompt = workflow_runs.api_prompt(workflow, object_info, dict(workflow_runs.TEST_OVERRIDES, seed=seed, **(overrides or {})))
    for node in prompt.values():
        if node["class_type"] == cls:
            node["inputs"].update(values)
    return server.run_prompt(prompt, timeout=900)


# (loader, workflow, file, what the error says the file is, the node it says loads it)
WRONG_FILES = [
    ("XCtrl_LoadControlNeXt", "controlnext_sdxl_canny", "sdxl_encD_depth_48m.safetensors", "a ControlNet-XS model",
     "Load ControlNet-XS (XCtrl)"),
    ("XCtrl_LoadControlNeXt", "controlnext_sdxl_canny", "control_v11p_sd15_canny_fp16.safetensors", "a ControlNet (LDM format)",
     "Load ControlNet Model"),
    ("XCtrl_LoadControlNeXt", "controlnext_sdxl_canny", T2I, "a T2I-Adapter", "Load ControlNet Model"),
    ("XCtrl_LoadControlNeXt", "controlnext_sdxl_canny", LORA, "a LoRA", "Load LoRA"),
    ("XCtrl_LoadControlNeXt", "controlnext_sdxl_canny", CHECKPOINT, "a full Stable Diffusion checkpoint", "Load Checkpoint"),
    ("XCtrl_LoadControlNetXS", "controlnet_xs_sdxl_depth", "controlnext_sdxl_anime_canny_controlnet.safetensors",
     "a ControlNeXt control module", "Load ControlNeXt (XCtrl)"),
    ("XCtrl_LoadControlNetXS", "controlnet_xs_sdxl_depth", "control_v11p_sd15_canny_fp16.safetensors", "a ControlNet (LDM format)",
     "Load ControlNet Model"),
    ("XCtrl_LoadControlNetXS", "controlnet_xs_sdxl_depth", T2I, "a T2I-Adapter", "Load ControlNet Model"),
    ("XCtrl_LoadControlNetXS", "controlnet_xs_sdxl_depth", LORA, "a LoRA", "Load LoRA"),
    ("XCtrl_LoadControlNetXS", "controlnet_xs_sdxl_depth", CHECKPOINT, "a full Stable Diffusion checkpoint", "Load Checkpoint"),
]


@server_runs
@pytest.mark.parametrize("loader, workflow, control_file, what, loaded_by", WRONG_FILES)
def test_a_file_of_another_kind_names_what_it_is_and_its_loader(loader, workflow, control_file, what, loaded_by, wf_server,
                                                               object_info):
    history = _run_with(wf_server, object_info, workflow, 3, loader, {"control_file": control_file})
    assert history["status"]["status_str"] == "error"
    err = _error(history)
    assert err.get("node_type") == loader and err.get("exception_type", "").endswith("WeightFileError"), err
    message = err["exception_message"]
    assert control_file in message and f"it is {what}" in message and loaded_by in message, message


@server_runs
@pytest.mark.parametrize("control_file, says", [
    (CORRUPT, "download it again"),  # not a weight file at all
    (REFUSED_PICKLE, "refuses to unpickle"),  # objects that would run code
])
def test_corrupt_or_unsafe_file_gives_the_packs_error_and_the_server_goes_on(control_file, says, wf_server, object_info):
    history = _run_with(wf_server, object_info, "controlnext_sdxl_canny", 3, "XCtrl_LoadControlNeXt", {"control_file": control_file})
    assert history["status"]["status_str"] == "error"
    err = _error(history)
    assert err.get("node_type") == "XCtrl_LoadControlNeXt", err
    assert err.get("exception_type", "").endswith("WeightFileError"), err
    message = err["exception_message"]
    assert control_file in message and says in message, message
    assert "weights_only" not in message, message  # never PyTorch's advice to load it unsafely
    assert not os.path.exists(os.path.join(wf_server.base, PAYLOAD_MARKER)), "the pickle's code ran"
    # the next prompt (the same graph with the right file) is served normally
    ok = _run_with(wf_server, object_info, "controlnext_sdxl_canny", 11)
    assert ok["status"]["status_str"] == "success", _error(ok)


@server_runs
def test_a_controlnext_module_of_another_base_is_refused_at_apply(wf_server, object_info):
    history = _run_with(wf_server, object_info, "controlnext_sdxl_canny", 5, "XCtrl_LoadControlNeXt",
                        {"control_file": "controlnext_sd15_deepfashion_multiview_controlnet.safetensors", "unet_weights": "none"})
    assert history["status"]["status_str"] == "error"
    err = _error(history)
    assert err.get("node_type") == "XCtrl_ApplyControlNeXt", err
    message = err["exception_message"]
    assert "SD1.5" in message and "SDXL" in message, message


def _model_was_called(err):
    return any(f in "".join(err.get("traceback", [])) for f in ("calc_cond_batch", "sampling_function", "apply_model("))


@server_runs
def test_a_pose_latent_batch_mismatch_is_reported_before_the_first_step(wf_server, object_info):
    """3 pose frames (the reference pose + 2) for 4 video frames: the error names the Apply node
    and both sizes, and comes before any model call."""
    history = _run_with(wf_server, object_info, "controlnext_svd_v2_pose_video", 5, overrides={"video_frames": 4})
    assert history["status"]["status_str"] == "error"
    err = _error(history)
    message = err["exception_message"]
    assert re.match(r"Apply ControlNeXt \(XCtrl\) \(node #\d+", message), message  # the sampler's error names the Apply node
    assert "3 images" in message and "latent batch has 4" in message and "reference" in message, message
    assert not _model_was_called(err), err.get("traceback")


# ----------------------------------------------------------------------------- memory across prompts
SOAK_WORKFLOWS = ["controlnext_sdxl_canny", "controlnext_sdxl_depth", "controlnet_xs_sdxl_depth", "controlnet_xs_sd21_canny",
                  "mi_sd15_pose_canny"]  # two ControlNeXt files, two ControlNet-XS files (two bases), balanced MI
SOAK_ROUNDS = 4
# Measured from the end of the second round: the first loads everything once, and the second
# lets the allocator reach the peak of the largest model's reload (~5.2 GB here, ~+25 MB over
# the two rounds after it).
RSS_GROWTH_LIMIT = 300 * 2**20


@pytest.fixture(scope="module")
def soak_server(comfy_root):
    """A server of its own (clean model management) with the probe node that reports loaded models."""
    probe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "harness", "probe_node")

    def add_probe(server):
        os.symlink(probe, os.path.join(server.base, "custom_nodes", "xctrl_test_probe"))

    with standins.server(comfy_root, add_probe) as server:
        yield server


def _rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@server_runs
def test_alternating_controls_keep_models_and_memory_bounded(soak_server):
    info = soak_server.get("/object_info")
    after_round = []
    for r in range(SOAK_ROUNDS):
        for i, name in enumerate(SOAK_WORKFLOWS):
            history = _run_with(soak_server, info, name, seed=100 * r + i)
            assert history["status"]["status_str"] == "success", f"round {r} {name}: {_error(history).get('exception_message')}"
        models = soak_server.get("/xctrl_probe/loaded_models")["models"]
        assert not [m for m in models if m["dead"]], f"round {r}: models outliving their patchers: {models}"
        after_round.append((len(models), _rss(soak_server.proc.pid), models))
    counts = [n for n, _, _ in after_round]
    assert max(counts[1:]) <= counts[0], f"loaded models grow across rounds: {counts}\n{after_round[-1][2]}"
    growth = after_round[-1][1] - after_round[1][1]
    rss = [f"{r / 2**20:.0f} MB" for _, r, _ in after_round]
    assert growth < RSS_GROWTH_LIMIT, f"server memory grew {growth / 2**20:.0f} MB after the second round ({rss})"
    log = soak_server.log()
    assert "memory leak with model" not in log, log[log.index("memory leak with model") - 500:][:1500]

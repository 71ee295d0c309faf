"""Run in its own process by tests/integration/test_update_safety.py: imports ComfyUI with its
built-in nodes, samples once without the pack, records every attribute of ComfyUI's modules
(and of the classes they define), then loads the pack, runs its controls through a sampler and
prints, as JSON, every attribute that is no longer the object it was. An empty list means the
pack replaced nothing of ComfyUI's (no monkey-patching at import or at run time).

usage: python update_safety_probe.py COMFYUI_ROOT WORK_DIR
"""
import asyncio
import inspect
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from harness import comfy_runtime  # noqa: E402

COMFY_MODULES = ("comfy", "comfy_extras", "comfy_api", "comfy_execution", "comfy_config", "app", "utils", "nodes",
                 "execution", "folder_paths", "server", "node_helpers", "latent_preview", "comfyui_version")
TORCH_MODULES = ("torch", "torch.nn", "torch.nn.functional", "torch.nn.modules.module")


def watched(name):
    return name in TORCH_MODULES or any(name == m or name.startswith(m + ".") for m in COMFY_MODULES)


def snapshot():
    """{(module, class or '', attribute): id(value)} over the watched modules."""
    seen = {}
    for name, mod in list(sys.modules.items()):
        if mod is None or not watched(name):
            continue
        for attr, value in list(vars(mod).items()):
            if inspect.ismodule(value):
                continue  # a submodule imported later becomes an attribute of its package
            seen[(name, "", attr)] = id(value)
            if inspect.isclass(value) and value.__module__ == name:
                for cattr, cvalue in list(vars(value).items()):
                    seen[(name, value.__name__, cattr)] = id(cvalue)
    return seen


def sample(model, positive, negative):
    import comfy.sample

    lat = torch.zeros(1, 4, 8, 8)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 0), 2, 5.0, "euler", "normal",
                               positive, negative, lat)


def run_pack_controls(pack, work_dir):
    """ControlNeXt on the MODEL and per prompt, MI over two stock ControlNets."""
    import folder_paths
    import nodes
    from safetensors.torch import save_file

    from harness import tiny_models as tm
    from harness.controlnext_files import TINY_OUT, controlnext_sd

    by_id = {cls.GET_SCHEMA().node_id: cls for cls in pack.NODES}
    folder_paths.add_model_folder_path("controlnet", work_dir)
    save_file(controlnext_sd("sd15", TINY_OUT["sd15"]), os.path.join(work_dir, "probe_cnx.safetensors"))
    base = tm.sd15(seed=0)
    pos, neg = tm.text_cond(base), tm.text_cond(base, seed=2)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    cnx = by_id["XCtrl_LoadControlNeXt"].execute("probe_cnx.safetensors", "none").result[0]
    controlled = by_id["XCtrl_ApplyControlNeXt"].execute(base, cnx, hint, 0.8, 0.0, 1.0).result[0]
    sample(controlled, pos, neg)
    cpos, cneg = by_id["XCtrl_ApplyControlNeXtConditioning"].execute(pos, neg, base, cnx, hint, 0.8, 0.0, 1.0).result
    sample(base, cpos, cneg)
    for i in range(2):
        cnet = tm.unet_controlnet(tm.SD15_TINY, 10 + i)
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, cnet, hint, 0.7, 0.0, 1.0)
    model, bpos, bneg = by_id["XCtrl_MIBalancedControl"].execute(base, pos, neg, "paper", "layer", 20.0).result
    sample(model, bpos, bneg)


def main(root, work_dir):
    comfy_runtime.import_comfyui(root)
    import nodes

    from harness import tiny_models as tm

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    base = tm.sd15(seed=0)
    sample(base, tm.text_cond(base), tm.text_cond(base, seed=2))  # ComfyUI's own first-run state
    before = snapshot()
    pack_path = os.path.join(comfy_runtime.pack_custom_nodes_dir(), comfy_runtime.PACK_FOLDER_NAME)
    if not asyncio.run(nodes.load_custom_node(pack_path)):
        raise SystemExit("ComfyUI did not load the pack")
    pack = sys.modules[pack_path.replace(".", "_x_")]
    run_pack_controls(pack, work_dir)
    after = snapshot()
    changed, removed = differences(before, after)
    print("XCTRL_PROBE " + json.dumps({"changed": changed, "removed": removed, "watched": len(before),
                                       "detects_patching": detects_patching(after)}))


def differences(before, after):
    changed = sorted(".".join(p for p in key if p) for key, ident in before.items() if after.get(key, ident) != ident)
    removed = sorted(".".join(p for p in key if p) for key in before if key not in after)
    return changed, removed


def detects_patching(before):
    """The probe's own check: a replaced module function and a replaced method are both seen."""
    import comfy.model_patcher
    import comfy.samplers

    saved = comfy.samplers.calc_cond_batch, comfy.model_patcher.ModelPatcher.clone
    comfy.samplers.calc_cond_batch = lambda *a, **k: None
    comfy.model_patcher.ModelPatcher.clone = lambda self: self
    try:
        changed, _ = differences(before, snapshot())
    finally:
        comfy.samplers.calc_cond_batch, comfy.model_patcher.ModelPatcher.clone = saved
    return changed == ["comfy.model_patcher.ModelPatcher.clone", "comfy.samplers.calc_cond_batch"]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

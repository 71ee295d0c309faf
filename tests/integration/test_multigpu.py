"""Every XCtrl method under ComfyUI's MultiGPU work units ("MultiGPU CFG Split",
MultiGPU_WorkUnits), against the same graph sampled on one device: equal to 1e-5.

Two devices on a CPU-only machine: core asks ``comfy.model_management.get_all_torch_devices()``
which devices exist; the module fixture makes it answer ``[cpu, cpu:1]``. torch accepts
``torch.device("cpu", 1)`` (tensors moved there land on the CPU) and it is a distinct dict key,
so core does everything it does with two GPUs except the copies between them: MultiGPU CFG
Split builds a second model from the loader factory (``cached_patcher_init``, which
harness/tiny_models.py registers as core's loaders do), sampling deep-clones every control of
the conditioning per device (``deepclone_multigpu``), and each step runs cond on one device and
uncond on the other, concurrently, in core's thread pool (one thread per device). A spy wrapper
checks that both devices ran; a global module hook checks that each device ran its own copy of
the control network.

Skipped on ComfyUI without comfy.multigpu (0.8.0, 0.3.64).
"""
import contextlib
import gc

import pytest
import torch

from harness import tiny_models as tm
from harness import xs_reference
from harness.comfy_runtime import node_result, pack_module, pack_node_classes
from harness.controlnext_files import TINY_OUT, controlnext_sd, write

try:
    import comfy.multigpu  # noqa: F401
    import comfy_extras.nodes_multigpu as core_multigpu
except ImportError:
    core_multigpu = None

pytestmark = [
    pytest.mark.skipif(core_multigpu is None, reason="this ComfyUI has no MultiGPU work units (comfy.multigpu)"),
    pytest.mark.usefixtures("two_devices"),
]

TOLERANCE = 1e-5
MEASURED = {}  # method -> (max abs difference, max relative difference), printed at the end


@pytest.fixture(scope="module")
def two_devices(one_thread):
    """(main device, second device) as core sees them."""
    import comfy.model_management as mm

    main = mm.get_torch_device()
    second = torch.device(main.type, 1)

    def all_devices(exclude_current=False):
        return [second] if exclude_current else [main, second]

    patch = pytest.MonkeyPatch()
    patch.setattr(mm, "get_all_torch_devices", all_devices)
    yield main, second
    mm.unload_all_models()
    patch.undo()
    print("\nMultiGPU vs one device (max abs / max rel difference):")
    for name, (abs_diff, rel_diff) in MEASURED.items():
        print(f"  {name}: {abs_diff:.3g} / {rel_diff:.3g}")


@pytest.fixture(scope="module")
def nodes(pack):
    return pack_node_classes()


def multigpu(model):
    """MODEL -> MultiGPU CFG Split(MODEL, max_gpus 2), with a spy recording the device of each call."""
    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    # Each graph starts with nothing loaded: core's reuse of loaded device clones trips over
    # entries of earlier graphs' (or test modules') models that were since collected (not what
    # is tested here), so those entries are dropped too.
    gc.collect()
    mm.unload_all_models()
    mm.cleanup_models()
    # An entry whose ModelPatcher was collected while its model lives on (a test module's fixture
    # keeps the model) survives both; core's reuse reads .model of every entry.
    mm.current_loaded_models[:] = [m for m in mm.current_loaded_models if m.model is not None]
    split = node_result(core_multigpu.MultiGPUCFGSplitNode, model, 2)[0]
    assert split.get_additional_models_with_key("multigpu"), "core made no second device"
    calls = []

    def spy(executor, x, t, *args, **kwargs):
        to = kwargs.get("transformer_options") or (args[3] if len(args) > 3 else {})
        calls.append((to.get("multigpu_thread_device"), tuple(to.get("cond_or_uncond", ()))))
        return executor(x, t, *args, **kwargs)

    split.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_spy", spy)
    split.spy_calls = calls
    return split


def compare(name, one_device, split, two_devices):
    """The MultiGPU result against the one-device one; both devices ran model calls."""
    devices = {d for d, _ in split.spy_calls}
    assert devices == set(two_devices), f"{name}: model calls ran on {devices}"
    abs_diff = (split.result - one_device).abs().max().item()
    rel_diff = abs_diff / one_device.abs().max().item()
    MEASURED[name] = (abs_diff, rel_diff)
    assert rel_diff < TOLERANCE, f"{name}: relative difference {rel_diff:.3g}"


def sample(model, positive, negative, size=8, steps=2, cfg=5.0):
    import comfy.sample

    lat = torch.zeros(1, 4, size, size)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 0), steps, cfg, "euler", "normal",
                               positive, negative, lat, disable_pbar=True)


@contextlib.contextmanager
def modules_called():
    """The ids of every torch module called meanwhile (in any thread)."""
    called = set()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: called.add(id(module)))
    try:
        yield called
    finally:
        handle.remove()


def ran(module, called):
    return any(id(m) in called for m in module.modules())


def both_ways(model, positive, negative, apply=None, **kw):
    """(one-device result, MultiGPU MODEL with .result and .called: the modules its sampling ran).
    With ``apply``, ``model`` is the base and the method is applied before / after the split."""
    if apply is None:
        one, split = sample(model, positive, negative, **kw), multigpu(model)
    else:
        one, first = sample(apply(model), positive, negative, **kw), multigpu(model)
        split = apply(first)
        split.spy_calls = first.spy_calls  # the spy wrapper came along with the clone
    with modules_called() as split.called:
        split.result = sample(split, positive, negative, **kw)
    return one, split


def device_patchers(patchers, device):
    return [p for p in patchers if p.load_device == device]


def check_one_network_per_device(network, split, two_devices):
    """Core loaded one control network of ``network``'s kind per device, each there, each run by
    that device's calls."""
    import comfy.model_management as mm

    patchers = {p for p in mm.loaded_models() if p is not None and type(p.model) is type(network)}
    (first,) = device_patchers(patchers, two_devices[0])
    (second,) = device_patchers(patchers, two_devices[1])
    assert second.model is not first.model
    assert ran(first.model, split.called) and ran(second.model, split.called)


def keyframes(nodes, *frames):
    schedule = None
    for start, strength in frames:
        schedule = node_result(nodes["XCtrl_StepKeyframe"], start, strength, "linear", 1, previous=schedule)[0]
    return schedule


def half_mask(size):
    mask = torch.ones(1, size, size)
    mask[:, :, : size // 2] = 0.25
    return mask


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def sd15(controlnet_dir):
    """Tiny SD1.5 and a ControlNeXt file with UNet weights (replacements of the attention outputs)."""
    import comfy.utils

    base = tm.sd15()
    mapping = comfy.utils.unet_to_diffusers(base.model.model_config.unet_config)
    weights = base.model.diffusion_model.state_dict()
    g = torch.Generator().manual_seed(11)
    unet = {d: torch.randn(weights[l].shape, generator=g) * 0.05 for d, l in mapping.items() if ".attn2.to_out.0." in d}
    unet_file = write(controlnet_dir, "mgpu_unet.safetensors", unet)
    module = write(controlnet_dir, "mgpu_sd15.safetensors", controlnext_sd("sd15", TINY_OUT["sd15"], seed=21))
    loaded = node_result(pack_module("nodes.controlnext_nodes").LoadControlNeXt, module, unet_file)[0]
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    return base, loaded, hint, tm.text_cond(base, seed=1), tm.text_cond(base, seed=2)


@pytest.fixture(scope="module")
def xs(nodes, controlnet_dir):
    base, sd, loaded = xs_reference.loaded_sd15_xs(nodes["XCtrl_LoadControlNetXS"], controlnet_dir, "mgpu_xs.safetensors")
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 128, 128, 3, generator=g)
    return base, loaded, image, [[torch.randn(1, 5, 768, generator=g), {}]], [[torch.randn(1, 5, 768, generator=g), {}]]


def stock_apply(positive, negative, control_net, image, strength=0.9, start=0.0, end=1.0):
    import nodes as comfy_nodes

    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, image, strength, start, end)


# ------------------------------------------------------------------------------ MODEL level
@pytest.mark.parametrize("split_first", [False, True], ids=["control_then_split", "split_then_control"])
def test_controlnext_model_with_unet_weights_schedule_mask(split_first, nodes, sd15, two_devices):
    base, loaded, hint, pos, neg = sd15
    schedule = keyframes(nodes, (0.0, 1.0), (0.5, 0.4))

    def apply(model):
        return node_result(nodes["XCtrl_ApplyControlNeXt"], model, loaded, hint, 0.8, 0.0, 1.0, mask=half_mask(64),
                           schedule=schedule, uncond_multiplier=0.5)[0]

    one, split = both_ways(base, pos, neg, apply) if split_first else both_ways(apply(base), pos, neg)
    order = "split, then control" if split_first else "control, then split"
    compare(f"ControlNeXt (MODEL, UNet weights, schedule, mask, uncond multiplier; {order})", one, split, two_devices)
    check_one_network_per_device(next(iter(split.model_patches_models())).model, split, two_devices)


def test_controlnet_xs_model_with_schedule_and_mask(nodes, xs, two_devices):
    base, loaded, image, pos, neg = xs
    model = node_result(nodes["XCtrl_ApplyControlNetXS"], base, loaded, image, 0.7, 0.0, 1.0, mask=half_mask(128),
                        schedule=keyframes(nodes, (0.0, 1.0), (0.5, 0.3)), uncond_multiplier=0.6)[0]
    one, split = both_ways(model, pos, neg, size=16)
    compare("ControlNet-XS (MODEL, schedule, mask, uncond multiplier)", one, split, two_devices)
    check_one_network_per_device(next(iter(split.model_patches_models())).model, split, two_devices)


# ------------------------------------------------------------------------------ per prompt
def check_per_device_clone(control, split, two_devices):
    """Core ran a clone of the control on the second device, with its own network there."""
    clone = control.get_instance_for_device(two_devices[1])
    assert clone is not control
    check_one_network_per_device(control.runner.patcher.model, split, two_devices)
    return clone


def test_controlnext_per_prompt_after_a_stock_controlnet(nodes, sd15, two_devices):
    base, loaded, hint, pos, neg = sd15
    stock = tm.unet_controlnet(tm.SD15_TINY, seed=5)
    spos, sneg = stock_apply(pos, neg, stock, torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4)))
    cpos, cneg = node_result(nodes["XCtrl_ApplyControlNeXtConditioning"], spos, sneg, base, loaded, hint, 0.8, 0.0, 1.0,
                             mask=half_mask(64), uncond_multiplier=0.3)
    one, split = both_ways(base, cpos, cneg)
    compare("ControlNeXt (per prompt, after a stock ControlNet)", one, split, two_devices)
    control = cpos[0][1]["control"]
    clone = check_per_device_clone(control, split, two_devices)
    assert clone.previous_controlnet is control.previous_controlnet.get_instance_for_device(two_devices[1])


def test_controlnet_xs_per_prompt(nodes, xs, two_devices):
    base, loaded, image, pos, neg = xs
    cpos, cneg = node_result(nodes["XCtrl_ApplyControlNetXSConditioning"], pos, neg, base, loaded, image, 0.7, 0.0, 1.0,
                             schedule=keyframes(nodes, (0.0, 1.0), (0.5, 0.5)))
    one, split = both_ways(base, cpos, cneg, size=16)
    compare("ControlNet-XS (per prompt, schedule)", one, split, two_devices)
    check_per_device_clone(cpos[0][1]["control"], split, two_devices)


# ------------------------------------------------------------------------------ MI
def test_mi_balanced_cond_and_uncond_on_different_devices(sd15, two_devices):
    base, _, _, pos, neg = sd15
    g = torch.Generator().manual_seed(20)
    for seed, strength, start, end in ((10, 0.8, 0.0, 1.0), (11, 1.3, 0.0, 0.6)):
        pos, neg = stock_apply(pos, neg, tm.unet_controlnet(tm.SD15_TINY, seed), torch.rand(1, 64, 64, 3, generator=g),
                               strength, start, end)
    model, bpos, bneg = node_result(pack_module("nodes.mi_nodes").MIBalancedControl, base, pos, neg, "paper", "pixel", 20.0)[:3]
    one, split = both_ways(model, bpos, bneg, steps=3)
    compare("MIControlNet (paper, pixel)", one, split, two_devices)
    assert {c for _, c in split.spy_calls} == {(0,), (1,)}  # cond and uncond balanced on their own devices
    control = bpos[0][1]["control"]
    clone = control.get_instance_for_device(two_devices[1])
    assert clone is not control and clone.balance is control.balance
    assert [m.control_model for m in clone.members] != [m.control_model for m in control.members]


# ------------------------------------------------------------------------------ long video
def test_long_video_windows_with_cfg_ramp(controlnet_dir, two_devices):
    import comfy.sample
    import comfy.samplers

    nodes_mod = pack_module("nodes.controlnext_nodes")
    base = tm.svd()
    loaded = node_result(nodes_mod.LoadControlNeXt, write(controlnet_dir, "mgpu_v2.safetensors",
                                                          controlnext_sd("svd_v2", 64, seed=4)), "none")[0]
    g = torch.Generator().manual_seed(7)
    n = 7
    poses = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(64, 64)).movedim(1, -1)
    image_emb, concat, noise = torch.randn(1, 1, 32, generator=g), torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)
    ids = {"fps": 7, "motion_bucket_id": 128, "augmentation_level": 0.02}
    pos = [[image_emb, dict(ids, concat_latent_image=concat)]]
    neg = [[torch.zeros_like(image_emb), dict(ids, concat_latent_image=torch.zeros_like(concat))]]
    controlled = node_result(nodes_mod.ApplyControlNeXt, base, loaded, poses, 0.9, 0.0, 1.0)[0]
    model = node_result(nodes_mod.ControlNeXtSVDLongVideo, controlled, 4, 2, "linear", 1.0)[0]

    def run(m):
        return comfy.sample.sample_custom(m, noise, 2.5, comfy.samplers.sampler_object("euler"),
                                          torch.tensor([3.0, 1.2, 0.5]), pos, neg, torch.zeros_like(noise),
                                          disable_pbar=True, seed=0)

    one = run(model)
    split = multigpu(model)
    split.result = run(split)
    compare("ControlNeXt-SVD v2 long video (windows, CFG ramp)", one, split, two_devices)

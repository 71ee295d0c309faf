"""MIControlNet on Qwen-Image ControlNets applied with core's Apply ControlNet (InstantX, 2512 Fun),
alone and mixed with DiffSynth model-patch controls on the same MODEL (runtime/qwen_control.py),
inside a real ComfyUI, against the independent float64 reference of harness/qwen_controlnets.py.
The features after every injection point are recorded in both runs and compared, as is the
denoised output."""
import re

import pytest
import torch

from harness import model_patch_models as mpm
from harness import qwen_controlnets as qcn
from harness.comfy_runtime import node_result, pack_module
from harness.mi_setups import denoise_once, full_sample

TOKENS = 16  # an 8x8 latent in 2x2 patches
NODE = re.escape("MI Balanced Control (XCtrl)")


@pytest.fixture(scope="module", autouse=True)
def _threads_no_grad(one_thread):
    with torch.inference_mode():  # as ComfyUI's executor runs nodes and sampling
        yield


@pytest.fixture(scope="module")
def qwen(pack):
    import sys

    import nodes

    base = mpm.qwen_image(0, qcn.LAYERS)
    vae = mpm.StubVAE(4, frames=True)
    second = qcn.fun(32) or qcn.instantx(32)  # older ComfyUI has no 2512 Fun ControlNet
    controls = [(qcn.instantx(31), mpm.image(41), 0.8), (second, mpm.image(42), 1.7)]
    pos, neg = mpm.text_cond("qwen_image", seed=1), mpm.text_cond("qwen_image", seed=2)
    cpos, cneg = pos, neg
    for cnet, hint, strength in controls:
        cpos, cneg = nodes.ControlNetApplyAdvanced().apply_controlnet(cpos, cneg, cnet, hint, strength, 0.0, 1.0, vae=vae)
    diffsynth = nodes.NODE_CLASS_MAPPINGS["QwenImageDiffsynthControlnet"]()
    module = sys.modules[type(diffsynth).__module__]
    patched = base
    for seed, strength in ((21, 0.9), (22, 1.2)):
        net = mpm.qwen_control(seed, module, num_layers=qcn.LAYERS)
        patched = diffsynth.diffsynth_controlnet(patched, net, vae, mpm.image(seed, 64), strength)[0]
    return dict(base=base, vae=vae, controls=controls, pos=pos, neg=neg, cpos=cpos, cneg=cneg, patched=patched,
                x=torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(5)), sigma=torch.tensor(0.7))


def mi_node(model, pos, neg, mode="paper", granularity="layer"):
    return node_result(pack_module("nodes.mi_nodes").MIBalancedControl, model, pos, neg, mode, granularity, 20.0)


def compare_every_point(setup, model, mode, granularity):
    """MI Balanced Control on ``model`` (with the setup's ControlNets) against the reference, after
    every block; returns (denoised, the node's positive)."""
    got_rec, want_rec = qcn.BlockInputs(TOKENS), qcn.BlockInputs(TOKENS)
    balanced, mpos, mneg = mi_node(model, setup["cpos"], setup["cneg"], mode, granularity)
    got = denoise_once(got_rec.install(balanced, qcn.LAYERS), mpos, mneg, setup["x"], setup["sigma"])
    ref = qcn.reference_model(setup, model, setup["controls"], mode, granularity, TOKENS)
    want = denoise_once(want_rec.install(ref, qcn.LAYERS), setup["pos"], setup["neg"], setup["x"], setup["sigma"])
    assert set(got_rec.seen) == set(range(qcn.LAYERS - 1))
    for i, b in want_rec.seen.items():
        a = got_rec.seen[i]
        assert a.shape[0] == 2  # cond and uncond rows in one call
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=f"after block {i}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    stock = denoise_once(model, setup["cpos"], setup["cneg"], setup["x"], setup["sigma"])
    assert (got - stock).abs().max() > 1e-3  # balancing changed something
    return got, mpos


MODES = [("paper", "layer"), ("paper", "pixel"), ("min_norm", "layer"), ("min_norm", "pixel")]


@pytest.mark.parametrize("mode,granularity", MODES)
def test_controlnets_match_hand_computation(qwen, mode, granularity):
    _, mpos = compare_every_point(qwen, qwen["base"], mode, granularity)
    layers = mpos[0][1]["control"].balance.report()["layers"]
    assert {"Qwen-Image block 0", "Qwen-Image block 12"} <= set(layers)


@pytest.mark.parametrize("mode,granularity", MODES)
def test_mix_with_diffsynth_patches_balanced_together(qwen, mode, granularity):
    """Two DiffSynth model patches and two ControlNets: one balanced injection of all four per block
    (three where the 2512 Fun ControlNet is silent; min_norm: the hull's min-norm point)."""
    got, _ = compare_every_point(qwen, qwen["patched"], mode, granularity)
    # MI Balanced Model Patches applied first (other settings): its members join, with MI Balanced Control's settings
    other = ("min_norm" if mode == "paper" else "paper", "pixel" if granularity == "layer" else "layer")
    first = pack_module("runtime.mi_apply").balance_model_patches(qwen["patched"], *other, 20.0, "test")
    model, mpos, mneg = mi_node(first, qwen["cpos"], qwen["cneg"], mode, granularity)
    torch.testing.assert_close(denoise_once(model, mpos, mneg, qwen["x"], qwen["sigma"]), got, rtol=0, atol=0)


@pytest.mark.parametrize("with_patches", [False, True])
def test_sum_is_core_bit_for_bit(qwen, with_patches):
    """Balance "sum" through the Qwen injection (ControlNets last, after the DiffSynth terms) is core's
    chained addition through sampling; the second ControlNet stops half way."""
    import nodes

    runtime = pack_module("runtime.mi")
    model = qwen["patched"] if with_patches else qwen["base"]
    (first, h1, s1), (second, h2, s2) = qwen["controls"]
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(qwen["pos"], qwen["neg"], first, h1, s1, 0.0, 1.0, vae=qwen["vae"])
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, second, h2, s2, 0.0, 0.5, vae=qwen["vae"])
    latent = torch.zeros_like(qwen["x"])
    stock = full_sample(model, pos, neg, latent)
    summed, spos, sneg, _ = runtime.apply_balance(model, pos, neg, runtime.Balance("sum", channel_dim=-1))
    assert torch.equal(full_sample(summed, spos, sneg, latent), stock)
    assert not torch.equal(full_sample(model, qwen["pos"], qwen["neg"], latent), stock)


@pytest.mark.parametrize("order", ["before", "after"])
def test_another_packs_double_block_patch_runs_before_the_controlnets(qwen, order):
    """Core adds the ControlNets after every double-block patch: so does the balanced injection,
    whether the other pack's patch was applied before or after the MI node."""
    def other(kwargs):
        kwargs["img"] = kwargs["img"] * 1.25 - 0.1
        return kwargs

    def with_other(model):
        model = model.clone()
        model.set_model_double_block_patch(other)
        return model

    base = with_other(qwen["base"]) if order == "before" else qwen["base"]
    model, mpos, mneg = mi_node(base, qwen["cpos"], qwen["cneg"])
    model = with_other(model) if order == "after" else model
    got = denoise_once(model, mpos, mneg, qwen["x"], qwen["sigma"])
    ref = qcn.reference_model(qwen, with_other(qwen["base"]), qwen["controls"], "paper", "layer", TOKENS)
    want = denoise_once(ref, qwen["pos"], qwen["neg"], qwen["x"], qwen["sigma"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_model_patches_without_controlnets_point_to_the_patch_node(qwen):
    with pytest.raises(ValueError, match=f"{NODE}: no ControlNet .* model patches: use 'MI Balanced Model Patches"):
        mi_node(qwen["patched"], qwen["pos"], qwen["neg"])


def test_lambda_stats_names_the_qwen_blocks(qwen):
    model, mpos, mneg = mi_node(qwen["patched"], qwen["cpos"], qwen["cneg"])
    denoise_once(model, mpos, mneg, qwen["x"], qwen["sigma"])
    text = pack_module("runtime.mi_apply").lambda_stats_text(mpos)
    assert "Qwen-Image block 0 " in text and "Qwen-Image block 13 " in text, text


def test_control_patch_of_another_family_is_named(qwen):
    import nodes

    if "ZImageFunControlnet" not in nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("this ComfyUI has no Z-Image Fun ControlNet")
    apply = nodes.NODE_CLASS_MAPPINGS["ZImageFunControlnet"]()
    wrong = apply.diffsynth_controlnet(qwen["base"], mpm.zimage_control(11, "2.0"), mpm.StubVAE(3), strength=1.0,
                                       image=mpm.image(1))[0]
    with pytest.raises(ValueError, match=f"{NODE}: a Z-Image Fun ControlNet patch is applied to a Qwen-Image model"):
        mi_node(wrong, qwen["cpos"], qwen["cneg"])

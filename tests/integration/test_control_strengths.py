"""Step schedules, latent strengths, the uncond multiplier, masks and ControlNet-XS connection
weights on ComfyUI's native models (tiny random-weight twins), each against the hand-written
references with the multiplier computed by hand: ControlNeXt (harness/reference.py) and
ControlNet-XS (harness/xs_reference.py)."""
import re
import types

import pytest
import torch

from harness import reference as ref
from harness import tiny_models as tm
from harness import xs_reference
from harness.comfy_runtime import OtherPacksReplacement, model_call, node_result, pack_module, pack_node_classes
from harness.controlnext_files import TINY_OUT, controlnext_sd, load, rel_err, write


@pytest.fixture(scope="module")
def nodes(pack):
    return pack_node_classes()


pytestmark = pytest.mark.usefixtures("one_thread")


def call(patcher, x, sigma, ctx, cond_or_uncond, y=None, sample_sigmas=None):
    return model_call(patcher, x, sigma, ctx, cond_or_uncond, y, sample_sigmas)


def keyframes(nodes, *frames):
    """A schedule chained through Step Keyframe (XCtrl): frames of (start, strength[, interpolation[, guaranteed]])."""
    schedule = None
    for f in frames:
        start, strength = f[0], f[1]
        interpolation = f[2] if len(f) > 2 else "hold"
        guaranteed = f[3] if len(f) > 3 else 1
        schedule = node_result(nodes["XCtrl_StepKeyframe"], start, strength, interpolation, guaranteed, previous=schedule)[0]
    return schedule


def latent_strengths(nodes, text):
    return node_result(nodes["XCtrl_LatentStrengths"], text)[0]


# ------------------------------------------------------------------------------ ControlNeXt
def cnx_inputs(rows, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, 16, 16, generator=g) * 2
    ctx = torch.randn(rows, 7, 32, generator=g)
    hint = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(128, 128), mode="nearest")
    return x, ctx, hint.movedim(1, -1)


def cnx_reference(base, sd, hint, x, sigma, ctx, row_strengths, mask=None):
    """SD1.5 released: feature added at the middle-block output, s = learned scale x strength per row,
    times the mask resized to the middle block's resolution."""
    sig = torch.full((x.shape[0],), float(sigma))
    t = base.model.model_sampling.timestep(sig).float()
    h_img = hint.movedim(-1, 1).expand(x.shape[0], -1, -1, -1)
    s = torch.as_tensor(row_strengths, dtype=torch.float32) * float(sd["scale"])
    with torch.no_grad():
        c = ref.controlnext_feature({k: v.float() for k, v in sd.items()}, "sd15", h_img, t)

        def inject(h):
            if mask is None:
                return ref.cross_norm_add(h, c, 1e-12, True, s)
            return h + (ref.cross_norm_add(h, c, 1e-12, True, s) - h) * xs_reference.ref_mask_at(mask, h.shape[-2:])

        return ref.unet_denoised(base.model, x, sig, ctx, hooks={("output", 0): inject})


def apply_cnx(nodes, base, cnx, hint, strength=1.0, **kw):
    return node_result(nodes["XCtrl_ApplyControlNeXt"], base, cnx, hint, strength, 0.0, 1.0, **kw)[0]


@pytest.fixture(scope="module")
def sd15(nodes, controlnet_dir):
    base = tm.sd15()
    sd = controlnext_sd("sd15", TINY_OUT["sd15"], seed=21)
    return base, sd, load(pack_module("nodes.controlnext_nodes"), write(controlnet_dir, "strengths_sd15.safetensors", sd))


def test_step_schedule_strength_at_each_step_reaches_the_injected_term(nodes, sd15):
    base, sd, cnx = sd15
    ms = base.model.model_sampling
    schedule = keyframes(nodes, (0.0, 1.0), (0.4, 0.5, "linear"), (0.8, 0.1))
    x, ctx, hint = cnx_inputs(2)
    patched = apply_cnx(nodes, base, cnx, hint, strength=0.8, schedule=schedule)
    percents = [0.05, 0.2, 0.5, 0.7, 0.9]
    sigmas = torch.tensor([float(ms.percent_to_sigma(p)) for p in percents] + [0.0])
    # hand computation: 1 before 0.4; from 0.4 linear 0.5 -> 0.1 until 0.8; 0.1 after
    want_strength = [1.0, 1.0, 0.5 + (0.1 - 0.5) * (0.5 - 0.4) / 0.4, 0.5 + (0.1 - 0.5) * (0.7 - 0.4) / 0.4, 0.1]
    for sigma, w in zip(sigmas[:-1], want_strength):
        got = call(patched, x, sigma, ctx, [0, 1], sample_sigmas=sigmas)
        want = cnx_reference(base, sd, hint, x, sigma, ctx, [0.8 * w] * 2)
        assert rel_err(got, want) < 1e-5, (float(sigma), w)


def test_a_schedule_of_one_and_all_ones_strengths_are_bit_identical_to_none(nodes, sd15):
    base, sd, cnx = sd15
    x, ctx, hint = cnx_inputs(2)
    ms = base.model.model_sampling
    sigmas = torch.tensor([float(ms.percent_to_sigma(p)) for p in (0.05, 0.5)] + [0.0])
    plain = apply_cnx(nodes, base, cnx, hint, strength=0.7)
    ones = apply_cnx(nodes, base, cnx, hint, strength=0.7, schedule=keyframes(nodes, (0.0, 1.0)),
                     latent_strengths=latent_strengths(nodes, "1.0"), mask=torch.ones(1, 128, 128))
    for sigma in sigmas[:-1]:
        assert torch.equal(call(ones, x, sigma, ctx, [0, 1], sample_sigmas=sigmas),
                           call(plain, x, sigma, ctx, [0, 1], sample_sigmas=sigmas))


def test_latent_strengths_scale_each_frame_and_acn_keyframes_null_the_rest(nodes, sd15):
    base, sd, cnx = sd15
    x, ctx, hint = cnx_inputs(3)
    got = call(apply_cnx(nodes, base, cnx, hint, strength=0.9, latent_strengths=latent_strengths(nodes, "1.0, 0.5, 0.0")),
               x, 2.0, ctx, [0])
    assert rel_err(got, cnx_reference(base, sd, hint, x, 2.0, ctx, [0.9, 0.45, 0.0])) < 1e-5
    # Advanced-ControlNet's LATENT_KEYFRAME layout: batch_index (negative from the end), strength
    acn = types.SimpleNamespace(keyframes=[types.SimpleNamespace(batch_index=-1, strength=0.25)])
    got = call(apply_cnx(nodes, base, cnx, hint, strength=0.9, latent_strengths=acn), x, 2.0, ctx, [0])
    assert rel_err(got, cnx_reference(base, sd, hint, x, 2.0, ctx, [0.0, 0.0, 0.225])) < 1e-5


def test_acn_timestep_keyframes_are_read_through_their_attributes(nodes, sd15):
    base, sd, cnx = sd15
    ms = base.model.model_sampling
    tk = lambda start, strength, guaranteed=1: types.SimpleNamespace(  # noqa: E731
        start_percent=start, strength=strength, guarantee_steps=guaranteed, latent_keyframes=None,
        null_latent_kf_strength=0.0, inherit_missing=True)
    group = types.SimpleNamespace(keyframes=[tk(0.0, 1.0, 0), tk(0.5, 0.2)])
    x, ctx, hint = cnx_inputs(2)
    patched = apply_cnx(nodes, base, cnx, hint, schedule=group)
    sigmas = torch.tensor([float(ms.percent_to_sigma(p)) for p in (0.1, 0.6)] + [0.0])
    for sigma, w in zip(sigmas[:-1], [1.0, 0.2]):
        got = call(patched, x, sigma, ctx, [0, 1], sample_sigmas=sigmas)
        assert rel_err(got, cnx_reference(base, sd, hint, x, sigma, ctx, [w, w])) < 1e-5


@pytest.mark.parametrize("multiplier", [0.0, 0.5])
def test_uncond_multiplier_batched_and_separate(multiplier, nodes, sd15):
    base, sd, cnx = sd15
    x, ctx, hint = cnx_inputs(2)
    patched = apply_cnx(nodes, base, cnx, hint, strength=0.8, uncond_multiplier=multiplier)
    together = call(patched, x, 2.0, ctx, [0, 1])
    want = cnx_reference(base, sd, hint, x, 2.0, ctx, [0.8, 0.8 * multiplier])
    assert rel_err(together, want) < 1e-5
    cond = call(patched, x[:1], 2.0, ctx[:1], [0])
    uncond = call(patched, x[1:], 2.0, ctx[1:], [1])
    torch.testing.assert_close(torch.cat([cond, uncond]), together, rtol=1e-5, atol=1e-5)


def test_bad_strength_lists_and_masks_fail_before_sampling_naming_the_node(nodes, sd15):
    import comfy.sample

    base, sd, cnx = sd15
    lat = torch.zeros(3, 4, 8, 8)

    def sample(patched):
        comfy.sample.sample(patched, comfy.sample.prepare_noise(lat, 0), 1, 5.0, "euler", "normal",
                            tm.text_cond(patched), tm.text_cond(patched, seed=2), lat)

    hint = torch.rand(1, 64, 64, 3)
    with pytest.raises(ValueError, match=r"Apply ControlNeXt \(XCtrl\): the latent strength list has 2 values but the latent batch has 3"):
        sample(apply_cnx(nodes, base, cnx, hint, latent_strengths=latent_strengths(nodes, "1, 0.5")))
    with pytest.raises(ValueError, match=r"Apply ControlNeXt \(XCtrl\): the mask is 128x64 .* latent is 8x8"):
        sample(apply_cnx(nodes, base, cnx, hint, mask=torch.full((1, 64, 128), 0.5)))
    with pytest.raises(ValueError, match=r"Apply ControlNeXt \(XCtrl\): the mask batch has 2 images but the latent batch has 3"):
        sample(apply_cnx(nodes, base, cnx, hint, mask=torch.full((2, 64, 64), 0.5)))
    with pytest.raises(ValueError, match="before the previous one"):
        keyframes(nodes, (0.5, 1.0), (0.2, 1.0))


# ------------------------------------------------------------------------------ ControlNet-XS
LATENT = 16


APPLY_NODES = ("XCtrl_ApplyControlNeXt", "XCtrl_ApplyControlNeXtConditioning", "XCtrl_ApplyControlNetXS",
               "XCtrl_ApplyControlNetXSConditioning")


def test_step_range_checked_at_validation_and_linked_values_when_the_node_runs(nodes, sd15):
    """ComfyUI skips its own min/max checks for inputs a validate_inputs names, and passes None for
    an input fed by a link: the range is checked there, and again when the node runs."""
    for node_id in APPLY_NODES:
        validate = nodes[node_id].validate_inputs
        assert validate(0.2, 0.8) is True and validate(None, 0.5) is True and validate(None, None) is True
        assert "start_percent (0.9) is after end_percent (0.1)" in validate(0.9, 0.1)
        assert "end_percent must be between 0 and 1, got 1.5" in validate(0.0, 1.5)
        assert "start_percent must be between 0 and 1" in validate(float("nan"), 1.0)
    assert nodes["XCtrl_LatentStrengths"].validate_inputs(None) is True
    assert nodes["XCtrl_ControlNeXtSVDLongVideo"].validate_inputs(None, 6) is True
    base, _, cnx = sd15
    with pytest.raises(ValueError, match=r"Apply ControlNeXt \(XCtrl\): start_percent \(0.7\) is after end_percent \(0.2\)"):
        node_result(nodes["XCtrl_ApplyControlNeXt"], base, cnx, torch.rand(1, 64, 64, 3), 1.0, 0.7, 0.2)


@pytest.fixture(scope="module")
def xs(nodes, controlnet_dir):
    import comfy.model_management as mm

    yield xs_reference.loaded_sd15_xs(nodes["XCtrl_LoadControlNetXS"], controlnet_dir, "strengths_xs.safetensors")
    mm.unload_all_models()


def xs_inputs(base, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = base.model.model_config.unet_config
    x = torch.randn(rows, 4, LATENT, LATENT, generator=g)
    ctx = torch.randn(rows, 5, unet["context_dim"], generator=g)
    image = torch.rand(1, 8 * LATENT, 8 * LATENT, 3, generator=g)
    return x, ctx, image


def apply_xs(nodes, base, loaded, image, strength=0.7, **kw):
    return node_result(nodes["XCtrl_ApplyControlNetXS"], base, loaded, image, strength, 0.0, 1.0, **kw)[0]


def xs_reference_out(base, sd, x, sigma, ctx, image, scale, weights=None, mask=None):
    import comfy.model_management as mm

    mm.load_models_gpu([base])
    hint = image.movedim(-1, 1).float().expand(x.shape[0], -1, -1, -1)
    with torch.no_grad():
        return xs_reference.xs_denoised(base.model, sd, x, torch.full((x.shape[0],), float(sigma)), ctx, hint, scale,
                                        weights=weights, mask=mask)


def test_xs_mask_at_every_block_resolution(nodes, xs):
    base, sd, loaded = xs
    x, ctx, image = xs_inputs(base, 2)
    g = torch.Generator().manual_seed(9)
    masks = torch.rand(2, 8 * LATENT, 8 * LATENT, generator=g)  # one per latent
    patched = apply_xs(nodes, base, loaded, image, mask=masks)
    got = call(patched, x, 3.0, ctx, [0])
    want = xs_reference_out(base, sd, x, 3.0, ctx, image, 0.7, mask=masks.unsqueeze(1))
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, xs_reference_out(base, sd, x, 3.0, ctx, image, 0.7)) > 1e-4  # the mask does act
    ones = apply_xs(nodes, base, loaded, image, mask=torch.ones(1, 8 * LATENT, 8 * LATENT))
    assert torch.equal(call(ones, x, 3.0, ctx, [0]), call(apply_xs(nodes, base, loaded, image), x, 3.0, ctx, [0]))


def test_xs_connection_weights_base_multiplier_and_explicit(nodes, xs):
    base, sd, loaded = xs
    x, ctx, image = xs_inputs(base, 1)
    n = len(base.model.diffusion_model.input_blocks)
    m = 0.8
    soft = [m ** (n - i) for i in range(n)] + [1.0] + [m ** (j + 1) for j in range(n)]  # by hand
    got = call(apply_xs(nodes, base, loaded, image, connection_base_multiplier=m), x, 3.0, ctx, [0])
    assert rel_err(got, xs_reference_out(base, sd, x, 3.0, ctx, image, 0.7, weights=soft)) < 1e-5
    explicit = [round(0.1 * (k % 7), 2) for k in range(2 * n + 1)]
    got = call(apply_xs(nodes, base, loaded, image, connection_weights=", ".join(map(str, explicit))), x, 3.0, ctx, [0])
    assert rel_err(got, xs_reference_out(base, sd, x, 3.0, ctx, image, 0.7, weights=explicit)) < 1e-5
    with pytest.raises(ValueError, match=f"give 1 or {2 * n + 1}"):
        apply_xs(nodes, base, loaded, image, connection_weights="1, 2")


def test_xs_schedule_latent_strengths_and_uncond_multiplier(nodes, xs):
    base, sd, loaded = xs
    ms = base.model.model_sampling
    x, ctx, image = xs_inputs(base, 4)  # 2 latents, cond + uncond
    sigmas = torch.tensor([float(ms.percent_to_sigma(p)) for p in (0.1, 0.6)] + [0.0])
    patched = apply_xs(nodes, base, loaded, image, strength=0.7, schedule=keyframes(nodes, (0.5, 0.4)),
                       latent_strengths=latent_strengths(nodes, "1.0, 0.5"), uncond_multiplier=0.5)
    for sigma, step in zip(sigmas[:-1], [1.0, 0.4]):
        got = call(patched, x, sigma, ctx, [0, 1], sample_sigmas=sigmas)
        rows = [0.7 * step * f * u for u in (1.0, 0.5) for f in (1.0, 0.5)]  # cond chunk, then uncond
        assert rel_err(got, xs_reference_out(base, sd, x, sigma, ctx, image, rows)) < 1e-5, float(sigma)


def test_xs_all_ones_knobs_are_bit_identical_to_none(nodes, xs):
    base, sd, loaded = xs
    x, ctx, image = xs_inputs(base, 2)
    plain = call(apply_xs(nodes, base, loaded, image), x, 3.0, ctx, [0, 1])
    ones = apply_xs(nodes, base, loaded, image, schedule=keyframes(nodes, (0.0, 1.0)),
                    latent_strengths=latent_strengths(nodes, "1"), uncond_multiplier=1.0, connection_base_multiplier=1.0)
    assert torch.equal(call(ones, x, 3.0, ctx, [0, 1]), plain)


# ------------------------------------------------------------------------------ per-prompt control
def sample(model, positive, negative, steps=2, seed=0, size=8):
    import comfy.sample

    lat = torch.zeros(1, 4, size, size)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(lat, seed), steps, 5.0, "euler", "normal",
                               positive, negative, lat)


def cnx_conditioning(nodes, positive, negative, base, cnx, hint, strength=0.8, **kw):
    return node_result(nodes["XCtrl_ApplyControlNeXtConditioning"], positive, negative, base, cnx, hint, strength,
                       0.0, 1.0, **kw)


def test_controlnext_on_all_prompts_equals_the_model_patch(nodes, sd15):
    base, sd, cnx = sd15
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    pos, neg = tm.text_cond(base), tm.text_cond(base, seed=2)
    model_level = sample(apply_cnx(nodes, base, cnx, hint, strength=0.8), pos, neg)
    cpos, cneg = cnx_conditioning(nodes, pos, neg, base, cnx, hint)
    cond_level = sample(base, cpos, cneg)
    plain = sample(base, pos, neg)
    assert (cond_level - model_level).abs().max() <= 1e-6 * model_level.abs().max()
    assert rel_err(model_level, plain) > 1e-3  # the control acts
    assert "control" not in pos[0][1]  # the inputs are not changed


def test_mmdit_controlnext_on_all_prompts_equals_the_model_patch_and_chains_a_replacement(nodes, controlnet_dir):
    """SD3: the per-call joint-block replacement wraps a replacement another pack put on the same block."""
    import comfy.sample

    base = tm.sd3()
    cnx = load(pack_module("nodes.controlnext_nodes"), write(controlnet_dir, "strengths_sd3.safetensors",
                                                             controlnext_sd("sdxl", 128, seed=5)))
    other = OtherPacksReplacement("double_block", 0, lambda img: img * 1.01)
    chained = other.on(base)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    pos, neg = tm.text_cond(base), tm.text_cond(base, seed=2)
    lat = torch.zeros(1, 16, 8, 8)

    def run(model, positive, negative):
        return comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 0), 2, 4.0, "euler", "simple", positive,
                                   negative, lat)

    model_level = run(apply_cnx(nodes, chained, cnx, hint, strength=0.8), pos, neg)
    other.calls.clear()
    cond_level = run(chained, *cnx_conditioning(nodes, pos, neg, chained, cnx, hint))
    assert other.calls, "the other pack's replacement did not run"
    assert (cond_level - model_level).abs().max() <= 1e-6 * model_level.abs().max()
    assert rel_err(cond_level, run(chained, pos, neg)) > 1e-3  # the control acts


def test_prompts_without_the_control_get_none(nodes, sd15):
    """Control on the positive prompt only = the MODEL patch with uncond multiplier 0."""
    base, sd, cnx = sd15
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    pos, neg = tm.text_cond(base), tm.text_cond(base, seed=2)
    cpos, _ = cnx_conditioning(nodes, pos, neg, base, cnx, hint)
    positive_only = sample(base, cpos, neg)
    want = sample(apply_cnx(nodes, base, cnx, hint, strength=0.8, uncond_multiplier=0.0), pos, neg)
    assert rel_err(positive_only, want) < 1e-5
    assert rel_err(positive_only, sample(apply_cnx(nodes, base, cnx, hint, strength=0.8), pos, neg)) > 1e-4


def test_a_stock_controlnet_before_it_keeps_working(nodes, sd15):
    base, sd, cnx = sd15
    import comfy.model_management as mm

    stock = tm.unet_controlnet(tm.SD15_TINY, seed=5)
    g = torch.Generator().manual_seed(4)
    hint, stock_hint = torch.rand(1, 64, 64, 3, generator=g), torch.rand(1, 64, 64, 3, generator=g)
    pos, neg = tm.text_cond(base), tm.text_cond(base, seed=2)
    spos, sneg = _stock_apply(pos, neg, stock, stock_hint)
    both = sample(base, *cnx_conditioning(nodes, spos, sneg, base, cnx, hint))
    want = sample(apply_cnx(nodes, base, cnx, hint, strength=0.8), spos, sneg)
    assert rel_err(both, want) < 1e-5
    assert rel_err(both, sample(base, *cnx_conditioning(nodes, pos, neg, base, cnx, hint))) > 1e-4  # the stock one acts
    mm.unload_all_models()


def _stock_apply(positive, negative, control_net, image, strength=0.9):
    import nodes as comfy_nodes

    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, image, strength, 0.0, 1.0)


def test_controlnet_xs_on_all_prompts_equals_the_model_patch(nodes, xs):
    base, sd, loaded = xs
    x, ctx, image = xs_inputs(base, 1)
    pos, neg = [[torch.randn(1, 5, 768), {}]], [[torch.randn(1, 5, 768), {}]]
    model_level = sample(apply_xs(nodes, base, loaded, image), pos, neg, size=LATENT)
    cpos, cneg = node_result(nodes["XCtrl_ApplyControlNetXSConditioning"], pos, neg, base, loaded, image, 0.7, 0.0, 1.0)
    cond_level = sample(base, cpos, cneg, size=LATENT)
    assert (cond_level - model_level).abs().max() <= 1e-6 * model_level.abs().max()
    assert rel_err(model_level, sample(base, pos, neg, size=LATENT)) > 1e-3


def test_model_level_controls_stop_on_a_tile_naming_the_per_prompt_node(nodes, sd15, xs):
    """A tiled upscaler's tile, as a MODEL-level control sees it: a sampled image smaller than the
    hint in both sides and of another shape. The same hint on an image of its own shape samples."""
    image = torch.rand(1, 96, 160, 3)
    cases = [(apply_cnx(nodes, sd15[0], sd15[2], image), tm.text_cond(sd15[0]), tm.text_cond(sd15[0], seed=2),
              r"Apply ControlNeXt \(XCtrl\): .*'Apply ControlNeXt to Conditioning \(XCtrl\)'"),
             (apply_xs(nodes, xs[0], xs[2], image), [[torch.randn(1, 5, 768), {}]], [[torch.randn(1, 5, 768), {}]],
              r"Apply ControlNet-XS \(XCtrl\): .*'Apply ControlNet-XS to Conditioning \(XCtrl\)'")]
    for patched, pos, neg, message in cases:
        with pytest.raises(ValueError, match=message):
            sample(patched, pos, neg, steps=1, size=8)  # a 64x64 tile of the 160x96 image
        lat = torch.zeros(1, 4, 6, 10)  # 80x48: the whole image, smaller
        assert torch.isfinite(comfy_sample(patched, pos, neg, lat)).all()


def comfy_sample(model, positive, negative, lat):
    import comfy.sample

    return comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 0), 1, 5.0, "euler", "normal", positive, negative, lat)


# ------------------------------------------------------------------------------ the real Advanced-ControlNet
def _acn_utils(comfy_root):
    import importlib
    import os
    import sys

    for folder in (os.environ.get("XCTRL_ACN_DIR"), os.path.join(comfy_root, "custom_nodes", "ComfyUI-Advanced-ControlNet")):
        if folder and os.path.isdir(os.path.join(folder, "adv_control")):
            sys.path.insert(0, folder)
            try:
                return importlib.import_module("adv_control.utils")
            finally:
                sys.path.remove(folder)
    pytest.skip("ComfyUI-Advanced-ControlNet is not installed here (set XCTRL_ACN_DIR to a checkout to run this test "
                "with its real keyframe classes; the layout tests above use objects with its attributes)")


def test_the_real_advanced_controlnet_keyframes(nodes, sd15, comfy_root):
    acn = _acn_utils(comfy_root)
    base, sd, cnx = sd15
    ms = base.model.model_sampling
    group = acn.TimestepKeyframeGroup()
    group.add(acn.TimestepKeyframe(start_percent=0.5, strength=0.3))
    latents = acn.LatentKeyframeGroup()
    latents.add(acn.LatentKeyframe(1, 0.5))
    x, ctx, hint = cnx_inputs(2)
    patched = apply_cnx(nodes, base, cnx, hint, schedule=group, latent_strengths=latents)
    sigmas = torch.tensor([float(ms.percent_to_sigma(p)) for p in (0.1, 0.6)] + [0.0])
    for sigma, step in zip(sigmas[:-1], [1.0, 0.3]):
        got = call(patched, x, sigma, ctx, [0], sample_sigmas=sigmas)
        assert rel_err(got, cnx_reference(base, sd, hint, x, sigma, ctx, [0.0, 0.5 * step])) < 1e-5


# ------------------------------------------------------------------------------ NaN and inf
@pytest.mark.parametrize("text", ["nan", "1.0, inf", "1e309", "-inf"])
def test_non_finite_latent_strengths_are_refused_naming_the_node(text, nodes):
    message = nodes["XCtrl_LatentStrengths"].validate_inputs(text)
    assert isinstance(message, str) and "Latent Strengths (XCtrl): the strengths must be finite numbers" in message
    with pytest.raises(ValueError, match="finite numbers"):
        latent_strengths(nodes, text)


def test_non_finite_images_masks_and_numbers_are_refused_at_apply(nodes, sd15, xs):
    base, _, cnx = sd15
    hint = torch.rand(1, 64, 64, 3)
    bad_hint = hint.clone()
    bad_hint[0, 3, 3, 1] = float("nan")
    bad_mask = torch.ones(1, 64, 64)
    bad_mask[0, 0, 0] = float("inf")
    for kw, name in [({"hint": bad_hint}, "image"), ({"mask": bad_mask}, "mask"), ({"strength": float("nan")}, "strength"),
                     ({"uncond_multiplier": float("inf")}, "uncond_multiplier")]:
        image = kw.pop("hint", hint)
        strength = kw.pop("strength", 1.0)
        with pytest.raises(ValueError, match=rf"Apply ControlNeXt \(XCtrl\): the {name} input contains NaN or infinite"):
            apply_cnx(nodes, base, cnx, image, strength, **kw)
    with pytest.raises(ValueError, match=r"Apply ControlNet-XS \(XCtrl\): the connection_base_multiplier input contains NaN"):
        apply_xs(nodes, xs[0], xs[2], hint, connection_base_multiplier=float("nan"))
    with pytest.raises(ValueError, match="finite numbers, got nan"):
        apply_xs(nodes, xs[0], xs[2], hint, connection_weights="1, nan")


def test_every_other_number_input_refuses_nan_naming_its_node(nodes, sd15):
    """Float widgets that ComfyUI's min/max checks let through as NaN (every comparison with NaN is
    false): each is refused naming the node, not turned into an all-NaN result."""
    base, _, cnx = sd15
    hint = torch.rand(1, 64, 64, 3)
    nan = float("nan")
    cases = [
        ("Apply ControlNeXt (XCtrl): the unet_strength", lambda: apply_cnx(nodes, base, cnx, hint, unet_strength=nan)),
        ("MI Balanced Control (XCtrl): the cap", lambda: node_result(nodes["XCtrl_MIBalancedControl"], base, [], [], "paper",
                                                                     "layer", nan)),
        ("Step Keyframe (XCtrl): the strength", lambda: node_result(nodes["XCtrl_StepKeyframe"], 0.0, nan, "hold", 1)),
        ("Step Keyframe (XCtrl): the start_percent", lambda: node_result(nodes["XCtrl_StepKeyframe"], nan, 1.0, "hold", 1)),
        ("ControlNeXt-SVD Long Video (XCtrl): the min_cfg", lambda: node_result(nodes["XCtrl_ControlNeXtSVDLongVideo"], base, 4, 1,
                                                                               "linear", nan)),
        ("Apply UNet Weights (XCtrl): the strength", lambda: node_result(nodes["XCtrl_ApplyUNetWeights"], base, "any", nan)),
        ("SVD Conditioning, reference pipeline (XCtrl): the augmentation_level", lambda: node_result(
            nodes["XCtrl_SVDReferenceConditioning"], None, hint, None, 64, 64, 3, 127, 7, nan)),
    ]
    for says, make in cases:
        with pytest.raises(ValueError, match=re.escape(says) + " input contains NaN or infinite values"):
            make()


# ------------------------------------------------------------------------------ per-prompt nodes: the same checks
def test_per_prompt_nodes_run_the_model_nodes_checks(nodes, sd15):
    """Wrong-length latent strengths, a mask of another aspect ratio and a hint batch that fits no
    latent batch are refused at the first model call, naming the node, as the MODEL nodes do."""
    base, _, cnx = sd15
    pos, neg = tm.text_cond(base), tm.text_cond(base, seed=2)
    hint = torch.rand(1, 64, 64, 3)
    node = r"Apply ControlNeXt to Conditioning \(XCtrl\)"

    def run(lat_batch=1, **kw):
        cpos, cneg = cnx_conditioning(nodes, pos, neg, base, cnx, hint, **kw)
        lat = torch.zeros(lat_batch, 4, 8, 8)
        comfy_sample(base, cpos, cneg, lat)

    with pytest.raises(ValueError, match=node + r": the latent strength list has 2 values but the latent batch has 3"):
        run(3, latent_strengths=latent_strengths(nodes, "1, 0.5"))
    with pytest.raises(ValueError, match=node + r": the mask is 128x64 .* latent is 8x8"):
        run(1, mask=torch.full((1, 64, 128), 0.5))
    with pytest.raises(ValueError, match=node + r": the condition image batch has 2 images but the latent batch has 3"):
        cpos, cneg = cnx_conditioning(nodes, pos, neg, base, cnx, torch.rand(2, 64, 64, 3))
        comfy_sample(base, cpos, cneg, torch.zeros(3, 4, 8, 8))


def test_per_prompt_control_on_another_model_than_its_node_was_given_is_refused(nodes, sd15, xs):
    base, _, cnx = sd15
    hint = torch.rand(1, 64, 64, 3)
    pos, neg = tm.text_cond(base), tm.text_cond(base, seed=2)
    cpos, cneg = cnx_conditioning(nodes, pos, neg, base, cnx, hint)
    other = tm.sdxl()
    carried = [[c[0], {**c[1], "control": cpos[0][1]["control"]}] for c in tm.text_cond(other)]
    with pytest.raises(ValueError, match=r"Apply ControlNeXt to Conditioning \(XCtrl\): the sampler's model is SDXL .* "
                                         r"set up for the SD1.5 .*connect the MODEL you sample with"):
        comfy_sample(other, carried, tm.text_cond(other, seed=2), torch.zeros(1, 4, 8, 8))
    xpos, xneg = node_result(nodes["XCtrl_ApplyControlNetXSConditioning"], pos, neg, xs[0], xs[2], hint, 0.7, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"Apply ControlNet-XS to Conditioning \(XCtrl\): the sampler's model is SD1.5"):
        comfy_sample(base, xpos, xneg, torch.zeros(1, 4, 8, 8))


# ------------------------------------------------------------------------------ condition images of another shape
def test_fit_crops_like_comfyuis_apply_controlnet_pads_and_stretches(pack):
    import comfy.utils

    hints = pack_module("runtime.batch_rows")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for size in [(64, 42), (40, 64), (64, 48)]:  # target = the crop's own size: no resize after the crop
        stock = comfy.utils.common_upscale(x, size[1], size[0], "bilinear", "center")
        assert torch.equal(hints.fit(x, size, "crop"), stock), size
    padded = hints.fit(x, (64, 128), "pad")  # a square into a 1:2 frame: black bars left and right, no resize
    assert torch.equal(padded[..., 32:96], x) and padded[..., :32].abs().max() == 0 and padded[..., 96:].abs().max() == 0
    assert torch.equal(hints.fit(x, (32, 64), "stretch"), hints.resize(x, (32, 64)))


def test_resize_mode_default_crops_a_condition_image_of_another_shape(nodes, sd15):
    """A square pose map on a portrait latent: by default the centre of the portrait's shape is used
    (as stock Apply ControlNet), exactly as if the image had been cropped first; 'stretch' squeezes."""
    base, _, cnx = sd15
    g = torch.Generator().manual_seed(4)
    square = torch.rand(1, 128, 128, 3, generator=g)
    cropped = square[:, :, 32:96]  # the centre 64x128 (W x H) of the square: the latent's 1:2 shape
    x, sigma, ctx = torch.randn(2, 4, 16, 8, generator=g), torch.tensor(3.0), torch.randn(2, 7, 32, generator=g)
    default = call(apply_cnx(nodes, base, cnx, square), x, sigma, ctx, [0, 1])
    precropped = call(apply_cnx(nodes, base, cnx, cropped, resize_mode="stretch"), x, sigma, ctx, [0, 1])
    stretched = call(apply_cnx(nodes, base, cnx, square, resize_mode="stretch"), x, sigma, ctx, [0, 1])
    assert torch.equal(default, precropped)
    assert (stretched - default).abs().max() > 1e-4 * default.abs().max()

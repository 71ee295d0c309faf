"""ControlNeXt on ComfyUI's native SD1.5 and SDXL models (tiny random-weight twins).

Parity: the patched model's denoised output against tests/harness/reference.py, which runs
the UNet block by block and injects the functional control feature as docs/controlnext.md says.
"""
import pytest
import torch

from harness import reference as ref
from harness import tiny_models as tm
from harness.comfy_runtime import OtherPacksReplacement, pack_module
from harness.controlnext_files import LAYOUTS, TINY_OUT, apply, controlnext_sd, load, rel_err, write
from harness.layouts import load_layout


def denoise(patcher, x, sigma, context, cond_or_uncond, y=None):
    """The patched model's prediction through ComfyUI's apply_model (wrappers + patches)."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    to = patcher.model_options["transformer_options"].copy()
    to["wrappers"] = patcher.wrappers  # what sampler_helpers merges in before sampling
    to["cond_or_uncond"] = list(cond_or_uncond)
    to["sigmas"] = sigma
    kw = {} if y is None else {"y": y}
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=to, **kw)


def inputs(family, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g) * 2
    sigma = torch.tensor([3.0, 3.0])
    ctx = torch.randn(2, 7, 32, generator=g)
    y = torch.randn(2, 2816, generator=g) if family == "sdxl" else None
    # Low-frequency hint: the control feature survives the pooling to the middle block's 2x2,
    # which keeps the cross-normalization well conditioned (random noise pools to ~0 and
    # amplifies float32 rounding).
    hint = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(128, 128), mode="nearest")
    return x, sigma, ctx, y, hint.movedim(1, -1)


def reference(base, family, sd, hint, x, sigma, ctx, y, strength, scale_learned=None):
    """docs/controlnext.md: SD1.5 released at the middle output, pool then normalize, s = learned * strength;
    SDXL after conv_in (skip keeps the uncontrolled tensor), normalize then pool, s = strength."""
    t = base.model.model_sampling.timestep(sigma).float()
    h_img = hint.movedim(-1, 1).expand(x.shape[0], -1, -1, -1)
    with torch.no_grad():
        c = ref.controlnext_feature({k: v.float() for k, v in sd.items()}, family, h_img, t)
        if family == "sd15":
            s = torch.full((x.shape[0],), float(sd["scale"]) * strength)
            hooks = {("output", 0): lambda h: ref.cross_norm_add(h, c, 1e-12, True, s)}
        else:
            s = torch.full((x.shape[0],), strength)
            hooks = {("input", 0): lambda h: ref.cross_norm_add(h, c, 1e-12, False, s)}
        return ref.unet_denoised(base.model, x, sigma, ctx, y=y, hooks=hooks)


def test_sd15_training_layout_parity_when_asked_for(nodes_mod, controlnet_dir):
    """SD1.5-Training: after input block 3 (skip saved first), pool then normalize, s = strength."""
    base = tm.sd15()
    sd = controlnext_sd("sd15_training", 32, seed=8)  # tiny SD1.5: 32 channels at input block 3
    cnx = load(nodes_mod, write(controlnet_dir, "sd15_training.safetensors", sd))
    x, sigma, ctx, _, hint = inputs("sd15")
    with pytest.raises(ValueError, match="sd15_training"):
        apply(nodes_mod, base, cnx, hint)
    got = denoise(apply(nodes_mod, base, cnx, hint, strength=0.6, sd15_layout="sd15_training"), x, sigma, ctx, [0, 1])
    t = base.model.model_sampling.timestep(sigma).float()
    with torch.no_grad():
        c = ref.controlnext_feature(sd, "sd15_training", hint.movedim(-1, 1).expand(2, -1, -1, -1), t)
        s = torch.full((2,), 0.6)
        want = ref.unet_denoised(base.model, x, sigma, ctx, hooks={("input", 3): lambda h: ref.cross_norm_add(h, c, 1e-12, True, s)})
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_parity_with_reference_forward(family, nodes_mod, controlnet_dir):
    base = getattr(tm, family)()
    sd = controlnext_sd(family, TINY_OUT[family])
    cnx = load(nodes_mod, write(controlnet_dir, f"parity_{family}.safetensors", sd))
    x, sigma, ctx, y, hint = inputs(family)
    patched = apply(nodes_mod, base, cnx, hint, strength=0.8)
    got = denoise(patched, x, sigma, ctx, [0, 1], y)
    want = reference(base, family, sd, hint, x, sigma, ctx, y, 0.8)
    plain = ref.unet_denoised(base.model, x, sigma, ctx, y=y)
    assert rel_err(want, plain) > 1e-3, "the control must change the output for the test to mean anything"
    assert rel_err(got, want) < 1e-5


def test_lazily_initialised_layers_load_and_give_the_same_output(nodes_mod, controlnet_dir, monkeypatch):
    """With DynamicVRAM (newer ComfyUI on NVIDIA GPUs) ComfyUI's ops create linear layers whose
    weights exist only once loaded; the module must load and compute exactly as with eager layers.
    Turned on here by the flag ComfyUI's start-up sets; the test CPU cannot run DynamicVRAM itself."""
    memory_management = pytest.importorskip("comfy.memory_management", reason="this ComfyUI has no lazily initialised layers")
    if not hasattr(memory_management, "aimdo_enabled"):
        pytest.skip("this ComfyUI has no lazily initialised layers")
    base = tm.sd15()
    x, sigma, ctx, y, hint = inputs("sd15")
    sd = controlnext_sd("sd15", TINY_OUT["sd15"])
    eager = denoise(apply(nodes_mod, base, load(nodes_mod, write(controlnet_dir, "eager.safetensors", sd)), hint), x, sigma, ctx, [0, 1])
    monkeypatch.setattr(memory_management, "aimdo_enabled", True)
    lazy_cnx = load(nodes_mod, write(controlnet_dir, "lazy.safetensors", sd))
    lazy = denoise(apply(nodes_mod, base, lazy_cnx, hint), x, sigma, ctx, [0, 1])
    assert torch.equal(lazy, eager)


def test_control_module_follows_a_compute_dtype_set_on_the_model(pack):
    """A compute-dtype node sets the dtype as an object patch of its clone: the module is built in it."""
    family = pack_module("runtime.model_family")
    base = tm.sd15()
    patched = base.clone()
    patched.set_model_compute_dtype(torch.bfloat16)
    assert family.compute_dtype(base) == torch.float32 and family.compute_dtype(patched) == torch.bfloat16


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_strength_zero_and_empty_mask_are_bit_identical_to_the_base(family, nodes_mod, controlnet_dir):
    base = getattr(tm, family)()
    cnx = load(nodes_mod, write(controlnet_dir, f"zero_{family}.safetensors", controlnext_sd(family, TINY_OUT[family])))
    x, sigma, ctx, y, hint = inputs(family)
    plain = denoise(base, x, sigma, ctx, [0, 1], y)
    assert torch.equal(denoise(apply(nodes_mod, base, cnx, hint, strength=0.0), x, sigma, ctx, [0, 1], y), plain)
    empty = torch.zeros(1, 128, 128)
    assert torch.equal(denoise(apply(nodes_mod, base, cnx, hint, mask=empty), x, sigma, ctx, [0, 1], y), plain)
    outside = apply(nodes_mod, base, cnx, hint, start=0.9, end=1.0)  # sigma 3 is early in the schedule
    assert torch.equal(denoise(outside, x, sigma, ctx, [0, 1], y), plain)


def test_cond_and_uncond_batched_together_equal_separately(nodes_mod, controlnet_dir):
    base = tm.sd15()
    cnx = load(nodes_mod, write(controlnet_dir, "batch.safetensors", controlnext_sd("sd15", 64)))
    x, sigma, ctx, y, _ = inputs("sd15")
    hints = torch.rand(2, 128, 128, 3, generator=torch.Generator().manual_seed(5))  # one per latent
    x4, ctx4 = torch.cat([x, x]), torch.cat([ctx, ctx.flip(0)])
    patched = apply(nodes_mod, base, cnx, hints)
    both = denoise(patched, x4, sigma.repeat(2), ctx4, [0, 1])
    cond = denoise(patched, x4[:2], sigma, ctx4[:2], [0])
    uncond = denoise(patched, x4[2:], sigma, ctx4[2:], [1])
    torch.testing.assert_close(both, torch.cat([cond, uncond]), rtol=1e-5, atol=1e-5)
    # hint i goes to latent i in every chunk: swapping the hints changes latent 0's result
    swapped = denoise(apply(nodes_mod, base, cnx, hints.flip(0)), x4, sigma.repeat(2), ctx4, [0, 1])
    assert not torch.allclose(swapped[0], both[0])


def test_control_module_runs_once_per_step_and_stem_once_per_run(nodes_mod, controlnet_dir):
    import comfy.sample

    base = tm.sd15()
    cnx = load(nodes_mod, write(controlnet_dir, "count.safetensors", controlnext_sd("sd15", 64)))
    patched = apply(nodes_mod, base, cnx, torch.rand(1, 64, 64, 3))
    module = patched.model_patches_models()[0].model
    calls = {"stem": 0, "rest": 0, "rows": 0}
    stem, rest = module.stem, module.forward_from_stem

    def count_stem(*a, **k):
        calls["stem"] += 1
        return stem(*a, **k)

    def count_rest(state, t):
        calls["rest"] += 1
        calls["rows"] += int(t.numel())
        return rest(state, t)

    module.stem, module.forward_from_stem = count_stem, count_rest
    try:
        lat = torch.zeros(1, 4, 8, 8)
        comfy.sample.sample(patched, comfy.sample.prepare_noise(lat, 0), 3, 5.0, "euler", "normal",
                            tm.text_cond(patched), tm.text_cond(patched, seed=2), lat)
    finally:
        del module.stem, module.forward_from_stem
    assert calls["stem"] == 1
    assert calls["rest"] == 3 and calls["rows"] == 3  # one hint, cond+uncond share it: 1 row per step


def test_hint_and_mask_batch_mismatch_is_a_clear_error(nodes_mod, controlnet_dir):
    base = tm.sd15()
    cnx = load(nodes_mod, write(controlnet_dir, "mismatch.safetensors", controlnext_sd("sd15", 64)))
    x, sigma, ctx, _, _ = inputs("sd15")
    patched = apply(nodes_mod, base, cnx, torch.rand(3, 64, 64, 3))
    with pytest.raises(ValueError, match="3 images but the latent batch has 1"):
        denoise(patched, x, sigma, ctx, [0, 1])


def test_family_mismatch_fails_at_apply_time_naming_both(nodes_mod, controlnet_dir):
    cnx_xl = load(nodes_mod, write(controlnet_dir, "xl.safetensors", controlnext_sd("sdxl", 32)))
    with pytest.raises(ValueError, match=r"SDXL.*SD1\.5|SD1\.5.*SDXL"):
        apply(nodes_mod, tm.sd15(), cnx_xl, torch.rand(1, 64, 64, 3))
    cnx_15 = load(nodes_mod, write(controlnet_dir, "15.safetensors", controlnext_sd("sd15", 64)))
    with pytest.raises(ValueError, match=r"SD1\.5.*SDXL|SDXL.*SD1\.5"):
        apply(nodes_mod, tm.sdxl(), cnx_15, torch.rand(1, 64, 64, 3))


@pytest.mark.parametrize("family, out", [("sd15", 64), ("sdxl", 32)])
def test_the_svd_v2_module_is_named_on_image_models(family, out, nodes_mod, controlnet_dir):
    """The SVD v2 module has the SDXL layout: its released name tells it apart (on SDXL it would
    otherwise run as an SDXL control without a word)."""
    cnx_svd = load(nodes_mod, write(controlnet_dir, f"controlnext-svd_v2-controlnet-fp16_{family}.safetensors",
                                    controlnext_sd("svd_v2", out)))
    with pytest.raises(ValueError, match=r"by its name, the ControlNeXt-SVD v2 control module .*Load an SVD model"):
        apply(nodes_mod, getattr(tm, family)(), cnx_svd, torch.rand(1, 64, 64, 3))


def test_width_mismatch_is_caught_at_apply_time(nodes_mod, controlnet_dir):
    """A released-width (1280) SD1.5 module on the tiny model (64 channels): error before sampling."""
    cnx = load(nodes_mod, write(controlnet_dir, "w1280.safetensors", controlnext_sd("sd15")))
    with pytest.raises(ValueError, match="1280"):
        apply(nodes_mod, tm.sd15(), cnx, torch.rand(1, 64, 64, 3))


def test_loader_names_other_file_kinds(nodes_mod, controlnet_dir):
    xs = {k: torch.zeros(v, dtype=torch.float16) for k, v in load_layout("controlnet_xs_vislearn_sd21_14m.json")["keys"].items()}
    with pytest.raises(ValueError, match="ControlNet-XS"):
        load(nodes_mod, write(controlnet_dir, "xs.safetensors", xs))
    (controlnet_dir / "cnx_truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ValueError, match="download it again"):
        load(nodes_mod, "cnx_truncated.safetensors")


@pytest.mark.parametrize("variant", sorted(LAYOUTS))
@pytest.mark.parametrize("fmt", ["safetensors_fp16", "bin_fp32"])
def test_loader_accepts_every_released_layout(variant, fmt, nodes_mod, controlnet_dir):
    dtype = torch.float16 if fmt.endswith("fp16") else torch.float32
    name = f"released_{variant}.{fmt.split('_')[0]}"
    loaded = load(nodes_mod, write(controlnet_dir, name, controlnext_sd(variant, dtype=dtype)))
    expected = {"sd15": "sd15", "svd_v1": "svd_v1"}.get(variant, "sdxl_family")
    assert loaded.family == expected


@pytest.mark.parametrize("layout", ["controlnext_sd15_unet_subset.json", "controlnext_sd15_unet_subset_upblocks.json",
                                    "controlnext_sdxl_unet_delta.json"])
def test_loader_accepts_released_unet_weight_files(layout, nodes_mod, controlnet_dir):
    name = write(controlnet_dir, "unet_" + layout.replace(".json", ".safetensors"),
                 {k: torch.zeros(v, dtype=torch.float16) for k, v in load_layout(layout)["keys"].items()})
    module = write(controlnet_dir, "with_unet_sd15.safetensors", controlnext_sd("sd15", dtype=torch.float16))
    loaded = load(nodes_mod, module, name)
    assert loaded.unet_semantics == (("delta" if "sdxl" in layout else "replace"), "diffusers")


# ------------------------------------------------------------------------- UNet weight files
def _attn_out_keys(base):
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(base.model.model_config.unet_config)
    return {d: l for d, l in mapping.items() if ".to_out.0." in d and (".attn1." in d or ".attn2." in d)}


def _lora(base, keys, seed=7):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for ldm in keys:
        w = base.model.diffusion_model.state_dict()[ldm]
        if w.dim() == 2:
            stem = "diffusion_model." + ldm[: -len(".weight")]
            sd[stem + ".lora_up.weight"] = 0.1 * torch.randn(w.shape[0], 2, generator=g)
            sd[stem + ".lora_down.weight"] = 0.1 * torch.randn(2, w.shape[1], generator=g)
    return sd


def test_unet_replacement_weights_compose_with_lora_in_either_order(nodes_mod, controlnet_dir):
    import comfy.model_management as mm
    import comfy.sd

    base = tm.sd15()
    keys = _attn_out_keys(base)
    g = torch.Generator().manual_seed(11)
    new = {d: torch.randn(base.model.diffusion_model.state_dict()[l].shape, generator=g) * 0.05 for d, l in keys.items()}
    unet_file = write(controlnet_dir, "unet_replace.safetensors", new)
    cnx = load(nodes_mod, write(controlnet_dir, "with_unet.safetensors", controlnext_sd("sd15", 64)), unet_file)
    hint = torch.rand(1, 64, 64, 3)
    lora = _lora(base, keys.values())

    originals = {l: base.model.diffusion_model.state_dict()[l].clone() for l in keys.values()}
    only_unet = apply(nodes_mod, base, cnx, hint, strength=0.0)
    mm.load_models_gpu([only_unet])
    sd_now = only_unet.model.diffusion_model.state_dict()
    for d, l in keys.items():  # strength 1: the file's weights (W + (W_new - W) up to fp32 rounding)
        torch.testing.assert_close(sd_now[l], new[d], rtol=0, atol=1e-6)
        assert not torch.allclose(sd_now[l], originals[l])

    lora_first = apply(nodes_mod, comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0], cnx, hint)
    unet_first = comfy.sd.load_lora_for_models(apply(nodes_mod, base, cnx, hint), None, lora, 1.0, 0)[0]
    x, sigma, ctx, _, _ = inputs("sd15")
    a = denoise(lora_first, x, sigma, ctx, [0, 1])
    b = denoise(unet_first, x, sigma, ctx, [0, 1])
    c = denoise(apply(nodes_mod, base, cnx, hint), x, sigma, ctx, [0, 1])
    assert rel_err(a, b) < 1e-5
    assert rel_err(a, c) > 1e-4  # the LoRA did something


def test_unet_weights_of_the_wrong_family_fail_at_apply_time(nodes_mod, controlnet_dir):
    layout = load_layout("controlnext_sdxl_unet_delta.json")["keys"]
    unet_file = write(controlnet_dir, "xl_delta.safetensors", {k: torch.zeros(v) for k, v in layout.items()})
    cnx = load(nodes_mod, write(controlnet_dir, "with_xl_unet.safetensors", controlnext_sd("sd15", 64)), unet_file)
    with pytest.raises(ValueError, match="another model family|SDXL"):
        apply(nodes_mod, tm.sd15(), cnx, torch.rand(1, 64, 64, 3))


# ------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_sampling_end_to_end(family, nodes_mod, controlnet_dir):
    import comfy.sample

    base = getattr(tm, family)()
    cnx = load(nodes_mod, write(controlnet_dir, f"e2e_{family}.safetensors", controlnext_sd(family, TINY_OUT[family])))
    patched = apply(nodes_mod, base, cnx, torch.rand(1, 100, 90, 3))  # odd size: resized to the latent's
    lat = torch.zeros(1, 4, 8, 8)

    def run(m):
        return comfy.sample.sample(m, comfy.sample.prepare_noise(lat, 0), 3, 5.0, "dpmpp_2m", "karras",
                                   tm.text_cond(m), tm.text_cond(m, seed=2), lat)

    out, plain = run(patched), run(base)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, plain)


# ------------------------------------------------------------------------- MMDiT (SD3), unofficial
def _sd3_reference(base, sd, hint, x, sigma, ctx, pooled, strength, post_block0=None):
    """SD3 forward with joint block 0's image input replaced per the documented format;
    ``post_block0(img)`` changes block 0's image output (another pack's replacement of it)."""
    import torch.nn.functional as F

    dm, ms = base.model.diffusion_model, base.model.model_sampling
    t = ms.timestep(sigma).float()
    c = ref.controlnext_feature({k: v.float() for k, v in sd.items()}, "sdxl", hint.movedim(-1, 1).expand(x.shape[0], -1, -1, -1), t)
    xc = ms.calculate_input(sigma, x)
    hw = xc.shape[-2:]
    tokens = dm.x_embedder(xc) + dm.cropped_pos_embed(hw, device=xc.device).to(xc.dtype)
    grid = (hw[0] // 2, hw[1] // 2)
    ct = F.adaptive_avg_pool2d(c, grid).flatten(2).transpose(1, 2)  # (B, N, C), row-major like the patches
    mh, sh = tokens.mean(1, keepdim=True), tokens.std(1, keepdim=True)
    mc, sc = ct.mean(1, keepdim=True), ct.std(1, keepdim=True)
    tokens = tokens + ((ct - mc) * sh / (sc + 1e-12) + mh) * strength
    cmod = dm.t_embedder(t, dtype=xc.dtype) + dm.y_embedder(pooled)
    context = dm.context_embedder(ctx)
    for i, block in enumerate(dm.joint_blocks):
        context, tokens = block(context, tokens, c=cmod)
        if i == 0 and post_block0 is not None:
            tokens = post_block0(tokens)
    out = dm.unpatchify(dm.final_layer(tokens, cmod), hw=hw)[:, :, :hw[0], :hw[1]]
    return ms.calculate_denoised(sigma, out, x)


@pytest.mark.parametrize("order", ["before", "after"])
def test_mmdit_parity_and_chaining(order, nodes_mod, controlnet_dir):
    """Parity, with another pack's replacement of joint block 0 applied before or after the Apply
    node: it runs on the controlled tokens and its change to the block's output stays."""
    import comfy.model_management as mm

    base = tm.sd3()
    sd = controlnext_sd("sdxl", 128, seed=4)  # tiny SD3 hidden size 128
    cnx = load(nodes_mod, write(controlnet_dir, "sd3.safetensors", sd))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 16, 16, 16, generator=g)
    sigma = torch.tensor([0.6, 0.6])
    ctx = torch.randn(2, 7, 48, generator=g)
    pooled = torch.randn(2, 64, generator=g)
    hint = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(128, 128)).movedim(1, -1)

    def change(img):
        return img * 1.25 - 0.1

    other = OtherPacksReplacement("double_block", 0, change)
    patched = apply(nodes_mod, other.on(base) if order == "before" else base, cnx, hint, strength=0.7)
    if order == "after":
        patched = other.on(patched)
    mm.load_models_gpu([patched])
    to = patched.model_options["transformer_options"].copy()
    to["wrappers"] = patched.wrappers
    to.update(cond_or_uncond=[0, 1], sigmas=sigma)
    with torch.no_grad():
        got = patched.model.apply_model(x, sigma, c_crossattn=ctx, y=pooled, transformer_options=to)
        want = _sd3_reference(base, sd, hint, x, sigma, ctx, pooled, 0.7, change)
        plain = _sd3_reference(base, sd, hint, x, sigma, ctx, pooled, 0.0, change)
        alone = _sd3_reference(base, sd, hint, x, sigma, ctx, pooled, 0.7)
    assert other.calls, "the other pack's block replacement was dropped"
    assert rel_err(want, plain) > 1e-3 and rel_err(want, alone) > 1e-3
    assert rel_err(got, want) < 1e-5
    assert len(set(patched.model_patches_models())) == 1  # the control module still loads with the MODEL


def test_mmdit_sampling_end_to_end(nodes_mod, controlnet_dir):
    import comfy.sample

    base = tm.sd3()
    cnx = load(nodes_mod, write(controlnet_dir, "sd3_e2e.safetensors", controlnext_sd("sdxl", 128, seed=5)))
    patched = apply(nodes_mod, base, cnx, torch.rand(1, 64, 64, 3))
    lat = torch.zeros(1, 16, 8, 8)
    run = lambda m: comfy.sample.sample(m, comfy.sample.prepare_noise(lat, 0), 2, 4.0, "euler", "simple",
                                        tm.text_cond(m), tm.text_cond(m, seed=2), lat)
    out = run(patched)
    assert torch.isfinite(out).all() and not torch.allclose(out, run(base))


def test_control_module_follows_the_models_devices(controlnet_dir, nodes_mod):
    """A UNet that a multi-GPU pack placed on another device takes its control module along."""
    base = tm.sdxl()
    elsewhere = base.clone()
    elsewhere.load_device, elsewhere.offload_device = torch.device("cuda", 1), torch.device("cpu", 0)
    cnx = load(nodes_mod, write(controlnet_dir, "devices_sdxl.safetensors", controlnext_sd("sdxl", TINY_OUT["sdxl"])))
    patched = apply(nodes_mod, elsewhere, cnx, torch.rand(1, 64, 64, 3))
    (module,) = set(patched.model_patches_models())
    assert (module.load_device, module.offload_device) == (torch.device("cuda", 1), torch.device("cpu", 0))
    plain = apply(nodes_mod, base, cnx, torch.rand(1, 64, 64, 3))
    (module,) = set(plain.model_patches_models())
    assert (module.load_device, module.offload_device) == (base.load_device, base.offload_device)


def test_clones_share_the_control_module_and_leave_no_leak(controlnet_dir, nodes_mod, caplog):
    """ComfyUI clones a MODEL's additional models with it: the module rides the patches instead,
    so every clone loads the one ModelPatcher and nothing dead stays in ComfyUI's loaded list."""
    import gc

    import comfy.model_management as mm
    import comfy.sample

    cnx = load(nodes_mod, write(controlnet_dir, "leak_sdxl.safetensors", controlnext_sd("sdxl", TINY_OUT["sdxl"])))
    patched = apply(nodes_mod, tm.sdxl(), cnx, torch.rand(1, 64, 64, 3))
    (module,) = set(patched.model_patches_models())
    lat = torch.zeros(1, 4, 8, 8)
    with caplog.at_level("INFO"):
        for _ in range(3):
            clone = patched.clone()  # what other nodes (LoRA loaders, hooks) do to a MODEL
            assert set(clone.model_patches_models()) == {module}
            comfy.sample.sample(clone, comfy.sample.prepare_noise(lat, 0), 1, 3.0, "euler", "normal",
                                tm.text_cond(clone, seed=1), tm.text_cond(clone, seed=2), lat, disable_pbar=True)
            del clone
            gc.collect()
            mm.cleanup_models_gc()
    assert not [m for m in mm.current_loaded_models if m.is_dead()]
    assert not [r for r in caplog.records if "memory leak" in r.getMessage().lower()]

"""ControlNet-XS in a real ComfyUI: loader and apply nodes, parity with a hand-written
two-stream loop (harness/xs_reference.py) on tiny SD1.5-, SD2.1- and SDXL-like models."""
import os

import pytest
import torch

from harness import comfy_runtime, tiny_models, xs_reference
from harness.comfy_runtime import model_call, node_result, pack_node_classes
from harness.layouts import load_layout
from harness.xs_reference import vislearn_to_diffusers

LATENT = 16  # latent side (SD1.5's /8 level is 2x2): hints are 128x128


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def release_bases(one_thread):
    yield
    _bases.clear()  # release the patchers while ComfyUI is still fully importable


@pytest.fixture(scope="session")
def xs_nodes(pack):
    classes = pack_node_classes()
    return classes["XCtrl_LoadControlNetXS"], classes["XCtrl_ApplyControlNetXS"]


def save(folder, name, sd):
    """Writes ``sd`` into the temp models/controlnet folder: .ckpt nested as Lightning does."""
    from safetensors.torch import save_file

    path = os.path.join(folder, name)
    if name.endswith(".ckpt"):
        torch.save({"state_dict": sd, "global_step": 1}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return name


def load(xs_nodes, controlnet_dir, name, sd):
    return node_result(xs_nodes[0], save(controlnet_dir, name, sd))[0]


def apply(xs_nodes, base, loaded, hint, strength=0.7, start=0.0, end=1.0, **kw):
    return node_result(xs_nodes[1], base, loaded, hint, strength, start, end, **kw)[0]


BASES = {"sd15": xs_reference.sd15_768, "sd21": xs_reference.sd21, "sdxl": tiny_models.sdxl, "sdxl_learned": tiny_models.sdxl}
_bases = {}


def base_for(kind):
    if kind not in _bases:
        _bases[kind] = BASES[kind]()
    return _bases[kind]


def inputs(base, rows, seed=0, hints=1):
    """x, context, y (SDXL) for ``rows`` batch rows, and a (hints, H, W, 3) IMAGE of 8x the latent."""
    g = torch.Generator().manual_seed(seed)
    unet = base.model.model_config.unet_config
    x = torch.randn(rows, 4, LATENT, LATENT, generator=g)
    ctx = torch.randn(rows, 5, unet["context_dim"], generator=g)
    y = torch.randn(rows, unet["adm_in_channels"], generator=g) if unet.get("adm_in_channels") else None
    image = torch.rand(hints, 8 * LATENT, 8 * LATENT, 3, generator=g)
    return x, ctx, y, image


def denoised(patcher, x, sigma, ctx, y=None, cond_or_uncond=(0,)):
    return model_call(patcher, x, sigma, ctx, cond_or_uncond, y)


def reference(base, sd, x, sigma, ctx, y, image_rows, scale):
    """The two-stream loop of docs/controlnet_xs.md; ``image_rows``: (rows, H, W, 3) IMAGE, one per batch row."""
    import comfy.model_management as mm

    mm.load_models_gpu([base])
    hint = image_rows.movedim(-1, 1).float()
    with torch.no_grad():
        return xs_reference.xs_denoised(base.model, sd, x, torch.full((x.shape[0],), float(sigma)), ctx, hint, scale, y)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl", "sdxl_learned"])
def test_parity_with_the_reference_two_stream_loop(kind, xs_nodes, controlnet_dir):
    base = base_for(kind)
    sd = xs_reference.xs_state_dict(kind, seed=1)
    loaded = load(xs_nodes, controlnet_dir, f"parity_{kind}.safetensors", sd)
    x, ctx, y, image = inputs(base, rows=2)
    patched = apply(xs_nodes, base, loaded, image, strength=0.7)
    got = denoised(patched, x, 3.0, ctx, y, cond_or_uncond=(0, 1))
    want = reference(base, sd, x, 3.0, ctx, y, image.expand(2, -1, -1, -1), 0.7)
    plain = denoised(base, x, 3.0, ctx, y, cond_or_uncond=(0, 1))
    assert rel_err(got, want) < 1e-5
    assert rel_err(plain, want) > 1e-3  # the control does act


def test_per_latent_hints_and_cond_uncond_batched_equal_separate(xs_nodes, controlnet_dir):
    base = base_for("sdxl")
    sd = xs_reference.xs_state_dict("sdxl", seed=2)
    loaded = load(xs_nodes, controlnet_dir, "batch_sdxl.safetensors", sd)
    x, ctx, y, image = inputs(base, rows=4, hints=2)  # latent batch 2, chunks cond + uncond
    patched = apply(xs_nodes, base, loaded, image, strength=1.0)
    together = denoised(patched, x, 2.0, ctx, y, cond_or_uncond=(0, 1))
    cond = denoised(patched, x[:2], 2.0, ctx[:2], y[:2], cond_or_uncond=(0,))
    uncond = denoised(patched, x[2:], 2.0, ctx[2:], y[2:], cond_or_uncond=(1,))
    assert rel_err(together, torch.cat([cond, uncond])) < 1e-6
    want = reference(base, sd, x, 2.0, ctx, y, image[[0, 1, 0, 1]], 1.0)
    assert rel_err(together, want) < 1e-5


def test_hint_of_another_size_is_resized_to_8x_the_latent(xs_nodes, controlnet_dir):
    hints = comfy_runtime.pack_module("runtime.batch_rows")
    base = base_for("sd15")
    sd = xs_reference.xs_state_dict("sd15", seed=3)
    loaded = load(xs_nodes, controlnet_dir, "resize_sd15.safetensors", sd)
    x, ctx, y, _ = inputs(base, rows=1)
    odd = torch.rand(1, 72, 200, 3)
    size = (8 * LATENT, 8 * LATENT)
    got = denoised(apply(xs_nodes, base, loaded, odd), x, 1.5, ctx)  # default: the centre of the image's shape
    fitted = hints.fit(odd.movedim(-1, 1), size, "crop").movedim(1, -1)
    assert torch.equal(got, denoised(apply(xs_nodes, base, loaded, fitted), x, 1.5, ctx))
    assert rel_err(got, reference(base, sd, x, 1.5, ctx, None, fitted, 0.7)) < 1e-5
    stretched = denoised(apply(xs_nodes, base, loaded, odd, resize_mode="stretch"), x, 1.5, ctx)
    squeezed = hints.resize(odd.movedim(-1, 1), size).movedim(1, -1)
    assert torch.equal(stretched, denoised(apply(xs_nodes, base, loaded, squeezed), x, 1.5, ctx))


def test_strength_zero_is_the_base_bit_for_bit(xs_nodes, controlnet_dir):
    base = base_for("sd21")  # learned time embedding: even the embedding must stay the base's
    loaded = load(xs_nodes, controlnet_dir, "zero_sd21.safetensors", xs_reference.xs_state_dict("sd21", seed=4))
    x, ctx, y, image = inputs(base, rows=2)
    got = denoised(apply(xs_nodes, base, loaded, image, strength=0.0), x, 3.0, ctx, y, (0, 1))
    assert torch.equal(got, denoised(base, x, 3.0, ctx, y, (0, 1)))


def test_outside_start_end_the_base_runs_on_its_own_time_embedding(xs_nodes, controlnet_dir):
    base = base_for("sdxl_learned")
    sd = xs_reference.xs_state_dict("sdxl_learned", seed=5)
    loaded = load(xs_nodes, controlnet_dir, "range_sdxl.safetensors", sd)
    ms = base.model.model_sampling
    x, ctx, y, image = inputs(base, rows=1)
    patched = apply(xs_nodes, base, loaded, image, strength=0.8, start=0.5, end=0.8)
    early = ms.percent_to_sigma(0.2)  # before start: off
    late = ms.percent_to_sigma(0.9)  # after end: off
    inside = ms.percent_to_sigma(0.6)
    for sigma in (early, late):
        assert torch.equal(denoised(patched, x, sigma, ctx, y), denoised(base, x, sigma, ctx, y))
    got = denoised(patched, x, inside, ctx, y)
    assert rel_err(got, reference(base, sd, x, inside, ctx, y, image, 0.8)) < 1e-5


def test_composes_with_a_weight_patch_on_the_base(xs_nodes, controlnet_dir):
    """A LoRA-like diff patch on the base and the control stream both act."""
    base = xs_reference.sd15_768()  # its own instance: the weight patch stays out of other tests
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    w = base.get_key_patches("diffusion_model.")[key][0]
    w = w[0] if isinstance(w, tuple) else w
    base.add_patches({key: (0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(9)),)}, 1.0)
    sd = xs_reference.xs_state_dict("sd15", seed=6)
    loaded = load(xs_nodes, controlnet_dir, "lora_sd15.safetensors", sd)
    x, ctx, y, image = inputs(base, rows=1)
    got = denoised(apply(xs_nodes, base, loaded, image), x, 2.0, ctx)
    want = reference(base, sd, x, 2.0, ctx, None, image, 0.7)  # loads the base with its patch
    assert rel_err(got, want) < 1e-5


# --------------------------------------------------------------------------- formats and errors
def test_diffusers_file_and_its_vislearn_twin_give_identical_outputs(xs_nodes, controlnet_dir):
    base = base_for("sd21")
    vis = xs_reference.xs_state_dict("sd21", seed=7)
    dif = {vislearn_to_diffusers(k, 12): v for k, v in vis.items()}
    twin_v = load(xs_nodes, controlnet_dir, "twin_vislearn.ckpt", dict(vis, scale_list=torch.ones(13)))
    twin_d = load(xs_nodes, controlnet_dir, "twin_diffusers.safetensors", dif)
    assert (twin_v.format, twin_d.format) == ("vislearn", "diffusers")
    x, ctx, y, image = inputs(base, rows=1)
    a = denoised(apply(xs_nodes, base, twin_v, image), x, 2.0, ctx)
    b = denoised(apply(xs_nodes, base, twin_d, image), x, 2.0, ctx)
    assert torch.equal(a, b)


def test_family_mismatch_fails_at_apply_naming_both(xs_nodes, controlnet_dir):
    import comfy.supported_models as sm

    xl = load(xs_nodes, controlnet_dir, "mismatch_sdxl.safetensors", xs_reference.xs_state_dict("sdxl", seed=8))
    image = torch.rand(1, 8 * LATENT, 8 * LATENT, 3)
    with pytest.raises(ValueError, match=r"SDXL.*MODEL is SD1\.5"):
        apply(xs_nodes, base_for("sd15"), xl, image)
    sd15 = load(xs_nodes, controlnet_dir, "mismatch_sd15.safetensors", xs_reference.xs_state_dict("sd15", seed=8))
    with pytest.raises(ValueError, match=r"made for SD1\.5.*MODEL is SD2"):
        apply(xs_nodes, base_for("sd21"), sd15, image)
    with pytest.raises(ValueError, match=r"made for SD1\.5.*MODEL is SDXL"):
        apply(xs_nodes, base_for("sdxl"), sd15, image)
    wider = tiny_models._patcher(sm.SD15, dict(tiny_models.SD15_TINY, context_dim=768, model_channels=64), 0)
    with pytest.raises(ValueError, match=r"UNet channel widths is \(32, 64, 64, 64\), the model's \(64, 128, 128, 128\)"):
        apply(xs_nodes, wider, sd15, image)  # right family, other widths


def test_a_controlnext_file_gets_a_clear_loader_error(xs_nodes, controlnet_dir):
    keys = load_layout("controlnext_sd15_released.json")["keys"]
    sd = {k: torch.zeros(v, dtype=torch.float16) for k, v in keys.items()}
    save(controlnet_dir, "not_xs_controlnext.safetensors", sd)
    with pytest.raises(ValueError, match=r"not_xs_controlnext\.safetensors is not a ControlNet-XS model: it is a ControlNeXt.*Load ControlNeXt"):
        node_result(xs_nodes[0], "not_xs_controlnext.safetensors")


RELEASED = {  # docs/controlnet_xs.md: control widths, learned time embedding, parameters (millions)
    "sd15_53m": ((64, 128, 256, 256), False, 52.66),
    "sd21_14m": ((4, 8, 16, 16), True, 14.19),
    "sdxl_20m": ((16, 32, 64), False, 20.18),
    "sdxl_48m": ((32, 64, 128), True, 42.42),
}


@pytest.mark.parametrize("fmt", ["vislearn", "diffusers"])
@pytest.mark.parametrize("model", sorted(RELEASED))
def test_every_released_layout_loads_through_the_loader_node(model, fmt, xs_nodes, controlnet_dir):
    keys = load_layout(f"controlnet_xs_{fmt}_{model}.json")["keys"]
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v, generator=g).half() for k, v in keys.items()}
    ext = ".ckpt" if fmt == "vislearn" and not model.startswith("sdxl") else ".safetensors"  # as released
    name = save(controlnet_dir, f"released_{fmt}_{model}{ext}", sd)
    del sd
    loaded = node_result(xs_nodes[0], name)[0]
    widths, learned, params = RELEASED[model]
    cfg = loaded.config
    assert (cfg.ctrl_channels, cfg.learned_time_embedding) == (widths, learned)
    assert round(sum(p.numel() for p in loaded.net.parameters()) / 1e6, 2) == params
    os.remove(os.path.join(controlnet_dir, name))


# --------------------------------------------------------------------------- sampling
def test_sampling_end_to_end(xs_nodes, controlnet_dir):
    import comfy.sample

    base = base_for("sdxl_learned")
    loaded = load(xs_nodes, controlnet_dir, "sample_sdxl.safetensors", xs_reference.xs_state_dict("sdxl_learned", seed=10))
    patched = apply(xs_nodes, base, loaded, torch.rand(1, 8 * LATENT, 8 * LATENT, 3), strength=1.0, start=0.0, end=0.7)
    latent = torch.zeros(1, 4, LATENT, LATENT)
    noise = comfy.sample.prepare_noise(latent, 0)
    pos, neg = tiny_models.text_cond(base, seed=1), tiny_models.text_cond(base, seed=2)

    def run(model):
        return comfy.sample.sample(model, noise, 3, 2.0, "euler", "normal", pos, neg, latent)

    out, plain = run(patched), run(base)
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-3 * plain.abs().max()


def test_control_network_follows_the_models_devices(xs_nodes, controlnet_dir):
    base = xs_reference.sd15_768()
    elsewhere = base.clone()
    elsewhere.load_device, elsewhere.offload_device = torch.device("cuda", 1), torch.device("cpu", 0)
    loaded = load(xs_nodes, controlnet_dir, "devices_sd15.safetensors", xs_reference.xs_state_dict("sd15", seed=11))
    patched = apply(xs_nodes, elsewhere, loaded, torch.rand(1, 64, 64, 3))
    (net,) = set(patched.model_patches_models())
    assert (net.load_device, net.offload_device) == (torch.device("cuda", 1), torch.device("cpu", 0))


def test_unreadable_connection_weights_are_refused_at_validation(pack):
    """The text is known before anything runs: ComfyUI's validation names the node and the input
    (its count, which depends on the network, is checked when the node runs)."""
    classes = pack_node_classes()
    for node in (classes["XCtrl_ApplyControlNetXS"], classes["XCtrl_ApplyControlNetXSConditioning"]):
        message = node.validate_inputs(0.0, 1.0, connection_weights="1, 0.5, x")
        assert isinstance(message, str) and message.startswith(f"{node.NODE}: connection_weights: the strengths must "
                                                               "be numbers"), message
        assert node.validate_inputs(0.0, 1.0, connection_weights="1, 0.5") is True
        assert node.validate_inputs(0.0, 1.0, connection_weights=None) is True  # linked: checked when it runs
        assert "start_percent" in node.validate_inputs(0.5, 0.2, connection_weights="1")

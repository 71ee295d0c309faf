"""Fine-tuned UNet files (ControlNeXt-SVD v2 style): diffusers and ComfyUI key names, loaded as the
model itself or applied as weight patches on a base model, inside a real ComfyUI."""
import math

import pytest
import torch
from safetensors.torch import save_file

from harness import tiny_models as tm
from harness.comfy_runtime import combo_options, node_result, pack_module


def invert(key_map):
    inv = {v: k for k, v in key_map.items()}
    assert len(inv) == len(key_map), "two diffusers keys map to one ComfyUI key"
    return inv

FRAMES = 3
# The smallest SVD that ComfyUI's model detection recognises (320 channels, 1024-wide context):
# ComfyUI's stock loader cannot detect the tiny SVD, so the "as the model itself" paths use this.
DETECTABLE = dict(tm.SVD_TINY, model_channels=320, context_dim=1024)


@pytest.fixture(scope="module")
def unet_dir(model_folder):
    return model_folder("diffusion_models")


@pytest.fixture(scope="module")
def nodes_mod(pack):  # this module's nodes: Apply UNet Weights, Load SVD UNet
    return pack_module("nodes.unet_weights_nodes")


@pytest.fixture(scope="module")
def keys_mod(pack):
    return pack_module("models.svd_unet_keys")


def write(unet_dir, name, sd):
    """Saves under a "uw_" name (folder_paths returns the first file of a name across folders)."""
    name = "uw_" + name
    path = unet_dir / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, str(path))
    return name


def to_diffusers(keys_mod, ldm_sd, config):
    inv = invert(keys_mod.svd_unet_key_map(config))
    return {inv[k]: v for k, v in ldm_sd.items()}


def effective(patcher):
    """The diffusion-model weights as ComfyUI computes them (patches applied); the shared model is
    unpatched again afterwards, so the module's base model keeps its own weights."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    try:
        return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        mm.unload_all_models()


def worst(got, want):
    """(largest absolute difference, its key) over the keys of ``want``."""
    return max(((got[k].float() - w.float()).abs().max().item(), k) for k, w in want.items())


def fine_tuned(orig, seed=5, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in orig.items()}


def lora_for(keys, shapes, seed=7):
    g = torch.Generator().manual_seed(seed)
    sd, delta = {}, {}
    for k in keys:
        stem = "diffusion_model." + k[: -len(".weight")]
        up = 0.1 * torch.randn(shapes[k][0], 2, generator=g)
        down = 0.1 * torch.randn(2, shapes[k][1], generator=g)
        sd[stem + ".lora_up.weight"], sd[stem + ".lora_down.weight"] = up, down
        delta[k] = up @ down
    return sd, delta


def svd_forward(patcher, seed=3):
    g = torch.Generator().manual_seed(seed)
    dm = patcher.model.diffusion_model
    ctx_dim = dm.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight.shape[1]
    x = torch.randn(FRAMES, 4, 8, 8, generator=g)
    sigma = torch.full((FRAMES,), 2.5)
    with torch.no_grad():
        return patcher.model.apply_model(
            x, sigma, c_concat=torch.randn(FRAMES, 4, 8, 8, generator=g), c_crossattn=torch.randn(FRAMES, 1, ctx_dim, generator=g),
            y=torch.randn(FRAMES, 768, generator=g), num_video_frames=FRAMES, image_only_indicator=torch.zeros(1, FRAMES))


# ---- the mapping against ComfyUI's own SVD model -------------------------------------------------


@pytest.mark.parametrize("config", [tm.SVD_TINY, dict(tm.SVD_TINY, model_channels=320, context_dim=1024, channel_mult=[1, 2, 4, 4])],
                         ids=["tiny", "released_size"])
def test_every_comfyui_key_is_the_image_of_one_diffusers_key(config, keys_mod, pack):
    import comfy.supported_models as sm

    mc = sm.SVD_img2vid(dict(config))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, device="meta")
    have = set(model.diffusion_model.state_dict())
    key_map = keys_mod.svd_unet_key_map(model.model_config.unet_config)
    assert len(invert(key_map)) == len(key_map)
    assert set(key_map.values()) == have
    if config["channel_mult"] == [1, 2, 4, 4]:
        assert len(have) == 1428


def test_node_registration(pack):
    import nodes

    for node_id in ("XCtrl_ApplyUNetWeights", "XCtrl_LoadSVDUNet"):
        assert node_id in nodes.NODE_CLASS_MAPPINGS
        assert nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA().category.startswith("XCtrl/")


# ---- (b), (c), (e): weight patches on the tiny SVD -------------------------------------------------


@pytest.fixture(scope="module")
def svd(pack):
    """One tiny SVD for the module (building it is the slow part); tests patch clones of it."""
    base = tm.svd()
    return base, {k: v.detach().clone() for k, v in base.model.diffusion_model.state_dict().items()}


@pytest.fixture(scope="module")
def sd15(pack):
    return tm.sd15()


@pytest.fixture(scope="module")
def tiny_files(unet_dir, keys_mod, svd):
    ft = fine_tuned(svd[1])
    return {
        "ft": ft,
        "diffusers": write(unet_dir, "tiny_ft_diffusers.safetensors", to_diffusers(keys_mod, ft, tm.SVD_TINY)),
        "diffusers_bin": write(unet_dir, "tiny_ft_diffusers.bin", to_diffusers(keys_mod, ft, tm.SVD_TINY)),
        "ldm": write(unet_dir, "tiny_ft_converted.safetensors", {"model.diffusion_model." + k: v for k, v in ft.items()}),
    }


def test_apply_full_diffusers_file_gives_the_files_weights(nodes_mod, tiny_files, svd):
    assert tiny_files["diffusers"] in combo_options(nodes_mod.ApplyUNetWeights, "unet_file")
    base, orig = svd
    patched = node_result(nodes_mod.ApplyUNetWeights, base, tiny_files["diffusers"], 1.0)[0]
    got = effective(patched)
    assert set(got) == set(tiny_files["ft"])
    assert worst(got, tiny_files["ft"])[0] < 2e-6  # W + (W_file - W) in fp32
    # the base ModelPatcher is untouched once the patched clone is gone
    plain = effective(base)
    for k in orig:
        assert torch.equal(plain[k], orig[k]), k


@pytest.mark.parametrize("which", ["ldm", "diffusers_bin"])
def test_comfyui_keys_and_bin_files_work_too(which, nodes_mod, tiny_files, svd):
    got = effective(node_result(nodes_mod.ApplyUNetWeights, svd[0], tiny_files[which], 1.0)[0])
    assert worst(got, tiny_files["ft"])[0] < 2e-6


def test_strength_half_gives_halfway_weights(nodes_mod, tiny_files, svd):
    base, orig = svd
    got = effective(node_result(nodes_mod.ApplyUNetWeights, base, tiny_files["diffusers"], 0.5)[0])
    assert worst(got, {k: orig[k] + 0.5 * (w - orig[k]) for k, w in tiny_files["ft"].items()})[0] < 2e-6


def test_composes_with_lora_in_either_order(nodes_mod, tiny_files, svd):
    import comfy.sd

    base, orig = svd
    shapes = {k: v.shape for k, v in orig.items()}
    keys = ["input_blocks.1.1.proj_in.weight", "input_blocks.1.1.time_stack.0.attn1.to_q.weight",
            "middle_block.1.transformer_blocks.0.attn2.to_out.0.weight", "label_emb.0.0.weight"]
    lora, delta = lora_for(keys, shapes)
    def apply(*args):
        return node_result(nodes_mod.ApplyUNetWeights, *args)

    lora_first = apply(comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0], tiny_files["diffusers"], 1.0)[0]
    unet_first = comfy.sd.load_lora_for_models(apply(base, tiny_files["diffusers"], 1.0)[0], None, lora, 1.0, 0)[0]
    a, b = effective(lora_first), effective(unet_first)
    want = {k: w + delta[k] if k in delta else w for k, w in tiny_files["ft"].items()}
    assert worst(a, want)[0] < 5e-6
    assert worst(b, want)[0] < 5e-6
    assert not torch.allclose(a[keys[0]], tiny_files["ft"][keys[0]])  # the LoRA did something


def test_partial_file(nodes_mod, unet_dir, keys_mod, tiny_files, svd):
    ft = tiny_files["ft"]
    part_keys = ["input_blocks.4.1.time_stack.0.ff_in.net.0.proj.weight", "output_blocks.5.0.time_mixer.mix_factor",
                 "out.2.bias"]
    key_map = invert(keys_mod.svd_unet_key_map(tm.SVD_TINY))
    name = write(unet_dir, "tiny_partial.safetensors", {key_map[k]: ft[k] for k in part_keys})
    base, orig = svd
    got = effective(node_result(nodes_mod.ApplyUNetWeights, base, name, 1.0)[0])
    for k in orig:
        if k in part_keys:
            torch.testing.assert_close(got[k], ft[k], rtol=0, atol=2e-6)
        else:
            assert torch.equal(got[k], orig[k]), k


def test_sd15_files_use_comfyuis_mapping(nodes_mod, unet_dir, sd15):
    """Non-SVD UNets go through comfy.utils.unet_to_diffusers: a diffusers-named full SD1.5 UNet."""
    import comfy.utils

    orig = {k: v.detach().clone() for k, v in sd15.model.diffusion_model.state_dict().items()}
    ft = fine_tuned(orig, seed=9)
    to_diff = {l: d for d, l in comfy.utils.unet_to_diffusers(sd15.model.model_config.unet_config).items() if l in orig}
    assert set(to_diff) == set(orig)
    name = write(unet_dir, "sd15_ft_diffusers.safetensors", {to_diff[k]: v for k, v in ft.items()})
    got = effective(node_result(nodes_mod.ApplyUNetWeights, sd15, name, 1.0)[0])
    assert worst(got, ft)[0] < 2e-6


# ---- (d): the wrong family or size fails clearly --------------------------------------------------


def test_sd15_file_on_svd_model(nodes_mod, unet_dir, svd, sd15):
    name = write(unet_dir, "sd15_unet.safetensors", sd15.model.diffusion_model.state_dict())
    with pytest.raises(ValueError) as e:
        node_result(nodes_mod.ApplyUNetWeights, svd[0], name, 1.0)
    msg = str(e.value)
    assert "no counterpart in this SVD (Stable Video Diffusion) MODEL" in msg
    assert "another model family" in msg and name in msg and "input_blocks.4.0.skip_connection.weight" in msg


def test_svd_file_on_sd15_model(nodes_mod, tiny_files, sd15):
    with pytest.raises(ValueError) as e:
        node_result(nodes_mod.ApplyUNetWeights, sd15, tiny_files["diffusers"], 1.0)
    msg = str(e.value)
    assert "an SVD (Stable Video Diffusion) UNet (diffusers key names" in msg and "the MODEL is SD1.5" in msg
    assert "temporal_transformer_blocks" in msg or "spatial_res_block" in msg
    assert msg.startswith(tiny_files["diffusers"]) and msg.endswith(". Fix: use it with a MODEL of the family it was made for.")


def test_shape_mismatch_names_key_and_shapes(nodes_mod, unet_dir, svd):
    name = write(unet_dir, "wrong_shape.safetensors", {"conv_in.weight": torch.zeros(64, 4, 3, 3)})
    with pytest.raises(ValueError, match=r"input_blocks\.0\.0\.weight: .* shape \(64, 4, 3, 3\) .* has \(64, 8, 3, 3\)"):
        node_result(nodes_mod.ApplyUNetWeights, svd[0], name, 1.0)


def test_loader_refuses_non_svd_and_undetectable(nodes_mod, unet_dir, keys_mod, tiny_files, sd15):
    name = write(unet_dir, "sd15_for_loader.safetensors", sd15.model.diffusion_model.state_dict())
    with pytest.raises(ValueError, match="not a Stable Video Diffusion UNet"):
        node_result(nodes_mod.LoadSVDUNet, name, "default")
    for name in (tiny_files["diffusers"], tiny_files["ldm"]):  # both namings reach ComfyUI's detection
        with pytest.raises(ValueError, match="did not recognise .* as an SVD model .*model_channels 64"):
            node_result(nodes_mod.LoadSVDUNet, name, "default")
    sd = to_diffusers(keys_mod, tiny_files["ft"], tm.SVD_TINY)
    del sd["mid_block.attentions.0.temporal_transformer_blocks.0.attn1.to_q.weight"]
    with pytest.raises(ValueError, match="incomplete diffusers SVD UNet: 1 tensors are missing"):
        node_result(nodes_mod.LoadSVDUNet, write(unet_dir, "incomplete.safetensors", sd), "default")


# ---- (a), (c): as the model itself (ComfyUI-detectable SVD size) ----------------------------------


@pytest.fixture(scope="module")
def detectable(unet_dir, keys_mod):
    """Random fp16 weights of an SVD UNet ComfyUI recognises, saved with diffusers and ComfyUI names."""
    import comfy.supported_models as sm

    mc = sm.SVD_img2vid(dict(DETECTABLE))
    mc.set_inference_dtype(torch.float32, None)
    shapes = {k: v.shape for k, v in mc.get_model({}, device="meta").diffusion_model.state_dict().items()}
    g = torch.Generator().manual_seed(21)
    ldm = {}
    for k, s in shapes.items():  # uniform fp16 noise (cheap) with a variance-preserving scale
        t = torch.rand(s, generator=g, dtype=torch.float16) - 0.5
        if len(s) >= 2:
            t *= math.sqrt(12 / math.prod(s[1:]))
        elif "norm" in k and k.endswith("weight"):
            t = 1 + 0.2 * t
        else:
            t *= 0.2
        ldm[k] = t
    return {
        "ldm": ldm,
        "diffusers": write(unet_dir, "svd320_diffusers.safetensors", to_diffusers(keys_mod, ldm, DETECTABLE)),
        "comfy": write(unet_dir, "svd320_converted.safetensors", ldm),
    }


def test_loader_and_stock_unet_loader_build_the_same_model(nodes_mod, detectable):
    import nodes

    ours = node_result(nodes_mod.LoadSVDUNet, detectable["diffusers"], "default")[0]
    stock = nodes.UNETLoader().load_unet(detectable["comfy"], "default")[0]
    for m in (ours, stock):
        assert type(m.model.model_config).__name__ == "SVD_img2vid"
        sd = m.model.diffusion_model.state_dict()
        assert set(sd) == set(detectable["ldm"])
        for k, v in detectable["ldm"].items():
            assert torch.equal(sd[k].float(), v.float()), k
    a, b = svd_forward(ours), svd_forward(stock)
    assert torch.isfinite(a).all() and a.abs().mean() > 0
    assert torch.equal(a, b)


def test_loader_registers_the_factory_core_builds_a_model_per_device_from(nodes_mod, detectable):
    """ComfyUI's MultiGPU CFG Split and Select Model Device rebuild a MODEL from its loader's
    ``cached_patcher_init`` (core's loaders set it; without one those nodes fail)."""
    ours = node_result(nodes_mod.LoadSVDUNet, detectable["diffusers"], "default")[0]
    if getattr(ours, "cached_patcher_init", None) is None:
        pytest.skip("this ComfyUI builds no model per device (ModelPatcher has no cached_patcher_init)")
    factory, args = ours.cached_patcher_init
    again = factory(*args, disable_dynamic=True)  # how core asks for a plain ModelPatcher
    assert again.model is not ours.model and not again.is_dynamic()
    mine = ours.model.diffusion_model.state_dict()
    for k, v in again.model.diffusion_model.state_dict().items():
        assert torch.equal(v, mine[k]), k

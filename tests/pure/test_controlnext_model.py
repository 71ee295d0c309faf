"""ControlNeXt control modules: layouts of the released files, parameter counts, and the
forward pass against an independent functional reference (F.conv2d & co. applied to the
state-dict tensors), in float64 so that differences are bugs, not rounding."""
import math

import pytest
import torch
import torch.nn.functional as F

from harness.ops import built_through, recording_ops
from harness.layouts import load_layout
from harness.random_weights import random_tensors
from xctrl.models.checkpoint_io import WeightFileError
from xctrl.models.controlnext import (
    SDXL_FAMILY,
    VARIANTS,
    ControlNeXt,
    build_controlnext,
    control_timesteps,
    detect_variant,
    injection_scales,
    resolve_variant,
    timestep_embedding,
)

LAYOUT_FILES = {
    "sd15": "controlnext_sd15_released.json",
    "sd15_training": "controlnext_sd15_training.json",
    "sdxl": "controlnext_sdxl.json",
    "svd_v1": "controlnext_svd_v1.json",
    "svd_v2": "controlnext_svd_v2.json",
}


def random_state_dict(layout, seed=0, dtype=torch.float64):
    """Random tensors with exactly the layout's keys and shapes (the tests' generator)."""
    return random_tensors(layout["keys"], seed, dtype, learned_scale=0.8)


# ---------------------------------------------------------------------------- reference

# Written from docs/controlnext.md's tables, independently of the production classes.
RES_GROUPS = {"sd15": [1, 8, 8], "sd15_training": [4, 8], "sdxl": [4, 8], "svd_v1": [4, 8, 8], "svd_v2": [4, 8]}
EMB_PADDING = {"sd15_training": 1, "sdxl": 1, "svd_v1": 0, "svd_v2": 0}  # embedding convs 2 and 3


def reference_forward(sd, variant, hint, t):
    def conv(x, name, stride=1, padding=1):
        return F.conv2d(x, sd[name + ".weight"], sd[name + ".bias"], stride=stride, padding=padding)

    def gn(x, name, groups, eps):
        return F.group_norm(x, groups, sd[name + ".weight"], sd[name + ".bias"], eps)

    def linear(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    # The sinusoid is computed in float32 whatever the model dtype (diffusers' Timesteps and
    # ComfyUI's timestep_embedding both do): at t ~ 900 that alone changes outputs by ~1e-5.
    half = 64
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(hint.dtype)
    temb = linear(F.silu(linear(temb, "time_embedding.linear_1")), "time_embedding.linear_2")

    x = hint
    if variant != "sd15":
        p = EMB_PADDING[variant]
        x = F.relu(gn(conv(x, "embedding.0", stride=2, padding=1), "embedding.1", 2, 1e-5))
        x = F.relu(gn(conv(x, "embedding.3", padding=p), "embedding.4", 2, 1e-5))
        x = F.relu(gn(conv(x, "embedding.6", padding=p), "embedding.7", 2, 1e-5))
        if variant == "svd_v1":
            x = F.max_pool2d(x, 2)
    for i, groups in enumerate(RES_GROUPS[variant]):
        r = f"down_res.{i}"
        h = conv(F.silu(gn(x, r + ".norm1", groups, 1e-6)), r + ".conv1")
        h = h + linear(F.silu(temb), r + ".time_emb_proj")[:, :, None, None]
        h = conv(F.silu(gn(h, r + ".norm2", groups, 1e-6)), r + ".conv2")
        skip = conv(x, r + ".conv_shortcut", padding=0) if r + ".conv_shortcut.weight" in sd else x
        x = conv(skip + h, f"down_sample.{i}.conv", stride=2, padding=1)
    if variant == "sd15":
        x = conv(F.relu(conv(x, "mid_convs.0.0")), "mid_convs.0.2")
    else:
        m = F.relu(conv(x, "mid_convs.0.0"))
        m = gn(conv(gn(m, "mid_convs.0.2", 8, 1e-5), "mid_convs.0.3"), "mid_convs.0.4", 8, 1e-5)
        x = x + m
    return conv(x, "mid_convs.1", padding=0)


def feature_size(variant, n):
    """Spatial size of the output for an input side n (conv arithmetic of docs/controlnext.md)."""
    down = lambda m: (m - 1) // 2 + 1  # 3x3, stride 2, padding 1  # noqa: E731
    if variant == "sd15":
        return down(down(down(n)))
    n = down(n)
    if EMB_PADDING[variant] == 0:
        n -= 4
    if variant == "svd_v1":
        n //= 2
    for _ in RES_GROUPS[variant]:
        n = down(n)
    return n


# ---------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("variant", sorted(LAYOUT_FILES))
def test_parameter_counts_match_spec_and_layout(variant):
    layout = load_layout(LAYOUT_FILES[variant])
    spec_counts = {"sd15": 5_352_327, "svd_v1": 5_610_177}
    expected = spec_counts.get(variant, 3_526_400)
    assert layout["params"] == expected
    assert sum(math.prod(s) for s in layout["keys"].values()) == expected
    model = ControlNeXt(variant, device="meta")
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("variant", sorted(LAYOUT_FILES))
def test_module_has_exactly_the_released_layout(variant):
    layout = load_layout(LAYOUT_FILES[variant])["keys"]
    model_sd = ControlNeXt(variant, device="meta").state_dict()
    assert {k: list(v.shape) for k, v in model_sd.items()} == layout


@pytest.mark.parametrize("variant", sorted(LAYOUT_FILES))
def test_strict_load_of_exact_layout(variant):
    sd = random_state_dict(load_layout(LAYOUT_FILES[variant]), dtype=torch.float32)
    model = build_controlnext(sd, variant)
    assert model.variant.name == variant
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_layout_mismatch_is_a_clear_error(case):
    sd = random_state_dict(load_layout(LAYOUT_FILES["sdxl"]), dtype=torch.float32)
    if case == "missing":
        del sd["down_res.1.norm2.bias"]
        needle = "missing keys: down_res.1.norm2.bias"
    elif case == "extra":
        sd["down_res.0.conv_shortcut.weight"] = torch.zeros(128, 128, 1, 1)
        needle = "unexpected keys: down_res.0.conv_shortcut.weight"
    else:
        sd["mid_convs.1.weight"] = torch.zeros(320, 256, 3, 3)
        needle = "mid_convs.1.weight (320, 256, 3, 3) (expected (320, 256, 1, 1))"
    with pytest.raises(WeightFileError) as e:
        build_controlnext(sd, "sdxl")
    assert needle in str(e.value)
    assert "ControlNeXt SDXL" in str(e.value)


def test_detect_variant_from_each_layout():
    expected = {"sd15": "sd15", "svd_v1": "svd_v1", "sdxl": SDXL_FAMILY, "svd_v2": SDXL_FAMILY, "sd15_training": SDXL_FAMILY}
    for variant, filename in LAYOUT_FILES.items():
        sd = {k: torch.empty(s, device="meta") for k, s in load_layout(filename)["keys"].items()}
        assert detect_variant(sd) == expected[variant], variant


def test_detect_rejects_other_files():
    with pytest.raises(WeightFileError, match="not a ControlNeXt control module"):
        detect_variant({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 4)})


def test_sdxl_family_needs_an_explicit_variant():
    sd = random_state_dict(load_layout(LAYOUT_FILES["sdxl"]), dtype=torch.float32)
    with pytest.raises(WeightFileError, match="variant='sdxl', 'svd_v2' or 'sd15_training'"):
        build_controlnext(sd)
    assert build_controlnext(sd, "svd_v2").variant.name == "svd_v2"


def test_variant_that_does_not_match_the_file_is_refused():
    sd = random_state_dict(load_layout(LAYOUT_FILES["sd15"]), dtype=torch.float32)
    assert build_controlnext(sd).variant.name == "sd15"  # detected
    with pytest.raises(WeightFileError, match="ControlNeXt SD1.5 module, not the SDXL one"):
        build_controlnext(sd, "sdxl")


def test_resolve_variant_by_base_model():
    assert resolve_variant(SDXL_FAMILY, "sdxl") == "sdxl"
    assert resolve_variant(SDXL_FAMILY, "svd") == "svd_v2"
    assert resolve_variant(SDXL_FAMILY, "sd15") == "sd15_training"
    assert resolve_variant("sd15", "sd15") == "sd15"
    assert resolve_variant("svd_v1", "svd") == "svd_v1"
    with pytest.raises(WeightFileError, match="made for SD1.5 and cannot control a sdxl model"):
        resolve_variant("sd15", "sdxl")
    with pytest.raises(ValueError, match="base_model must be one of"):
        resolve_variant("sd15", "flux")


@pytest.mark.parametrize("prefix", ["controlnet.", "module.", "module.controlnet."])
def test_common_key_prefix_is_stripped(prefix):
    sd = random_state_dict(load_layout(LAYOUT_FILES["sd15"]), dtype=torch.float32)
    model = build_controlnext({prefix + k: v for k, v in sd.items()})
    assert torch.equal(model.scale, sd["scale"])


def test_fp16_file_loads_into_fp32_and_fp16_modules():
    sd = {k: v.half() for k, v in random_state_dict(load_layout(LAYOUT_FILES["svd_v1"]), dtype=torch.float32).items()}
    m32 = build_controlnext(sd)
    assert m32.scale.dtype == torch.float32
    assert torch.equal(m32.embedding[0].weight, sd["embedding.0.weight"].float())
    m16 = build_controlnext(sd, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in m16.parameters())
    assert m16.learned_scale() == pytest.approx(0.8, abs=1e-3)


# ---------------------------------------------------------------------------- forward


SIZES = {"sd15": (32, 40), "sd15_training": (32, 40), "sdxl": (32, 40), "svd_v1": (64, 72), "svd_v2": (44, 50)}


@pytest.mark.parametrize("variant", sorted(LAYOUT_FILES))
def test_forward_matches_functional_reference(variant):
    sd = random_state_dict(load_layout(LAYOUT_FILES[variant]), seed=1)
    model = build_controlnext(sd, variant, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    H, W = SIZES[variant]
    hint = torch.rand(2, 3, H, W, generator=g, dtype=torch.float64)
    t = torch.tensor([3.0, 871.0]) if VARIANTS[variant].timestep == "model_timestep" else torch.tensor([-1.3, 0.9])
    with torch.no_grad():
        out = model(hint, t)
        ref = reference_forward(sd, variant, hint, t)
    out_c = 1280 if variant in ("sd15", "svd_v1") else 320
    assert out.shape == (2, out_c, feature_size(variant, H), feature_size(variant, W))
    assert ref.abs().mean() > 0.1  # the test is not comparing near-zero tensors
    # float64 on both sides: anything above rounding (e.g. a wrong GroupNorm eps) is a bug
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())
    # and the samples differ (time embedding and hint both matter)
    assert not torch.allclose(out[0], out[1])


def test_output_shapes_per_spec():
    # SD1.5: H/8 with 1280 channels; SDXL: H/8 (latent size) with 320 channels
    assert feature_size("sd15", 512) == 64 and feature_size("sdxl", 1024) == 128
    # SVD v2: pad-0 embedding convs make 1024x576 give 127x71 (docs/controlnext.md)
    assert (feature_size("svd_v2", 1024), feature_size("svd_v2", 576)) == (127, 71)
    sd = random_state_dict(load_layout(LAYOUT_FILES["svd_v2"]), dtype=torch.float32)
    model = build_controlnext(sd, "svd_v2")
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 36), torch.tensor([0.5]))
    # smaller analogue of the same arithmetic: 64 -> 32 -> 30 -> 28 -> 14 -> 7, 36 -> 18 -> 16 -> 14 -> 7 -> 4
    assert out.shape == (1, 320, 7, 4)
    model_sdxl = build_controlnext(sd, "sdxl")
    with torch.no_grad():
        assert model_sdxl(torch.rand(1, 3, 64, 36), torch.tensor([0.5])).shape == (1, 320, 8, 5)


def test_stem_is_the_part_before_the_time_embedding():
    sd = random_state_dict(load_layout(LAYOUT_FILES["sd15"]), seed=4)
    model = build_controlnext(sd, "sd15", dtype=torch.float64)
    hint = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    skip, h = model.stem(hint)
    ref_h = F.conv2d(F.silu(F.group_norm(hint, 1, sd["down_res.0.norm1.weight"], sd["down_res.0.norm1.bias"], 1e-6)),
                     sd["down_res.0.conv1.weight"], sd["down_res.0.conv1.bias"], padding=1)
    ref_skip = F.conv2d(hint, sd["down_res.0.conv_shortcut.weight"], sd["down_res.0.conv_shortcut.bias"])
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(skip, ref_skip)


def test_timesteps_broadcast_and_length_check():
    sd = random_state_dict(load_layout(LAYOUT_FILES["sdxl"]), dtype=torch.float32)
    model = build_controlnext(sd, "sdxl")
    hint = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        a = model(hint, 500.0)
        b = model(hint, torch.tensor([500.0, 500.0, 500.0]))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        with pytest.raises(ValueError, match="got 2 timesteps for a batch of 3"):
            model(hint, torch.tensor([1.0, 2.0]))


def test_timestep_embedding_is_cos_first_without_shift():
    emb = timestep_embedding(torch.tensor([0.0, 7.0]))
    assert emb.shape == (2, 128) and emb.dtype == torch.float32
    assert torch.equal(emb[0, :64], torch.ones(64)) and torch.equal(emb[0, 64:], torch.zeros(64))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(64, dtype=torch.float64) / 64)
    torch.testing.assert_close(emb[1, :64].double(), torch.cos(7.0 * freqs), rtol=0, atol=1e-6)
    torch.testing.assert_close(emb[1, 64:].double(), torch.sin(7.0 * freqs), rtol=0, atol=1e-6)


def test_all_weight_layers_come_from_ops():
    ops, made = recording_ops()
    assert built_through(ControlNeXt("svd_v1", ops=ops, device="meta"), made)


# ---------------------------------------------------------------------------- variant table


def test_injection_scales():
    uncond = [False, False, True, True]
    assert injection_scales("sd15", 0.5, uncond, learned_scale=2.0).tolist() == [1.0] * 4
    assert injection_scales("sdxl", 0.7, uncond).tolist() == pytest.approx([0.7] * 4)
    s = injection_scales("svd_v1", 1.0, uncond, learned_scale=1.5).tolist()
    assert s == pytest.approx([1.3 / (1 + math.exp(-1.5))] * 2 + [0.65] * 2)
    assert injection_scales("svd_v2", 1.0, uncond).tolist() == pytest.approx([0.2, 0.2, 0.0, 0.0])
    with pytest.raises(ValueError, match="learned scale"):
        injection_scales("sd15", 1.0, uncond)


def test_control_timesteps():
    idx = torch.tensor([999.0])
    assert control_timesteps("sdxl", torch.tensor([14.6]), idx) is idx
    torch.testing.assert_close(control_timesteps("svd_v2", torch.tensor([math.e ** 2])), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="timestep index"):
        control_timesteps("sd15", torch.tensor([1.0]))


def test_mmdit_variant_is_the_sdxl_module_with_a_hidden_width_output():
    """The unofficial SD3 format: SDXL keys, `mid_convs.1` widened to the MMDiT hidden size."""
    layout = load_layout(LAYOUT_FILES["sdxl"])
    layout = {"keys": dict(layout["keys"], **{"mid_convs.1.weight": [1536, 256, 1, 1], "mid_convs.1.bias": [1536]})}
    sd = random_state_dict(layout, seed=4)
    assert detect_variant(sd) == SDXL_FAMILY and resolve_variant(SDXL_FAMILY, "sd3") == "sd3"
    model = build_controlnext(sd, "sd3", dtype=torch.float64)
    assert sum(p.numel() for p in model.parameters()) == 3_526_400 + 256 * (1536 - 320) + (1536 - 320)
    hint = torch.rand(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(hint, torch.tensor([500.0])), reference_forward(sd, "sdxl", hint, torch.tensor([500.0])))

"""ControlNet-XS formats, diffusers -> vislearn names and the architecture read from them.

Checked against the key->shape layouts of the 8 released files (tests/data/checkpoint_layouts). Tensors are
on the meta device: only names and shapes matter here.
"""
import pytest
import torch

from xctrl.models.controlnet_xs_keys import (
    ControlNetXSFormatError,
    XSConfig,
    describe,
    detect_format,
    group_count,
    heads_for,
    largest_divisor_at_most,
    read_config,
    to_vislearn,
)

from harness.xs_reference import MODELS, layout, meta_sd, shapes, vislearn_to_diffusers, vislearn_used


# ---- format detection and conversion ---------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("fmt", ["vislearn", "diffusers"])
def test_detect_format(fmt, model):
    assert detect_format(meta_sd(layout(fmt, model))) == fmt


@pytest.mark.parametrize("model", MODELS)
def test_diffusers_converts_to_the_vislearn_layout(model):
    converted = to_vislearn(meta_sd(layout("diffusers", model)))
    expected = vislearn_used(model)
    assert shapes(converted) == expected
    # The layouts differ by scale_list only: 4 released pairs, none has a key left over.
    assert set(layout("vislearn", model)) - set(expected) == {"scale_list"}


@pytest.mark.parametrize("model", MODELS)
def test_vislearn_is_kept_minus_unused_keys(model):
    keys = layout("vislearn", model)
    assert shapes(to_vislearn(meta_sd(keys))) == vislearn_used(model)


@pytest.mark.parametrize("model", MODELS)
def test_each_key_maps_back_to_its_own_name(model):
    """Shapes alone cannot tell apart e.g. ctrl_to_base.0/.1 or norm1/norm2 of a square res
    block: check every name against the independent table above, in both directions."""
    vis = vislearn_used(model)
    n_in = sum(1 for k in vis if k.startswith("enc_zero_convs_out.") and k.endswith(".weight"))
    renamed = {vislearn_to_diffusers(k, n_in): v for k, v in vis.items()}
    assert renamed == layout("diffusers", model)  # the test's table reproduces the diffusers file
    marked = {d: torch.empty(0, device="meta") for d in renamed}
    for d in marked:
        marked[d].origin = d
    back = to_vislearn(marked)
    assert len(back) == len(vis)
    for vkey, tensor in back.items():
        assert vislearn_to_diffusers(vkey, n_in) == tensor.origin


def test_dropped_keys():
    keys = dict(layout("vislearn", "sdxl_48m"))
    keys["control_model.label_emb.0.0.weight"] = (1280, 2816)
    keys["control_model.label_emb.0.2.bias"] = (1280,)
    out = to_vislearn(meta_sd(keys))
    assert not any(k.startswith("control_model.label_emb") or k == "scale_list" for k in out)
    assert len(out) == len(keys) - 3


def test_conversion_keeps_the_tensors():
    sd = {k: torch.zeros(1) for k in layout("diffusers", "sd21_14m")}
    out = to_vislearn(sd)
    assert out["control_model.input_blocks.0.0.weight"] is sd["conv_in.weight"]
    assert out["enc_zero_convs_in.11.0.bias"] is sd["mid_block.base_to_ctrl.bias"]
    assert out["control_model.middle_block.2.out_layers.3.weight"] is sd["mid_block.midblock.resnets.1.conv2.weight"]


def test_unknown_diffusers_key_is_an_error():
    keys = dict(layout("diffusers", "sdxl_20m"))
    keys["down_blocks.0.some_new_layer.weight"] = (3,)
    with pytest.raises(ControlNetXSFormatError, match="some_new_layer"):
        to_vislearn(meta_sd(keys))


def test_legacy_diffusers_is_detected_and_refused():
    sd = meta_sd({"down_zero_convs_in.0.weight": (320, 320, 1, 1), "up_zero_convs_out.0.weight": (320, 4, 1, 1),
                  "control_model.conv_in.weight": (4, 4, 3, 3)})
    assert detect_format(sd) == "diffusers_legacy"
    with pytest.raises(ControlNetXSFormatError, match="0.28"):
        to_vislearn(sd)


@pytest.mark.parametrize(
    "keys, hint",
    [
        ({"input_blocks.0.0.weight": (320, 4, 3, 3), "zero_convs.0.0.weight": (320, 320, 1, 1)}, "regular ControlNet"),
        ({"down_res.0.conv1.weight": (64, 4, 3, 3), "mid_convs.0.0.weight": (4, 4, 1, 1)}, "ControlNeXt"),
        ({"foo.weight": (1,)}, "Not a ControlNet-XS"),
    ],
)
def test_other_files_are_refused_with_a_reason(keys, hint):
    with pytest.raises(ControlNetXSFormatError, match=hint):
        detect_format(meta_sd(keys))


# ---- architecture ---------------------------------------------------------------------------

EXPECTED = {
    "sd15_53m": dict(family="sd", ctrl_channels=(64, 128, 256, 256), base_channels=(320, 640, 1280, 1280),
                     transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1, num_heads=(8, 8, 8, 0),
                     num_heads_middle=8, context_dim=768, use_linear_projection=False, learned_time_embedding=False),
    "sd21_14m": dict(family="sd", ctrl_channels=(4, 8, 16, 16), base_channels=(320, 640, 1280, 1280),
                     transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1, num_heads=(1, 1, 2, 0),
                     num_heads_middle=2, context_dim=1024, use_linear_projection=True, learned_time_embedding=True),
    "sdxl_20m": dict(family="sdxl", ctrl_channels=(16, 32, 64), base_channels=(320, 640, 1280),
                     transformer_depth=(0, 2, 10), transformer_depth_middle=10, num_heads=(0, 1, 1),
                     num_heads_middle=1, context_dim=2048, use_linear_projection=True, learned_time_embedding=False),
    "sdxl_48m": dict(family="sdxl", ctrl_channels=(32, 64, 128), base_channels=(320, 640, 1280),
                     transformer_depth=(0, 2, 10), transformer_depth_middle=10, num_heads=(0, 1, 2),
                     num_heads_middle=2, context_dim=2048, use_linear_projection=True, learned_time_embedding=True),
}
PARAMS_M = {"sd15_53m": 52.66, "sd21_14m": 14.19, "sdxl_20m": 20.18, "sdxl_48m": 42.42}  # the released files' parameter counts


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("fmt", ["vislearn", "diffusers"])
def test_read_config(fmt, model):
    cfg = read_config(meta_sd(layout(fmt, model)))
    assert cfg == XSConfig(**EXPECTED[model])  # in_channels 4, hint 3, t_emb 320 -> 1280 defaults
    assert cfg.num_input_blocks == (12 if cfg.family == "sd" else 9)
    assert cfg.num_params / 1e6 == pytest.approx(PARAMS_M[model], abs=0.006)
    assert cfg.transformer_norm_eps == (1e-6 if cfg.family == "sd" else 1e-5)


def test_describe():
    assert describe(read_config(meta_sd(layout("vislearn", "sdxl_20m")))) == "ControlNet-XS SDXL 20M (control widths 16,32,64)"
    assert describe(read_config(meta_sd(layout("diffusers", "sd21_14m")))) == (
        "ControlNet-XS SD2.x 14M (control widths 4,8,16,16, learned time embedding)"
    )
    assert describe(read_config(meta_sd(layout("vislearn", "sd15_53m")))).startswith("ControlNet-XS SD1.5 53M ")


def test_missing_key_is_named():
    keys = dict(layout("vislearn", "sd15_53m"))
    del keys["control_model.input_blocks.4.0.out_layers.3.weight"]
    with pytest.raises(ControlNetXSFormatError, match="input_blocks.4.0.out_layers.3.weight"):
        read_config(meta_sd(keys))


@pytest.mark.parametrize("n, groups", [(4, 4), (8, 8), (12, 12), (324, 27), (1296, 27), (320, 32), (96, 32),
                                       (352, 32), (336, 28), (648, 27), (36, 18), (1, 1), (31, 31), (37, 1)])
def test_group_count(n, groups):
    assert group_count(n) == groups
    assert n % groups == 0 and groups <= 32


def test_heads_rule():
    assert [heads_for("sd", 768, c) for c in (64, 128, 256)] == [8, 8, 8]
    assert [heads_for("sd", 1024, c) for c in (4, 8, 16, 320)] == [1, 1, 2, 40]
    assert [heads_for("sdxl", 2048, c) for c in (32, 64, 96, 128, 640)] == [1, 1, 2, 2, 10]
    assert largest_divisor_at_most(12, 8) == 6  # the reference's find_denominator, not min(C, 8)
    with pytest.raises(ControlNetXSFormatError, match="context width 512"):
        heads_for("sd", 512, 64)

"""Diffusers (UNetSpatioTemporalConditionModel) <-> ComfyUI names of the SVD UNet.

Expected diffusers names follow diffusers' modules (unet_spatio_temporal_condition.py,
unet_3d_blocks.py, resnet.py SpatioTemporalResBlock / TemporalResnetBlock / AlphaBlender,
transformers/transformer_temporal.py TransformerSpatioTemporalModel, attention.py
TemporalBasicTransformerBlock). The ComfyUI side is checked against ComfyUI's own model in
tests/integration/test_unet_weights.py.
"""
import re

import pytest
import torch

from xctrl.models import svd_unet_keys as svk
from xctrl.models.checkpoint_io import WeightFileError
from xctrl.models.unet_weight_files import naming_of

# ComfyUI's SVD_img2vid unet_config (supported_models.py + model_detection) for the released model.
SVD = dict(
    model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1, adm_in_channels=768, in_channels=8, use_temporal_resblock=True,
    use_temporal_attention=True, disable_temporal_crossattention=False,
)
TINY = dict(SVD, model_channels=64, channel_mult=[1, 1, 1, 1])

PAIRS = {
    "time_embedding.linear_1.weight": "time_embed.0.weight",
    "time_embedding.linear_2.bias": "time_embed.2.bias",
    "add_embedding.linear_1.weight": "label_emb.0.0.weight",
    "add_embedding.linear_2.bias": "label_emb.0.2.bias",
    "conv_in.weight": "input_blocks.0.0.weight",
    "conv_norm_out.weight": "out.0.weight",
    "conv_out.bias": "out.2.bias",
    "down_blocks.0.resnets.0.spatial_res_block.conv1.weight": "input_blocks.1.0.in_layers.2.weight",
    "down_blocks.0.resnets.0.spatial_res_block.norm1.bias": "input_blocks.1.0.in_layers.0.bias",
    "down_blocks.0.resnets.0.spatial_res_block.time_emb_proj.weight": "input_blocks.1.0.emb_layers.1.weight",
    "down_blocks.0.resnets.0.temporal_res_block.conv1.weight": "input_blocks.1.0.time_stack.in_layers.2.weight",
    "down_blocks.0.resnets.0.temporal_res_block.conv2.bias": "input_blocks.1.0.time_stack.out_layers.3.bias",
    "down_blocks.0.resnets.1.time_mixer.mix_factor": "input_blocks.2.0.time_mixer.mix_factor",
    "down_blocks.1.resnets.0.spatial_res_block.conv_shortcut.weight": "input_blocks.4.0.skip_connection.weight",
    "down_blocks.0.attentions.0.norm.weight": "input_blocks.1.1.norm.weight",
    "down_blocks.0.attentions.0.proj_in.weight": "input_blocks.1.1.proj_in.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.0.attentions.0.temporal_transformer_blocks.0.ff_in.net.0.proj.weight": "input_blocks.1.1.time_stack.0.ff_in.net.0.proj.weight",
    "down_blocks.0.attentions.0.temporal_transformer_blocks.0.norm_in.bias": "input_blocks.1.1.time_stack.0.norm_in.bias",
    "down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn2.to_out.0.bias": "input_blocks.1.1.time_stack.0.attn2.to_out.0.bias",
    "down_blocks.0.attentions.0.time_pos_embed.linear_1.weight": "input_blocks.1.1.time_pos_embed.0.weight",
    "down_blocks.0.attentions.0.time_pos_embed.linear_2.bias": "input_blocks.1.1.time_pos_embed.2.bias",
    "down_blocks.0.attentions.0.time_mixer.mix_factor": "input_blocks.1.1.time_mixer.mix_factor",
    "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.3.0.op.weight",
    "down_blocks.2.downsamplers.0.conv.bias": "input_blocks.9.0.op.bias",
    "down_blocks.3.resnets.1.spatial_res_block.norm2.bias": "input_blocks.11.0.out_layers.0.bias",
    "mid_block.resnets.0.spatial_res_block.conv2.weight": "middle_block.0.out_layers.3.weight",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight": "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "mid_block.attentions.0.temporal_transformer_blocks.0.ff.net.2.weight": "middle_block.1.time_stack.0.ff.net.2.weight",
    "mid_block.resnets.1.temporal_res_block.time_emb_proj.weight": "middle_block.2.time_stack.emb_layers.1.weight",
    "mid_block.resnets.1.time_mixer.mix_factor": "middle_block.2.time_mixer.mix_factor",
    "up_blocks.0.resnets.0.spatial_res_block.conv_shortcut.weight": "output_blocks.0.0.skip_connection.weight",
    "up_blocks.0.resnets.2.spatial_res_block.conv1.weight": "output_blocks.2.0.in_layers.2.weight",
    "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.1.conv.weight",
    "up_blocks.1.attentions.0.proj_out.bias": "output_blocks.3.1.proj_out.bias",
    "up_blocks.1.upsamplers.0.conv.bias": "output_blocks.5.2.conv.bias",
    "up_blocks.2.upsamplers.0.conv.weight": "output_blocks.8.2.conv.weight",
    "up_blocks.3.attentions.2.temporal_transformer_blocks.0.norm3.weight": "output_blocks.11.1.time_stack.0.norm3.weight",
    "up_blocks.3.resnets.2.time_mixer.mix_factor": "output_blocks.11.0.time_mixer.mix_factor",
}
ABSENT = [
    "down_blocks.0.resnets.0.spatial_res_block.conv_shortcut.weight",  # 320 -> 320
    "down_blocks.0.resnets.0.temporal_res_block.conv_shortcut.weight",  # temporal block keeps the width
    "down_blocks.3.attentions.0.norm.weight",  # DownBlockSpatioTemporal has no attention
    "down_blocks.3.downsamplers.0.conv.weight",  # last down block does not downsample
    "up_blocks.0.attentions.0.norm.weight",  # UpBlockSpatioTemporal has no attention
    "up_blocks.3.upsamplers.0.conv.weight",  # last up block does not upsample
    "mid_block.resnets.2.spatial_res_block.conv1.weight",
    "down_blocks.0.attentions.0.time_proj.weight",  # Timesteps has no weights
]


def invert(key_map):
    """{ComfyUI key: diffusers key}; the map must be one to one."""
    inv = {v: k for k, v in key_map.items()}
    assert len(inv) == len(key_map), "two diffusers keys map to one ComfyUI key"
    return inv


@pytest.fixture(scope="module")
def svd_map():
    return svk.svd_unet_key_map(SVD)


def test_hand_picked_pairs(svd_map):
    for d, l in PAIRS.items():
        assert svd_map.get(d) == l, d
    for d in ABSENT:
        assert d not in svd_map, d


def test_bijective_and_counts(svd_map):
    inv = invert(svd_map)  # raises if two diffusers keys share a ComfyUI key
    assert len(inv) == len(svd_map) == 1428  # ComfyUI's SVD_img2vid UNet has 1428 tensors
    assert svk.svd_unet_key_map(TINY).__len__() == 1424  # no skip connections in the input blocks
    # Per video res block 10 spatial + 10 temporal tensors + mix factor (+2 with a shortcut).
    res = {}
    for k in svd_map:
        m = re.match(r"^(.*\.resnets\.\d+)\.", k)
        if m:
            res[m.group(1)] = res.get(m.group(1), 0) + 1
    assert len(res) == 8 + 2 + 12
    assert sorted(set(res.values())) == [21, 23]
    shortcuts = sorted(k for k in svd_map if "conv_shortcut.weight" in k)
    assert shortcuts == sorted(
        ["down_blocks.1.resnets.0.spatial_res_block.conv_shortcut.weight",
         "down_blocks.2.resnets.0.spatial_res_block.conv_shortcut.weight"]
        + [f"up_blocks.{x}.resnets.{i}.spatial_res_block.conv_shortcut.weight" for x in range(4) for i in range(3)]
    )


def test_diffusers_names_are_well_formed(svd_map):
    """Each diffusers name is a module path of UNetSpatioTemporalConditionModel."""
    leaf = re.compile(
        r"^(time_embedding|add_embedding)\.linear_[12]\.(weight|bias)$"
        r"|^conv_(in|out|norm_out)\.(weight|bias)$"
        r"|^(down_blocks\.[0-3]|up_blocks\.[0-3]|mid_block)\.("
        r"resnets\.\d\.(spatial_res_block\.(norm[12]|conv[12]|time_emb_proj|conv_shortcut)|temporal_res_block\.(norm[12]|conv[12]|time_emb_proj))\.(weight|bias)"
        r"|resnets\.\d\.time_mixer\.mix_factor"
        r"|attentions\.\d\.(norm|proj_in|proj_out|time_pos_embed\.linear_[12])\.(weight|bias)"
        r"|attentions\.\d\.time_mixer\.mix_factor"
        r"|attentions\.\d\.transformer_blocks\.0\.(norm[123]\.(weight|bias)|attn[12]\.(to_[qkv]\.weight|to_out\.0\.(weight|bias))|ff\.net\.(0\.proj|2)\.(weight|bias))"
        r"|attentions\.\d\.temporal_transformer_blocks\.0\.(norm(_in|[123])\.(weight|bias)|attn[12]\.(to_[qkv]\.weight|to_out\.0\.(weight|bias))|(ff|ff_in)\.net\.(0\.proj|2)\.(weight|bias))"
        r"|(down|up)samplers\.0\.conv\.(weight|bias))$"
    )
    bad = [k for k in svd_map if not leaf.match(k)]
    assert not bad, bad[:5]
    # The temporal transformer block: norm_in, ff_in, norm1, attn1, norm2, attn2, norm3, ff.
    tb = "down_blocks.1.attentions.1.temporal_transformer_blocks.0."
    assert len([k for k in svd_map if k.startswith(tb)]) == 2 + 4 + 2 + 5 + 2 + 5 + 2 + 4
    # time_mixer of a video res block and of a video transformer map to the block's own mixer.
    assert svd_map["up_blocks.2.attentions.1.time_mixer.mix_factor"] == "output_blocks.7.1.time_mixer.mix_factor"


def test_without_temporal_cross_attention():
    m = svk.svd_unet_key_map(dict(SVD, disable_temporal_crossattention=True))
    assert not any("temporal_transformer_blocks" in k and (".attn2." in k or ".norm2." in k) for k in m)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight" in m  # spatial keeps it
    assert len(m) == 1428 - 16 * 7


def test_deeper_transformers_and_int_res_blocks():
    m = svk.svd_unet_key_map(dict(SVD, num_res_blocks=2, transformer_depth=[2] * 6 + [0, 0],
                                  transformer_depth_output=[2] * 9 + [0] * 3, transformer_depth_middle=2))
    assert m["down_blocks.0.attentions.1.transformer_blocks.1.attn1.to_q.weight"] == "input_blocks.2.1.transformer_blocks.1.attn1.to_q.weight"
    assert m["mid_block.attentions.0.temporal_transformer_blocks.1.norm_in.weight"] == "middle_block.1.time_stack.1.norm_in.weight"
    invert(m)


def test_not_svd_config():
    with pytest.raises(ValueError, match="not an SVD"):
        svk.svd_unet_key_map(dict(SVD, use_temporal_resblock=False))


def _meta_diffusers_sd(config, key_map):
    """Diffusers-named meta tensors with the shapes svd_config_from_diffusers reads."""
    mc = config["model_channels"]
    sd = {k: torch.empty(1, device="meta") for k in key_map}
    sd["conv_in.weight"] = torch.empty(mc, config["in_channels"], 3, 3, device="meta")
    sd["add_embedding.linear_1.weight"] = torch.empty(4 * mc, config["adm_in_channels"], device="meta")
    for x, m in enumerate(config["channel_mult"]):
        sd[f"down_blocks.{x}.resnets.0.spatial_res_block.conv1.weight"] = torch.empty(mc * m, mc, 3, 3, device="meta")
    return sd


@pytest.mark.parametrize("config", [SVD, TINY, dict(SVD, disable_temporal_crossattention=True)])
def test_config_from_diffusers(config):
    key_map = svk.svd_unet_key_map(config)
    got = svk.svd_config_from_diffusers(_meta_diffusers_sd(config, key_map))
    for k in ("model_channels", "channel_mult", "num_res_blocks", "transformer_depth", "transformer_depth_output",
              "transformer_depth_middle", "adm_in_channels", "in_channels", "disable_temporal_crossattention"):
        assert got[k] == config[k], k
    assert svk.svd_unet_key_map(got) == key_map


def _values(key_map, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {l: torch.randn(2, generator=g) for l in key_map.values()}


def test_full_unet_round_trip(svd_map):
    ldm = _values(svd_map)
    inv = invert(svd_map)
    diffusers = {inv[k]: v for k, v in ldm.items()}
    out = svk.full_unet_to_ldm(diffusers, SVD)
    assert set(out) == set(ldm) and all(out[k] is ldm[k] for k in ldm)
    assert {inv[k]: v for k, v in out.items()}.keys() == diffusers.keys()
    # Already ComfyUI names, with or without checkpoint prefixes.
    for prefix in ("", "diffusion_model.", "model.diffusion_model."):
        out = svk.full_unet_to_ldm({prefix + k: v for k, v in ldm.items()}, SVD)
        assert set(out) == set(ldm) and all(out[k] is ldm[k] for k in ldm)


def test_partial_and_mixed_files(svd_map):
    part = {"down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q.weight": torch.ones(1),
            "middle_block.1.time_mixer.mix_factor": torch.zeros(1)}
    out = svk.full_unet_to_ldm(part, SVD)
    assert set(out) == {"input_blocks.1.1.time_stack.0.attn1.to_q.weight", "middle_block.1.time_mixer.mix_factor"}


def test_unmapped_keys_are_listed_never_dropped():
    sd = {"conv_in.weight": torch.ones(1), "down_blocks.0.resnets.0.conv1.weight": torch.ones(1),
          "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.weight": torch.ones(1)}
    with pytest.raises(WeightFileError) as e:
        svk.full_unet_to_ldm(sd, SVD)
    msg = str(e.value)
    assert "2 of 3 keys" in msg and "down_blocks.0.resnets.0.conv1.weight" in msg and "processor" in msg


def test_same_tensor_twice_is_an_error():
    sd = {"conv_in.weight": torch.ones(1), "input_blocks.0.0.weight": torch.ones(1)}
    with pytest.raises(WeightFileError, match="twice"):
        svk.full_unet_to_ldm(sd, SVD)


def test_config_from_non_svd_file():
    with pytest.raises(WeightFileError, match="not a diffusers SVD UNet"):
        svk.svd_config_from_diffusers({"conv_in.weight": torch.ones(1), "down_blocks.0.resnets.0.conv1.weight": torch.ones(1)})


def test_naming_and_description(svd_map):
    inv = invert(svd_map)
    assert naming_of({k: 0 for k in svd_map}) == "diffusers"
    assert naming_of({k: 0 for k in inv}) == "ldm"
    assert naming_of({"conv_in.weight": 0, "input_blocks.1.0.in_layers.0.weight": 0}) == "mixed"
    assert naming_of({"lora_unet_x.lora_up.weight": 0}) == "unknown"
    sd15 = {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(320, 768)}
    assert svk.describe_unet_file(sd15).startswith("a SD1.5 UNet (ComfyUI/LDM key names")
    assert svk.describe_unet_file({k: torch.empty(1) for k in svd_map}).startswith("an SVD")

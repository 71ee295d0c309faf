"""Diffusers <-> ComfyUI (LDM) key names of the Stable Video Diffusion UNet.

ComfyUI loads SVD UNets only with LDM names (``input_blocks`` / ``middle_block`` /
``output_blocks``, ``openaimodel.UNetModel`` with ``use_temporal_resblock`` and
``use_temporal_attention``). Its diffusers-name detection covers SD1.x/2.x/SDXL variants but
not ``UNetSpatioTemporalConditionModel``: files saved by diffusers (e.g. the ControlNeXt-SVD v2
fine-tuned ``unet/diffusion_pytorch_model.safetensors``) need this mapping.

Correspondence (diffusers -> ComfyUI):

- ``time_embedding.linear_1/2`` -> ``time_embed.0/2``; ``add_embedding.linear_1/2`` ->
  ``label_emb.0.0/0.2``; ``conv_in`` -> ``input_blocks.0.0``; ``conv_norm_out`` -> ``out.0``;
  ``conv_out`` -> ``out.2``.
- ``SpatioTemporalResBlock`` -> ``VideoResBlock``: ``spatial_res_block.{norm1, conv1,
  time_emb_proj, norm2, conv2, conv_shortcut}`` -> ``{in_layers.0, in_layers.2, emb_layers.1,
  out_layers.0, out_layers.3, skip_connection}``; ``temporal_res_block.*`` -> ``time_stack.*``
  (same ResBlock names); ``time_mixer.mix_factor`` unchanged.
- ``TransformerSpatioTemporalModel`` -> ``SpatialVideoTransformer``: ``norm``, ``proj_in``,
  ``proj_out``, ``transformer_blocks.i.*`` and ``time_mixer.mix_factor`` unchanged;
  ``temporal_transformer_blocks.i.*`` -> ``time_stack.i.*``; ``time_pos_embed.linear_1/2`` ->
  ``time_pos_embed.0/2``.
- ``down_blocks.x.downsamplers.0.conv`` -> ``input_blocks.n.0.op``;
  ``up_blocks.x.upsamplers.0.conv`` -> ``output_blocks.n.{1|2}.conv``;
  ``mid_block.resnets.0 / attentions.0 / resnets.1`` -> ``middle_block.0 / 1 / 2``.

The config is ComfyUI's ``unet_config`` (``model_channels``, ``channel_mult``,
``num_res_blocks``, ``transformer_depth``, ``transformer_depth_output``,
``transformer_depth_middle``, ``adm_in_channels``, ``disable_temporal_crossattention``).
Pure Python + torch; no ComfyUI import.
"""
import re

from .checkpoint_io import WeightFileError
from .families import base_of_context_width
from .unet_weight_files import naming_of, strip_unet_prefix, to_ldm_keys


# ResBlock sub-layers: diffusers name -> ComfyUI name.
_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
)
_SHORTCUT = ("conv_shortcut", "skip_connection")
_WB = ("weight", "bias")
_ATTN = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")
_FF = ("net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias")
_TOP = (
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
)
_ADM = (("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"))


def _as_list(value, n, name):
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries, expected {n}")
    return value


def _res_block(out, d, l, shortcut):
    """A VideoResBlock: spatial ResBlock names at ``l``, temporal ones under ``l.time_stack``."""
    for dn, ln in _RESNET + ((_SHORTCUT,) if shortcut else ()):
        for p in _WB:
            out[f"{d}.spatial_res_block.{dn}.{p}"] = f"{l}.{ln}.{p}"
    for dn, ln in _RESNET:  # the temporal block never changes the width: no shortcut
        for p in _WB:
            out[f"{d}.temporal_res_block.{dn}.{p}"] = f"{l}.time_stack.{ln}.{p}"
    out[f"{d}.time_mixer.mix_factor"] = f"{l}.time_mixer.mix_factor"


def _transformer_block(out, d, l, temporal, cross):
    norms = ("norm_in", "norm1", "norm3") if temporal else ("norm1", "norm2", "norm3")
    if temporal and cross:
        norms += ("norm2",)
    for n in norms:
        for p in _WB:
            out[f"{d}.{n}.{p}"] = f"{l}.{n}.{p}"
    for a in ("attn1", "attn2") if (cross or not temporal) else ("attn1",):
        for k in _ATTN:
            out[f"{d}.{a}.{k}"] = f"{l}.{a}.{k}"
    for f in ("ff", "ff_in") if temporal else ("ff",):
        for k in _FF:
            out[f"{d}.{f}.{k}"] = f"{l}.{f}.{k}"


def _video_transformer(out, d, l, depth, temporal_cross):
    for n in ("norm", "proj_in", "proj_out"):
        for p in _WB:
            out[f"{d}.{n}.{p}"] = f"{l}.{n}.{p}"
    for t in range(depth):
        _transformer_block(out, f"{d}.transformer_blocks.{t}", f"{l}.transformer_blocks.{t}", False, True)
        _transformer_block(out, f"{d}.temporal_transformer_blocks.{t}", f"{l}.time_stack.{t}", True, temporal_cross)
    for dn, ln in (("linear_1", "0"), ("linear_2", "2")):
        for p in _WB:
            out[f"{d}.time_pos_embed.{dn}.{p}"] = f"{l}.time_pos_embed.{ln}.{p}"
    out[f"{d}.time_mixer.mix_factor"] = f"{l}.time_mixer.mix_factor"


def is_svd_config(config):
    return bool(config.get("use_temporal_resblock")) and bool(config.get("use_temporal_attention"))


def svd_unet_key_map(config):
    """{diffusers key: ComfyUI key} for every weight of an SVD UNet with this ``unet_config``."""
    if not is_svd_config(config):
        raise ValueError("not an SVD UNet config (use_temporal_resblock and use_temporal_attention must be set)")
    mc = int(config["model_channels"])
    mult = list(config["channel_mult"])
    levels = len(mult)
    res = _as_list(config["num_res_blocks"], levels, "num_res_blocks")
    depth_in = _as_list(config.get("transformer_depth", 1), sum(res), "transformer_depth")
    depth_out = _as_list(config.get("transformer_depth_output", depth_in[0]), sum(res) + levels, "transformer_depth_output")
    depth_mid = int(config.get("transformer_depth_middle", depth_in[-1]))
    if depth_mid < 1:
        raise ValueError(f"an SVD UNet has a transformer in its middle block; transformer_depth_middle is {depth_mid}")
    temporal_cross = not config.get("disable_temporal_crossattention", False)

    out = {}
    for dn, ln in _TOP:
        for p in _WB:
            out[f"{dn}.{p}"] = f"{ln}.{p}"
    if config.get("adm_in_channels") is not None:
        for dn, ln in _ADM:
            for p in _WB:
                out[f"{dn}.{p}"] = f"{ln}.{p}"

    ch, skip_chans = _input_side(out, mc, mult, res, depth_in, temporal_cross)
    _res_block(out, "mid_block.resnets.0", "middle_block.0", False)
    _video_transformer(out, "mid_block.attentions.0", "middle_block.1", depth_mid, temporal_cross)
    _res_block(out, "mid_block.resnets.1", "middle_block.2", False)
    _output_side(out, mc, mult, res, depth_out, temporal_cross, ch, skip_chans)
    return out


def _input_side(out, mc, mult, res, depth_in, temporal_cross):
    """Input blocks: ComfyUI block n counts conv_in (0), res(+attention) blocks and downsamplers.
    Returns the width after the last block and the skip widths, for the output side."""
    levels = len(mult)
    ch, n, r = mc, 1, 0
    skip_chans = [mc]
    for x in range(levels):
        for i in range(res[x]):
            width = mc * mult[x]
            _res_block(out, f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0", ch != width)
            ch = width
            if depth_in[r] > 0:
                _video_transformer(out, f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", depth_in[r], temporal_cross)
            skip_chans.append(ch)
            n, r = n + 1, r + 1
        if x != levels - 1:
            for p in _WB:
                out[f"down_blocks.{x}.downsamplers.0.conv.{p}"] = f"input_blocks.{n}.0.op.{p}"
            skip_chans.append(ch)
            n += 1
    return ch, skip_chans


def _output_side(out, mc, mult, res, depth_out, temporal_cross, ch, skip_chans):
    """Output blocks: diffusers up block x is level (levels - 1 - x); ComfyUI pops the
    per-output-block transformer depths from the end of transformer_depth_output."""
    levels = len(mult)
    depth_out = list(depth_out)
    n = 0
    for x in range(levels):
        level = levels - 1 - x
        width = mc * mult[level]
        for i in range(res[level] + 1):
            in_ch = ch + skip_chans.pop()
            _res_block(out, f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0", in_ch != width)
            ch = width
            sub = 1
            depth = depth_out.pop()
            if depth > 0:
                _video_transformer(out, f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", depth, temporal_cross)
                sub = 2
            if level != 0 and i == res[level]:
                for p in _WB:
                    out[f"up_blocks.{x}.upsamplers.0.conv.{p}"] = f"output_blocks.{n}.{sub}.conv.{p}"
            n += 1


def _indices(keys, prefix):
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys for m in [pat.match(k)] if m})


def is_svd_diffusers(sd):
    """True when the keys are those of a diffusers ``UNetSpatioTemporalConditionModel``."""
    return any(".spatial_res_block." in k for k in sd) and "conv_in.weight" in sd


def svd_config_from_diffusers(sd):
    """The ComfyUI ``unet_config`` entries the key mapping needs, read from a complete
    diffusers-named SVD UNet state dict (prefixes already stripped)."""
    if not is_svd_diffusers(sd):
        raise WeightFileError(
            "not a diffusers SVD UNet (UNetSpatioTemporalConditionModel): no conv_in.weight or no "
            "spatial_res_block keys"
        )
    keys = list(sd)
    mc = int(sd["conv_in.weight"].shape[0])
    downs = _indices(keys, "down_blocks")
    if downs != list(range(len(downs))) or not downs:
        raise WeightFileError(f"the diffusers SVD UNet has down blocks {downs}: the file is incomplete")
    mult, res, depth_in = [], [], []
    for x in downs:
        resnets = _indices(keys, f"down_blocks.{x}.resnets")
        res.append(len(resnets))
        conv = sd.get(f"down_blocks.{x}.resnets.0.spatial_res_block.conv1.weight")
        if conv is None:
            raise WeightFileError(f"down_blocks.{x}.resnets.0.spatial_res_block.conv1.weight is missing: the file is incomplete")
        mult.append(int(conv.shape[0]) // mc)
        for i in resnets:
            depth_in.append(len(_indices(keys, f"down_blocks.{x}.attentions.{i}.transformer_blocks")))
    depth_out = []
    for x in range(len(downs)):
        for i in _indices(keys, f"up_blocks.{x}.resnets"):
            depth_out.append(len(_indices(keys, f"up_blocks.{x}.attentions.{i}.transformer_blocks")))
    config = {
        "model_channels": mc,
        "in_channels": int(sd["conv_in.weight"].shape[1]),
        "channel_mult": mult,
        "num_res_blocks": res,
        "transformer_depth": depth_in,
        "transformer_depth_output": depth_out[::-1],  # ComfyUI pops output depths from the end
        "transformer_depth_middle": len(_indices(keys, "mid_block.attentions.0.transformer_blocks")),
        "adm_in_channels": int(sd["add_embedding.linear_1.weight"].shape[1]) if "add_embedding.linear_1.weight" in sd else None,
        "disable_temporal_crossattention": not any(".temporal_transformer_blocks." in k and ".attn2." in k for k in keys),
        "use_temporal_resblock": True,
        "use_temporal_attention": True,
    }
    return config


# ---- converting ---------------------------------------------------------------------------------


def full_unet_to_ldm(sd, config):
    """A complete or partial SVD UNet state dict (diffusers or ComfyUI names, optionally with a
    "model.diffusion_model." / "diffusion_model." prefix) in ComfyUI names."""
    return to_ldm_keys(sd, svd_unet_key_map(config), "the SVD UNet file", "an SVD UNet of this configuration")


def describe_unet_file(sd):
    """A short phrase for messages: which UNet family and naming the keys look like."""
    sd = strip_unet_prefix(sd)
    naming = naming_of(sd)
    if any(part in k for k in sd for part in (".spatial_res_block.", ".temporal_transformer_blocks.", ".time_stack.", ".time_mixer.")):
        family = "an SVD (Stable Video Diffusion) UNet"
    else:
        family = "a UNet"
        for k, v in sd.items():
            if k.endswith("attn2.to_k.weight") and v.dim() == 2:
                base = base_of_context_width(int(v.shape[1]))
                if base:
                    family = f"a {base} UNet"
                break
    names = {"diffusers": "diffusers key names", "ldm": "ComfyUI/LDM key names", "mixed": "mixed key names"}.get(naming, "unrecognised key names")
    return f"{family} ({names}, {len(sd)} tensors)"

"""Naming what a weight file is from its keys, so that a wrong file gets a useful error.

``kind_of(sd)`` returns a short machine id; ``describe_state_dict(sd)`` a phrase for
messages ("a T2I-Adapter", ...). Only key names and a few shapes are read.
"""
from .checkpoint_io import WeightFileError
from .controlnext import SDXL_FAMILY, detect_variant, strip_common_prefix
from .families import base_of_context_width
from .unet_weight_files import DELTA, is_unet_weight_file, parse_unet_weight_file

KINDS = (
    "controlnext_sd15",
    "controlnext_sdxl_family",
    "controlnext_svd_v1",
    "controlnet_xs_vislearn",
    "controlnet_xs_diffusers",
    "controlnet_xs_diffusers_legacy",
    "controlnet",
    "t2i_adapter",
    "lora",
    "checkpoint",
    "unet",
    "controlnext_unet_weights",
    "unknown",
)

def kind_of(sd):
    """One of :data:`KINDS`."""
    return _classify(sd)[0]


def describe_state_dict(sd):
    """A phrase naming the file, e.g. "a LoRA" or "unknown (first keys: ...)"."""
    return _classify(sd)[1]


def _has(sd, name):
    """A key equal to ``name`` or ending in ``.name`` (any prefix)."""
    dotted = "." + name
    return any(k == name or k.endswith(dotted) for k in sd)


def _has_part(sd, *fragments):
    return any(f in k for k in sd for f in fragments)


def _starts(sd, *prefixes):
    return any(k.startswith(prefixes) for k in sd)


def _base_from_context(sd):
    """"SD1.5" / "SD2.x" / "SDXL" from a cross-attention key width, or ""."""
    for k, v in sd.items():
        if k.endswith("attn2.to_k.weight") and v.dim() == 2:
            return base_of_context_width(int(v.shape[1]))
    return ""


def _for(base):
    return f" for {base}" if base else ""


def _classify(sd):
    if not sd:
        return "unknown", "an empty file (no tensors)"
    stripped = strip_common_prefix(sd)
    if all(k in stripped for k in ("time_embedding.linear_1.weight", "mid_convs.1.weight", "down_res.0.conv1.weight")):
        try:
            variant = detect_variant(stripped)
        except WeightFileError as e:
            return "unknown", f"a ControlNeXt-like module in an unknown layout ({e})"
        if variant == "sd15":
            return "controlnext_sd15", "a ControlNeXt control module for SD1.5 (released, with learned scale)"
        if variant == "svd_v1":
            return "controlnext_svd_v1", "a ControlNeXt control module for SVD v1 (with learned scale)"
        assert variant == SDXL_FAMILY
        return (
            "controlnext_sdxl_family",
            "a ControlNeXt control module with the SDXL layout (SDXL, SVD v2 or SD1.5-Training: the file cannot tell which)",
        )
    if is_unet_weight_file(sd):
        try:
            semantics, naming = parse_unet_weight_file(sd)
        except WeightFileError:
            return "unknown", "a file of attention to_out weights only, not a known ControlNeXt UNet weight file"
        what = "SDXL attention deltas" if semantics == DELTA else "SD1.5 attention replacement weights"
        return "controlnext_unet_weights", f"a ControlNeXt UNet weight file ({what}, {naming} key names)"
    if _has_part(sd, "lora_up", "lora_down", "lora_A", "lora_B", ".lora.up.", ".lora.down."):
        return "lora", "a LoRA"
    base = _base_from_context(sd)
    if _has(sd, "enc_zero_convs_in.0.0.weight"):
        return "controlnet_xs_vislearn", f"a ControlNet-XS model (authors' vislearn format){_for(base)}"
    if _has(sd, "control_to_base_for_conv_in.weight") or _has(sd, "down_blocks.0.base_to_ctrl.0.weight"):
        return "controlnet_xs_diffusers", f"a ControlNet-XS adapter (diffusers format){_for(base)}"
    if _has_part(sd, "down_zero_convs_in.", "up_zero_convs_out."):
        return "controlnet_xs_diffusers_legacy", "a ControlNet-XS model in the old diffusers format (before diffusers 0.28)"
    if _has(sd, "input_hint_block.0.weight") or _has(sd, "zero_convs.0.0.weight"):
        return "controlnet", f"a ControlNet (LDM format){_for(base)}"
    if _has(sd, "controlnet_cond_embedding.conv_in.weight") and _has(sd, "controlnet_down_blocks.0.weight"):
        return "controlnet", f"a ControlNet (diffusers format){_for(base)}"
    if _starts(sd, "controlnet_blocks.", "controlnet_single_blocks.") or _has(sd, "pos_embed_input.proj.weight"):
        return "controlnet", "a ControlNet for a DiT model (SD3 / SD3.5 / Flux)"
    if _starts(sd, "body.0.", "adapter.body.0."):
        return "t2i_adapter", "a T2I-Adapter"
    if _starts(sd, "model.diffusion_model."):
        return "checkpoint", f"a full Stable Diffusion checkpoint{_for(base)}"
    if _has(sd, "input_blocks.0.0.weight") or ("conv_in.weight" in sd and _starts(sd, "down_blocks.")):
        return "unet", f"a UNet (diffusion model){_for(base)}"
    first = ", ".join(list(sd)[:5])
    return "unknown", f"unknown (first keys: {first})"

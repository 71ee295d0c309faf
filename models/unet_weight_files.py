"""UNet weight files: key naming and renaming, and ControlNeXt's partial attention weights.

One pipeline for every UNet file the pack applies (docs/weight_files.md): strip a common
prefix, tell the naming (:func:`naming_of`), rename to ComfyUI's diffusion-model names with a
{diffusers name: ComfyUI name} map (:func:`to_ldm_keys`; ComfyUI's own map for SD1.x/2.x/SDXL,
models/svd_unet_keys.py for SVD), then turn the tensors into weight differences.

ControlNeXt released two kinds of partial files:
- SD1.5 ``unet.safetensors``: ABSOLUTE replacement weights for every ``attn1``/``attn2``
  ``to_out.0`` (or only the up-block ones), diffusers naming.
- SDXL ``unet.safetensors``: ADDITIVE deltas (W_finetuned - W_base) for every
  ``attn2.to_out.0``, diffusers naming; LDM (ComfyUI) names are accepted too.
Both become weight deltas for ComfyUI diff patches, so that LoRAs stack on top in any order.
Keys are in ComfyUI's diffusion-model naming without the "diffusion_model." prefix.
"""
import re

import torch

from .checkpoint_io import WeightFileError

REPLACE = "replace"
DELTA = "delta"
DIFFUSERS = "diffusers"
LDM = "ldm"

_ATTN_OUT = re.compile(r"^(.+)\.transformer_blocks\.(\d+)\.(attn[12])\.to_out\.0\.(weight|bias)$")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.")


def strip_unet_prefix(sd):
    """Removes a "model.diffusion_model." / "diffusion_model." / "unet." prefix shared by all keys."""
    for p in _PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items()}
    return dict(sd)


def naming_of(sd):
    """"diffusers", "ldm", "mixed" or "unknown" from the block names of (prefix-stripped) keys."""
    diff = any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "time_embedding.")) for k in sd)
    ldm = any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.")) for k in sd)
    if diff and ldm:
        return "mixed"
    return DIFFUSERS if diff else LDM if ldm else "unknown"


def is_unet_weight_file(sd):
    """True when every key is an attention ``to_out.0`` weight or bias (the ControlNeXt layout)."""
    sd = strip_unet_prefix(sd)
    return bool(sd) and all(_ATTN_OUT.match(k) for k in sd)


def parse_unet_weight_file(sd, delta=False):
    """Returns ``(semantics, naming)``: ("replace" | "delta", "diffusers" | "ldm").

    SD1.5 files (attn1 present, one transformer block per attention) hold replacements;
    SDXL files (attn2 only, no 320-wide layers) hold deltas. ``delta``: the file says it holds
    differences (the authors' training scripts name them ``unet_weight_increasements``; XCtrl's
    trainer also writes it into the metadata), whatever its layout.
    """
    sd = strip_unet_prefix(sd)
    if not sd:
        raise WeightFileError("the ControlNeXt UNet weight file is empty")
    foreign = [k for k in sd if not _ATTN_OUT.match(k)]
    if foreign:
        raise WeightFileError(
            f"not a ControlNeXt UNet weight file: {len(foreign)} keys are not attention to_out weights "
            f"(e.g. {', '.join(sorted(foreign)[:3])})"
        )
    naming = naming_of(sd)
    if naming not in (DIFFUSERS, LDM):
        raise WeightFileError(
            "the ControlNeXt UNet weight file mixes diffusers (down_blocks/mid_block/up_blocks) and LDM "
            "(input_blocks/middle_block/output_blocks) key names: it was edited or merged wrongly"
        )
    if delta:
        return DELTA, naming
    parts = [_ATTN_OUT.match(k).groups() for k in sd]
    has_attn1 = any(attn == "attn1" for _, _, attn, _ in parts)
    deep = any(int(idx) > 0 for _, idx, _, _ in parts)
    widths = {int(v.shape[0]) for v in sd.values()}
    if has_attn1 and not deep:
        return REPLACE, naming
    if not has_attn1 and 320 not in widths:
        return DELTA, naming
    raise WeightFileError(
        "unrecognised ControlNeXt UNet weight file: neither the SD1.5 layout (attn1 and attn2 replacements, one "
        "transformer block per attention) nor the SDXL one (attn2 deltas, 640/1280 channels)"
    )


def to_ldm_keys(sd, key_map, file_title="the UNet weight file", model_title="this model"):
    """Renames every key to ComfyUI's UNet naming with ``key_map`` {diffusers name: ComfyUI name}.

    Keys already in ComfyUI naming (the map's values) are kept. Any key the map does not know
    raises, listing some: nothing is dropped silently.
    """
    sd = strip_unet_prefix(sd)
    ldm_names = set(key_map.values())
    out, unmapped = {}, []
    for k, v in sd.items():
        name = key_map.get(k, k if k in ldm_names else None)
        if name is None:
            unmapped.append(k)
            continue
        if name in out:
            raise WeightFileError(f"{file_title} sets {name} twice (under two names)")
        out[name] = v
    if unmapped:
        raise WeightFileError(
            f"{len(unmapped)} of {len(sd)} keys of {file_title} have no counterpart in {model_title} "
            f"(e.g. {', '.join(sorted(unmapped)[:6])}): the file is for another model family or architecture"
        )
    return out


def weight_patches(file_sd_ldm, base_weights, semantics):
    """Returns {ldm_key: delta} to add to the model's weights.

    "replace": ``W_new - W_orig`` in float32 on the CPU (adding it back gives W_new exactly,
    also when the model's weights are fp16); "delta": the file's tensor as it is.
    ``base_weights``: {ldm_key: current model tensor}, the same naming as ``file_sd_ldm``.
    """
    if semantics not in (REPLACE, DELTA):
        raise ValueError(f"semantics must be {REPLACE!r} or {DELTA!r}, got {semantics!r}")
    patches = {}
    for k, w in file_sd_ldm.items():
        if k not in base_weights:
            raise WeightFileError(
                f"{k} from the ControlNeXt UNet weight file does not exist in this model: "
                "the file is for another model family"
            )
        base = base_weights[k]
        if tuple(w.shape) != tuple(base.shape):
            raise WeightFileError(
                f"{k}: the ControlNeXt UNet weight file has shape {tuple(w.shape)} but the model has "
                f"{tuple(base.shape)}: the file is for another model family (SD1.5 files need an SD1.5 model, "
                "SDXL files an SDXL model)"
            )
        if semantics == REPLACE:
            patches[k] = w.detach().to("cpu", torch.float32) - base.detach().to("cpu", torch.float32)
        else:
            patches[k] = w
    return patches

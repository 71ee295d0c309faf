"""UNet weight files on a loaded MODEL, one path for every node that applies one (glue):
the file's UNet tensors (:func:`unet_part`), renamed to the MODEL's keys with the MODEL's
{diffusers name: ComfyUI name} map (:func:`to_model_keys`), next to the MODEL's own unpatched
weights (:func:`base_weights`). The numerics (differences, semantics) are in
models/unet_weight_files.py; docs/weight_files.md says what each released file holds.
"""
import logging

import comfy.utils

from ..models import svd_unet_keys as svk
from ..models import unet_weight_files as uwf
from ..models.checkpoint_io import WeightFileError
from ..models.file_kinds import describe_state_dict
from .model_family import family_title, model_family

LOG = logging.getLogger("xctrl")
CHECKPOINT_PREFIX = "model.diffusion_model."


def unet_part(sd):
    """The UNet tensors of a file, prefix-stripped. A full checkpoint (UNet under
    "model.diffusion_model." next to VAE/text-encoder tensors) gives its UNet part."""
    if any(k.startswith(CHECKPOINT_PREFIX) for k in sd) and not all(k.startswith(CHECKPOINT_PREFIX) for k in sd):
        others = sum(not k.startswith(CHECKPOINT_PREFIX) for k in sd)
        LOG.info("[XCtrl] full checkpoint: using its %d UNet tensors, ignoring %d others (VAE, text encoders)",
                 len(sd) - others, others)
        sd = {k: v for k, v in sd.items() if k.startswith(CHECKPOINT_PREFIX)}
    return uwf.strip_unet_prefix(sd)


def describe(sd):
    """What a UNet file looks like, for messages."""
    if uwf.naming_of(sd) == "unknown":
        return describe_state_dict(sd)
    return svk.describe_unet_file(sd)


def key_map_for(model):
    """{diffusers key: ComfyUI key} for the MODEL's UNet (SVD: XCtrl's mapping; SD1.x/2.x/SDXL:
    ComfyUI's ``unet_to_diffusers``)."""
    config = model.model.model_config.unet_config
    if svk.is_svd_config(config):
        return svk.svd_unet_key_map(config)
    if "num_res_blocks" in config and "channel_mult" in config:
        return comfy.utils.unet_to_diffusers(config)
    raise WeightFileError(
        f"UNet weight files apply to UNet models (SD1.5, SD2.x, SDXL, SVD); this MODEL is "
        f"{family_title(model_family(model))}, which has no UNet."
    )


def base_weights(model, keys):
    """{ComfyUI key: the model's own (unpatched) tensor} for ``keys`` without prefix."""
    key_patches = model.get_key_patches("diffusion_model.")
    out = {}
    for k in keys:
        entry = key_patches.get("diffusion_model." + k)
        if entry is not None:
            w = entry[0]
            out[k] = w[0] if isinstance(w, tuple) else w
    return out


def to_model_keys(model, sd, file_name):
    """The file's UNet tensors under the MODEL's diffusion-model keys (no "diffusion_model." prefix)."""
    sd = unet_part(sd)
    if not sd:
        raise WeightFileError(f"{file_name} holds no UNet tensors")
    family = family_title(model_family(model))
    try:
        return uwf.to_ldm_keys(sd, key_map_for(model), file_name, f"this {family} MODEL")
    except WeightFileError as e:
        raise WeightFileError(f"{e}. {file_name} looks like {describe(sd)}; the MODEL is {family}.") from None

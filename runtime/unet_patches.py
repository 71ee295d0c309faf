"""UNet weight files (glue): on a loaded MODEL as weight patches, one path for every node that applies one:
the file's UNet tensors (:func:`unet_part`), renamed to the MODEL's keys with the MODEL's
{diffusers name: ComfyUI name} map (:func:`to_model_keys`), next to the MODEL's own unpatched
weights (:func:`base_weights`). The numerics (differences, semantics) are in
models/unet_weight_files.py; docs/weight_files.md says what each released file holds. A
complete diffusers-named SVD UNet, which ComfyUI's own detection does not cover, loads as a MODEL
(:func:`load_svd_unet`).
"""
import logging

import torch

import comfy.sd
import comfy.utils

from ..models import svd_unet_keys as svk
from ..models import unet_weight_files as uwf
from ..models.checkpoint_io import WeightFileError, file_error
from ..models.file_kinds import describe_state_dict
from .model_family import family_title, model_family
from .weight_files import read
from .control_inputs import require_finite

LOG = logging.getLogger("xctrl")
CHECKPOINT_PREFIX = "model.diffusion_model."
UNET_FOLDERS = ("diffusion_models", "unet")
DTYPES = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
        f"{family_title(model_family(model))}, which has no UNet. Fix: connect an SD1.5, SD2.x, SDXL or SVD MODEL."
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
        raise file_error(file_name, "holds no UNet tensors", "choose a UNet weight file")
    family = family_title(model_family(model))
    try:
        return uwf.to_ldm_keys(sd, key_map_for(model), file_name, f"this {family} MODEL")
    except WeightFileError as e:
        raise file_error(file_name, f"does not fit the MODEL ({e}): the file looks like {describe(sd)}; the MODEL is "
                         f"{family}", "use it with a MODEL of the family it was made for") from None


def apply_unet_file(model, unet_file, strength):
    """Apply UNet Weights: a clone of the MODEL with the file's differences as weight patches."""
    require_finite("Apply UNet Weights (XCtrl)", strength=strength)
    diffs = unet_weight_diffs(model, read(unet_file, *UNET_FOLDERS), unet_file)
    patched = model.clone()
    if strength != 0.0 and diffs:
        patched.add_patches({"diffusion_model." + k: (d,) for k, d in diffs.items()}, strength)
    return patched


def unet_weight_diffs(model, sd, file_name):
    """The file's UNet tensors as ``{ComfyUI key: W_file - W_model}`` (float32, CPU), keys
    without the "diffusion_model." prefix. Unchanged tensors (zero difference) are left out.

    Every key must exist in the MODEL with the same shape, else WeightFileError naming the
    family or size mismatch.
    """
    family = family_title(model_family(model))
    what = describe(sd)
    ldm = to_model_keys(model, sd, file_name)
    base = base_weights(model, ldm)
    missing = sorted(set(ldm) - set(base))
    if missing:
        raise file_error(file_name, f"does not fit this {family} MODEL: {len(missing)} of its keys do not exist there "
                         f"(e.g. {', '.join(missing[:5])}); the file looks like {what}",
                         "use it with a MODEL of the family and architecture it was made for")
    diffs, unchanged = {}, 0
    for k, w in ldm.items():
        b = base[k]
        if tuple(w.shape) != tuple(b.shape):
            raise file_error(file_name, f"does not fit this {family} MODEL: {k}: the file has shape {tuple(w.shape)} but "
                             f"the MODEL has {tuple(b.shape)}; the file looks like {what}",
                             "use it with a MODEL of the family and size it was made for")
        d = w.detach().to("cpu", torch.float32) - b.detach().to("cpu", torch.float32)
        if torch.count_nonzero(d) == 0:
            unchanged += 1
            continue
        diffs[k] = d
    LOG.info("[XCtrl] %s: %d UNet tensors differ from the model, %d are identical", file_name, len(diffs), unchanged)
    return diffs


def svd_ldm_state_dict(sd, file_name):
    """A complete SVD UNet in ComfyUI names from a diffusers- or ComfyUI-named file."""
    sd = unet_part(sd)
    naming = uwf.naming_of(sd)
    if svk.is_svd_diffusers(sd):
        config = svk.svd_config_from_diffusers(sd)
        expected = set(svk.svd_unet_key_map(config).values())
        try:
            ldm = svk.full_unet_to_ldm(sd, config)
        except WeightFileError as e:
            raise WeightFileError(f"{file_name}: {e}") from e
        missing = sorted(expected - set(ldm))
        if missing:
            raise WeightFileError(
                f"{file_name} is an incomplete diffusers SVD UNet: {len(missing)} tensors are missing "
                f"(e.g. {', '.join(missing[:5])}). Apply a partial file with XCtrl Apply UNet Weights instead."
            )
        return ldm
    if naming == "ldm" and any(".time_stack." in k for k in sd):
        return sd  # already ComfyUI names (the stock Load Diffusion Model node loads these too)
    raise WeightFileError(
        f"{file_name} is not a Stable Video Diffusion UNet: it looks like {describe(sd)}. "
        "Other UNets load with ComfyUI's Load Diffusion Model / Load Checkpoint nodes."
    )


def load_svd_unet(unet_file, weight_dtype="default", disable_dynamic=False):
    """The SVD UNet of a file as a MODEL, with its loader factory registered as core's loaders
    register theirs (ComfyUI's MultiGPU and device nodes build a model per device from it)."""
    ldm = svd_ldm_state_dict(read(unet_file, *UNET_FOLDERS), unet_file)
    keys = set(ldm)
    options = {} if DTYPES[weight_dtype] is None else {"dtype": DTYPES[weight_dtype]}
    more = {"disable_dynamic": True} if disable_dynamic else {}  # asked for only by ComfyUI versions that take it
    model = comfy.sd.load_diffusion_model_state_dict(ldm, model_options=options, **more)
    if model is None:
        cin = ldm.get("input_blocks.0.0.weight")
        raise WeightFileError(
            f"ComfyUI did not recognise {unet_file} as an SVD model (model_channels "
            f"{None if cin is None else int(cin.shape[0])}): only the standard SVD architecture (320 channels, "
            "1024-wide image context, 8 input channels) loads."
        )
    if model_family(model) != "svd":
        raise WeightFileError(f"{unet_file} loaded as {family_title(model_family(model))}, not as SVD")
    have = set(model.model.diffusion_model.state_dict())
    if have != keys:
        extra, absent = sorted(keys - have), sorted(have - keys)
        raise WeightFileError(
            f"{unet_file} does not match ComfyUI's SVD model: {len(extra)} file tensors unused "
            f"(e.g. {', '.join(extra[:3])}), {len(absent)} model tensors not in the file (e.g. {', '.join(absent[:3])})"
        )
    if hasattr(model, "cached_patcher_init"):
        model.cached_patcher_init = (load_svd_unet, (unet_file, weight_dtype))
    return model

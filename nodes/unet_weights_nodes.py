"""Fine-tuned UNet files: as weight patches on a base model, or (diffusers-named SVD) as the model.

ControlNeXt-SVD v2 ships its fine-tuned UNet in diffusers naming
(``unet/diffusion_pytorch_model.safetensors``); a community conversion to ComfyUI names
(``controlnext-svd_v2-unet-fp16_converted.safetensors``) loads with ComfyUI's stock
"Load Diffusion Model" node. ComfyUI's own diffusers detection does not cover SVD UNets, so
the diffusers file needs XCtrl_LoadSVDUNet (as the model itself) or XCtrl_ApplyUNetWeights
(as weight patches on a loaded SVD model).
"""
import logging

import torch

import comfy.sd
from comfy_api.latest import io

from ..models import svd_unet_keys as svk
from ..models import unet_weight_files as uwf
from ..models.checkpoint_io import WeightFileError
from ..runtime.model_family import family_title, model_family
from ..runtime.unet_patches import base_weights, describe, to_model_keys, unet_part
from ..runtime.weight_files import file_list, read

LOG = logging.getLogger("xctrl")
CATEGORY = "XCtrl/UNet"
UNET_FOLDERS = ("diffusion_models", "unet")
DTYPES = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
        raise WeightFileError(
            f"{len(missing)} keys of {file_name} do not exist in this {family} MODEL (e.g. {', '.join(missing[:5])}): "
            f"{file_name} looks like {what}; it is for another model family or architecture."
        )
    diffs, unchanged = {}, 0
    for k, w in ldm.items():
        b = base[k]
        if tuple(w.shape) != tuple(b.shape):
            raise WeightFileError(
                f"{k}: {file_name} has shape {tuple(w.shape)} but this {family} MODEL has {tuple(b.shape)}. "
                f"{file_name} looks like {what}; it is for another model (family or size)."
            )
        d = w.detach().to("cpu", torch.float32) - b.detach().to("cpu", torch.float32)
        if torch.count_nonzero(d) == 0:
            unchanged += 1
            continue
        diffs[k] = d
    LOG.info("[XCtrl] %s: %d UNet tensors differ from the model, %d are identical", file_name, len(diffs), unchanged)
    return diffs


class ApplyUNetWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XCtrl_ApplyUNetWeights",
            display_name="Apply UNet Weights (XCtrl)",
            category=CATEGORY,
            description=(
                "Applies a full or partial fine-tuned UNet file to a MODEL as weight patches (W_file - W_model), so "
                "LoRAs stack on top in any order and strength blends between the base (0) and the file's weights (1). "
                "Diffusers or ComfyUI key names; SD1.5, SD2.x, SDXL and SVD (e.g. the ControlNeXt-SVD v2 fine-tuned UNet "
                "on a base SVD model). Keeps float32 differences in RAM (4 bytes per changed parameter): for a full UNet, "
                "loading it as the model itself (XCtrl Load SVD UNet, or Load Diffusion Model for ComfyUI-key files) is lighter."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("unet_file", options=file_list(*UNET_FOLDERS), tooltip="UNet weights from models/diffusion_models (or models/unet): .safetensors or .bin, diffusers or ComfyUI key names, complete or partial."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="1 = the file's weights, 0 = the base model's, 0.5 = halfway."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, unet_file, strength):
        sd = read(unet_file, *UNET_FOLDERS)
        diffs = unet_weight_diffs(model, sd, unet_file)
        patched = model.clone()
        if strength != 0.0 and diffs:
            patched.add_patches({"diffusion_model." + k: (d,) for k, d in diffs.items()}, strength)
        return io.NodeOutput(patched)


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


class LoadSVDUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XCtrl_LoadSVDUNet",
            display_name="Load SVD UNet, diffusers or ComfyUI keys (XCtrl)",
            category=CATEGORY,
            description=(
                "Loads a Stable Video Diffusion UNet saved by diffusers (UNetSpatioTemporalConditionModel, e.g. the "
                "ControlNeXt-SVD v2 unet/diffusion_pytorch_model.safetensors or .bin), which ComfyUI's Load Diffusion Model "
                "node does not recognise, as a MODEL. ComfyUI-key SVD files (e.g. controlnext-svd_v2-unet-fp16_converted) "
                "load here too, or with the stock Load Diffusion Model node."
            ),
            inputs=[
                io.Combo.Input("unet_file", options=file_list(*UNET_FOLDERS), tooltip="A complete SVD UNet from models/diffusion_models (or models/unet), diffusers or ComfyUI key names."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default", tooltip="default: ComfyUI's choice for this device."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, unet_file, weight_dtype="default"):
        return io.NodeOutput(load_svd_unet(unet_file, weight_dtype))


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


NODES = [ApplyUNetWeights, LoadSVDUNet]

"""ControlNeXt nodes: load a control module (+ optional UNet weights), apply it to a MODEL."""
import torch

import comfy.utils

from ..models import controlnext as cnx
from ..models import unet_weight_files as uwf
from ..models.checkpoint_io import WeightFileError
from . import hints
from .controlnext_runtime import ControlNeXtRunner, module_patcher
from .model_family import compute_dtype, family_title, model_family, unet_block_channels
from .weight_files import NONE, file_list, read

CATEGORY = "XCtrl/ControlNeXt"
CONTROLNEXT = "XCTRL_CONTROLNEXT"
UNET_FOLDERS = ("controlnet", "diffusion_models")

# Which ControlNeXt member a base model family selects (resolve_variant's base names).
_BASE_FOR_FAMILY = {"sd15": "sd15", "sdxl": "sdxl", "svd": "svd", "sd3": "sd3"}


class LoadedControlNeXt:
    """A ControlNeXt file read from disk; the module is built per variant when applied."""

    def __init__(self, name, state_dict, unet_name=None, unet_sd=None):
        self.name = name
        self.state_dict = cnx.strip_common_prefix(state_dict)
        self.family = cnx.detect_variant(self.state_dict)  # raises with what the file is instead
        self.unet_name = unet_name
        self.unet_sd = unet_sd
        self.unet_semantics = uwf.parse_unet_weight_file(unet_sd) if unet_sd is not None else None
        self._patchers = {}

    def module_patcher(self, variant, dtype):
        key = (variant, dtype)
        if key not in self._patchers:
            self._patchers[key] = module_patcher(self.state_dict, variant, dtype)
        return self._patchers[key]


class LoadControlNeXt:
    DESCRIPTION = (
        "Loads a ControlNeXt control module (SD1.5, SDXL, SVD v1/v2; .safetensors or .bin) from models/controlnet, "
        "optionally with its UNet weight file (the 'unet.safetensors' released next to it)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "control_file": (file_list("controlnet"), {"tooltip": "The control module, e.g. controlnet.safetensors of a ControlNeXt release."}),
                "unet_weights": ([NONE] + file_list(*UNET_FOLDERS), {"tooltip": "Optional fine-tuned UNet weights released with the module (SD1.5: replacement attention weights; SDXL: deltas). From models/controlnet or models/diffusion_models."}),
            }
        }

    RETURN_TYPES = (CONTROLNEXT,)
    RETURN_NAMES = ("controlnext",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, control_file, unet_weights):
        sd = read(control_file, "controlnet")
        try:
            unet_sd = None if unet_weights == NONE else read(unet_weights, *UNET_FOLDERS)
            return (LoadedControlNeXt(control_file, sd, None if unet_sd is None else unet_weights, unet_sd),)
        except WeightFileError as e:
            raise WeightFileError(f"{control_file}: {e}") from e


class ApplyControlNeXt:
    DESCRIPTION = (
        "Applies ControlNeXt to a MODEL: the control feature is cross-normalized and added inside the denoiser at the "
        "point the weights were trained for, on every sampler step in [start, end]. Connect the patched MODEL to any sampler."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "controlnext": (CONTROLNEXT,),
                "image": ("IMAGE", {"tooltip": "Condition image (pose, edges, depth, ...), RGB in [0, 1]; resized to the generated image size. A batch of 1 serves every latent; otherwise one per latent."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Control strength. SD1.5 released: multiplies the learned scale. SDXL: the scale itself (authors: ~0.35 for canny, 1.0 for dense conditions)."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Where to apply the control (1 = full control)."}),
                "unet_strength": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.01, "tooltip": "Strength of the UNet weight file loaded with the module (ignored without one)."}),
                "sd15_layout": (["refuse", "sd15_training"], {"default": "refuse", "tooltip": "An SDXL-layout file on an SD1.5 model: 'refuse' (no SD1.5-Training weights were released, so it is most likely an SDXL file) or 'sd15_training' for a module you trained with the ControlNeXt SD1.5-Training code."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, controlnext, image, strength, start_percent, end_percent, mask=None, unet_strength=1.0,
              sd15_layout="refuse"):
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent})")
        family = model_family(model)
        base = _BASE_FOR_FAMILY.get(family)
        if base is None:
            raise WeightFileError(
                f"{controlnext.name} is a ControlNeXt {_family_label(controlnext.family)} module; it cannot control a "
                f"{family_title(family)} model. Use a ControlNeXt model made for your base model."
            )
        try:
            variant = cnx.resolve_variant(controlnext.family, base)
        except WeightFileError as e:
            raise WeightFileError(
                f"{controlnext.name} is a ControlNeXt {_family_label(controlnext.family)} module but the MODEL is "
                f"{family_title(family)}: load the ControlNeXt file made for {family_title(family)}, or use a "
                f"{_family_label(controlnext.family)} checkpoint."
            ) from e
        if variant == "sd15_training" and sd15_layout != "sd15_training":
            raise WeightFileError(
                f"{controlnext.name} has the SDXL ControlNeXt layout but the MODEL is SD1.5. No SD1.5-Training weights "
                "were released; this is most likely an SDXL ControlNeXt file: use an SDXL checkpoint (or, for a module "
                "you trained with the SD1.5-Training code, set sd15_layout to sd15_training)."
            )
        _check_width(controlnext, variant, model)
        hint = hints.image_to_nchw(image)
        mask_t = None
        if mask is not None:
            mask_t = (mask if mask.dim() == 3 else mask.reshape(-1, *mask.shape[-2:])).float().unsqueeze(1)
        patched = model.clone()
        if controlnext.unet_sd is not None and unet_strength != 0.0:
            add_unet_weight_patches(patched, controlnext, unet_strength)
        runner = ControlNeXtRunner(
            controlnext.module_patcher(variant, compute_dtype(model)), variant, hint, strength,
            start_percent, end_percent, mask_t,
        )
        runner.install(patched)
        return (patched,)


def _check_width(controlnext, variant, model):
    """The module's output width must equal the UNet's at the injection point (else the file
    is for another model, e.g. a distilled/pruned UNet): fail now, not mid-sampling."""
    v = cnx.get_variant(variant)
    have = int(controlnext.state_dict["mid_convs.1.weight"].shape[0])
    if model_family(model) == "sd3":
        need = model.model.diffusion_model.x_embedder.proj.weight.shape[0]  # hidden size of the tokens
    else:
        need = unet_block_channels(model).get(v.injection)
    if need is not None and need != have:
        raise WeightFileError(
            f"{controlnext.name} outputs {have} channels but this {family_title(model_family(model))} model has {need} "
            f"at the ControlNeXt {v.title} injection point ({v.injection_note}): the file is for a different model."
        )


def _family_label(family):
    return {"sd15": "SD1.5", "svd_v1": "SVD v1", cnx.SDXL_FAMILY: "SDXL (or SVD v2)"}.get(family, family)


def add_unet_weight_patches(model, controlnext, strength):
    """The UNet weight file as ComfyUI diff patches, so LoRAs stack on top in any order."""
    semantics, naming = controlnext.unet_semantics
    sd = uwf.strip_unet_prefix(controlnext.unet_sd)
    if naming == uwf.DIFFUSERS:
        mapping = {k: v for k, v in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()}
        sd = uwf.to_ldm_keys(sd, mapping)
    base = {}
    key_patches = model.get_key_patches("diffusion_model.")
    for k in sd:
        entry = key_patches.get("diffusion_model." + k)
        if entry is not None:
            w = entry[0]
            base[k] = w[0] if isinstance(w, tuple) else w
    try:
        deltas = uwf.weight_patches(sd, base, semantics)
    except WeightFileError as e:
        raise WeightFileError(f"{controlnext.unet_name}: {e}") from e
    model.add_patches({"diffusion_model." + k: (d,) for k, d in deltas.items()}, strength)


NODE_CLASS_MAPPINGS = {
    "XCtrl_LoadControlNeXt": LoadControlNeXt,
    "XCtrl_ApplyControlNeXt": ApplyControlNeXt,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "XCtrl_LoadControlNeXt": "Load ControlNeXt (XCtrl)",
    "XCtrl_ApplyControlNeXt": "Apply ControlNeXt (XCtrl)",
}

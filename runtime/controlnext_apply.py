"""ControlNeXt from files to a patched MODEL or conditioning: the loaded file, which variant it
runs as on a MODEL (and the wrong-file messages), its width check, the UNet weight file as weight
patches, and the runner the Apply nodes install. Running the module in sampling: controlnext.py."""
import logging
import os

from ..models import controlnext as cnx
from ..models import unet_weight_files as uwf
from ..models.checkpoint_io import WeightFileError, file_error
from ..models.file_kinds import kind_of
from .conditioning_control import attach
from .control_inputs import require_finite
from .controlnext import INJECTIONS, ControlNeXtRunner, module_patcher
from .model_family import compute_dtype, family_title, model_family, unet_block_channels
from .unet_patches import base_weights, to_model_keys
from .weight_files import NONE, metadata_of, read, wrong_file

LOG = logging.getLogger("xctrl")
UNET_FOLDERS = ("controlnet", "diffusion_models")
# safetensors metadata XCtrl's trainer writes: the module's variant, and that the UNet file holds differences.
TRAINED_LAYOUT_KEY, TRAINED_UNET_KEY = "xctrl_layout", "xctrl_unet"

# Which ControlNeXt member a base model family selects (resolve_variant's base names).
_BASE_FOR_FAMILY = {"sd15": "sd15", "sdxl": "sdxl", "svd": "svd", "sd3": "sd3"}


class LoadedControlNeXt:
    """A ControlNeXt file read from disk; the module is built per variant when applied."""

    def __init__(self, name, state_dict, unet_name=None, unet_sd=None, unet_delta=False, trained_for=None):
        self.name = name
        self.trained_for = trained_for  # "sd15_training" for a module XCtrl trained for SD1.5 (from its metadata)
        self.state_dict = cnx.strip_common_prefix(state_dict)
        try:
            self.family = cnx.detect_variant(self.state_dict)
            cnx.check_file_layout(self.state_dict, self.family)
        except WeightFileError as e:
            if kind_of(state_dict).startswith("controlnext_") and not uwf.is_unet_weight_file(state_dict):
                raise WeightFileError(f"{name}: {e}") from None  # a ControlNeXt module, altered
            raise wrong_file(name, state_dict, "a ControlNeXt control module") from None
        self.unet_name = unet_name
        self.unet_sd = unet_sd
        self.unet_semantics = None
        if unet_sd is not None:
            try:
                self.unet_semantics = uwf.parse_unet_weight_file(unet_sd, delta=unet_delta)
            except WeightFileError as e:
                raise wrong_file(unet_name, unet_sd, "a ControlNeXt UNet weight file", str(e)) from None
        self._patchers = {}

    def module_patcher(self, variant, model):
        """The module for a variant, on the MODEL's compute dtype and devices (built once per combination)."""
        key = (variant, compute_dtype(model), str(model.load_device), str(model.offload_device))
        if key not in self._patchers:
            self._patchers[key] = module_patcher(self.state_dict, variant, model)
        return self._patchers[key]

    def built_modules(self):
        """The modules built so far (one per variant, dtype and device pair), oldest first."""
        return [patcher.model for patcher in self._patchers.values()]


def load(control_file, unet_weights=NONE):
    """Load ControlNeXt: the module file from models/controlnet, and optionally its UNet weight file."""
    sd = read(control_file, "controlnet")
    trained_for = metadata_of(control_file, "controlnet").get(TRAINED_LAYOUT_KEY)
    if unet_weights == NONE:
        return LoadedControlNeXt(control_file, sd, trained_for=trained_for)
    delta = ("increasement" in os.path.basename(unet_weights).lower()  # the SDXL release's name for its deltas
             or metadata_of(unet_weights, *UNET_FOLDERS).get(TRAINED_UNET_KEY) == "delta")
    return LoadedControlNeXt(control_file, sd, unet_weights, read(unet_weights, *UNET_FOLDERS), unet_delta=delta,
                             trained_for=trained_for)


def make_runner(model, controlnext, inputs, sd15_layout="refuse", reference_pose_per_window=True):
    """The runner of one Apply node (inputs: control_inputs.ControlInputs), checked against the MODEL."""
    variant = variant_for(controlnext, model, sd15_layout)
    check_width(controlnext, variant, model)
    runner = ControlNeXtRunner(controlnext.module_patcher(variant, model), variant, inputs.hint, inputs.strength,
                               inputs.start_percent, inputs.end_percent, inputs.mask, reference_pose_per_window,
                               inputs.strengths)
    return inputs.configure(runner)


def apply_to_model(model, controlnext, inputs, unet_strength=1.0, **options):
    """Apply ControlNeXt: a clone of the MODEL with the control (and the UNet weight file's patches)."""
    require_finite(inputs.node, unet_strength=unet_strength)
    runner = make_runner(model, controlnext, inputs, **options)
    patched = model.clone()
    if controlnext.unet_sd is not None and unet_strength != 0.0:
        add_unet_weight_patches(patched, controlnext, unet_strength)
    runner.install(patched)
    return patched


def apply_to_conditioning(positive, negative, model, controlnext, inputs, **options):
    """Apply ControlNeXt to Conditioning: the control carried by these conditionings only."""
    if controlnext.unet_sd is not None:
        LOG.warning("[XCtrl] %s: the UNet weights loaded with %s act on a MODEL and are not applied here (use Apply "
                    "ControlNeXt, or Apply UNet Weights on the MODEL)", inputs.node, controlnext.name)
    return attach(positive, negative, model, make_runner(model, controlnext, inputs, **options))


def variant_for(controlnext, model, sd15_layout):
    """The ControlNeXt variant for this file on this MODEL, or a WeightFileError saying what to load."""
    family = model_family(model)
    base = _BASE_FOR_FAMILY.get(family)
    module_title = cnx.module_family_title(controlnext.family)
    if base is None:
        raise WeightFileError(
            f"{controlnext.name} is a ControlNeXt {module_title} module; it cannot control a "
            f"{family_title(family)} model. Use a ControlNeXt model made for your base model."
        )
    try:
        variant = cnx.resolve_variant(controlnext.family, base)
    except WeightFileError as e:
        raise WeightFileError(
            f"{controlnext.name} is a ControlNeXt {module_title} module but the MODEL is {family_title(family)}: load the "
            f"ControlNeXt file made for {family_title(family)}, or use a {module_title} checkpoint."
        ) from e
    if family != "svd" and controlnext.family == cnx.SDXL_FAMILY and controlnext.trained_for is None \
            and cnx.named_as_svd_module(controlnext.name):
        raise WeightFileError(
            f"{controlnext.name} is, by its name, the ControlNeXt-SVD v2 control module (it has the SDXL layout, so only "
            f"the name tells them apart): it controls SVD image-to-video models, not {family_title(family)}. Load an SVD "
            "model (the ControlNeXt-SVD v2 UNet); if this file really is an SDXL module, rename it without 'svd'."
        )
    if variant == "sd15_training" and sd15_layout != "sd15_training" and controlnext.trained_for != "sd15_training":
        raise WeightFileError(
            f"{controlnext.name} has the SDXL ControlNeXt layout but the MODEL is SD1.5. No SD1.5-Training weights "
            "were released; this is most likely an SDXL ControlNeXt file: use an SDXL checkpoint (or, for a module "
            "you trained with the SD1.5-Training code, set sd15_layout to sd15_training)."
        )
    return variant


def check_width(controlnext, variant, model):
    """The module's output width must equal the UNet's at the injection point (else the file
    is for another model, e.g. a distilled/pruned UNet): fail now, not mid-sampling."""
    have = int(controlnext.state_dict["mid_convs.1.weight"].shape[0])
    if model_family(model) == "sd3":
        need = model.model.diffusion_model.x_embedder.proj.weight.shape[0]  # hidden size of the tokens
    else:
        need = unet_block_channels(model).get(INJECTIONS[variant].block)
    if need is not None and need != have:
        raise WeightFileError(
            f"{controlnext.name} outputs {have} channels but this {family_title(model_family(model))} model has {need} "
            f"at the ControlNeXt {cnx.get_variant(variant).title} injection point ({INJECTIONS[variant].where}): the "
            "file is for a different model."
        )


def add_unet_weight_patches(model, controlnext, strength):
    """The UNet weight file as ComfyUI diff patches, so LoRAs stack on top in any order."""
    semantics, _ = controlnext.unet_semantics
    sd = to_model_keys(model, controlnext.unet_sd, controlnext.unet_name)
    try:
        deltas = uwf.weight_patches(sd, base_weights(model, sd), semantics)
    except WeightFileError as e:
        raise file_error(controlnext.unet_name, f"cannot be applied to this MODEL ({e})",
                         "use it with a MODEL of the family it was made for") from e
    model.add_patches({"diffusion_model." + k: (d,) for k, d in deltas.items()}, strength)

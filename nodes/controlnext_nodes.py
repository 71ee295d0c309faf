"""ControlNeXt nodes: load a control module (+ optional UNet weights), apply it to a MODEL or
to conditioning (per prompt), run SVD videos longer than one window and condition SVD the
authors' way."""
import logging
import os

import torch

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from ..models import controlnext as cnx
from ..models import unet_weight_files as uwf
from ..models import svd_reference
from ..models import video_windows as vw
from ..models.checkpoint_io import WeightFileError
from ..models.file_kinds import kind_of
from ..runtime import batch_rows
from .apply_inputs import (check_step_range, image_input, mask_batch, mask_input, require_finite, require_step_range,
                           resize_mode_input, step_range_inputs)
from ..runtime.conditioning_control import ConditioningControl, with_control
from .control_strength_nodes import strength_inputs, strengths_from
from ..runtime.controlnext import INJECTIONS, ControlNeXtRunner, module_patcher
from ..runtime.long_video import NODE as LONG_VIDEO_NODE
from ..runtime.long_video import LongVideoError, LongVideoWindows
from ..runtime.unet_patches import base_weights, to_model_keys
from ..runtime.model_family import compute_dtype, family_title, model_family, model_signature, unet_block_channels
from ..runtime.weight_files import NONE, file_list, metadata_of, read, wrong_file

LOG = logging.getLogger("xctrl")
CATEGORY = "XCtrl/ControlNeXt"
CONTROLNEXT = "XCTRL_CONTROLNEXT"
ControlNeXtType = io.Custom(CONTROLNEXT)
UNET_FOLDERS = ("controlnet", "diffusion_models")
# safetensors metadata XCtrl's trainer writes (nodes/training_nodes.py): the module's variant, and
# that the UNet file holds differences.
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


class LoadControlNeXt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XCtrl_LoadControlNeXt",
            display_name="Load ControlNeXt (XCtrl)",
            category=CATEGORY,
            description=(
                "Loads a ControlNeXt control module (SD1.5, SDXL, SVD v1/v2; .safetensors or .bin) from models/controlnet, "
                "optionally with its UNet weight file (the 'unet.safetensors' released next to it)."
            ),
            inputs=[
                io.Combo.Input("control_file", options=file_list("controlnet"), tooltip="The control module, e.g. controlnet.safetensors of a ControlNeXt release."),
                io.Combo.Input("unet_weights", options=[NONE] + file_list(*UNET_FOLDERS), tooltip="Optional fine-tuned UNet weights released with the module (SD1.5: replacement attention weights; SDXL: deltas). From models/controlnet or models/diffusion_models."),
            ],
            outputs=[ControlNeXtType.Output(display_name="controlnext")],
        )

    @classmethod
    def execute(cls, control_file, unet_weights):
        sd = read(control_file, "controlnet")
        trained_for = metadata_of(control_file, "controlnet").get(TRAINED_LAYOUT_KEY)
        unet_sd, delta = None, False
        if unet_weights != NONE:
            unet_sd = read(unet_weights, *UNET_FOLDERS)
            delta = ("increasement" in os.path.basename(unet_weights).lower()
                     or metadata_of(unet_weights, *UNET_FOLDERS).get(TRAINED_UNET_KEY) == "delta")
        return io.NodeOutput(LoadedControlNeXt(control_file, sd, None if unet_sd is None else unet_weights, unet_sd,
                                               unet_delta=delta, trained_for=trained_for))


class ApplyControlNeXt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XCtrl_ApplyControlNeXt",
            display_name="Apply ControlNeXt (XCtrl)",
            category=CATEGORY,
            description=(
                "Applies ControlNeXt to a MODEL: the control feature is cross-normalized and added inside the denoiser at the "
                "point the weights were trained for, on every sampler step in [start, end]. Connect the patched MODEL to any sampler."
            ),
            inputs=[
                io.Model.Input("model"),
                ControlNeXtType.Input("controlnext"),
                image_input("pose, edges, depth, ..."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01, tooltip="Control strength. SD1.5 released: multiplies the learned scale. SDXL: the scale itself (authors: ~0.35 for canny, 1.0 for dense conditions)."),
                *step_range_inputs(),
                mask_input(),
                io.Float.Input("unet_strength", optional=True, default=1.0, min=-2.0, max=2.0, step=0.01, tooltip="Strength of the UNet weight file loaded with the module (ignored without one)."),
                io.Combo.Input("sd15_layout", optional=True, options=["refuse", "sd15_training"], default="refuse", tooltip="An SDXL-layout file on an SD1.5 model: 'refuse' (no SD1.5-Training weights were released, so it is most likely an SDXL file) or 'sd15_training' for a module you trained with the ControlNeXt SD1.5-Training code."),
                io.Boolean.Input("reference_pose_per_window", optional=True, default=True, tooltip="SVD v2 under context windows (XCtrl Long Video, ComfyUI's Context Windows, AnimateDiff-Evolved context options): every window gets pose frame 0 (the reference image's pose) at its first position, as the authors' long-video loop does. Off: every frame gets its own pose. Other variants always use their own frame's image."),
                *strength_inputs(),
                resize_mode_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent):
        return check_step_range(start_percent, end_percent)

    @classmethod
    def execute(cls, model, controlnext, image, strength, start_percent, end_percent, mask=None, unet_strength=1.0,
                sd15_layout="refuse", reference_pose_per_window=True, schedule=None, latent_strengths=None,
                uncond_multiplier=1.0, resize_mode="crop"):
        runner = _runner(model, controlnext, image, strength, start_percent, end_percent, mask, sd15_layout,
                         reference_pose_per_window, schedule, latent_strengths, uncond_multiplier, "Apply ControlNeXt (XCtrl)",
                         resize_mode)
        patched = model.clone()
        if controlnext.unet_sd is not None and unet_strength != 0.0:
            add_unet_weight_patches(patched, controlnext, unet_strength)
        runner.install(patched)
        return io.NodeOutput(patched)


def _runner(model, controlnext, image, strength, start_percent, end_percent, mask, sd15_layout, reference_pose_per_window,
            schedule, latent_strengths, uncond_multiplier, node, resize_mode="crop"):
    require_step_range(start_percent, end_percent, node)
    require_finite(node, image=image, mask=mask, strength=strength, uncond_multiplier=uncond_multiplier)
    variant = _variant_for(controlnext, model, sd15_layout)
    _check_width(controlnext, variant, model)
    strengths = strengths_from(schedule, latent_strengths, uncond_multiplier, node)
    runner = ControlNeXtRunner(controlnext.module_patcher(variant, model), variant, batch_rows.image_to_nchw(image), strength,
                               start_percent, end_percent, mask_batch(mask), reference_pose_per_window, strengths)
    runner.NODE = node  # the node its errors name
    runner.fit_mode = resize_mode
    return runner


class ApplyControlNeXtConditioning(io.ComfyNode):
    NODE = "Apply ControlNeXt to Conditioning (XCtrl)"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XCtrl_ApplyControlNeXtConditioning",
            display_name=cls.NODE,
            category=CATEGORY,
            description=(
                "ControlNeXt carried by conditioning, like ComfyUI's Apply ControlNet: only the prompts (and areas) that "
                "pass through here get the control; others get none. The MODEL input only tells which ControlNeXt variant "
                "to run and where its module loads (it is not patched). UNet weight files loaded with the module act on a "
                "whole MODEL: use Apply ControlNeXt for them."
            ),
            inputs=[
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Model.Input("model", tooltip="The MODEL these conditionings will be sampled with (read only)."),
                ControlNeXtType.Input("controlnext"),
                image_input("pose, edges, depth, ..."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01, tooltip="As Apply ControlNeXt's strength."),
                *step_range_inputs(),
                mask_input(),
                io.Combo.Input("sd15_layout", optional=True, options=["refuse", "sd15_training"], default="refuse",
                               tooltip="As Apply ControlNeXt's sd15_layout."),
                io.Boolean.Input("reference_pose_per_window", optional=True, default=True,
                                 tooltip="As Apply ControlNeXt's reference_pose_per_window."),
                *strength_inputs(),
                resize_mode_input(),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent):
        return check_step_range(start_percent, end_percent)

    @classmethod
    def execute(cls, positive, negative, model, controlnext, image, strength, start_percent, end_percent, mask=None,
                sd15_layout="refuse", reference_pose_per_window=True, schedule=None, latent_strengths=None,
                uncond_multiplier=1.0, resize_mode="crop"):
        if controlnext.unet_sd is not None:
            LOG.warning("[XCtrl] %s: the UNet weights loaded with %s act on a MODEL and are not applied here (use Apply "
                        "ControlNeXt, or Apply UNet Weights on the MODEL)", cls.NODE, controlnext.name)
        runner = _runner(model, controlnext, image, strength, start_percent, end_percent, mask, sd15_layout,
                         reference_pose_per_window, schedule, latent_strengths, uncond_multiplier, cls.NODE, resize_mode)
        return io.NodeOutput(*with_control(positive, negative, ConditioningControl(runner, model_signature(model.model))))


class ControlNeXtSVDLongVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XCtrl_ControlNeXtSVDLongVideo",
            display_name=LONG_VIDEO_NODE,
            category=CATEGORY,
            description=(
                "Makes an SVD MODEL denoise videos longer than one window the way the ControlNeXt-SVD v2 authors do: at every "
                "sampler step the video runs in windows of frames_per_window frames overlapping by overlap frames (the last "
                "window moved back to end at the last frame), each window from the same sigma, fused by a flat average that "
                "leaves out position 0 of every window not starting at frame 0. With Apply ControlNeXt (SVD v2) every window "
                "gets the reference pose (frame 0) at its first position. Any sampler and scheduler."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SVD model (e.g. the ControlNeXt-SVD v2 UNet), before or after Apply ControlNeXt."),
                io.Int.Input("frames_per_window", default=24, min=1, max=4096, tooltip="Frames the UNet sees per call (the authors' script: 24). A video this short or shorter is one window."),
                io.Int.Input("overlap", default=6, min=0, max=4095, tooltip="Frames shared by consecutive windows (the authors' script: 6); at least 1, fewer than frames_per_window."),
                io.Combo.Input("cfg_ramp", options=["constant", "linear"], default="constant", tooltip="constant: the sampler's cfg on every frame (the authors' script). linear: per window position, cfg rises from min_cfg (position 0) to the sampler's cfg (last position) before the windows are fused, as the reference pipeline's min/max guidance does."),
                io.Float.Input("min_cfg", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="cfg at window position 0 with cfg_ramp = linear; ignored with constant."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, frames_per_window, overlap):
        if frames_per_window is None or overlap is None:  # linked: checked when the node runs
            return True
        try:
            vw.check_window_settings(frames_per_window, overlap)
        except vw.WindowError as e:
            return f"{e}. The authors' setting is frames_per_window 24, overlap 6."
        return True

    @classmethod
    def execute(cls, model, frames_per_window, overlap, cfg_ramp="constant", min_cfg=1.0):
        family = model_family(model)
        if family != "svd":
            raise LongVideoError(
                f"{LONG_VIDEO_NODE} windows Stable Video Diffusion models; this MODEL is {family_title(family)}. "
                "Connect an SVD model (e.g. the ControlNeXt-SVD v2 UNet)."
            )
        patched = model.clone()
        LongVideoWindows(frames_per_window, overlap, min_cfg if cfg_ramp == "linear" else None).install(patched)
        return io.NodeOutput(patched)


class SVDReferenceConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XCtrl_SVDReferenceConditioning",
            display_name="SVD Conditioning, reference pipeline (XCtrl)",
            category=CATEGORY,
            description=(
                "Stable Video Diffusion image-to-video conditioning as the ControlNeXt-SVD v2 (diffusers) pipeline makes it: "
                "the reference image resized to cover width x height and center-cropped; CLIP vision sees the whole image "
                "squashed to 224 x 224 with the pipeline's antialiased resize (ComfyUI's SVD_img2vid_Conditioning crops it "
                "to a centered square, losing head and feet of a portrait); the noise augmentation is added in [-1, 1] "
                "pixel space (ComfyUI's node adds twice as much) from a seed. Same outputs as SVD_img2vid_Conditioning."
            ),
            inputs=[
                io.ClipVision.Input("clip_vision"),
                io.Image.Input("init_image"),
                io.Vae.Input("vae"),
                io.Int.Input("width", default=576, min=16, max=16384, step=8),
                io.Int.Input("height", default=1024, min=16, max=16384, step=8),
                io.Int.Input("video_frames", default=14, min=1, max=4096, tooltip="Frames to generate = pose frames (the reference pose plus the aligned driving poses)."),
                io.Int.Input("motion_bucket_id", default=128, min=1, max=1023, tooltip="The reference pipeline uses 128."),
                io.Int.Input("fps", default=7, min=1, max=1024, tooltip="The model sees fps - 1; the reference pipeline's fps id is 6."),
                io.Float.Input("augmentation_level", default=0.02, min=0.0, max=10.0, step=0.01, tooltip="Noise added to the reference image, std in [-1, 1] pixel space (the reference pipeline: 0.02); also the model's time id."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip="Seed of the augmentation noise."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
                     io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, clip_vision, init_image, vae, width, height, video_frames, motion_bucket_id, fps, augmentation_level, seed=0):
        pixels = comfy.utils.common_upscale(init_image[..., :3].movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
        pooled = clip_vision.encode_image(svd_reference.clip_pixels(pixels)).image_embeds.unsqueeze(0)
        noisy = svd_reference.augment(pixels, augmentation_level, torch.Generator().manual_seed(seed))
        latent = vae.encode(noisy)
        ids = {"motion_bucket_id": motion_bucket_id, "fps": fps, "augmentation_level": augmentation_level}
        positive = [[pooled, dict(ids, concat_latent_image=latent)]]
        negative = [[torch.zeros_like(pooled), dict(ids, concat_latent_image=torch.zeros_like(latent))]]
        samples = torch.zeros([video_frames, 4, height // 8, width // 8], device=mm.intermediate_device())
        return io.NodeOutput(positive, negative, {"samples": samples})


def _variant_for(controlnext, model, sd15_layout):
    """The ControlNeXt variant for this file on this MODEL, or a WeightFileError saying what to load."""
    family = model_family(model)
    base = _BASE_FOR_FAMILY.get(family)
    if base is None:
        raise WeightFileError(
            f"{controlnext.name} is a ControlNeXt {cnx.module_family_title(controlnext.family)} module; it cannot control a "
            f"{family_title(family)} model. Use a ControlNeXt model made for your base model."
        )
    try:
        variant = cnx.resolve_variant(controlnext.family, base)
    except WeightFileError as e:
        raise WeightFileError(
            f"{controlnext.name} is a ControlNeXt {cnx.module_family_title(controlnext.family)} module but the MODEL is "
            f"{family_title(family)}: load the ControlNeXt file made for {family_title(family)}, or use a "
            f"{cnx.module_family_title(controlnext.family)} checkpoint."
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


def _check_width(controlnext, variant, model):
    """The module's output width must equal the UNet's at the injection point (else the file
    is for another model, e.g. a distilled/pruned UNet): fail now, not mid-sampling."""
    v = cnx.get_variant(variant)
    have = int(controlnext.state_dict["mid_convs.1.weight"].shape[0])
    if model_family(model) == "sd3":
        need = model.model.diffusion_model.x_embedder.proj.weight.shape[0]  # hidden size of the tokens
    else:
        need = unet_block_channels(model).get(INJECTIONS[variant].block)
    if need is not None and need != have:
        raise WeightFileError(
            f"{controlnext.name} outputs {have} channels but this {family_title(model_family(model))} model has {need} "
            f"at the ControlNeXt {v.title} injection point ({INJECTIONS[variant].where}): the file is for a different model."
        )


def add_unet_weight_patches(model, controlnext, strength):
    """The UNet weight file as ComfyUI diff patches, so LoRAs stack on top in any order."""
    semantics, _ = controlnext.unet_semantics
    sd = to_model_keys(model, controlnext.unet_sd, controlnext.unet_name)
    try:
        deltas = uwf.weight_patches(sd, base_weights(model, sd), semantics)
    except WeightFileError as e:
        raise WeightFileError(f"{controlnext.unet_name}: {e}") from e
    model.add_patches({"diffusion_model." + k: (d,) for k, d in deltas.items()}, strength)


NODES = [LoadControlNeXt, ApplyControlNeXt, ControlNeXtSVDLongVideo, SVDReferenceConditioning, ApplyControlNeXtConditioning]

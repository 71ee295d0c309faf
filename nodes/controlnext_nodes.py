"""ControlNeXt nodes: load a control module (+ optional UNet weights), apply it to a MODEL or
to conditioning (per prompt), run SVD videos longer than one window and condition SVD the
authors' way."""
from comfy_api.latest import io

from ..runtime import controlnext_apply as apply
from ..runtime.control_inputs import ControlInputs, node_label
from ..runtime.long_video import NODE as LONG_VIDEO_NODE
from ..runtime.long_video import check_window_inputs, windowed_model
from ..runtime.svd_conditioning import reference_conditioning
from ..runtime.weight_files import NONE, file_list
from .apply_inputs import NODE_REFERENCE, ApplyNode, conditioning_inputs, conditioning_outputs, ControlNeXtType, control_inputs
from .schema import node_schema

CATEGORY = "XCtrl/ControlNeXt"


class LoadControlNeXt(io.ComfyNode):
    """Loads a ControlNeXt control module (SD1.5, SDXL, SVD v1/v2; .safetensors or .bin) from models/controlnet,
    optionally with its UNet weight file (the 'unet.safetensors' released next to it)."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_LoadControlNeXt", "Load ControlNeXt (XCtrl)", CATEGORY, inputs=[
            io.Combo.Input("control_file", options=file_list("controlnet"), tooltip="The control module, e.g. controlnet.safetensors of a ControlNeXt release."),
            io.Combo.Input("unet_weights", options=[NONE] + file_list(*apply.UNET_FOLDERS), tooltip="Optional fine-tuned UNet weights released with the module (SD1.5: replacement attention weights; SDXL: deltas). From models/controlnet or models/diffusion_models."),
        ], outputs=[ControlNeXtType.Output(display_name="controlnext")])

    @classmethod
    def execute(cls, control_file, unet_weights):
        return io.NodeOutput(apply.load(control_file, unet_weights))


class ApplyControlNeXt(ApplyNode):
    """Applies ControlNeXt to a MODEL: the control feature is cross-normalized and added inside the denoiser at
    the point the weights were trained for, on every sampler step in [start, end]. Connect the patched MODEL
    to any sampler."""

    NODE = "Apply ControlNeXt (XCtrl)"

    @classmethod
    def define_schema(cls):
        return cls.model_schema(
            "XCtrl_ApplyControlNeXt", CATEGORY, ControlNeXtType.Input("controlnext"), "pose, edges, depth, ...",
            "Control strength. SD1.5 released: multiplies the learned scale. SDXL: the scale itself (authors: ~0.35 for canny, 1.0 for dense conditions).", [
                io.Float.Input("unet_strength", optional=True, default=1.0, min=-2.0, max=2.0, step=0.01, tooltip="Strength of the UNet weight file loaded with the module (ignored without one)."),
                io.Combo.Input("sd15_layout", optional=True, options=["refuse", "sd15_training"], default="refuse", tooltip="An SDXL-layout file on an SD1.5 model: 'refuse' (no SD1.5-Training weights were released, so it is most likely an SDXL file) or 'sd15_training' for a module you trained with the ControlNeXt SD1.5-Training code."),
                io.Boolean.Input("reference_pose_per_window", optional=True, default=True, tooltip="SVD v2 under context windows (XCtrl Long Video, ComfyUI's Context Windows, AnimateDiff-Evolved context options): every window gets pose frame 0 (the reference image's pose) at its first position, as the authors' long-video loop does. Off: every frame gets its own pose. Other variants always use their own frame's image."),
            ])

    @classmethod
    def execute(cls, model, controlnext, image, strength, start_percent, end_percent, mask=None, unet_strength=1.0,
                sd15_layout="refuse", reference_pose_per_window=True, schedule=None, latent_strengths=None,
                uncond_multiplier=1.0, resize_mode="crop"):
        inputs = ControlInputs(node_label(cls.NODE, cls.hidden), image, strength, start_percent, end_percent, mask,
                               schedule, latent_strengths, uncond_multiplier, resize_mode)
        return io.NodeOutput(apply.apply_to_model(model, controlnext, inputs, unet_strength, sd15_layout=sd15_layout,
                                                  reference_pose_per_window=reference_pose_per_window))


class ApplyControlNeXtConditioning(ApplyNode):
    """ControlNeXt carried by conditioning, like ComfyUI's Apply ControlNet: only the prompts (and areas) that
    pass through here get the control; others get none. The MODEL input only tells which ControlNeXt variant
    to run and where its module loads (it is not patched). UNet weight files loaded with the module act on a
    whole MODEL: use Apply ControlNeXt for them."""

    NODE = "Apply ControlNeXt to Conditioning (XCtrl)"

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_ApplyControlNeXtConditioning", cls.NODE, CATEGORY, hidden=NODE_REFERENCE, inputs=[
            *conditioning_inputs(),
            ControlNeXtType.Input("controlnext"),
            *control_inputs("pose, edges, depth, ...", "As Apply ControlNeXt's strength.", method_inputs=[
                io.Combo.Input("sd15_layout", optional=True, options=["refuse", "sd15_training"], default="refuse",
                               tooltip="As Apply ControlNeXt's sd15_layout."),
                io.Boolean.Input("reference_pose_per_window", optional=True, default=True,
                                 tooltip="As Apply ControlNeXt's reference_pose_per_window."),
            ]),
        ], outputs=conditioning_outputs())

    @classmethod
    def execute(cls, positive, negative, model, controlnext, image, strength, start_percent, end_percent, mask=None,
                sd15_layout="refuse", reference_pose_per_window=True, schedule=None, latent_strengths=None,
                uncond_multiplier=1.0, resize_mode="crop"):
        inputs = ControlInputs(node_label(cls.NODE, cls.hidden), image, strength, start_percent, end_percent, mask,
                               schedule, latent_strengths, uncond_multiplier, resize_mode)
        return io.NodeOutput(*apply.apply_to_conditioning(positive, negative, model, controlnext, inputs,
                                                          sd15_layout=sd15_layout,
                                                          reference_pose_per_window=reference_pose_per_window))


class ControlNeXtSVDLongVideo(io.ComfyNode):
    """Makes an SVD MODEL denoise videos longer than one window the way the ControlNeXt-SVD v2 authors do: at
    every sampler step the video runs in windows of frames_per_window frames overlapping by overlap frames
    (the last window moved back to end at the last frame), each window from the same sigma, fused by a flat
    average that leaves out position 0 of every window not starting at frame 0. With Apply ControlNeXt (SVD
    v2) every window gets the reference pose (frame 0) at its first position. Any sampler and scheduler."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_ControlNeXtSVDLongVideo", LONG_VIDEO_NODE, CATEGORY, inputs=[
            io.Model.Input("model", tooltip="An SVD model (e.g. the ControlNeXt-SVD v2 UNet), before or after Apply ControlNeXt."),
            io.Int.Input("frames_per_window", default=24, min=1, max=4096, tooltip="Frames the UNet sees per call (the authors' script: 24). A video this short or shorter is one window."),
            io.Int.Input("overlap", default=6, min=0, max=4095, tooltip="Frames shared by consecutive windows (the authors' script: 6); at least 1, fewer than frames_per_window."),
            io.Combo.Input("cfg_ramp", options=["constant", "linear"], default="constant", tooltip="constant: the sampler's cfg on every frame (the authors' script). linear: per window position, cfg rises from min_cfg (position 0) to the sampler's cfg (last position) before the windows are fused, as the reference pipeline's min/max guidance does."),
            io.Float.Input("min_cfg", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="cfg at window position 0 with cfg_ramp = linear; ignored with constant."),
        ], outputs=[io.Model.Output()])

    @classmethod
    def validate_inputs(cls, frames_per_window, overlap):
        return check_window_inputs(frames_per_window, overlap)

    @classmethod
    def execute(cls, model, frames_per_window, overlap, cfg_ramp="constant", min_cfg=1.0):
        return io.NodeOutput(windowed_model(model, frames_per_window, overlap, cfg_ramp, min_cfg))


class SVDReferenceConditioning(io.ComfyNode):
    """Stable Video Diffusion image-to-video conditioning as the ControlNeXt-SVD v2 (diffusers) pipeline makes
    it: the reference image resized to cover width x height and center-cropped; CLIP vision sees the whole
    image squashed to 224 x 224 with the pipeline's antialiased resize (ComfyUI's SVD_img2vid_Conditioning
    crops it to a centered square, losing head and feet of a portrait); the noise augmentation is added in
    [-1, 1] pixel space (ComfyUI's node adds twice as much) from a seed. Same outputs as
    SVD_img2vid_Conditioning."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_SVDReferenceConditioning", "SVD Conditioning, reference pipeline (XCtrl)", CATEGORY, inputs=[
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
        ], outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
            io.Latent.Output(display_name="latent")])

    @classmethod
    def execute(cls, clip_vision, init_image, vae, width, height, video_frames, motion_bucket_id, fps, augmentation_level, seed=0):
        return io.NodeOutput(*reference_conditioning(clip_vision, init_image, vae, width, height, video_frames,
                                                     motion_bucket_id, fps, augmentation_level, seed))


NODES = [LoadControlNeXt, ApplyControlNeXt, ControlNeXtSVDLongVideo, SVDReferenceConditioning, ApplyControlNeXtConditioning]

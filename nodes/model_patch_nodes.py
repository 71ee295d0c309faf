"""Apply nodes for ComfyUI's model-patch controls (Z-Image Fun ControlNet, Qwen-Image DiffSynth
ControlNet): core's inputs, then a step range, schedules, latent strengths and a mask on the
control's residual (runtime/model_patch_apply.py)."""
from comfy_api.latest import io

from ..runtime import model_patch_apply as mpa
from ..runtime import model_patch_control as mpc
from ..runtime.control_inputs import node_label
from .apply_inputs import NODE_REFERENCE, ApplyNode, step_range_inputs, strength_inputs
from .schema import node_schema

CATEGORY = "XCtrl/model patches"
ModelPatchType = getattr(io, "ModelPatch", None) or io.Custom("MODEL_PATCH")
STRENGTH = dict(default=1.0, min=-10.0, max=10.0, step=0.01)


def our_inputs():
    return [
        *step_range_inputs(),
        io.Mask.Input("control_mask", optional=True, tooltip=(
            "Where the control acts (1 = full control), applied to its residual on the image tokens; not the inpaint "
            "mask. One mask for every latent or one per latent, of the image's aspect ratio.")),
        *strength_inputs(),
    ]


def patch_apply_schema(cls, node_id, core_inputs):
    """Core's node's inputs (model, model_patch and vae first, then its own), then ours; a MODEL out."""
    return node_schema(
        cls, node_id, cls.TITLE, CATEGORY, hidden=NODE_REFERENCE,
        inputs=[io.Model.Input("model"), ModelPatchType.Input("model_patch"), io.Vae.Input("vae"), *core_inputs,
                *our_inputs()],
        outputs=[io.Model.Output(display_name="model")],
    )


class ApplyZImageFunControlNet(ApplyNode):
    """ComfyUI's Apply Z-Image Fun ControlNet (same inputs, same result by default) with a step range, step
    keyframe schedules, per-latent strengths, an uncond multiplier and a mask on the control's residual.
    Several of them can be balanced with MI Balanced Model Patches."""

    TITLE = "Apply Z-Image Fun ControlNet (XCtrl)"

    @classmethod
    def define_schema(cls):
        return patch_apply_schema(cls, "XCtrl_ApplyZImageFunControlNet", [
            io.Float.Input("strength", **STRENGTH),
            io.Image.Input("image", optional=True), io.Image.Input("inpaint_image", optional=True),
            io.Mask.Input("mask", optional=True, tooltip="The inpaint mask, as in core's node."),
        ])

    @classmethod
    def execute(cls, model, model_patch, vae, strength, image=None, inpaint_image=None, mask=None, start_percent=0.0,
                end_percent=1.0, control_mask=None, schedule=None, latent_strengths=None, uncond_multiplier=1.0):
        core = dict(vae=vae, image=image, strength=strength, inpaint_image=inpaint_image, mask=mask)
        return io.NodeOutput(mpa.apply_node(mpc.ZIMAGE, node_label(cls.TITLE, cls.hidden), model, model_patch, core,
                                            start_percent, end_percent, control_mask, schedule, latent_strengths,
                                            uncond_multiplier))


class ApplyQwenImageDiffsynthControlNet(ApplyNode):
    """ComfyUI's Apply Qwen Image DiffSynth ControlNet (same inputs, same result by default) with a step range,
    step keyframe schedules, per-latent strengths, an uncond multiplier and a mask on the control's residual.
    Several of them can be balanced with MI Balanced Model Patches."""

    TITLE = "Apply Qwen Image DiffSynth ControlNet (XCtrl)"

    @classmethod
    def define_schema(cls):
        return patch_apply_schema(cls, "XCtrl_ApplyQwenImageDiffsynthControlNet", [
            io.Image.Input("image"), io.Float.Input("strength", **STRENGTH),
            io.Mask.Input("mask", optional=True, tooltip="The inpaint mask, as in core's node."),
        ])

    @classmethod
    def execute(cls, model, model_patch, vae, image, strength, mask=None, start_percent=0.0, end_percent=1.0,
                control_mask=None, schedule=None, latent_strengths=None, uncond_multiplier=1.0):
        core = dict(vae=vae, image=image, strength=strength, mask=mask)
        return io.NodeOutput(mpa.apply_node(mpc.QWEN, node_label(cls.TITLE, cls.hidden), model, model_patch, core,
                                            start_percent, end_percent, control_mask, schedule, latent_strengths,
                                            uncond_multiplier))


NODES = [ApplyZImageFunControlNet, ApplyQwenImageDiffsynthControlNet]

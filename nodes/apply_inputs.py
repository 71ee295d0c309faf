"""Schemas several node files share: the pack's own socket types, and the inputs every Apply node of a
control method has (condition image, step range, mask, resize mode, schedule, latent strengths,
uncond multiplier). Their checks: runtime/control_inputs.py."""
from comfy_api.latest import io

from ..runtime.control_inputs import check_step_range
from .schema import node_schema

IMAGE_TIP = ("Condition image ({what}), RGB in [0, 1]; resized to the generated image size. A batch of 1 serves every "
             "latent; otherwise one per latent.")
ControlNeXtType = io.Custom("XCTRL_CONTROLNEXT")
ControlNetXSType = io.Custom("XCTRL_CONTROLNET_XS")
StepScheduleType = io.Custom("XCTRL_STEP_SCHEDULE")
LatentStrengthsType = io.Custom("XCTRL_LATENT_STRENGTHS")
# The hidden inputs an Apply node reads to name itself in errors: its id in the graph and the prompt (its title)
NODE_REFERENCE = [io.Hidden.unique_id, io.Hidden.prompt]
# Advanced-ControlNet's types, accepted as they are
AcnTimestepKeyframe = io.Custom("TIMESTEP_KEYFRAME")
AcnLatentKeyframe = io.Custom("LATENT_KEYFRAME")


def image_input(what):
    return io.Image.Input("image", tooltip=IMAGE_TIP.format(what=what))


def step_range_inputs():
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
    ]


def resize_mode_input():
    return io.Combo.Input("resize_mode", optional=True, options=["crop", "stretch", "pad"], default="crop",
                          tooltip="A condition image of another shape than the generated image: crop its centre (as "
                          "ComfyUI's Apply ControlNet does), stretch it, or pad it with black borders.")


def mask_input():
    return io.Mask.Input("mask", optional=True, tooltip="Where to apply the control (1 = full control): one mask for "
                         "every latent or one per latent, of the image's aspect ratio; resized to each resolution the "
                         "control acts at.")


def strength_inputs():
    """The optional inputs every Apply node of ours appends (after its published ones)."""
    return [
        io.MultiType.Input("schedule", types=[StepScheduleType, AcnTimestepKeyframe], optional=True,
                           tooltip="Strength over the sampling steps: from Step Keyframe (XCtrl) nodes or Advanced-ControlNet's "
                                   "timestep keyframes. Multiplies strength."),
        io.MultiType.Input("latent_strengths", types=[LatentStrengthsType, AcnLatentKeyframe], optional=True,
                           tooltip="Strength per latent (video frame, batch item): from Latent Strengths (XCtrl) or "
                                   "Advanced-ControlNet's latent keyframes (latents not listed there get no control). "
                                   "Multiplies strength."),
        io.Float.Input("uncond_multiplier", optional=True, default=1.0, min=0.0, max=10.0, step=0.01,
                       tooltip="Multiplies the control on the negative (uncond) prompt's rows. 1 = as the reference "
                               "pipelines; 0 = the control acts on the positive only ('ControlNet is more important')."),
    ]


def control_inputs(what, strength_tip, method_inputs=()):
    """An Apply node's inputs after its MODEL / conditioning and control, in their published order:
    the condition image, strength, step range and mask, the method's own inputs, then the inputs
    appended since (schedule, latent strengths, uncond multiplier, resize mode)."""
    return [
        image_input(what),
        io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01, tooltip=strength_tip),
        *step_range_inputs(),
        mask_input(),
        *method_inputs,
        *strength_inputs(),
        resize_mode_input(),
    ]


def conditioning_inputs():
    """The first inputs of an Apply ... to Conditioning node; its outputs: conditioning_outputs()."""
    return [
        io.Conditioning.Input("positive"),
        io.Conditioning.Input("negative"),
        io.Model.Input("model", tooltip="The MODEL these conditionings will be sampled with (read only)."),
    ]


def conditioning_outputs():
    return [io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")]


class ApplyNode(io.ComfyNode):
    """An Apply node with step_range_inputs: a reversed or out-of-range step range is refused before
    the graph runs (ComfyUI skips its own min/max check for inputs validate_inputs names)."""

    NODE = None  # the node's title

    @classmethod
    def model_schema(cls, node_id, category, control, what, strength_tip, method_inputs=()):
        """An Apply node on a MODEL: the MODEL, the loaded control, control_inputs(); the patched MODEL out."""
        return node_schema(cls, node_id, cls.NODE, category, hidden=NODE_REFERENCE, inputs=[
            io.Model.Input("model"), control, *control_inputs(what, strength_tip, method_inputs),
        ], outputs=[io.Model.Output()])

    @classmethod
    def validate_inputs(cls, start_percent, end_percent):
        return check_step_range(start_percent, end_percent)

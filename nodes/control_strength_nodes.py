"""Strength schedules and per-latent strengths for the Apply nodes: our own nodes, and
Advanced-ControlNet's TIMESTEP_KEYFRAME / LATENT_KEYFRAME outputs read through their public
attributes (never importing that pack: without it nothing here costs anything).

Semantics: models/control_schedule.py and docs/schedules.md.
"""
from comfy_api.latest import io

from ..runtime.control_inputs import HOLD, INTERPOLATIONS, add_keyframe, check_latent_strength_list, latent_strength_list
from .apply_inputs import LatentStrengthsType, StepScheduleType
from .schema import node_schema

CATEGORY = "XCtrl/schedules"


class StepKeyframeNode(io.ComfyNode):
    """One keyframe of a strength schedule over the sampling steps, for Apply ControlNeXt / ControlNet-XS
    (XCtrl). Chain them: each adds its keyframe to the previous ones. From start_percent on (the share of
    sampling done) the control's strength is multiplied by strength; 'linear' moves it to the next keyframe's
    strength by the next keyframe's start. Before the first keyframe the multiplier is 1."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_StepKeyframe", "Step Keyframe (XCtrl)", CATEGORY, inputs=[
            StepScheduleType.Input("previous", optional=True),
            io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
            io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01),
            io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default=HOLD,
                           tooltip="hold: this strength until the next keyframe; linear: towards the next keyframe's."),
            io.Int.Input("guarantee_steps", default=1, min=0, max=10000,
                         tooltip="Steps this keyframe stays active even if later keyframes have started (0: none)."),
        ], outputs=[StepScheduleType.Output(display_name="schedule")])

    @classmethod
    def execute(cls, start_percent, strength, interpolation, guarantee_steps, previous=None):
        return io.NodeOutput(add_keyframe(previous, start_percent, strength, interpolation, guarantee_steps,
                                          "Step Keyframe (XCtrl)"))


class LatentStrengthsNode(io.ComfyNode):
    """A strength per latent (video frame or batch item) for Apply ControlNeXt / ControlNet-XS (XCtrl): one value
    for every latent, or exactly one per latent (checked before sampling). Under context windows each window
    gets its frames' strengths."""

    @classmethod
    def define_schema(cls):
        return node_schema(
            cls, "XCtrl_LatentStrengths", "Latent Strengths (XCtrl)", CATEGORY,
            inputs=[io.String.Input("strengths", default="1.0", multiline=True,
                                    tooltip="Numbers separated by commas, e.g. 1.0, 0.8, 0.6")],
            outputs=[LatentStrengthsType.Output(display_name="latent_strengths")],
        )

    @classmethod
    def validate_inputs(cls, strengths):
        return check_latent_strength_list(strengths, "Latent Strengths (XCtrl)")

    @classmethod
    def execute(cls, strengths):
        return io.NodeOutput(latent_strength_list(strengths, "Latent Strengths (XCtrl)"))


NODES = [StepKeyframeNode, LatentStrengthsNode]

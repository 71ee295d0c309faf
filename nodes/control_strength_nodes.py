"""Strength schedules and per-latent strengths for the Apply nodes: our own nodes, and
Advanced-ControlNet's TIMESTEP_KEYFRAME / LATENT_KEYFRAME outputs read through their public
attributes (never importing that pack: without it nothing here costs anything).

Semantics: models/control_schedule.py and docs/schedules.md.
"""
from comfy_api.latest import io

from ..models.control_schedule import (HOLD, INTERPOLATIONS, LatentStrengths, ScheduleError, StepKeyframe, StepSchedule,
                                       Strengths, parse_strength_list)

CATEGORY = "XCtrl/schedules"
StepScheduleType = io.Custom("XCTRL_STEP_SCHEDULE")
LatentStrengthsType = io.Custom("XCTRL_LATENT_STRENGTHS")
# Advanced-ControlNet's types, accepted as they are
AcnTimestepKeyframe = io.Custom("TIMESTEP_KEYFRAME")
AcnLatentKeyframe = io.Custom("LATENT_KEYFRAME")


class Keyframes:
    """What our keyframe node passes on: the keyframes so far (a new list per node)."""

    def __init__(self, keyframes):
        self.keyframes = tuple(keyframes)


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


def strengths_from(schedule, latent_strengths, uncond_multiplier, node):
    """Strengths from the Apply node's optional inputs (ours or Advanced-ControlNet's objects)."""
    try:
        return Strengths(to_schedule(schedule, node), to_latent_strengths(latent_strengths, node), float(uncond_multiplier))
    except ScheduleError:
        raise
    except (AttributeError, TypeError, ValueError) as e:
        raise ScheduleError(f"{node}: the schedule input is not a keyframe list this node can read ({e})") from None


def to_schedule(obj, node):
    if obj is None:
        return None
    if isinstance(obj, Keyframes):
        return StepSchedule(obj.keyframes, node)
    # Advanced-ControlNet: TimestepKeyframeGroup.keyframes, sorted, each with start_percent, strength,
    # guarantee_steps, latent_keyframes (+ null_latent_kf_strength, inherit_missing)
    keyframes = []
    for tk in obj.keyframes:
        latents = None
        if getattr(tk, "latent_keyframes", None) is not None:
            latents = _acn_latents(tk.latent_keyframes, getattr(tk, "null_latent_kf_strength", 0.0))
        elif not getattr(tk, "inherit_missing", True):
            latents = LatentStrengths()  # no latent strengths from here on
        keyframes.append(StepKeyframe(float(tk.start_percent), float(tk.strength), int(getattr(tk, "guarantee_steps", 1)),
                                      HOLD, latents))
    return StepSchedule(keyframes, node)


def to_latent_strengths(obj, node):
    if obj is None:
        return None
    if isinstance(obj, LatentStrengths):
        return obj
    return _acn_latents(obj, 0.0)


def _acn_latents(group, missing):
    """LatentKeyframeGroup.keyframes: each with batch_index (negative from the end) and strength."""
    return LatentStrengths(values={int(k.batch_index): float(k.strength) for k in group.keyframes}, missing=float(missing))


class StepKeyframeNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XCtrl_StepKeyframe",
            display_name="Step Keyframe (XCtrl)",
            category=CATEGORY,
            description=(
                "One keyframe of a strength schedule over the sampling steps, for Apply ControlNeXt / ControlNet-XS "
                "(XCtrl). Chain them: each adds its keyframe to the previous ones. From start_percent on (the share of "
                "sampling done) the control's strength is multiplied by strength; 'linear' moves it to the next "
                "keyframe's strength by the next keyframe's start. Before the first keyframe the multiplier is 1."
            ),
            inputs=[
                StepScheduleType.Input("previous", optional=True),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default=HOLD,
                               tooltip="hold: this strength until the next keyframe; linear: towards the next keyframe's."),
                io.Int.Input("guarantee_steps", default=1, min=0, max=10000,
                             tooltip="Steps this keyframe stays active even if later keyframes have started (0: none)."),
            ],
            outputs=[StepScheduleType.Output(display_name="schedule")],
        )

    @classmethod
    def execute(cls, start_percent, strength, interpolation, guarantee_steps, previous=None):
        before = list(previous.keyframes) if previous is not None else []
        if before and start_percent < before[-1].start_percent:
            raise ScheduleError(f"Step Keyframe (XCtrl): this keyframe starts at {start_percent}, before the previous one "
                                f"({before[-1].start_percent}): chain keyframes in order of start_percent")
        return io.NodeOutput(Keyframes(before + [StepKeyframe(start_percent, strength, guarantee_steps, interpolation)]))


class LatentStrengthsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XCtrl_LatentStrengths",
            display_name="Latent Strengths (XCtrl)",
            category=CATEGORY,
            description=(
                "A strength per latent (video frame or batch item) for Apply ControlNeXt / ControlNet-XS (XCtrl): one "
                "value for every latent, or exactly one per latent (checked before sampling). Under context windows "
                "each window gets its frames' strengths."
            ),
            inputs=[io.String.Input("strengths", default="1.0", multiline=True,
                                    tooltip="Numbers separated by commas, e.g. 1.0, 0.8, 0.6")],
            outputs=[LatentStrengthsType.Output(display_name="latent_strengths")],
        )

    @classmethod
    def validate_inputs(cls, strengths):
        if strengths is None:  # linked: parsed when the node runs
            return True
        try:
            parse_strength_list(strengths, "Latent Strengths (XCtrl)")
        except ScheduleError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, strengths):
        return io.NodeOutput(LatentStrengths.from_list(parse_strength_list(strengths, "Latent Strengths (XCtrl)")))


NODES = [StepKeyframeNode, LatentStrengthsNode]

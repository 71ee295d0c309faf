"""The inputs every Apply node of a control method shares (condition image, strength, step range,
mask, schedule, latent strengths, uncond multiplier, resize mode): their checks and conversion,
done once when the node runs. Schedule semantics: models/control_schedule.py, docs/schedules.md."""
import math

import torch

from ..models.control_schedule import (HOLD, INTERPOLATIONS, LatentStrengths, ScheduleError, StepKeyframe, StepSchedule, Strengths,
                                       parse_strength_list)
from . import batch_rows

__all__ = ["INTERPOLATIONS"]  # re-exported for the Step Keyframe node's choices


class Keyframes:
    """What Step Keyframe (XCtrl) passes on: the keyframes so far (a new tuple per node)."""

    def __init__(self, keyframes):
        self.keyframes = tuple(keyframes)


class ControlInputs:
    """The shared Apply inputs, checked (range, NaN / inf) and converted to what a runner takes."""

    def __init__(self, node, image, strength, start_percent, end_percent, mask=None, schedule=None, latent_strengths=None,
                 uncond_multiplier=1.0, resize_mode="crop", **numbers):
        require_step_range(start_percent, end_percent, node)
        require_finite(node, image=image, mask=mask, strength=strength, uncond_multiplier=uncond_multiplier, **numbers)
        self.node = node
        self.hint = batch_rows.image_to_nchw(image)
        self.strength = strength
        self.start_percent, self.end_percent = start_percent, end_percent
        self.mask = mask_batch(mask)
        self.strengths = strengths_from(schedule, latent_strengths, uncond_multiplier, node)
        self.resize_mode = resize_mode

    def configure(self, runner):
        """The runner names this node in its errors and fits hints with this resize mode."""
        runner.NODE = self.node
        runner.fit_mode = self.resize_mode
        return runner


def node_label(display_name, hidden=None):
    """How the errors of an Apply node name it: its display name, then its id in the graph (the
    number the frontend's node id badge shows) and its title when the user renamed it. An error
    that only the latent batch reveals comes while the sampler runs, and ComfyUI marks the sampler
    (docs/comfyui_hooks.md, "Where errors appear"): the id still leads to the node to change.
    ``hidden``: the node's hidden inputs (``cls.hidden``; None when called outside an executor)."""
    unique_id = getattr(hidden, "unique_id", None)
    if unique_id is None:
        return display_name
    node = (getattr(hidden, "prompt", None) or {}).get(str(unique_id)) or {}
    title = (node.get("_meta") or {}).get("title") if isinstance(node, dict) else None
    renamed = f" '{title}'" if isinstance(title, str) and title and title != display_name else ""
    return f"{display_name} (node #{unique_id}{renamed})"


def mask_batch(mask):
    """ComfyUI MASK (B, H, W) or (H, W) -> (B, 1, H, W) float32; None without a mask or for one
    that is 1 everywhere (full control: the output stays bit for bit the unmasked one)."""
    if mask is None or bool((mask == 1).all()):
        return None
    return (mask if mask.dim() == 3 else mask.reshape(-1, *mask.shape[-2:])).float().unsqueeze(1)


def check_step_range(start_percent, end_percent):
    """True, or the message validate_inputs shows. ComfyUI skips its own min/max checks for the
    inputs a validate_inputs names, so the range is checked here; a linked input arrives as None
    at validation and is checked when the node runs (require_step_range)."""
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if value is not None and not 0.0 <= value <= 1.0:  # NaN fails too
            return f"{name} must be between 0 and 1, got {value}"
    if start_percent is not None and end_percent is not None and start_percent > end_percent:
        return f"start_percent ({start_percent}) is after end_percent ({end_percent}): set start_percent <= end_percent"
    return True


def require_step_range(start_percent, end_percent, node):
    """check_step_range when the node runs (values from links were not seen at validation)."""
    message = check_step_range(start_percent, end_percent)
    if message is not True:
        raise ValueError(f"{node}: {message}")


def require_finite(node, **values):
    """Refuses NaN / inf in numbers and images (they would turn the whole result into NaN without a
    word): {input name: float, tensor or None}."""
    for name, value in values.items():
        if value is None:
            continue
        finite = bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else math.isfinite(float(value))
        if not finite:
            raise ValueError(f"{node}: the {name} input contains NaN or infinite values: fix the node that feeds it")


def strengths_from(schedule, latent_strengths, uncond_multiplier, node):
    """Strengths from the Apply node's optional inputs (ours or Advanced-ControlNet's objects, read
    through their public attributes: that pack is never imported)."""
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


def add_keyframe(previous, start_percent, strength, interpolation, guarantee_steps, node):
    """Step Keyframe: the previous keyframes plus this one, which must not start before them."""
    require_finite(node, start_percent=start_percent, strength=strength)
    before = list(previous.keyframes) if previous is not None else []
    if before and start_percent < before[-1].start_percent:
        raise ScheduleError(f"{node}: this keyframe starts at {start_percent}, before the previous one "
                            f"({before[-1].start_percent}): chain keyframes in order of start_percent")
    return Keyframes(before + [StepKeyframe(start_percent, strength, guarantee_steps, interpolation)])


def check_latent_strength_list(text, node):
    """True, or the message validate_inputs shows; a linked input (None) is parsed when the node runs."""
    if text is None:
        return True
    try:
        parse_strength_list(text, node)
    except ScheduleError as e:
        return str(e)
    return True


def latent_strength_list(text, node):
    """Latent Strengths' text as per-latent strengths (ScheduleError naming the node if unreadable)."""
    return LatentStrengths.from_list(parse_strength_list(text, node))

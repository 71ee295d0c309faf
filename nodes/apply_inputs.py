"""Inputs every Apply node of a control method shares (condition image, step range, mask), and their checks."""
import math

import torch

from comfy_api.latest import io

IMAGE_TIP = ("Condition image ({what}), RGB in [0, 1]; resized to the generated image size. A batch of 1 serves every "
             "latent; otherwise one per latent.")


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

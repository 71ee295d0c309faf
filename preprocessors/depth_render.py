"""Rendering a depth estimate as a control image.

Input: a relative depth map as depth estimators give it (Depth Anything, MiDaS): larger =
nearer (inverse depth / disparity). It is min-max normalised to 0..255 with a truncating uint8
cast, as the Depth Anything V2 reference and the annotators do (a constant map gives 0).

- `render_grey`: white = near, black = far, 3 equal channels (ControlNet depth models).
- `render_viridis`: the viridis colormap in RGB (OpenCV's applyColorMap returns BGR; it is
  reversed here). The ControlNeXt depth models (SD1.5 and SDXL vidit_depth) were trained on the
  VIDIT depth dataset, whose condition images (ControlNeXt-SDXL/examples/vidit_depth/
  condition_0.png) are viridis in RGB order with the colour rising with *distance*: near =
  dark purple (68, 1, 84), far = yellow (253, 231, 37). Hence `near="dark"` by default, which
  renders 255 - disparity. (VIDIT stores metric depth with the sky at 0; a relative estimate
  can only approximate that: the sky comes out yellow.)
"""
import cv2
import numpy as np
import torch

NEAR_OPTIONS = ("dark", "bright")


def normalize_depth(depth):
    """2-D float map -> uint8 0..255 by min-max (truncating cast); a constant map gives zeros.

    "Constant" allows float32 rounding (a range below 1e-6 of the values): a flat prediction
    resized bilinearly would otherwise come out as full-range noise."""
    d = _as_2d(depth)
    lo, hi = float(d.min()), float(d.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("The depth map contains NaN or infinite values.")
    if hi - lo <= 1e-6 * max(abs(hi), abs(lo)):
        return np.zeros(d.shape, np.uint8)
    return ((d - lo) / (hi - lo) * 255.0).astype(np.uint8)


def render_grey(depth):
    """Disparity-like map -> (H, W, 3) uint8, white = near."""
    return np.repeat(normalize_depth(depth)[:, :, None], 3, axis=2)


def render_viridis(depth, near="dark"):
    """Disparity-like map -> (H, W, 3) uint8 RGB viridis; near = "dark" (as ControlNeXt's
    training data) or "bright"."""
    if near not in NEAR_OPTIONS:
        raise ValueError(f"near must be one of {NEAR_OPTIONS}, got {near!r}.")
    value = normalize_depth(depth)
    if near == "dark":
        value = 255 - value
    return cv2.applyColorMap(value, cv2.COLORMAP_VIRIDIS)[:, :, ::-1].copy()


def _as_2d(depth):
    if isinstance(depth, torch.Tensor):
        depth = depth.detach().to("cpu", torch.float64).numpy()
    d = np.asarray(depth, dtype=np.float64)
    if d.ndim == 3 and d.shape[2] in (1, 3):  # a greyscale rendering passed back in: use one channel
        d = d[:, :, 0]
    if d.ndim != 2:
        raise ValueError(f"Expected a 2-D depth map (H, W), got shape {d.shape}.")
    if d.size == 0:
        raise ValueError(f"The depth map has zero size ({d.shape[0]} x {d.shape[1]}).")
    return d

"""Batches of frames: the sizes a preprocessor works and answers at, and batched processing.

Size rule shared by the XCtrl preprocessor nodes (one place: `plan_sizes`; docs/preprocessors.md,
"Sizes and limits"):
- Aspect ratio: an image whose longer side is more than `MAX_ASPECT` times its shorter side is
  refused before anything is allocated (scaling its shorter side to `resolution` would make a
  huge working image; no control model was trained on such shapes).
- Working size (what the network sees): shorter side = `resolution` (input size when
  resolution <= 0), aspect kept, each side rounded; when that exceeds the network's pixel limit
  (`max_pixels`, in each network's module), it is scaled down to the limit, aspect kept, with a
  warning naming the node, the sizes and the largest resolution that fits.
- Output size (`output_size` input): "input" = the input image's H x W (memory in proportion to
  the input); "resolution" = shorter side equal to `resolution`, aspect kept, each side rounded
  (e.g. 1280 x 720 at 512 -> 910 x 512), capped at `MAX_OUTPUT_PIXELS` like the working size;
  resolution <= 0 keeps the input size.
"""
import logging
import math

import cv2
import numpy as np

from .image_io import pad_to_multiple, scaled_size

LOG = logging.getLogger("xctrl")
OUTPUT_SIZES = ("input", "resolution")
MAX_ASPECT = 16  # longer side / shorter side
MAX_OUTPUT_PIXELS = 4096 * 4096  # an output frame of at most 16.8 MP (201 MB as an IMAGE)
CALL_PIXELS = 1 << 20  # working pixels per network call: frames are batched up to this (at least 1)


def check_aspect(height, width, who):
    """Refuses images beyond MAX_ASPECT : 1 (see module docstring); `who` names the node."""
    if min(height, width) * MAX_ASPECT < max(height, width):
        raise ValueError(
            f"{who}: the image is {width} x {height} pixels (aspect ratio {max(height, width) / min(height, width):.0f}:1); "
            f"preprocessors take aspect ratios up to {MAX_ASPECT}:1, as scaling the shorter side to the resolution would "
            f"make a huge working image. Crop or pad the image to at most {MAX_ASPECT}:1 first (e.g. ImageCrop, or "
            f"Pad Image for Outpainting)."
        )


def capped(height, width, max_pixels):
    """(H, W) scaled down, aspect kept, to at most `max_pixels` (unchanged when within it or None)."""
    if max_pixels is None or height * width <= max_pixels:
        return height, width
    k = math.sqrt(max_pixels / (height * width))
    return max(1, int(height * k)), max(1, int(width * k))


def limited_size(height, width, resolution, max_pixels, who, what):
    """Shorter side = resolution (input size when <= 0), capped at `max_pixels` with a warning."""
    h, w = scaled_size(height, width, resolution)
    ch, cw = capped(h, w, max_pixels)
    if (ch, cw) != (h, w):
        fits = int(math.sqrt(max_pixels * min(height, width) / max(height, width)))
        LOG.warning(
            "[XCtrl] %s: %s %d x %d (resolution %s on a %d x %d image) is above the limit of %.1f MP; "
            "using %d x %d instead. Set resolution to at most %d for this image to avoid the downscale.",
            who, what, w, h, resolution, width, height, max_pixels / 1e6, cw, ch, fits,
        )
    return ch, cw


def output_hw(height, width, resolution, output_size, who="XCtrl preprocessor"):
    """(H, W) of a node's output for an input of height x width (see module docstring)."""
    if output_size not in OUTPUT_SIZES:
        raise ValueError(f"output_size must be one of {OUTPUT_SIZES}, got {output_size!r}.")
    if output_size == "input":
        return height, width
    return limited_size(height, width, resolution, MAX_OUTPUT_PIXELS, who, "output size")


def plan_sizes(height, width, resolution, output_size, max_pixels, who, work_resolution=None):
    """((work H, W), (output H, W)) for one input size, after the aspect check (module docstring).
    `work_resolution` replaces `resolution` for the working size (a network's own default)."""
    check_aspect(height, width, who)
    res = resolution if work_resolution is None else work_resolution
    work = limited_size(height, width, res, max_pixels, who, "working size")
    return work, output_hw(height, width, resolution, output_size, who)


def frames_per_call(work_hw, most):
    """How many frames of the working size one network call takes: up to CALL_PIXELS, 1..most."""
    return max(1, min(int(most), CALL_PIXELS // max(1, work_hw[0] * work_hw[1])))


def resize(image, height, width):
    """cv2 resize of one (H, W[, C]) array: INTER_AREA when shrinking, INTER_CUBIC for uint8
    enlarging, INTER_LINEAR for float maps enlarging; unchanged when the size already matches."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    if height * width < h * w:
        mode = cv2.INTER_AREA
    else:
        mode = cv2.INTER_CUBIC if image.dtype == np.uint8 else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=mode)


def batched_at_resolution(images, resolution, fn, output_hw_=None, multiple=64):
    """`batched_at_size` with the working size of the `resolution` convention (shorter side =
    resolution, no cap)."""
    images = np.asarray(images)
    return batched_at_size(images, scaled_size(*images.shape[1:3], resolution), fn, output_hw_, multiple)


def batched_at_size(images, size, fn, output_hw_=None, multiple=64):
    """(B, H, W, 3) uint8 frames resized to `size` (H, W), edge-padded (bottom/right) to a multiple
    of `multiple`, passed to `fn(batch) -> (B, H', W'[, C])` maps of the padded size; the padding
    is cropped and each map resized (INTER_AREA shrinking, INTER_LINEAR enlarging) to `output_hw_`
    (default: `size`)."""
    images = np.asarray(images)
    b, h, w = images.shape[:3]
    th, tw = size
    scaled = np.stack([resize(img, th, tw) for img in images]) if (th, tw) != (h, w) else images
    padded = np.stack([pad_to_multiple(img, multiple) for img in scaled])
    maps = np.asarray(fn(padded))
    if maps.shape[:3] != padded.shape[:3]:
        raise ValueError(f"The processing step returned shape {maps.shape} for a batch of shape {padded.shape[:3]}.")
    oh, ow = output_hw_ if output_hw_ is not None else (th, tw)
    out = []
    for m in maps:
        m = np.ascontiguousarray(m[:th, :tw])
        if (oh, ow) != (th, tw):
            mode = cv2.INTER_AREA if oh * ow < th * tw else cv2.INTER_LINEAR
            m = cv2.resize(m, (ow, oh), interpolation=mode)
        out.append(m)
    return np.stack(out)


def chunks(count, size):
    """[(start, stop)] covering range(count) in pieces of at most `size` (>= 1)."""
    size = max(1, int(size))
    return [(s, min(count, s + size)) for s in range(0, count, size)]

"""Batches of frames: output sizes and batched processing at a resolution.

Output size rule shared by the XCtrl preprocessor nodes (`output_size` input):
- "input": the map has the input image's H x W.
- "resolution": the shorter side equals `resolution`, aspect ratio kept, each side rounded
  (e.g. 1280 x 720 at resolution 512 -> 910 x 512); resolution <= 0 keeps the input size.
"""
import cv2
import numpy as np

from .image_io import pad_to_multiple, scaled_size

OUTPUT_SIZES = ("input", "resolution")


def output_hw(height, width, resolution, output_size):
    """(H, W) of a node's output for an input of height x width (see module docstring)."""
    if output_size not in OUTPUT_SIZES:
        raise ValueError(f"output_size must be one of {OUTPUT_SIZES}, got {output_size!r}.")
    return (height, width) if output_size == "input" else scaled_size(height, width, resolution)


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
    """The `resolution` convention over a batch: (B, H, W, 3) uint8 frames scaled so the shorter
    side is `resolution`, edge-padded (bottom/right) to a multiple of `multiple`, passed to
    `fn(batch) -> (B, H', W'[, C])` maps of the padded size; the padding is cropped and each map
    resized (INTER_AREA shrinking, INTER_LINEAR enlarging) to `output_hw_` (default: the scaled size)."""
    images = np.asarray(images)
    b, h, w = images.shape[:3]
    th, tw = scaled_size(h, w, resolution)
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

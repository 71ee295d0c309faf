"""MIControlNet's measurements on generated images (docs/mi_training.md, "Measurements").

Images are (N, H, W, C) float in [0, 1] (ComfyUI's IMAGE layout). A silent region is where a
condition is empty: no condition pixel brighter than ``threshold`` within ``radius`` pixels.

- total variation inside the silent region: how much detail the generated image has where the
  condition says nothing (the paper's "total variance under silent control signals");
- cycle consistency: mean L1 between the condition and the one extracted from the generated
  image, outside the silent region.
"""
import torch


def active_region(condition, threshold=0.04, radius=0):
    """(N, H, W) bool: within ``radius`` px (Chebyshev distance) of a condition pixel whose
    brightest channel exceeds ``threshold``."""
    active = (condition.amax(-1) > threshold).float()[:, None]
    if radius > 0:
        active = torch.nn.functional.max_pool2d(active, 2 * radius + 1, stride=1, padding=radius)
    return active[:, 0] > 0.5


def silent_region(condition, threshold=0.04, radius=0):
    """(N, H, W) bool: the complement of :func:`active_region`."""
    return ~active_region(condition, threshold, radius)


def total_variation(image, region):
    """Anisotropic total variation of ``image`` inside ``region``, per image.

    Sums |I(y, x+1) - I(y, x)| over horizontal and |I(y+1, x) - I(y, x)| over vertical
    neighbour pairs whose two pixels are both in the region, over all channels. Returns
    (sum (N,), pairs (N,), mean (N,) = sum / (pairs * C), 0 where there are no pairs).
    """
    img = image.double()
    reg = region.bool()
    dx = (img[:, :, 1:] - img[:, :, :-1]).abs().sum(-1) * (reg[:, :, 1:] & reg[:, :, :-1])
    dy = (img[:, 1:] - img[:, :-1]).abs().sum(-1) * (reg[:, 1:] & reg[:, :-1])
    total = dx.sum((1, 2)) + dy.sum((1, 2))
    pairs = (reg[:, :, 1:] & reg[:, :, :-1]).sum((1, 2)) + (reg[:, 1:] & reg[:, :-1]).sum((1, 2))
    mean = torch.where(pairs > 0, total / (pairs.double() * img.shape[-1]).clamp(min=1), torch.zeros_like(total))
    return total, pairs, mean


def masked_l1(a, b, region):
    """Per image: (sum of |a - b| over the region's pixels and all channels, region pixels,
    mean = sum / (pixels * C), 0 for an empty region)."""
    diff = (a.double() - b.double()).abs().sum(-1) * region
    total = diff.sum((1, 2))
    pixels = region.sum((1, 2))
    mean = torch.where(pixels > 0, total / (pixels.double() * a.shape[-1]).clamp(min=1), torch.zeros_like(total))
    return total, pixels, mean


def cycle_consistency(condition, extracted, threshold=0.04, radius=0, silent=None):
    """Mean L1 between ``condition`` and ``extracted`` (the condition extracted from the generated
    image) outside the silent region (``silent`` (N, H, W) bool, else the condition's own)."""
    if silent is None:
        silent = silent_region(condition, threshold, radius)
    return masked_l1(condition, extracted, ~silent)

"""MIControlNet's training data and measurements inside ComfyUI: the checks (with the node's
name and the fix) and the calls into models/silent_signal.py and models/mi_metrics.py
(docs/mi_training.md)."""
import torch

from ..models import mi_metrics as mt
from ..models import silent_signal as ss
from ..preprocessors import canny as canny_mod
from ..preprocessors.image_io import image_to_uint8, uint8_to_image

BALANCE_NODE = "Silent Signal Balance (XCtrl)"
TV_NODE = "Silent Total Variation (XCtrl)"
CYCLE_NODE = "Cycle Consistency (XCtrl)"
SEGMENTERS = ("colour_clusters", "grid")


class MIDataError(ValueError):
    """Bad input to one of the MIControlNet data / measurement nodes (the message names the node and the fix)."""


def joined(items, what, node):
    """A tensor or a list of tensors (ComfyUI's list outputs) -> one batch; None stays None."""
    if items is None or isinstance(items, torch.Tensor):
        return items
    items = [t for t in items if t is not None]
    if not items:
        return None
    shapes = sorted({tuple(t.shape[1:]) for t in items})
    if len(shapes) > 1:
        raise MIDataError(f"{node}: the {what} have different sizes {shapes}: resize them to one size first "
                          "(e.g. Upscale Image)")
    return torch.cat(items)


def _check_batch(t, what, node, dims=4):
    if not isinstance(t, torch.Tensor) or t.dim() != dims or t.shape[0] == 0 or 0 in t.shape[1:3]:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise MIDataError(f"{node}: the {what} are not a non-empty batch ({shape}): connect an "
                          f"{'IMAGE' if dims == 4 else 'MASK'} output")
    if not bool(torch.isfinite(t).all()):
        raise MIDataError(f"{node}: the {what} contain NaN or infinite values: fix the node that makes them")


def check_balance_inputs(images, conditions, masks):
    """Same count and size for images and conditions; masks of their size, one label map or the same
    number of masks per image."""
    node = BALANCE_NODE
    _check_batch(images, "images", node)
    _check_batch(conditions, "conditions", node)
    n, h, w = images.shape[:3]
    if conditions.shape[0] != n:
        raise MIDataError(f"{node}: {conditions.shape[0]} condition images for {n} images: give one condition per image, "
                          "in the same order")
    if tuple(conditions.shape[1:3]) != (h, w):
        raise MIDataError(f"{node}: the conditions are {conditions.shape[2]}x{conditions.shape[1]} px but the images "
                          f"{w}x{h}: make the conditions from these images, or resize them to {w}x{h} (Upscale Image)")
    if masks is None:
        return
    if masks.dim() == 2:
        masks = masks[None]
    _check_batch(masks, "masks", node, dims=3)
    if tuple(masks.shape[1:]) != (h, w):
        raise MIDataError(f"{node}: the masks are {masks.shape[2]}x{masks.shape[1]} px but the images {w}x{h}: make "
                          f"the masks from these images, or resize them to {w}x{h} (Upscale Image on Convert Mask to "
                          "Image, nearest-exact)")
    if masks.shape[0] % n:
        raise MIDataError(f"{node}: {masks.shape[0]} masks for {n} images: give one label map per image, or the same "
                          f"number of masks for every image (k masks per image: {n}, {2 * n}, {3 * n}, ... masks, image "
                          "i's masks together in a row), or disconnect masks to segment by colour")


def segment_labels(images, masks, segmenter, segments):
    """(N, H, W) label maps: from the masks when given, else from the built-in segmenter."""
    n, h, w = images.shape[:3]
    if masks is not None:
        return ss.labels_from_masks((masks[None] if masks.dim() == 2 else masks).cpu(), n)
    if segmenter == "grid":
        return ss.grid_segments(n, h, w, int(segments))
    rgb = images[..., :3].float().cpu()
    return torch.stack([ss.colour_segments(img, int(segments)) for img in rgb])


def balance(images, conditions, masks, keep_rate, variants, seed, segmenter, segments, silent_value):
    """The node's work: (images, balanced conditions, keep masks as float MASK). Each input may
    arrive as a list (the node takes lists, so ComfyUI's dataset nodes' list outputs plug in): the
    tensors are joined, of each option its first value is used."""
    keep_rate, variants, seed, segmenter, segments, silent_value = (
        v[0] if isinstance(v, list) else v for v in (keep_rate, variants, seed, segmenter, segments, silent_value))
    images = joined(images, "images", BALANCE_NODE)
    conditions = joined(conditions, "conditions", BALANCE_NODE)
    masks = joined(masks, "masks", BALANCE_NODE)
    check_balance_inputs(images, conditions, masks)
    if segmenter not in SEGMENTERS:
        raise MIDataError(f"{BALANCE_NODE}: unknown segmenter {segmenter!r}: choose one of {', '.join(SEGMENTERS)}")
    labels = segment_labels(images, masks, segmenter, segments)
    targets, conds, keep = ss.balance(images.cpu(), conditions.cpu(), labels, keep_rate, variants, seed, silent_value)
    return targets, conds, keep.float()


def _metric_inputs(node, image, condition, silent_mask):
    _check_batch(image, "generated images", node)
    _check_batch(condition, "conditions", node)
    n, h, w = image.shape[:3]
    if condition.shape[0] not in (1, n):
        raise MIDataError(f"{node}: {condition.shape[0]} conditions for {n} generated images: give one condition for "
                          "all or one per image")
    if tuple(condition.shape[1:3]) != (h, w):
        raise MIDataError(f"{node}: the condition is {condition.shape[2]}x{condition.shape[1]} px but the generated "
                          f"image {w}x{h}: resize the condition to {w}x{h} (Upscale Image) or generate at its size")
    condition = condition.expand(n, -1, -1, -1).cpu().float()
    if silent_mask is None:
        return image.cpu().float(), condition, None
    mask = silent_mask[None] if silent_mask.dim() == 2 else silent_mask
    _check_batch(mask, "silent masks", node, dims=3)
    if mask.shape[0] not in (1, n) or tuple(mask.shape[1:]) != (h, w):
        raise MIDataError(f"{node}: the silent_mask batch is {tuple(mask.shape)} but the generated images are {n} x "
                          f"{h} x {w}: give one {w}x{h} mask for all images or one per image")
    return image.cpu().float(), condition, mask.expand(n, -1, -1).cpu() > 0.5


def total_variation(image, condition, threshold, radius, silent_mask=None):
    """(mean TV over the batch, per-image rows for the report) inside the silent region."""
    image, condition, silent = _metric_inputs(TV_NODE, image, condition, silent_mask)
    if silent is None:
        silent = mt.silent_region(condition, threshold, int(radius))
    total, pairs, mean = mt.total_variation(image, silent)
    rows = [(float(m), float(t), int(p)) for m, t, p in zip(mean, total, pairs)]
    return float(mean.mean()), rows, silent


def extract_canny(image, low, high):
    """The pack's canny (lllyasviel's annotator) of each generated image, as an IMAGE."""
    return uint8_to_image([canny_mod.canny(a, int(low), int(high)) for a in image_to_uint8(image)])


def cycle_consistency(image, condition, threshold, radius, low, high, extracted=None, silent_mask=None):
    """(mean L1 over the batch, per-image rows, the extracted conditions) outside the silent region."""
    image, condition, silent = _metric_inputs(CYCLE_NODE, image, condition, silent_mask)
    if extracted is None:
        extracted = extract_canny(image, low, high)
    else:
        _check_batch(extracted, "extracted conditions", CYCLE_NODE)
        if extracted.shape[0] != image.shape[0] or extracted.shape[1:3] != image.shape[1:3]:
            raise MIDataError(f"{CYCLE_NODE}: the extracted conditions are {tuple(extracted.shape[:3])} but the generated "
                              f"images {tuple(image.shape[:3])}: extract one condition per generated image, at its size")
        extracted = extracted.cpu().float()
    if extracted.shape[-1] != condition.shape[-1]:
        extracted, condition = extracted[..., :3].mean(-1, keepdim=True), condition[..., :3].mean(-1, keepdim=True)
    total, pixels, mean = mt.cycle_consistency(condition, extracted, threshold, int(radius), silent)
    rows = [(float(m), float(t), int(p)) for m, t, p in zip(mean, total, pixels)]
    return float(mean.mean()), rows, extracted


def total_variation_report(image, condition, threshold, radius, silent_mask=None):
    """The Silent Total Variation node's outputs: (value, report text, silent region as float MASK)."""
    value, rows, silent = total_variation(image, condition, threshold, radius, silent_mask)
    return value, report("total variation in the silent region", "pixel pair and channel", rows), silent.float()


def cycle_consistency_report(image, condition, threshold, radius, low, high, extracted=None, silent_mask=None):
    """The Cycle Consistency node's outputs: (value, report text, the extracted conditions)."""
    value, rows, extracted = cycle_consistency(image, condition, threshold, radius, low, high, extracted, silent_mask)
    return value, report("cycle consistency L1 outside the silent region", "pixel and channel", rows), extracted


def report(title, unit, rows):
    """A few lines of text: the batch mean and one line per image."""
    lines = [f"{title}: {sum(r[0] for r in rows) / len(rows):.6f} (mean over {len(rows)} image(s))"]
    lines += [f"image {i}: {m:.6f} per {unit} (sum {t:.3f} over {p} {unit}s)" for i, (m, t, p) in enumerate(rows)]
    return "\n".join(lines)

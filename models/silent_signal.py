"""Silent-signal data balancing (MIControlNet's rebalanced training data; docs/mi_training.md).

A training pair is (target image, condition image). The image is split into segments; per
pair a random subset of the segments keeps its condition and the rest of the condition is made
silent (set to the empty value, black for edge, pose and depth maps), while the target image is
left as it is. The denoiser then sees pairs where an empty condition sits over a detailed image
region, the case the plain data almost never shows.

Segments are integer label maps, (N, H, W) int64, one label per segment (any values). They come
from user masks (`labels_from_masks`) or from a fallback that needs no model (`colour_segments`,
`grid_segments`). Everything here is torch / numpy / OpenCV only.
"""
import cv2
import numpy as np
import torch

KMEANS_ITERATIONS = 12
BLUR_SIGMA = 1.5  # px: smooths texture so a cluster follows regions, not single pixels
SMALL_PART = 0.002  # connected parts below this share of the image join their cluster's "scattered" segment


def labels_from_masks(masks, n):
    """(M, H, W) masks in [0, 1] -> (N, H, W) label maps.

    M == n: each mask is one image's label map, every distinct value (to 1/255) one segment (a
    binary mask gives two segments: inside and outside). M == k * n: k binary masks per image,
    image i owning masks i*k .. i*k+k-1 (mask > 0.5; a later mask wins where two overlap) and
    the pixels no mask covers form one more segment.
    """
    m = masks.shape[0]
    if m == n:
        return torch.round(masks.float().clamp(0, 1) * 255).long()
    if m % n:
        raise ValueError(f"{m} masks for {n} images: give one label map per image or the same number of masks per image")
    k = m // n
    grouped = masks.reshape(n, k, *masks.shape[1:]) > 0.5
    labels = torch.zeros(n, *masks.shape[1:], dtype=torch.long)
    for j in range(k):
        labels[grouped[:, j]] = j + 1
    return labels


def grid_segments(n, height, width, cells):
    """(N, H, W) labels of a cells x cells grid (rows and columns split as evenly as integers allow)."""
    rows = torch.arange(height) * cells // height
    cols = torch.arange(width) * cells // width
    return (rows[:, None] * cells + cols[None, :]).expand(n, height, width).clone()


def kmeans_colours(pixels, k):
    """Lloyd's k-means on (P, C) float pixels, deterministic: the first centre is the pixel farthest
    from the mean colour, each next one the pixel farthest from the centres so far (so a small
    region of a distinct colour gets its own centre). Returns (P,) cluster indices."""
    picks = [int((pixels - pixels.mean(0)).norm(dim=1).argmax())]
    nearest = (pixels - pixels[picks[0]]).norm(dim=1)
    for _ in range(1, k):
        picks.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, (pixels - pixels[picks[-1]]).norm(dim=1))
    centres = pixels[picks].clone()
    assign = torch.zeros(pixels.shape[0], dtype=torch.long)
    for _ in range(KMEANS_ITERATIONS):
        assign = torch.cdist(pixels, centres).argmin(1)
        for c in range(k):
            members = pixels[assign == c]
            if members.shape[0]:
                centres[c] = members.mean(0)
    return assign


def colour_segments(image, k):
    """One image (H, W, C) float in [0, 1] -> (H, W) labels: k colour clusters of the blurred
    image, each split into its connected parts (8-connected); the parts smaller than SMALL_PART
    of the image stay together as one segment per cluster."""
    h, w = image.shape[:2]
    smooth = cv2.GaussianBlur(image.float().numpy(), (0, 0), BLUR_SIGMA)
    assign = kmeans_colours(torch.from_numpy(smooth).reshape(h * w, -1), k).reshape(h, w).numpy()
    labels = np.zeros((h, w), np.int64)
    next_label = 0
    for c in range(k):
        count, parts = cv2.connectedComponents((assign == c).astype(np.uint8), connectivity=8)
        scattered = next_label
        next_label += 1
        for p in range(1, count):
            where = parts == p
            if where.sum() < SMALL_PART * h * w:
                labels[where] = scattered
            else:
                labels[where] = next_label
                next_label += 1
    return torch.from_numpy(labels)


def keep_masks(labels, keep_rate, variants, generator):
    """(N, H, W) labels -> (N * variants, H, W) bool, True where the condition is kept.

    For pair i and variant j (row i * variants + j) each segment, in increasing label order,
    draws u ~ U[0, 1) from ``generator`` and keeps its condition when u < keep_rate.
    """
    out = []
    for lab in labels:
        segs = torch.unique(lab)  # sorted
        for _ in range(variants):
            kept = segs[torch.rand(segs.shape[0], generator=generator) < keep_rate]
            out.append(torch.isin(lab, kept))
    return torch.stack(out)


def silence(conditions, keep, silent_value=0.0):
    """(N, H, W, C) conditions, (N, H, W) bool keep masks -> conditions with every pixel outside
    ``keep`` set to ``silent_value`` (all channels)."""
    return torch.where(keep[..., None], conditions, torch.full_like(conditions, float(silent_value)))


def balance(images, conditions, labels, keep_rate, variants=1, seed=0, silent_value=0.0):
    """The balanced pairs: (images repeated per variant, unchanged), silenced conditions, keep masks.

    ``images`` / ``conditions`` (N, H, W, C) and ``labels`` (N, H, W) of one size; row i * variants
    + j of each output is variant j of pair i. The same seed and inputs give the same result.
    """
    g = torch.Generator().manual_seed(int(seed))
    keep = keep_masks(labels, float(keep_rate), int(variants), g)
    targets = images.repeat_interleave(variants, 0)
    conds = silence(conditions.repeat_interleave(variants, 0), keep, silent_value)
    return targets, conds, keep

"""HED soft edges with lllyasviel's Apache-2.0 network (`ControlNetHED.pth`).

The module and parameter names equal the keys of `ControlNetHED.pth` (lllyasviel/Annotators):
`norm`, `block{1..5}.convs.{i}.weight|bias`, `block{1..5}.projection.weight|bias`.
The network takes raw RGB in 0..255 (no /255) and subtracts its learned `norm` itself.

Post-processing as the ControlNet 1.1 annotator (annotator/hed/__init__.py, annotator/util.py):
- soft: side outputs resized bilinearly to H x W, averaged, sigmoid, x255, clip, uint8
  (truncating cast).
- safe: `safe_step` before the x255: floor(3x) / 2, so levels 0, 127 (0.5 * 255 truncated)
  and 255 (1.0 and 1.5 clip to 255).
- scribble (from the soft map): `nms(edge, 127, 3.0)`, Gaussian blur sigma 3, then > 4 -> 255
  else 0.
"""
import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .image_io import uint8_rgb_batch
from .weights import load_exact

WEIGHT_FILE = "ControlNetHED.pth"
MODES = ("soft", "safe", "scribble")
# Working-size limit: the VGG features take about 720 bytes per pixel in float32 (3 GB at the limit).
MAX_PIXELS = 2048 * 2048


class DoubleConvBlock(nn.Module):
    """VGG block: optional 2x2 max-pool, `layers` conv3x3+ReLU, and a 1x1 side projection."""

    def __init__(self, in_channels, out_channels, layers):
        super().__init__()
        self.convs = nn.Sequential(
            *[nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1) for i in range(layers)]
        )
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, x, down_sampling=False):
        if down_sampling:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class ControlNetHED_Apache2(nn.Module):
    """Five VGG blocks (64x2, 128x2, 256x3, 512x3, 512x3); returns the five side outputs."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1 = DoubleConvBlock(3, 64, 2)
        self.block2 = DoubleConvBlock(64, 128, 2)
        self.block3 = DoubleConvBlock(128, 256, 3)
        self.block4 = DoubleConvBlock(256, 512, 3)
        self.block5 = DoubleConvBlock(512, 512, 3)

    def forward(self, x, check=None):
        """x: (B, 3, H, W) RGB in 0..255. `check()`, when given, is called after each block (the
        caller's cancel check raises there)."""
        h = x - self.norm
        sides = []
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            h, side = block(h, down_sampling=i > 0)
            sides.append(side)
            if check is not None:
                check()
        return sides


def build_hed(state_dict):
    """A ControlNetHED_Apache2 in eval mode loaded strictly from `state_dict`."""
    return load_exact(ControlNetHED_Apache2(), state_dict, WEIGHT_FILE)


@torch.no_grad()
def hed_soft_edges(net, images, check=None):
    """Soft edge probability in [0, 1], float64: (B, H, W, 3) uint8 RGB -> (B, H, W).

    Runs on the network's device and dtype; the average and sigmoid are taken in float64 on
    the CPU like the reference. `check`: see ControlNetHED_Apache2.forward.
    """
    images = uint8_rgb_batch(images, "HED")
    param = next(net.parameters())
    x = torch.from_numpy(images).to(device=param.device, dtype=param.dtype).permute(0, 3, 1, 2)
    h, w = images.shape[1:3]
    sides = [F.interpolate(s.float(), size=(h, w), mode="bilinear", align_corners=False) for s in net(x, check)]
    mean = torch.cat(sides, dim=1).mean(dim=1).cpu().double().numpy()
    with np.errstate(over="ignore"):  # exp(-mean) = inf for very negative logits gives 0, as wanted
        return 1.0 / (1.0 + np.exp(-mean))


def edges_from_soft(edge, mode="soft"):
    """The mode applied to soft edge maps in [0, 1] (B, H, W) -> uint8 (B, H, W). Apply it at the
    size the map is shown at, so binary maps stay binary."""
    _check_mode(mode)
    edge = np.asarray(edge)
    if mode == "safe":
        edge = safe_step(edge)
    out = (edge * 255.0).clip(0, 255).astype(np.uint8)
    if mode == "scribble":
        out = np.stack([scribble(e) for e in out])
    return out


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"HED mode must be one of {MODES}, got {mode!r}.")


def safe_step(x, step=2):
    """floor((step + 1) * x) / step in float32 (as the annotator: int cast of positive values)."""
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


def nms(x, threshold, sigma):
    """The annotator's edge thinning: blur, keep pixels that are a maximum along at least one of
    four directions (horizontal, vertical, two diagonals), then 255 where above `threshold`."""
    x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)
    kept = np.zeros_like(x)
    for kernel in _DIRECTIONS:
        np.putmask(kept, cv2.dilate(x, kernel=kernel) == x, x)
    out = np.zeros(x.shape, dtype=np.uint8)
    out[kept > threshold] = 255
    return out


def scribble(edge):
    """Scribble map from a uint8 soft-edge map: nms(127, sigma 3), blur sigma 3, > 4 -> 255."""
    if edge.dtype != np.uint8 or edge.ndim != 2:
        raise ValueError(f"scribble expects a 2-D uint8 edge map, got {edge.dtype} {edge.shape}.")
    y = cv2.GaussianBlur(nms(edge, 127, 3.0), (0, 0), 3.0)
    return np.where(y > 4, 255, 0).astype(np.uint8)


_DIRECTIONS = [
    np.array(k, dtype=np.uint8)
    for k in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]],
        [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
    )
]

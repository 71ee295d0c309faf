"""ComfyUI IMAGE tensors <-> uint8 RGB arrays, and the sizes of the `resolution` convention.

ComfyUI IMAGE: torch float tensor `B x H x W x C` in [0, 1]. Channel handling:
- C == 3: used as is.
- C == 1: greyscale, replicated to RGB.
- C == 4: RGBA, the alpha channel is dropped (colour kept as stored). This is what ComfyUI's
  own LoadImage does (`convert("RGB")`); the mask travels separately as a MASK.
Floats are mapped to uint8 by rounding `x * 255` after clipping to [0, 1], so an image that
came from uint8 round-trips exactly (truncation would turn 0.2 * 255 = 50.999... into 50).

`resolution` convention (as comfyui_controlnet_aux): scale the shorter side to
`resolution` (INTER_AREA when shrinking, INTER_CUBIC when enlarging; sizes rounded), pad the
bottom and right edges (edge mode) to a multiple of 64, process, crop the padding
(frames.batched_at_resolution; the output size rule is in frames.py). `resolution <= 0`
processes at the input size (still padded and cropped).
"""
import numpy as np
import torch

def image_to_uint8(image, band_pixels=1 << 22):
    """(B, H, W, C) float IMAGE tensor -> (B, H, W, 3) uint8 numpy array (RGB).

    Converted in bands of about `band_pixels` pixels, so the float temporaries stay small
    whatever the batch size."""
    check_image_batch(image)
    b, h, w, _ = image.shape
    out = np.empty((b, h, w, 3), np.uint8)
    rows = max(1, band_pixels // w)
    for i in range(b):
        for r in range(0, h, rows):
            out[i, r:r + rows] = _band_to_uint8(image[i, r:r + rows])
    return out


def _band_to_uint8(x):
    x = x.detach().to(device="cpu", dtype=torch.float32)
    channels = x.shape[-1]
    if channels == 1:
        x = x.expand(-1, -1, 3)
    elif channels == 4:
        x = x[..., :3]
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()


class ImageBatch:
    """A (count, H, W, 3) float32 IMAGE filled chunk by chunk from uint8 maps, so a node's output
    costs its own size and no more (no list of parts, no concatenated copy)."""

    def __init__(self, count, height, width):
        self.image = torch.empty((count, height, width, 3), dtype=torch.float32)

    def put(self, start, maps):
        """Writes uint8 maps (B, H, W) or (B, H, W, 3) at frames start .. start + B."""
        maps = np.asarray(maps)
        if maps.dtype != np.uint8 or maps.shape[1:3] != self.image.shape[1:3] or maps.ndim not in (3, 4):
            raise ValueError(f"Expected uint8 maps (B, {self.image.shape[1]}, {self.image.shape[2]}[, 3]), got {maps.dtype} {maps.shape}.")
        src = torch.from_numpy(np.ascontiguousarray(maps))
        dst = self.image[start:start + len(maps)]
        dst.copy_(src[..., None].expand(-1, -1, -1, 3) if maps.ndim == 3 else src)
        dst.div_(255.0)


def uint8_to_image(arrays, device="cpu"):
    """uint8 maps -> (B, H, W, 3) float32 IMAGE tensor in [0, 1].

    `arrays`: one array (H, W), (H, W, 3) or (B, H, W, 3), or a list of (H, W) / (H, W, 3)
    arrays of one size. Single-channel maps are replicated to RGB.
    """
    if isinstance(arrays, np.ndarray) and arrays.ndim == 4:
        batch = arrays
    else:
        items = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
        if not items:
            raise ValueError("uint8_to_image: no images given (empty list).")
        batch = np.stack([_hwc3(a) for a in items])
    if batch.dtype != np.uint8:
        raise TypeError(f"uint8_to_image expects uint8 arrays, got {batch.dtype}.")
    if batch.shape[-1] != 3:
        raise ValueError(f"uint8_to_image expects 3 channels, got shape {batch.shape}.")
    return torch.from_numpy(np.ascontiguousarray(batch)).to(device=device, dtype=torch.float32) / 255.0


def check_image_batch(image):
    """Raises a clear error unless `image` is a non-empty B x H x W x C tensor, C in 1, 3, 4."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"Expected an IMAGE tensor (B, H, W, C), got {type(image).__name__}.")
    if image.ndim != 4:
        raise ValueError(f"Expected an IMAGE tensor of shape (B, H, W, C), got shape {tuple(image.shape)}.")
    b, h, w, c = image.shape
    if b == 0:
        raise ValueError("The IMAGE batch is empty (0 images): nothing to process.")
    if h == 0 or w == 0:
        raise ValueError(f"The IMAGE has zero size ({h} x {w} pixels).")
    if c not in (1, 3, 4):
        raise ValueError(f"IMAGE must have 1, 3 or 4 channels, got {c} (shape {tuple(image.shape)}).")


def uint8_rgb_batch(images, who):
    """(H, W, 3) or (B, H, W, 3) uint8 RGB -> a (B, H, W, 3) array; ``who`` names the network in errors."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"{who} expects uint8 RGB images (H, W, 3) or (B, H, W, 3), got {images.dtype} {images.shape}.")
    if 0 in images.shape[:3]:
        raise ValueError(f"{who} got an empty batch or a zero-size image: shape {images.shape}.")
    return images


def scaled_size(height, width, resolution):
    """(H, W) after scaling the shorter side to `resolution` (unchanged when resolution <= 0)."""
    if resolution <= 0:
        return height, width
    k = float(resolution) / min(height, width)
    return max(1, int(round(height * k))), max(1, int(round(width * k)))


def pad_to_multiple(image, multiple=64, mode="edge"):
    """Pads the bottom and right of an (H, W[, C]) array to a multiple of `multiple`."""
    h, w = image.shape[:2]
    pad_h, pad_w = -h % multiple, -w % multiple
    pads = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pads, mode=mode)


def _hwc3(a):
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3):
        raise ValueError(f"Expected an (H, W), (H, W, 1) or (H, W, 3) map, got shape {a.shape}.")
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a

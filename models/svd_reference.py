"""The reference-image conditioning of the ControlNeXt-SVD v2 pipeline (diffusers' Stable Video
Diffusion pipeline), where it differs from ComfyUI's stock SVD conditioning node
(docs/long_video.md, "Reference image"):

- CLIP vision sees the whole reference image squashed to 224 x 224 (no square crop), resized
  with an antialiasing Gaussian blur and then bicubic interpolation (align_corners=True), in
  [-1, 1] pixel space.
- The noise augmentation ``level * N(0, 1)`` is added in [-1, 1] pixel space, i.e.
  ``level / 2 * N(0, 1)`` on [0, 1] pixels (ComfyUI's node adds ``level * N(0, 1)`` to [0, 1]
  pixels: twice as much). The time id is ``level`` in both.

Images are (B, H, W, C) in [0, 1], as ComfyUI's IMAGE.
"""
import torch
import torch.nn.functional as F

CLIP_SIZE = 224


def _gaussian_kernel(size, sigma, dtype):
    x = torch.arange(size, dtype=dtype) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    k = torch.exp(-x.pow(2) / (2 * sigma ** 2))
    return k / k.sum()


def _blur(x, kernel_size, sigmas):
    """Separable Gaussian blur with reflect padding, (B, C, H, W)."""
    c = x.shape[1]
    for dim, (size, sigma) in enumerate(zip(kernel_size, sigmas)):
        k = _gaussian_kernel(size, sigma, x.dtype).to(x.device)
        before, after = (size - 1) // 2, (size - 1) - (size - 1) // 2
        if dim == 0:  # vertical
            x = F.pad(x, (0, 0, before, after), mode="reflect")
            x = F.conv2d(x, k.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)
        else:
            x = F.pad(x, (before, after, 0, 0), mode="reflect")
            x = F.conv2d(x, k.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    return x


def antialiased_resize(x, size):
    """diffusers' SVD resize: Gaussian blur (sigma = max((factor - 1) / 2, 0.001) per axis, kernel
    max(4 sigma, 3) rounded down and made odd), then bicubic with align_corners=True."""
    h, w = x.shape[-2:]
    factors = (h / size[0], w / size[1])
    sigmas = tuple(max((f - 1.0) / 2.0, 0.001) for f in factors)
    ks = [int(max(2.0 * 2 * s, 3)) for s in sigmas]
    ks = [k + 1 if k % 2 == 0 else k for k in ks]
    x = _blur(x, ks, sigmas)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


def clip_pixels(image):
    """The 224 x 224 [0, 1] image the reference's CLIP image encoder sees: (B, H, W, 3) -> (B, 224, 224, 3)."""
    x = image[..., :3].movedim(-1, 1).float() * 2.0 - 1.0
    x = antialiased_resize(x, (CLIP_SIZE, CLIP_SIZE))
    return ((x + 1.0) / 2.0).movedim(1, -1)


def augment(pixels, level, generator=None):
    """[0, 1] pixels with the reference's noise augmentation (``level`` in [-1, 1] pixel space)."""
    if level <= 0:
        return pixels
    noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.device, pixels.dtype)
    return pixels + noise * (level / 2.0)

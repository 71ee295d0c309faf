"""The reference pipeline's SVD image conditioning (models/svd_reference.py) against a direct
2-D computation of the same blur and resize."""
import math

import torch
import torch.nn.functional as F

from xctrl.models import svd_reference as sr


def blur_2d_by_hand(x, sigmas):
    """Gaussian blur as one 2-D kernel (outer product), reflect padding, float64."""
    ks = [int(max(4 * s, 3)) for s in sigmas]
    ks = [k + 1 if k % 2 == 0 else k for k in ks]
    g = []
    for k, s in zip(ks, sigmas):
        t = torch.tensor([i - k // 2 for i in range(k)], dtype=torch.float64)
        w = torch.exp(-t ** 2 / (2 * s * s))
        g.append(w / w.sum())
    kernel = torch.outer(g[0], g[1])
    c = x.shape[1]
    pad = ((ks[1] - 1) // 2, ks[1] - 1 - (ks[1] - 1) // 2, (ks[0] - 1) // 2, ks[0] - 1 - (ks[0] - 1) // 2)
    xp = F.pad(x, pad, mode="reflect")
    return F.conv2d(xp, kernel.expand(c, 1, *kernel.shape), groups=c)


def test_clip_pixels_is_blur_then_bicubic_in_minus_one_one_space():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 96, 54, 3, generator=g, dtype=torch.float64)  # a small portrait (h > w)
    got = sr.clip_pixels(image.float()).double()
    x = image.movedim(-1, 1) * 2 - 1
    sigmas = [max((96 / 224 - 1) / 2, 0.001), max((54 / 224 - 1) / 2, 0.001)]
    want = F.interpolate(blur_2d_by_hand(x, sigmas), size=(224, 224), mode="bicubic", align_corners=True)
    want = ((want + 1) / 2).movedim(1, -1)
    assert got.shape == (1, 224, 224, 3)
    assert (got - want).abs().max() < 3e-5  # float32 arithmetic, values ~0.5


def test_shrinking_blurs_with_the_pipelines_sigma():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 1024, 576, 3, generator=g)
    sigmas = [(1024 / 224 - 1) / 2, (576 / 224 - 1) / 2]  # 1.786, 0.786: kernels 7 and 3
    x = image.movedim(-1, 1).double() * 2 - 1
    want = ((F.interpolate(blur_2d_by_hand(x, sigmas), size=(224, 224), mode="bicubic", align_corners=True) + 1) / 2)
    got = sr.clip_pixels(image).movedim(-1, 1).double()
    assert (got - want).abs().max() < 3e-5  # float32 arithmetic, values ~0.5
    # the square crop of ComfyUI's stock SVD conditioning would give another image
    crop = F.interpolate(x[:, :, 224:800, :], size=(224, 224), mode="bicubic", antialias=True)
    assert (got - (crop + 1) / 2).abs().mean() > 1e-2


def test_augmentation_is_level_in_minus_one_one_space():
    pixels = torch.full((1, 64, 64, 3), 0.5)
    out = sr.augment(pixels, 0.02, torch.Generator().manual_seed(0))
    noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, pixels + 0.01 * noise)
    std_in_minus_one_one = ((out * 2 - 1) - (pixels * 2 - 1)).std().item()
    assert math.isclose(std_in_minus_one_one, 0.02, rel_tol=0.05)
    assert torch.equal(sr.augment(pixels, 0.0), pixels)

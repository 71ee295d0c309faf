"""The long-video window rules (models/video_windows.py) against hand-written versions of the
ControlNeXt-SVD v2 authors' loop."""
import math
import random

import pytest
import torch

from xctrl.models import video_windows as vw


def reference_starts(n, length, overlap):
    """The authors' windows in closed form: ceil((N - O) / (L - O)) windows (the length of their
    range(0, N - O, L - O)), window k at k * (L - O), moved back to N - L if it would end past the
    last frame; a video no longer than one window is one window."""
    if n <= length:
        return [0]
    stride = length - overlap
    return [min(k * stride, n - length) for k in range(math.ceil((n - overlap) / stride))]


@pytest.mark.parametrize("n, length, overlap, starts", [
    (48, 24, 6, [0, 18, 24]), (42, 24, 6, [0, 18]), (50, 24, 6, [0, 18, 26]), (60, 24, 6, [0, 18, 36]),
    (25, 14, 5, [0, 9, 11]), (240, 24, 6, [0, 18, 36, 54, 72, 90, 108, 126, 144, 162, 180, 198, 216]),
    (72, 24, 6, [0, 18, 36, 48]), (24, 24, 6, [0]), (10, 24, 6, [0]), (1, 24, 6, [0]),
])
def test_window_starts_of_the_worked_examples(n, length, overlap, starts):
    assert vw.window_starts(n, length, overlap) == starts


def test_window_starts_random_settings_match_the_reference_loop_and_cover_every_frame():
    rng = random.Random(0)
    for _ in range(2000):
        length = rng.randint(2, 40)
        overlap = rng.randint(1, length - 1)
        n = rng.randint(1, 200)
        starts = vw.window_starts(n, length, overlap)
        assert starts == reference_starts(n, length, overlap), (n, length, overlap)
        size = vw.window_length(n, length)
        assert all(0 <= s <= n - size for s in starts) and starts == sorted(set(starts))
        covered = set()
        for s in starts:
            covered |= set(range(s if s == 0 else s + 1, s + size))
        assert covered == set(range(n)), (n, length, overlap)


@pytest.mark.parametrize("length, overlap, match", [
    (24, 0, "overlap must be at least 1"), (24, 24, "smaller than frames_per_window"), (24, 30, "smaller"),
    (1, 0, "at least 2"), (0, 0, "at least 2"),
])
def test_bad_settings_are_refused(length, overlap, match):
    with pytest.raises(vw.WindowError, match=match):
        vw.window_starts(48, length, overlap)


def fuse_by_hand(outputs, starts, n):
    """Flat average; position 0 of every window not starting at frame 0 left out."""
    total = [None] * n
    count = [0] * n
    for s, out in zip(starts, outputs):
        for p in range(out.shape[0]):
            if s > 0 and p == 0:
                continue
            f = s + p
            total[f] = out[p].clone() if total[f] is None else total[f] + out[p]
            count[f] += 1
    return torch.stack([t / c for t, c in zip(total, count)])


@pytest.mark.parametrize("n, length, overlap", [(7, 4, 2), (6, 4, 2), (25, 14, 5), (50, 24, 6)])
def test_fusion_is_the_flat_average_without_later_windows_position_0(n, length, overlap):
    g = torch.Generator().manual_seed(n)
    starts = vw.window_starts(n, length, overlap)
    size = vw.window_length(n, length)
    outs = [torch.randn(size, 2, 3, generator=g, dtype=torch.float64) for _ in starts]
    fusion = vw.WindowFusion(n, starts, size)
    for s, o in zip(starts, outs):
        fusion.add(s, o)
    want = fuse_by_hand(outs, starts, n)
    torch.testing.assert_close(fusion.result(), want, rtol=1e-12, atol=1e-12)
    # keeping position 0 would give another answer wherever a later window starts inside the video
    if len(starts) > 1:
        kept = torch.zeros(n, 2, 3, dtype=torch.float64)
        cnt = torch.zeros(n, 1, 1, dtype=torch.float64)
        for s, o in zip(starts, outs):
            kept[s:s + size] += o
            cnt[s:s + size] += 1
        assert not torch.allclose(kept / cnt, want)


@pytest.mark.parametrize("n, length, overlap", [(7, 4, 2), (25, 14, 5)])
def test_ramped_cfg_equals_cfg_per_window_position_then_fusion(n, length, overlap):
    g = torch.Generator().manual_seed(3)
    lo, hi = 1.0, 3.5
    starts = vw.window_starts(n, length, overlap)
    size = vw.window_length(n, length)
    cond = [torch.randn(size, 4, generator=g, dtype=torch.float64) for _ in starts]
    uncond = [torch.randn(size, 4, generator=g, dtype=torch.float64) for _ in starts]
    guidance = torch.linspace(lo, hi, size, dtype=torch.float64)[:, None]  # the reference's per-position cfg
    want = fuse_by_hand([u + guidance * (c - u) for c, u in zip(cond, uncond)], starts, n)
    fc, fu = vw.WindowFusion(n, starts, size, ramp=True), vw.WindowFusion(n, starts, size, ramp=True)
    for s, c, u in zip(starts, cond, uncond):
        fc.add(s, c)
        fu.add(s, u)
    got = vw.ramped_cfg(fc.result(), fu.result(), fc.ramp_result(), fu.ramp_result(), lo, hi)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # a ramp over the fused video (ComfyUI's VideoLinearCFGGuidance reading) is a different result
    video_ramp = torch.linspace(lo, hi, n, dtype=torch.float64)[:, None]
    assert not torch.allclose(fu.result() + video_ramp * (fc.result() - fu.result()), want)


def test_constant_cfg_fuses_exactly_by_averaging_cond_and_uncond():
    g = torch.Generator().manual_seed(5)
    n, length, overlap, cfg = 25, 14, 5, 3.0
    starts = vw.window_starts(n, length, overlap)
    cond = [torch.randn(length, 4, generator=g, dtype=torch.float64) for _ in starts]
    uncond = [torch.randn(length, 4, generator=g, dtype=torch.float64) for _ in starts]
    per_window = fuse_by_hand([u + cfg * (c - u) for c, u in zip(cond, uncond)], starts, n)
    c, u = fuse_by_hand(cond, starts, n), fuse_by_hand(uncond, starts, n)
    torch.testing.assert_close(u + cfg * (c - u), per_window, rtol=1e-12, atol=1e-12)

"""Cross normalization as the released ControlNeXt weights were trained (docs/controlnext.md, "Cross normalization")."""
import pytest
import torch
import torch.nn.functional as F

from xctrl.models.cross_norm import control_to_tokens, cross_normalize, cross_normalize_tokens


def hand_formula(h, c, eps, order, s=1.0):
    """c_hat * s written out per sample with plain loops, in float64."""
    h = h.double()
    c = c.double()
    out = []
    for b in range(h.shape[0]):
        hb, cb = h[b], c[b]
        if order == "pool_then_norm":
            cb = F.adaptive_avg_pool2d(cb[None], hb.shape[-2:])[0]
        n_h, n_c = hb.numel(), cb.numel()
        mean_h, mean_c = hb.sum() / n_h, cb.sum() / n_c
        std_h = (((hb - mean_h) ** 2).sum() / (n_h - 1)).sqrt()
        std_c = (((cb - mean_c) ** 2).sum() / (n_c - 1)).sqrt()
        c_hat = (cb - mean_c) / (std_c + eps) * std_h + mean_h
        if order == "norm_then_pool":
            c_hat = F.adaptive_avg_pool2d(c_hat[None], hb.shape[-2:])[0]
        sb = s[b].item() if isinstance(s, torch.Tensor) else s
        out.append(c_hat * sb)
    return torch.stack(out)


def sample(shape, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale + shift


@pytest.mark.parametrize("order", ["pool_then_norm", "norm_then_pool"])
def test_matches_hand_formula(order):
    h = sample((2, 8, 6, 5), 0, scale=3.0, shift=1.5).double()
    c = sample((2, 8, 13, 11), 1, scale=0.2, shift=-4.0).double()  # larger than h, not an integer multiple
    out = cross_normalize(h, c, 1e-12, order, 0.7)
    assert out.shape == h.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, hand_formula(h, c, 1e-12, order, 0.7), rtol=1e-10, atol=1e-10)
    # float32 inputs: same result up to float32 rounding, returned as float32
    out32 = cross_normalize(h.float(), c.float(), 1e-12, order, 0.7)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out, rtol=1e-4, atol=1e-4)
    if order == "pool_then_norm":  # the added term carries h's mean: it is not zero-mean
        torch.testing.assert_close(out.mean(dim=(1, 2, 3)), 0.7 * h.mean(dim=(1, 2, 3)))


def test_the_two_orders_differ():
    h = sample((1, 4, 4, 4), 2)
    c = sample((1, 4, 9, 7), 3) ** 3  # heavy tails: pooling changes the statistics a lot
    a = cross_normalize(h, c, 1e-12, "pool_then_norm")
    b = cross_normalize(h, c, 1e-12, "norm_then_pool")
    assert (a - b).abs().max() > 1e-2


def test_same_size_needs_no_pooling():
    h = sample((2, 3, 5, 5), 4)
    c = sample((2, 3, 5, 5), 5)
    a = cross_normalize(h, c, 1e-5, "pool_then_norm")
    b = cross_normalize(h, c, 1e-5, "norm_then_pool")
    torch.testing.assert_close(a, b)


def test_eps_is_added_to_the_std_not_the_variance():
    h = sample((1, 4, 8, 8), 6)
    c = sample((1, 4, 8, 8), 7)
    c = (c - c.mean()) / c.std() * 1e-5  # std(c) == eps
    out = cross_normalize(h, c, 1e-5, "norm_then_pool")
    torch.testing.assert_close(out.double(), hand_formula(h, c, 1e-5, "norm_then_pool"), rtol=1e-4, atol=1e-5)
    # std + eps = 2e-5 -> the normalized c has std 1/2 (with eps on the variance it would be ~0.003)
    c_norm = (out.double() - h.double().mean()) / h.double().std()
    assert c_norm.std().item() == pytest.approx(0.5, rel=1e-3)


def test_constant_control_gives_mean_of_h_without_nan():
    h = sample((2, 4, 6, 6), 8, shift=2.0)
    c = torch.full((2, 4, 12, 12), 3.0)  # std 0: only eps keeps the division finite
    for order in ("pool_then_norm", "norm_then_pool"):
        out = cross_normalize(h, c, 1e-12, order)
        assert torch.isfinite(out).all()
        expected = h.mean(dim=(1, 2, 3), keepdim=True).expand_as(h)
        torch.testing.assert_close(out, expected)


def test_fp16_statistics_are_computed_in_float32():
    # sum of squares of these values overflows fp16 (max 65504), and fp16 std of the tiny
    # c would underflow; the result must still be finite and right
    h = (sample((2, 16, 16, 16), 9) * 3000 + 20000).half()
    c = (sample((2, 16, 32, 32), 10) * 1e-3).half()
    assert not torch.isfinite((h * h).sum())  # the trap is real
    out = cross_normalize(h, c, 1e-12, "norm_then_pool", 0.5)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref = hand_formula(h.float(), c.float(), 1e-12, "norm_then_pool", 0.5)
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=0.0)


def test_per_sample_scale_tensor():
    h = sample((3, 4, 5, 5), 11)
    c = sample((3, 4, 10, 10), 12)
    s = torch.tensor([1.0, 0.0, 0.25])
    out = cross_normalize(h, c, 1e-12, "pool_then_norm", s)
    full = cross_normalize(h, c, 1e-12, "pool_then_norm", 1.0)
    torch.testing.assert_close(out[0], full[0])
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[2], 0.25 * full[2])
    torch.testing.assert_close(out.double(), hand_formula(h, c, 1e-12, "pool_then_norm", s), rtol=1e-5, atol=1e-5)
    # a 0-d tensor (e.g. the learned scale) acts like a number
    torch.testing.assert_close(cross_normalize(h, c, 1e-12, "pool_then_norm", torch.tensor(0.5)), 0.5 * full)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        cross_normalize(h, c, 1e-12, "pool_then_norm", torch.ones(2))


def test_input_errors():
    h = sample((1, 4, 5, 5), 13)
    with pytest.raises(ValueError, match="batch or channels"):
        cross_normalize(h, sample((1, 8, 5, 5), 14), 1e-12, "pool_then_norm")
    with pytest.raises(ValueError, match="order must be one of"):
        cross_normalize(h, h, 1e-12, "pool")


# ---------------------------------------------------------------------------- MMDiT tokens


def test_tokens_match_hand_formula_per_channel_over_tokens():
    h = sample((2, 12, 6), 15, scale=2.0, shift=1.0)
    c = sample((2, 12, 6), 16, scale=0.1)
    out = cross_normalize_tokens(h, c, scale=torch.tensor([1.0, 0.5]))
    hd, cd = h.double(), c.double()
    ref = torch.empty_like(hd)
    for b in range(2):
        for ch in range(6):
            x, y = hd[b, :, ch], cd[b, :, ch]
            ref[b, :, ch] = (y - y.mean()) / (y.std() + 1e-12) * x.std() + x.mean()
    ref[1] *= 0.5
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # per channel: every channel of the result has h's channel mean
    torch.testing.assert_close(out[0].mean(0), h[0].mean(0), rtol=1e-4, atol=1e-5)


def test_control_to_tokens_follows_patch_embedding_order():
    c = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    tokens = control_to_tokens(c, (4, 5))
    assert tokens.shape == (2, 20, 3)
    for i in range(4):
        for j in range(5):
            assert torch.equal(tokens[:, i * 5 + j, :], c[:, :, i, j])
    # a 2x larger feature is average-pooled to the grid
    big = sample((1, 3, 8, 10), 17)
    torch.testing.assert_close(control_to_tokens(big, (4, 5)), F.avg_pool2d(big, 2).flatten(2).transpose(1, 2))


def test_tokens_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="control_to_tokens"):
        cross_normalize_tokens(torch.zeros(1, 16, 4), torch.zeros(1, 15, 4))

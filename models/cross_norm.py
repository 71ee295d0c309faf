"""ControlNeXt cross normalization: aligning the control feature to the denoiser's statistics.

The released weights were trained with (docs/controlnext.md, "Cross normalization"), per sample over
(C, H, W), unbiased std, eps added to the std (not the variance):

    c_hat = (c - mean(c)) * std(h) / (std(c) + eps) + mean(h)
    h     = h + c_hat * s

Both functions here return the term to ADD to ``h`` (``c_hat * s``), cast to ``h``'s dtype.
Statistics are computed in float32 (float64 inputs stay float64): in fp16 the sum of squares
over a whole feature map overflows, and small variances underflow.
"""
import torch
import torch.nn.functional as F

POOL_THEN_NORM = "pool_then_norm"  # SD1.5 released / SD1.5-Training
NORM_THEN_POOL = "norm_then_pool"  # SDXL, SVD v1, SVD v2
ORDERS = (POOL_THEN_NORM, NORM_THEN_POOL)


def _per_sample_scale(scale, batch, ndim, device, dtype):
    """A python number, a 0-d tensor, or a (B,) tensor -> something broadcastable to (B, ...).

    A (B,) tensor lets callers give each sample its own scale, e.g. 0 for the uncond rows.
    """
    if not isinstance(scale, torch.Tensor):
        return float(scale)
    s = scale.to(device=device, dtype=dtype)
    if s.numel() == 1:
        return s.reshape(())
    if s.dim() != 1 or s.shape[0] != batch:
        raise ValueError(
            f"scale must be a number or a tensor of shape ({batch},) (one value per sample), got shape {tuple(s.shape)}"
        )
    return s.reshape((batch,) + (1,) * (ndim - 1))


def _stats_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


def _moments(x, dims):
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, correction=1)  # unbiased, as torch.std
    return mean, std


def cross_normalize(h, c, eps, order, scale=1.0):
    """Returns ``c_hat * scale`` for ``h`` (B, C, H, W) and control feature ``c`` (B, C, H', W').

    ``order``: "pool_then_norm" adaptive-average-pools ``c`` to h's size and then takes its
    statistics; "norm_then_pool" normalizes ``c`` at its own size and pools ``c_hat``.
    ``scale``: a number or a per-sample tensor of shape (B,).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if h.dim() != 4 or c.dim() != 4:
        raise ValueError(f"cross_normalize expects 4-D (B, C, H, W) tensors, got h {tuple(h.shape)} and c {tuple(c.shape)}")
    if c.shape[:2] != h.shape[:2]:
        raise ValueError(
            f"control feature {tuple(c.shape)} does not match the denoiser feature {tuple(h.shape)} in batch or channels: "
            "the control module was built for another model family or injection point"
        )
    size = tuple(h.shape[-2:])
    hf = h.to(_stats_dtype(h))
    cf = c.to(device=h.device, dtype=hf.dtype)
    if order == POOL_THEN_NORM:
        cf = F.adaptive_avg_pool2d(cf, size)
    mean_h, std_h = _moments(hf, (1, 2, 3))
    mean_c, std_c = _moments(cf, (1, 2, 3))
    c_hat = (cf - mean_c) * (std_h / (std_c + eps)) + mean_h
    if order == NORM_THEN_POOL:
        c_hat = F.adaptive_avg_pool2d(c_hat, size)
    s = _per_sample_scale(scale, h.shape[0], 4, h.device, hf.dtype)
    return (c_hat * s).to(h.dtype)


def control_to_tokens(c, grid_hw):
    """Resizes a control feature (B, C, H, W) to an MMDiT token grid: (B, h*w, C).

    Adaptive average pooling to the patch grid (h, w), then row-major flattening, the same
    order a patch embedding (strided conv, ``flatten(2).transpose(1, 2)``) gives its tokens.
    """
    if c.dim() != 4:
        raise ValueError(f"control_to_tokens expects a (B, C, H, W) tensor, got {tuple(c.shape)}")
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    pooled = F.adaptive_avg_pool2d(c, (gh, gw))
    return pooled.flatten(2).transpose(1, 2)


def cross_normalize_tokens(h_tokens, c_tokens, eps=1e-12, scale=1.0):
    """Token-stream variant for MMDiT (SD3); UNOFFICIAL: the authors released no SD3 code or weights.

    ``h_tokens`` and ``c_tokens`` are (B, N, C). Statistics are per sample and per channel,
    taken over the token axis N (unbiased std, eps added to the std). Returns
    ``c_hat * scale`` in h's dtype. Resize a spatial control feature with
    :func:`control_to_tokens` first.
    """
    if h_tokens.dim() != 3 or c_tokens.shape != h_tokens.shape:
        raise ValueError(
            f"cross_normalize_tokens expects two (B, N, C) tensors of the same shape, got {tuple(h_tokens.shape)} "
            f"and {tuple(c_tokens.shape)}; resize the control feature with control_to_tokens(c, (h, w)) first"
        )
    hf = h_tokens.to(_stats_dtype(h_tokens))
    cf = c_tokens.to(device=h_tokens.device, dtype=hf.dtype)
    mean_h, std_h = _moments(hf, (1,))
    mean_c, std_c = _moments(cf, (1,))
    c_hat = (cf - mean_c) * (std_h / (std_c + eps)) + mean_h
    s = _per_sample_scale(scale, h_tokens.shape[0], 3, h_tokens.device, hf.dtype)
    return (c_hat * s).to(h_tokens.dtype)

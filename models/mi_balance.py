"""MIControlNet: balanced injection and combination of control residuals.

Pure torch (no ComfyUI import). Implements Eqs. 8-12 of "Minimal Impact ControlNet"
(ICLR 2025) and a min-norm variant, for residual tensors of any shape (B, ...):
(B, C, H, W) UNet feature maps or (B, N, C) transformer tokens.

    lambda_star(v1, v2) = clip((v2 - v1) . v2 / ||v2 - v1||^2, 0, 1)          (Eq. 8)
    lambda(v1, v2)      = lambda_star / (1 - lambda_star), limited to [0, cap]  (Eq. 9)
    add_inj(e, c)       = e + lambda(e, c) * c                                  (Eq. 10)
    add_com(f1, f2)     = (1 - lambda_star(f1, f2)) f1 + lambda_star(f1, f2) f2 (Eq. 12)

``lambda_star(v1, v2)`` is the weight of *v1* in the min-norm point of the segment
[v1, v2] (the two-vector MGDA step). Eqs. 10 and 12 put it on the *second* argument,
i.e. they use the min-norm point reflected about the segment's midpoint. Modes:

- ``"paper"``: the formulas exactly as printed (default). For orthogonal e, c the
  injection weight is ||c||^2 / ||e||^2: small controls are damped, large ones amplified
  (up to ``cap``); a zero ("silent") residual is ignored by add_com.
- ``"min_norm"``: the two weights swapped, i.e. the genuine min-norm (MGDA) point:
  add_com gives the min-norm point of [f1, f2]; add_inj gives that point of [e, c]
  rescaled so that e keeps weight 1: e + lambda(c, e) * c. It behaves the opposite way
  (orthogonal case: weight ||e||^2 / ||c||^2). The paper does not settle which reading
  the authors ran.
- ``"sum"``: plain addition, bit-identical to stock ComfyUI.

Granularity: ``"layer"`` (the paper's) computes one weight per batch row, reducing over
all non-batch dims; ``"pixel"`` reduces over the channel axis only (``channel_dim``: 1 for
(B, C, H, W), -1 for (B, N, C) tokens), one weight per row and spatial position / token.
Rows are independent, so cond and uncond rows of a CFG batch get their own weights.

Numerics: dot products and norms are computed in float32 (float64 stays float64) after
scaling each row jointly by its largest magnitude, which leaves the weights unchanged
(they are jointly scale invariant) and keeps fp16/bf16/huge inputs from overflowing.

Degenerate cases (weights are always finite):
- NaN/+-inf entries count as 0 when computing weights. They are not removed from the
  residuals themselves: they reach the output as with plain addition.
- v1 == v2 (including both zero, or all non-finite): lambda_star = 0.5, since both
  endpoints are the same point; hence lambda = 1 and add_com returns that point.
- v1 = 0, v2 != 0: lambda_star = 1, lambda = cap. v2 = 0: lambda_star = 0, lambda = 0.
- lambda = cap whenever lambda_star >= cap / (cap + 1) (no division by zero).

User strength must be applied to each control's residual BEFORE calling these functions
(by the caller): lambda is not invariant to scaling one argument alone.
"""
from typing import List, Optional, Sequence

import torch

MODES = ("paper", "min_norm", "sum")
GRANULARITIES = ("layer", "pixel")
DEFAULT_CAP = 20.0
# Rows stop as soon as they converge; near-degenerate Gram matrices can need more than 256 pairwise
# steps to reach tol (weights off by ~5e-4 at 256), hardly any more than 1024.
DEFAULT_MAX_ITER = 1024

_TINY = torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------------------- helpers

def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _reduce_dims(x, granularity, channel_dim):
    """Dims summed over for one weight: all non-batch dims, or only the channel dim."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if x.dim() < 2:
        raise ValueError(f"expected a tensor of shape (B, ...) with at least 2 dims, got {tuple(x.shape)}")
    if granularity == "layer":
        return tuple(range(1, x.dim()))
    if not -x.dim() <= channel_dim < x.dim():
        raise ValueError(f"channel_dim {channel_dim} out of range for shape {tuple(x.shape)}")
    cd = channel_dim % x.dim()
    if cd == 0:
        raise ValueError("channel_dim cannot be the batch dim 0")
    return (cd,)


def _compute_dtype(*tensors):
    """At least float32 (fp16 squared norms of a 320x64x64 map overflow)."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _prepared(tensors, dims):
    """Copies in the compute dtype, non-finite -> 0, jointly scaled per row to max |x| = 1.

    Joint scaling keeps every weight unchanged and keeps sums of squares far from
    overflow / underflow whatever the input magnitude.
    """
    dt = _compute_dtype(*tensors)
    xs = [torch.nan_to_num(t.to(dt), nan=0.0, posinf=0.0, neginf=0.0) for t in tensors]
    s = torch.stack([x.abs().amax(dim=dims, keepdim=True) for x in xs]).amax(dim=0)
    s = torch.where(s > 0, s, torch.ones_like(s))  # all-zero row: nothing to scale
    return [x / s for x in xs]


def _lambda_from_star(ls, cap):
    cap = float(cap)
    if not 0.0 <= cap < float("inf"):
        raise ValueError(f"cap must be finite and >= 0, got {cap}")
    thr = cap / (cap + 1.0)
    capped = ls >= thr
    safe = torch.where(capped, torch.zeros_like(ls), ls)  # keeps 1 - ls away from 0
    val = (safe / (1.0 - safe)).clamp(0.0, cap)
    return torch.where(capped, torch.full_like(ls, cap), val)


# ---------------------------------------------------------------------------- weights

def lambda_star(v1, v2, granularity="layer", channel_dim=1):
    """Eq. 8: clip((v2 - v1).v2 / ||v2 - v1||^2, 0, 1), shape broadcastable to the inputs.

    Float32 (or float64) result in [0, 1], never NaN; v1 == v2 gives 0.5 (see module doc).
    """
    v1, v2 = torch.broadcast_tensors(v1, v2)
    dims = _reduce_dims(v1, granularity, channel_dim)
    a, b = _prepared([v1, v2], dims)
    d = b - a  # direct difference: no cancellation when v1 is close to v2
    num = (d * b).sum(dim=dims, keepdim=True)
    den = (d * d).sum(dim=dims, keepdim=True)
    ratio = (num / den.clamp_min(_TINY)).clamp(0.0, 1.0)
    return torch.where(den > 0, ratio, torch.full_like(ratio, 0.5))


def lam(v1, v2, cap=DEFAULT_CAP, granularity="layer", channel_dim=1):
    """Eq. 9: lambda_star / (1 - lambda_star) limited to [0, cap]; cap when ls >= cap/(cap+1)."""
    return _lambda_from_star(lambda_star(v1, v2, granularity, channel_dim), cap)


def min_norm_weights(vectors: Sequence[torch.Tensor], granularity="layer", channel_dim=1,
                     max_iter=DEFAULT_MAX_ITER, tol=1e-7):
    """Simplex weights w of the min-norm element of conv{v_1..v_k}, per row (and pixel).

    Returns a tensor of shape (k, *row_shape) where w[i] broadcasts against vectors[i]
    (row_shape is the input shape with the reduced dims set to 1), so that the min-norm
    element is sum_i w[i] * vectors[i]. Solved by Frank-Wolfe on the k x k Gram matrix
    (see _frank_wolfe); k = 2 gives the closed form [lambda_star, 1 - lambda_star] up to
    rounding. Identical vectors share their weight equally (uniform start).
    """
    k = len(vectors)
    if k == 0:
        raise ValueError("min_norm_weights needs at least one vector")
    vs = torch.broadcast_tensors(*vectors)
    dims = _reduce_dims(vs[0], granularity, channel_dim)
    xs = _prepared(list(vs), dims)
    row_shape = xs[0].sum(dim=dims, keepdim=True).shape
    if k == 1:
        return torch.ones((1,) + tuple(row_shape), dtype=xs[0].dtype, device=xs[0].device)
    gram = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            gram[i][j] = gram[j][i] = (xs[i] * xs[j]).sum(dim=dims, keepdim=True)
    M = torch.stack([torch.stack(row, dim=-1) for row in gram], dim=-2)  # (*row_shape, k, k)
    w = _frank_wolfe(M.reshape(-1, k, k), max_iter, tol)  # (R, k)
    return w.transpose(0, 1).reshape((k,) + tuple(row_shape))


def _frank_wolfe(M, max_iter, tol):
    """min_w w^T M w over the simplex, for a batch of Gram matrices M (R, k, k).

    Frank-Wolfe with exact line search from the uniform start, as in Sener & Koltun
    (2018, Alg. 2), but with the *pairwise* step (Lacoste-Julien & Jaggi 2015): weight
    moves from the worst active vertex to the best one instead of shrinking all weights.
    The plain step zig-zags when the optimum lies on a face (often the case for
    correlated residuals) and reaches only ~3e-3 relative accuracy in 200 steps; the
    pairwise step converges linearly. Stops when every row's pairwise gap (an upper
    bound of the Frank-Wolfe duality gap) is below tol * max_i M_ii, or after max_iter.
    """
    R, k, _ = M.shape
    w = M.new_full((R, k), 1.0 / k)
    diag = M.diagonal(dim1=-2, dim2=-1)
    limit = tol * diag.amax(dim=-1, keepdim=True) + _TINY
    for it in range(max(int(max_iter), 0)):
        g = (M @ w.unsqueeze(-1)).squeeze(-1)  # g_i = u . v_i with u = sum_j w_j v_j
        t = g.argmin(dim=-1, keepdim=True)  # vertex to move towards
        s = g.masked_fill(w <= 0, float("-inf")).argmax(dim=-1, keepdim=True)  # away vertex
        gap = g.gather(-1, s) - g.gather(-1, t)
        if it % 16 == 0 and bool((gap <= limit).all()):  # sync only every 16 steps
            break
        m_ts = M.gather(-2, t.unsqueeze(-1).expand(R, 1, k)).squeeze(-2).gather(-1, s)
        den = diag.gather(-1, t) + diag.gather(-1, s) - 2.0 * m_ts  # ||v_t - v_s||^2
        step = torch.where(den > 0, gap / den.clamp_min(_TINY), torch.zeros_like(den))
        step = torch.minimum(step.clamp_min(0.0), w.gather(-1, s))  # stay on the simplex
        w = w.scatter_add(-1, t, step).scatter_add(-1, s, -step)
    return w.clamp_min(0.0)


# ---------------------------------------------------------------------------- adding

def injection_term(e, c, mode="paper", cap=DEFAULT_CAP, granularity="layer", channel_dim=1,
                   stats: Optional[List[torch.Tensor]] = None):
    """What add_inj adds to e: lambda(e, c) * c (paper), lambda(c, e) * c (min_norm), in the
    float32-or-wider compute dtype; sum: c itself. ``stats`` as in :func:`add_inj`."""
    _check_mode(mode)
    if mode == "sum":
        return c
    w = lam(e, c, cap, granularity, channel_dim) if mode == "paper" else \
        lam(c, e, cap, granularity, channel_dim)
    if stats is not None:
        stats.append(w.detach())
    dt = _compute_dtype(e, c)
    return w.to(dt) * c.to(dt)


def add_inj(e, c, mode="paper", cap=DEFAULT_CAP, granularity="layer", channel_dim=1,
            stats: Optional[List[torch.Tensor]] = None):
    """Injects control residual c into UNet residual e (Eq. 10); result in e's dtype.

    paper: e + lambda(e, c) * c. min_norm: e + lambda(c, e) * c (the min-norm point of
    [e, c] rescaled to keep e's weight 1). sum: e + c, exactly stock ComfyUI.
    If ``stats`` is a list, the lambda tensor used is appended to it (detached, float32,
    shape broadcastable to e); sum mode appends nothing.
    """
    term = injection_term(e, c, mode, cap, granularity, channel_dim, stats)
    out = e + c if mode == "sum" else e.to(term.dtype) + term
    return out if out.dtype == e.dtype else out.to(e.dtype)


def add_com(f1, f2, mode="paper", granularity="layer", channel_dim=1):
    """Combines two controls' residuals (Eq. 12); result in the promoted dtype of f1, f2.

    paper: (1 - ls) f1 + ls f2 with ls = lambda_star(f1, f2) (so add_com(0, f) = f and
    add_com(f, 0) = f exactly). min_norm: ls f1 + (1 - ls) f2, the min-norm point of
    [f1, f2]. sum: f1 + f2.
    """
    _check_mode(mode)
    if mode == "sum":
        return f1 + f2
    ls = lambda_star(f1, f2, granularity, channel_dim)
    w2 = ls if mode == "paper" else 1.0 - ls  # weight of f2
    dt = _compute_dtype(f1, f2)
    out = (1.0 - w2).to(dt) * f1.to(dt) + w2.to(dt) * f2.to(dt)
    return out.to(torch.result_type(f1, f2))


def combine(residuals: Sequence[Optional[torch.Tensor]], mode="paper", granularity="layer",
            channel_dim=1, max_iter=DEFAULT_MAX_ITER):
    """Combines k controls' residuals for one layer, to be injected with add_inj.

    ``None`` entries (a control silent at this layer) are skipped; all None -> None.
    k = 1 returns the residual itself (same object).
    - paper: pairwise fold in list order, add_com(add_com(r1, r2), r3) ...; the result
      depends on the order for k >= 3 (the paper only evaluates pairs).
    - min_norm: k = 2 is add_com's closed form; k >= 3 the min-norm element of the convex
      hull (Frank-Wolfe, see min_norm_weights), independent of the order.
    - sum: left fold of ``+`` in list order: ((r1 + r2) + r3) ..., bit-identical to
      ComfyUI chaining controls (control_merge computes prev + own, oldest control first).
    """
    _check_mode(mode)
    rs = [r for r in residuals if r is not None]
    if not rs:
        return None
    if len(rs) == 1:
        return rs[0]
    if mode == "sum":
        out = rs[0]
        for r in rs[1:]:
            out = out + r
        return out
    if mode == "paper" or len(rs) == 2:
        out = rs[0]
        for r in rs[1:]:
            out = add_com(out, r, mode, granularity, channel_dim)
        return out
    w = min_norm_weights(rs, granularity, channel_dim, max_iter=max_iter)
    dt = _compute_dtype(*rs)
    out = w[0] * rs[0].to(dt)
    for i in range(1, len(rs)):
        out = out + w[i] * rs[i].to(dt)
    res_dtype = rs[0].dtype
    for r in rs[1:]:
        res_dtype = torch.promote_types(res_dtype, r.dtype)
    return out.to(res_dtype)


def lambda_summary(stats: Sequence[torch.Tensor]):
    """{'count', 'mean', 'min', 'max'} over all lambda values collected by add_inj(stats=...).

    Returns None when nothing was collected. Synchronises with the device (call it once
    per report, not per layer).
    """
    if not stats:
        return None
    flat = torch.cat([s.detach().float().reshape(-1).cpu() for s in stats])
    return {"count": int(flat.numel()), "mean": float(flat.mean()),
            "min": float(flat.min()), "max": float(flat.max())}

"""Properties of MIControlNet's balanced injection / combination (docs/mi_controlnet.md).

Independent oracles: a float64 numpy transcription of Eq. 8, per-pixel loops for the
pixel granularity, an exact face-by-face (KKT) solver (harness/mi_reference.py) and a dense
simplex grid for the min-norm element, and a replay of ComfyUI's control_merge addition chain for the "sum" mode.
"""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from harness.mi_reference import simplex_min_norm_weights
from xctrl.models.mi_balance import (add_com, add_inj, combine, lam, lambda_star, lambda_summary,
                                     min_norm_weights)

# derandomize: every run checks the same examples, so CI is reproducible (widen max_examples locally to explore)
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
MODES = ("paper", "min_norm", "sum")


def gen(seed, *shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def ref_lambda_star(v1, v2):
    """Eq. 8 on flattened float64 vectors, written from the paper's formula."""
    v1 = np.asarray(v1, dtype=np.float64).ravel()
    v2 = np.asarray(v2, dtype=np.float64).ravel()
    d = v2 - v1
    return float(np.clip(d @ v2 / (d @ d), 0.0, 1.0))


def orthogonal_pair(seed, shape=(1, 6, 4, 4), ratio=1.0):
    """e on even channels, c on odd channels: e . c = 0 exactly, ||c|| = ratio * ||e||."""
    x = gen(seed, *shape)
    e, c = torch.zeros(shape), torch.zeros(shape)
    e[:, 0::2] = x[:, 0::2]
    c[:, 1::2] = ratio * x[:, 0::2]  # same values: equal norms up to the ratio
    return e, c


# Arrays with anything float32 can hold: NaN, inf, 0, subnormals, 3e38.
shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3))


@st.composite
def wild_pairs(draw):
    shape = draw(shapes)
    elems = st.floats(width=32, allow_nan=True, allow_infinity=True)
    v1 = draw(hnp.arrays(np.float32, shape, elements=elems))
    kind = draw(st.sampled_from(["free", "equal", "zero", "negated"]))
    if kind == "free":
        v2 = draw(hnp.arrays(np.float32, shape, elements=elems))
    elif kind == "equal":
        v2 = v1.copy()
    elif kind == "zero":
        v2 = np.zeros_like(v1)
    else:
        v2 = -v1
    if draw(st.booleans()):
        v1, v2 = v2, v1
    return torch.from_numpy(v1), torch.from_numpy(v2)


# ------------------------------------------------------------------ lambda_star / lambda

@SETTINGS
@given(wild_pairs(), st.sampled_from(["layer", "pixel"]), st.sampled_from(MODES))
def test_weights_and_outputs_never_nan(pair, granularity, mode):
    v1, v2 = pair
    ls = lambda_star(v1, v2, granularity)
    assert torch.isfinite(ls).all() and (ls >= 0).all() and (ls <= 1).all()
    lm = lam(v1, v2, granularity=granularity)
    assert torch.isfinite(lm).all() and (lm >= 0).all() and (lm <= 20).all()
    # outputs are finite wherever the inputs are (non-finite inputs count as 0 for weights)
    finite = torch.isfinite(v1) & torch.isfinite(v2)
    clean1, clean2 = torch.where(finite, v1, 0.0), torch.where(finite, v2, 0.0)
    small1, small2 = clean1.clamp(-1e30, 1e30), clean2.clamp(-1e30, 1e30)  # no overflow in sums
    assert torch.isfinite(add_inj(small1, small2, mode, granularity=granularity)).all()
    assert torch.isfinite(add_com(small1, small2, mode, granularity=granularity)).all()
    w = min_norm_weights([v1, v2, v1 - v2], granularity)
    assert torch.isfinite(w).all()


def test_non_finite_entries_count_as_zero():
    v1, v2 = gen(1, 2, 5, 3, 3), gen(2, 2, 5, 3, 3)
    bad1, bad2 = v1.clone(), v2.clone()
    bad1[0, 1, 1, 1], bad1[1, 0, 0, 2], bad2[1, 3, 2, 0] = float("nan"), float("inf"), -float("inf")
    for t, b in ((v1, bad1), (v2, bad2)):
        t[~torch.isfinite(b)] = 0.0
    for gr in ("layer", "pixel"):
        torch.testing.assert_close(lambda_star(bad1, bad2, gr), lambda_star(v1, v2, gr))


def test_matches_float64_reference():
    for seed in range(8):
        v1, v2 = gen(seed, 3, 4, 5, 5), gen(100 + seed, 3, 4, 5, 5) + 0.3 * seed * gen(200 + seed, 3, 4, 5, 5)
        ls = lambda_star(v1, v2)
        for b in range(3):
            assert ls[b].item() == pytest.approx(ref_lambda_star(v1[b], v2[b]), abs=1e-5)


@SETTINGS
@given(st.integers(0, 10_000), st.floats(1e-12, 1e12), st.booleans(), st.sampled_from(["layer", "pixel"]))
def test_joint_scale_invariance(seed, a, negative, granularity):
    v1, v2 = gen(seed, 2, 3, 4, 4), gen(seed + 1, 2, 3, 4, 4)
    a = -a if negative else a
    ref = lambda_star(v1, v2, granularity)
    scaled = lambda_star((a * v1.double()).float(), (a * v2.double()).float(), granularity)
    torch.testing.assert_close(scaled, ref, atol=2e-5, rtol=0)


@SETTINGS
@given(st.integers(0, 10_000), st.floats(-2.0, 2.0), st.sampled_from(["layer", "pixel"]))
def test_swapping_arguments_gives_complement(seed, mix, granularity):
    # v2 partly aligned with v1 so that all of clipped-at-0, interior and clipped-at-1 occur
    v1 = gen(seed, 2, 3, 2, 2)
    v2 = mix * v1 + 0.5 * gen(seed + 1, 2, 3, 2, 2)
    s = lambda_star(v1, v2, granularity) + lambda_star(v2, v1, granularity)
    torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)


def test_orthogonal_equal_norms_is_plain_addition():
    e, c = orthogonal_pair(0)
    torch.testing.assert_close(lambda_star(e, c), torch.full((1, 1, 1, 1), 0.5))
    torch.testing.assert_close(lam(e, c), torch.ones(1, 1, 1, 1))
    for mode in ("paper", "min_norm"):
        torch.testing.assert_close(add_inj(e, c, mode), e + c)


def test_endpoints_and_opposite_vectors():
    v = gen(3, 2, 4, 3, 3)
    z = torch.zeros_like(v)
    for gr in ("layer", "pixel"):
        assert torch.equal(lambda_star(z, v, gr), torch.ones_like(lambda_star(z, v, gr)))
        assert torch.equal(lambda_star(v, z, gr), torch.zeros_like(lambda_star(v, z, gr)))
        torch.testing.assert_close(lambda_star(v, -v, gr), torch.full_like(lambda_star(v, -v, gr), 0.5))
        # degenerate: same point (incl. both zero) -> 0.5, lambda 1
        assert torch.equal(lambda_star(v, v, gr), torch.full_like(lambda_star(v, v, gr), 0.5))
        assert torch.equal(lambda_star(z, z, gr), torch.full_like(lambda_star(z, z, gr), 0.5))
        assert torch.equal(lam(z, z, granularity=gr), torch.ones_like(lam(z, z, granularity=gr)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_silent_residuals_literal(dtype):
    f = gen(4, 2, 4, 3, 3, dtype=dtype)
    z = torch.zeros_like(f)
    for gr in ("layer", "pixel"):
        assert torch.equal(add_com(z, f, granularity=gr), f)
        assert torch.equal(add_com(f, z, granularity=gr), f)
        assert torch.equal(combine([f, z, z], "paper", gr), f)
        for mode in MODES:
            assert torch.equal(add_inj(f, z, mode, granularity=gr), f)
        # min-norm reading: the min-norm point of [0, f] is 0
        assert torch.equal(add_com(z, f, "min_norm", granularity=gr), z)


def test_cap_and_orthogonal_lambda():
    for ratio2 in (0.01, 0.25, 1.0, 4.0, 19.0):
        e, c = orthogonal_pair(5, ratio=ratio2 ** 0.5)
        # paper: ||c||^2/||e||^2 ; min-norm reading: ||e||^2/||c||^2
        assert lam(e, c).item() == pytest.approx(ratio2, rel=1e-4)
        assert lam(c, e).item() == pytest.approx(1 / ratio2 if 1 / ratio2 < 20 else 20.0, rel=1e-4)
        torch.testing.assert_close(add_inj(e, c), e + ratio2 * c, rtol=1e-4, atol=1e-6)
    e, c = orthogonal_pair(5, ratio=20.0 ** 0.5)
    assert lam(e, c).item() == pytest.approx(20.0, rel=1e-5)  # the boundary, up to rounding
    for ratio2 in (20.1, 21.0, 100.0, 1e6):
        e, c = orthogonal_pair(5, ratio=ratio2 ** 0.5)
        assert lam(e, c).item() == 20.0
    e, c = orthogonal_pair(6)
    assert lam(torch.zeros_like(e), c).item() == 20.0  # lambda_star = 1: no division by zero
    assert lam(e, c, cap=0.0).item() == 0.0
    assert lam(torch.zeros_like(e), c, cap=3.5).item() == 3.5


@SETTINGS
@given(st.integers(0, 10_000), st.floats(0.0, 50.0), st.floats(-3.0, 3.0))
def test_lambda_is_capped_formula(seed, cap, mix):
    v1 = gen(seed, 3, 2, 3, 3)
    v2 = mix * v1 + 0.3 * gen(seed + 1, 3, 2, 3, 3)
    ls = lambda_star(v1, v2).double()
    lm = lam(v1, v2, cap=cap).double()
    cap = torch.tensor(cap, dtype=torch.float32).item()  # the float32 result holds cap rounded
    assert (lm >= 0).all() and (lm <= cap).all()
    expect = torch.where(ls >= cap / (cap + 1), torch.full_like(ls, cap), ls / (1 - ls).clamp_min(1e-300))
    torch.testing.assert_close(lm, expect.clamp(max=cap), rtol=1e-5, atol=1e-6)


def test_invalid_arguments():
    v = gen(0, 2, 3, 2, 2)
    with pytest.raises(ValueError):
        add_inj(v, v, mode="average")
    with pytest.raises(ValueError):
        lambda_star(v, v, granularity="channel")
    with pytest.raises(ValueError):
        lambda_star(v, v, granularity="pixel", channel_dim=0)
    with pytest.raises(ValueError):
        lam(v, v, cap=-1.0)
    with pytest.raises(ValueError):
        lambda_star(v[0, 0, 0], v[0, 0, 0])


# ------------------------------------------------------------------ rows and granularity

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("granularity", ["layer", "pixel"])
def test_batch_rows_independent(mode, granularity):
    e, c1, c2, c3 = (gen(s, 4, 3, 5, 5) for s in range(10, 14))
    perm = torch.tensor([2, 0, 3, 1])
    out = add_inj(e, c1, mode, granularity=granularity)
    torch.testing.assert_close(add_inj(e[perm], c1[perm], mode, granularity=granularity), out[perm],
                               rtol=1e-6, atol=1e-6)
    comb = combine([c1, c2, c3], mode, granularity)
    torch.testing.assert_close(combine([c1[perm], c2[perm], c3[perm]], mode, granularity), comb[perm],
                               rtol=1e-5, atol=1e-5)
    # cond / uncond: a batch of 2 equals two batches of 1
    two = add_com(c1[:2], c2[:2], mode, granularity)
    ones = torch.cat([add_com(c1[i:i + 1], c2[i:i + 1], mode, granularity) for i in range(2)])
    torch.testing.assert_close(two, ones, rtol=1e-6, atol=1e-6)


def test_pixel_granularity_is_layer_formula_per_pixel():
    v1, v2 = gen(20, 2, 6, 3, 4), gen(21, 2, 6, 3, 4)
    v2[:, :, 0, 0] = 0.0  # silent pixel
    v1[:, :, 1, 1] = v2[:, :, 1, 1]  # degenerate pixel
    v2[:, :, 2, 3] = -2 * v1[:, :, 2, 3]
    px = lambda_star(v1, v2, "pixel")
    assert px.shape == (2, 1, 3, 4)
    for h, w in itertools.product(range(3), range(4)):
        torch.testing.assert_close(px[:, 0, h, w], lambda_star(v1[:, :, h, w], v2[:, :, h, w]).reshape(2))
    out = add_inj(v1, v2, granularity="pixel")
    for h, w in itertools.product(range(3), range(4)):
        torch.testing.assert_close(out[:, :, h, w], add_inj(v1[:, :, h, w], v2[:, :, h, w]))
    # the layer value is one per row, and differs from the per-pixel ones
    assert lambda_star(v1, v2).shape == (2, 1, 1, 1)


def test_pixel_granularity_on_tokens():
    v = [gen(s, 2, 7, 5) for s in (30, 31, 32)]  # (B, N, C), channels last
    px = lambda_star(v[0], v[1], "pixel", channel_dim=-1)
    assert px.shape == (2, 7, 1)
    for n in range(7):
        torch.testing.assert_close(px[:, n, 0], lambda_star(v[0][:, n], v[1][:, n]).reshape(2))
    w = min_norm_weights(v, "pixel", channel_dim=2)
    assert w.shape == (3, 2, 7, 1)
    for n in range(7):
        torch.testing.assert_close(w[:, :, n, 0], min_norm_weights([x[:, n] for x in v]).reshape(3, 2),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_maps(dtype):
    # 320x64x64 of magnitude 100: the squared norm (~1e10) overflows fp16
    e = (100 * gen(40, 1, 320, 64, 64)).to(dtype)
    c = (100 * gen(41, 1, 320, 64, 64) + 0.5 * e.double()).to(dtype)
    ref = ref_lambda_star(e.float().numpy(), c.float().numpy())
    assert lambda_star(e, c).item() == pytest.approx(ref, abs=1e-5)
    assert 0.01 < ref < 0.99  # a non-trivial weight
    out = add_inj(e, c, "min_norm" if dtype == torch.float16 else "paper")
    assert out.dtype == dtype and torch.isfinite(out).all()
    if dtype == torch.float16:
        assert torch.isfinite(add_com(e, c, "paper", "pixel")).all()
        out = combine([e, c, 0.5 * e - c], "min_norm")
        assert out.dtype == dtype and torch.isfinite(out).all()


# ------------------------------------------------------------------ injection / combination

def test_add_inj_formulas():
    e, c = gen(50, 2, 4, 3, 3), gen(51, 2, 4, 3, 3)
    torch.testing.assert_close(add_inj(e, c), e + lam(e, c) * c)
    torch.testing.assert_close(add_inj(e, c, "min_norm"), e + lam(c, e) * c)
    # min_norm injection = min-norm point of [e, c] rescaled so that e keeps weight 1
    ls = lambda_star(e, c)
    ok = ls > 1 / 21  # below that lambda(c, e) is capped
    point = ls * e + (1 - ls) * c
    torch.testing.assert_close((add_inj(e, c, "min_norm") * ls)[ok.expand_as(e)], point[ok.expand_as(e)])
    stats = []
    add_inj(e, c, stats=stats)
    add_inj(e, c, "min_norm", granularity="pixel", stats=stats)
    add_inj(e, c, "sum", stats=stats)
    assert len(stats) == 2 and stats[1].shape == (2, 1, 3, 3)
    summary = lambda_summary(stats)
    assert summary["count"] == 2 + 18 and 0 <= summary["min"] <= summary["mean"] <= summary["max"] <= 20
    assert lambda_summary([]) is None


@SETTINGS
@given(st.integers(0, 10_000), st.floats(-2.0, 2.0))
def test_add_com_min_norm_point_and_reflection(seed, mix):
    f1 = gen(seed, 1, 3, 2, 2)
    f2 = mix * f1 + 0.5 * gen(seed + 1, 1, 3, 2, 2)
    mn = add_com(f1, f2, "min_norm").double()
    # min-norm point of the segment, checked against a dense grid over the segment
    g = torch.linspace(0, 1, 4001, dtype=torch.float64).reshape(-1, 1)
    seg = g * f1.reshape(1, -1).double() + (1 - g) * f2.reshape(1, -1).double()
    assert mn.norm().item() <= seg.norm(dim=1).min().item() + 1e-5
    # the paper's point is its reflection about the midpoint
    torch.testing.assert_close(add_com(f1, f2) + add_com(f1, f2, "min_norm"), f1 + f2, atol=1e-5, rtol=1e-5)


def test_combine_paper_folds_in_order():
    a, b, c = (gen(s, 2, 4, 3, 3) for s in (60, 61, 62))
    torch.testing.assert_close(combine([a, b, c]), add_com(add_com(a, b), c))
    assert not torch.allclose(combine([a, b, c]), combine([c, b, a]))  # documented order dependence
    assert combine([a]) is a
    assert combine([None, a, None], "min_norm") is a
    assert combine([None, None]) is None
    torch.testing.assert_close(combine([a, None, b], "paper", "pixel"), add_com(a, b, granularity="pixel"))
    torch.testing.assert_close(combine([a, b], "min_norm"), add_com(a, b, "min_norm"))


# ------------------------------------------------------------------ min-norm, k >= 3

def qp_active_set(M):
    """Exact min of w^T M w on the simplex (float64), by the face-by-face KKT solver the
    integration references use (harness/mi_reference.py)."""
    w = simplex_min_norm_weights(torch.from_numpy(M)[None])[0].numpy()
    return objective(w, M)


def simplex_grid_min(M, n=300):
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = i + j <= n
    w = np.stack([i[keep], j[keep], n - i[keep] - j[keep]], axis=1) / n
    return float(np.einsum("ri,ij,rj->r", w, M, w).min())


def as_gram(vectors):
    X = np.stack([v.double().numpy().ravel() for v in vectors])
    return X @ X.T


def objective(w, M):
    w = np.asarray(w, dtype=np.float64)
    return float(w @ M @ w)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [3, 4, 5])
def test_min_norm_matches_brute_force_qp(seed, k):
    # low dims + a shared offset: the optimum often lies on a face of the simplex
    dim = [2, 3, 6][seed % 3]
    vs = [gen(1000 * k + 10 * seed + i, 1, dim) + (0.7 if seed % 2 else 0.0) for i in range(k)]
    w = min_norm_weights(vs).reshape(k, 1)[:, 0]
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-5)
    M = as_gram(vs)
    scale = np.diag(M).max()
    f = objective(w.numpy(), M)
    exact = qp_active_set(M)
    assert exact - 1e-6 * scale <= f <= exact + 1e-4 * scale
    if k == 3:  # second oracle: a dense grid over the simplex (an upper bound)
        grid = simplex_grid_min(M)
        assert exact <= grid + 1e-9 * scale and f <= grid + 1e-3 * scale


@SETTINGS
@given(st.integers(0, 10_000), st.integers(3, 5), st.randoms(use_true_random=False),
       st.sampled_from(["layer", "pixel"]))
def test_min_norm_order_invariant(seed, k, rnd, granularity):
    vs = [gen(seed + i, 2, 8, 2, 2) + 0.5 * gen(seed + 99, 2, 8, 2, 2) for i in range(k)]
    perm = list(range(k))
    rnd.shuffle(perm)
    w = min_norm_weights(vs, granularity)
    wp = min_norm_weights([vs[p] for p in perm], granularity)
    torch.testing.assert_close(wp, w[perm], atol=2e-4, rtol=0)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(0), torch.ones_like(w[0]), atol=1e-5, rtol=0)
    out = combine(vs, "min_norm", granularity)
    torch.testing.assert_close(combine([vs[p] for p in perm], "min_norm", granularity), out,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, sum(w[i] * vs[i] for i in range(k)), atol=1e-5, rtol=1e-5)


def test_min_norm_converges_on_a_near_degenerate_row():
    """A case where 256 pairwise steps left weights 5e-4 from the optimum (a long-converging row)."""
    seed, k = 794, 5
    vs = [gen(seed + i, 2, 8, 2, 2) + 0.5 * gen(seed + 99, 2, 8, 2, 2) for i in range(k)]
    exact = min_norm_weights([v.double() for v in vs], "pixel", max_iter=100_000, tol=1e-15)
    torch.testing.assert_close(min_norm_weights(vs, "pixel").double(), exact, atol=1e-5, rtol=0)


@SETTINGS
@given(st.integers(0, 10_000), st.floats(-2.0, 2.0), st.sampled_from(["layer", "pixel"]))
def test_min_norm_k2_matches_closed_form(seed, mix, granularity):
    v1 = gen(seed, 2, 3, 2, 2)
    v2 = mix * v1 + 0.4 * gen(seed + 1, 2, 3, 2, 2)
    w = min_norm_weights([v1, v2], granularity)
    ls = lambda_star(v1, v2, granularity)
    torch.testing.assert_close(w[0], ls, atol=1e-5, rtol=0)
    torch.testing.assert_close(w[1], 1 - ls, atol=1e-5, rtol=0)


def test_min_norm_degenerate_sets():
    v = gen(70, 2, 4, 3)
    z = torch.zeros_like(v)
    w = min_norm_weights([v, v, v])
    torch.testing.assert_close(w, torch.full_like(w, 1 / 3))  # identical: shared equally
    w = min_norm_weights([v, z, 2 * v])
    torch.testing.assert_close(w[1], torch.ones_like(w[1]), atol=1e-6, rtol=0)  # zero is the min
    w = min_norm_weights([v])
    assert torch.equal(w, torch.ones_like(w))
    out = combine([v, -v, 3 * v], "min_norm")
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ sum mode = stock ComfyUI

def comfy_chain(outputs):
    """ComfyUI control_merge: each control adds the previous chain's output, prev + own."""
    prev = None
    for o in outputs:
        prev = o if prev is None else prev + o
    return prev


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sum_mode_bit_identical(dtype):
    rs = [(10 ** s * gen(80 + s, 2, 4, 5, 5)).to(dtype) for s in range(4)]
    e = gen(90, 2, 4, 5, 5).to(dtype)
    assert torch.equal(add_inj(e, rs[0], "sum"), e + rs[0])
    h = e.clone()
    h += rs[0]  # ComfyUI's apply_control adds in place
    assert torch.equal(add_inj(e, rs[0], "sum"), h)
    assert torch.equal(add_com(rs[0], rs[1], "sum"), rs[0] + rs[1])
    for k in (2, 3, 4):
        assert torch.equal(combine(rs[:k], "sum"), comfy_chain(rs[:k]))
    # a control with batch 1 next to one with batch 2 broadcasts as in ComfyUI
    assert torch.equal(combine([rs[0][:1], rs[1]], "sum"), rs[0][:1] + rs[1])

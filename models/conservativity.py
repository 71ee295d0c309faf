"""How far the part of the denoiser's Jacobian that a control adds is from symmetric, estimated
with random probes and vector-Jacobian products (MIControlNet's conservativity loss and its Asym
measure; docs/conservativity.md). Pure torch.

A control joins the denoiser at one point: ``joined = h + term(h)``, where ``h`` is the UNet's
activation there and ``term`` the control's contribution. Write ``J_c = (d out / d joined) (d term
/ d x)`` for the part of the Jacobian of the output with respect to the input ``x`` that passes
through the control's term (the whole Jacobian is J_c plus the part through ``h`` alone). Then

    asym(J) = 1/2 ||J - J^T||_F^2 = tr(J J^T) - tr(J J)

and for random probes ``v`` with mean 0 and covariance I (Rademacher: +-1; Gaussian) Hutchinson's
identity E[v^T A v] = tr(A) gives the unbiased estimate

    asym(J) ~ mean over probes of  ||J^T v||^2 - v . J^T (J^T v)

(v^T J J v = (J^T v) . (J v) = v . J^T (J^T v)), two products J^T(.) per probe, each one
backward pass from ``out`` to ``joined`` and one from ``term`` to ``x``. The full Jacobian is never
formed. Rows of the batch are treated as separate samples (the denoiser's rows do not mix):
everything is per row, summed over that row's elements.
"""
import torch

PROBES = ("rademacher", "gaussian")


def probe_vectors(shape, count, kind, generator):
    """``count`` probes of ``shape`` (float32, CPU) drawn from ``generator``: Rademacher (+-1) or Gaussian."""
    if kind not in PROBES:
        raise ValueError(f"probes must be one of {PROBES}, got {kind!r}")
    if kind == "gaussian":
        return torch.randn((int(count), *shape), generator=generator)
    return torch.randint(0, 2, (int(count), *shape), generator=generator).float() * 2 - 1


def control_jacobian_t(out, joined, term, x, create_graph=False):
    """v -> J_c^T v for ``v`` shaped like ``out`` (J_c: module docstring). ``out``, ``joined`` and
    ``term`` come from one forward of ``x`` (which requires grad); the graph is kept for further
    products, and with ``create_graph`` the products can themselves be differentiated (a loss).

    A control that joins at several points (a ControlNet: every skip connection and the middle)
    gives lists: ``joined[k] = h_k + term[k]``, none of the h_k depending on another joined point;
    then J_c = sum_k (d out / d joined_k) (d term_k / d x), and J_c^T v is one backward pass from
    ``out`` to all joined points and one from all terms to ``x``."""
    joins = list(joined) if isinstance(joined, (list, tuple)) else [joined]
    terms = list(term) if isinstance(term, (list, tuple)) else [term]

    def jt(v):
        ws = torch.autograd.grad(out, joins, v.to(out.dtype), retain_graph=True, create_graph=create_graph)
        return torch.autograd.grad(terms, x, ws, retain_graph=True, create_graph=create_graph)[0]

    return jt


def _rows(a, b):
    return (a.float() * b.float()).flatten(1).sum(1)


def hutchinson_asymmetry(jt, probes):
    """Per row: (estimate of 1/2 ||J - J^T||_F^2, estimate of ||J||_F^2), each the mean over the
    probes ``probes`` (count, *shape) of ||J^T v||^2 - v . J^T J^T v and of ||J^T v||^2."""
    if len(probes) == 0:
        raise ValueError("at least one probe is needed")
    asym = frob = 0.0
    for v in probes:
        u = jt(v)
        uu = jt(u)
        norm = _rows(u, u)
        asym = asym + norm - _rows(v.to(uu.device), uu)
        frob = frob + norm
    return asym / len(probes), frob / len(probes)


def simplified_conservativity_loss(out, joined, term, x, probes):
    """MIControlNet's simplified conservativity loss (its Eq. 18) for one forward: the mean over rows
    of the probe estimate of tr(J_c J_c^T) - tr(J_c J_c), differentiable (with respect to whatever
    the control's term depends on, e.g. the control's parameters)."""
    jt = control_jacobian_t(out, joined, term, x, create_graph=True)
    return hutchinson_asymmetry(jt, probes.to(out.device))[0].mean()


class ConservativityStage:
    """The second training stage: from optimizer step ``start`` on, ``weight`` times the simplified
    conservativity loss is added, its gradient taken with respect to ``params`` only (the control's:
    the UNet's own parameters are left out, as the paper's Assumption 4.1 says).

    ``tapped_forward(x, t, idx, empty)`` -> (out, joined, term) runs the denoiser on ``x`` (which
    requires grad) and returns its output with the activation after the control joined and the
    control's term there."""

    def __init__(self, weight, probes, kind, start, params, tapped_forward):
        if kind not in PROBES:
            raise ValueError(f"probes must be one of {PROBES}, got {kind!r}")
        self.weight, self.probes, self.kind, self.start = float(weight), int(probes), kind, int(start)
        self.params = [p for p in params if p.requires_grad]
        self.tapped_forward = tapped_forward

    def active(self, step):
        return self.weight > 0 and step >= self.start

    def loss(self, x_t, t, idx, empty, generator):
        x = x_t.detach().requires_grad_(True)
        out, joined, term = self.tapped_forward(x, t, idx, empty)
        probes = probe_vectors(tuple(out.shape), self.probes, self.kind, generator)
        return simplified_conservativity_loss(out, joined, term, x, probes)

    def add_gradients(self, loss, factor):
        """Adds d(factor * weight * loss)/d params to the params' .grad (nothing else gets any)."""
        grads = torch.autograd.grad(loss * (factor * self.weight), self.params, allow_unused=True)
        for p, g in zip(self.params, grads):
            if g is not None:
                p.grad = g.detach() if p.grad is None else p.grad + g.detach()

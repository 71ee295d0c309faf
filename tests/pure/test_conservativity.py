"""The conservativity estimator and loss (models/conservativity.py) against full Jacobians.

The reference is written here: the Jacobian the control adds, J_c = (d out / d joined) (d term / d x),
is formed in full with torch.autograd.functional.jacobian on networks small enough for it, and
its asymmetry is 1/2 ||J_c - J_c^T||_F^2.
"""
import pytest
import torch

from xctrl.models import conservativity as cons
from xctrl.models.controlnext_training import Trainer

SHAPE = (2, 3, 3)  # one row's shape (18 elements)
D = 18


class TinyControlled(torch.nn.Module):
    """x -> h = tanh(conv1 x); joined = h + term(h), term = a cross-normalization of the control's
    feature ``phi`` to h's statistics (per row); out = conv2(silu(joined)) + h (a path through h alone)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(2, 2, 3, padding=1)
        with torch.no_grad():
            for p in (*self.conv1.parameters(), *self.conv2.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.phi = torch.nn.Parameter(torch.randn(1, *SHAPE, generator=g))

    def h(self, x):
        return torch.tanh(self.conv1(x))

    def term(self, h):
        f = self.phi.expand_as(h)
        dims = (1, 2, 3)
        fn = (f - f.mean(dims, keepdim=True)) / f.std(dims, keepdim=True)
        return fn * h.std(dims, keepdim=True) * 0.7 + h.mean(dims, keepdim=True) * 0.3

    def rest(self, joined, h):
        return self.conv2(torch.nn.functional.silu(joined)) + h

    def tapped(self, x):
        h = self.h(x)
        term = self.term(h)
        joined = h + term
        return self.rest(joined, h), joined, term


def exact_control_jacobian(net, x_row, create_graph=False):
    """J_c of one row (D x D), in full."""
    x_row = x_row[None]
    h = net.h(x_row)
    joined = h + net.term(h)
    j_rest = torch.autograd.functional.jacobian(lambda j: net.rest(j, h.detach()), joined if create_graph else joined.detach(),
                                                  create_graph=create_graph)
    j_term = torch.autograd.functional.jacobian(lambda x: net.term(net.h(x)), x_row, create_graph=create_graph)
    return j_rest.reshape(D, D) @ j_term.reshape(D, D)


def exact_asymmetry(j):
    return 0.5 * ((j - j.T) ** 2).sum()


def basis_probes(rows):
    """The D standard basis vectors, each for every row at once: sum_i e_i^T A e_i = tr(A) exactly."""
    return torch.eye(D).reshape(D, 1, *SHAPE).expand(D, rows, *SHAPE).contiguous()


def _jt(net, x, create_graph=False):
    x = x.clone().requires_grad_(True)
    out, joined, term = net.tapped(x)
    return cons.control_jacobian_t(out, joined, term, x, create_graph=create_graph)


def _x(rows=2, seed=1):
    return torch.randn(rows, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_basis_probes_give_the_exact_asymmetry_and_frobenius_norm():
    net, x = TinyControlled(), _x()
    asym, frob = cons.hutchinson_asymmetry(_jt(net, x), basis_probes(2))
    for r in range(2):
        j = exact_control_jacobian(net, x[r])
        assert exact_asymmetry(j) > 1e-3  # a real asymmetry to find
        torch.testing.assert_close(asym[r] * D, exact_asymmetry(j), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(frob[r] * D, (j ** 2).sum(), rtol=1e-5, atol=1e-7)
        # and the identity the estimator rests on: 1/2 ||J - J^T||^2 = tr(J J^T) - tr(J J)
        torch.testing.assert_close(exact_asymmetry(j), torch.trace(j @ j.T) - torch.trace(j @ j), rtol=1e-5, atol=1e-7)


class TwoPointControlled(TinyControlled):
    """A control joining at two points, as a ControlNet joins every skip: h2 = tanh(conv3 h1) is a
    deeper feature of x (not of any joined point), term2 depends on x through h2 and on the
    control's second feature; out mixes both joined points."""

    def __init__(self, seed=0):
        super().__init__(seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.conv3 = torch.nn.Conv2d(2, 2, 3, padding=1)
        with torch.no_grad():
            for p in self.conv3.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.phi2 = torch.nn.Parameter(torch.randn(1, *SHAPE, generator=g))

    def hs(self, x):
        h1 = self.h(x)
        return h1, torch.tanh(self.conv3(h1))

    def terms(self, x):
        h1, h2 = self.hs(x)
        return self.term(h1), torch.sin(h2) * self.phi2

    def rest2(self, j1, j2, h1):
        return self.rest(j1, h1) + j1 * torch.tanh(j2)

    def tapped(self, x):
        h1, h2 = self.hs(x)
        t1, t2 = self.terms(x)
        j1, j2 = h1 + t1, h2 + t2
        return self.rest2(j1, j2, h1), [j1, j2], [t1, t2]


def test_a_control_joining_at_several_points_gives_the_sum_of_its_jacobians():
    """J_c = sum_k (d out / d joined_k)(d term_k / d x): in full, the Jacobian of x -> out with every
    UNet feature held at its value and only the terms following x."""
    net, x = TwoPointControlled(), _x()
    asym, frob = cons.hutchinson_asymmetry(_jt(net, x), basis_probes(2))
    for r in range(2):
        x0 = x[r][None]
        h1, h2 = (h.detach() for h in net.hs(x0))

        def through_terms(xx):
            t1, t2 = net.terms(xx)
            return net.rest2(h1 + t1, h2 + t2, h1)

        j = torch.autograd.functional.jacobian(through_terms, x0).reshape(D, D)
        assert exact_asymmetry(j) > 1e-3
        torch.testing.assert_close(asym[r] * D, exact_asymmetry(j), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(frob[r] * D, (j ** 2).sum(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", cons.PROBES)
def test_random_probe_estimate_converges_to_the_exact_asymmetry(kind):
    net, x = TinyControlled(seed=2), _x(rows=1, seed=3)
    exact = float(exact_asymmetry(exact_control_jacobian(net, x[0])))
    copies = 1000  # rows do not mix: 1000 copies of the row give 1000 independent one-probe estimates per call
    jt = _jt(net, x.expand(copies, *SHAPE))
    g = torch.Generator().manual_seed(4)
    single = torch.cat([cons.hutchinson_asymmetry(jt, cons.probe_vectors((copies, *SHAPE), 1, kind, g))[0]
                        for _ in range(3)])
    mean, stderr = float(single.mean()), float(single.std() / len(single) ** 0.5)
    assert abs(mean - exact) < 4 * stderr  # unbiased
    assert stderr < 0.1 * exact  # and the 3000-probe mean lies within a few per cent
    several = cons.hutchinson_asymmetry(jt, cons.probe_vectors((copies, *SHAPE), 3, kind, g))[0]
    assert float(several.std()) < float(single[:copies].std())  # more probes per row: a tighter estimate


def test_probe_distributions():
    g = torch.Generator().manual_seed(0)
    r = cons.probe_vectors((4, 5), 2000, "rademacher", g)
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(float(r.mean())) < 0.02
    n = cons.probe_vectors((4, 5), 2000, "gaussian", g)
    assert abs(float(n.mean())) < 0.02 and abs(float(n.var()) - 1) < 0.02
    with pytest.raises(ValueError, match="probes must be one of"):
        cons.probe_vectors((2,), 1, "uniform", g)


def test_a_linear_map_whose_asymmetry_is_known():
    """term = A x, out = joined = x + A x: J_c = A, asymmetry 1/2 ||A - A^T||^2 exactly."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(D, D, generator=g)
    x = torch.randn(3, D, generator=g).requires_grad_(True)
    term = x @ a.T
    joined = x + term
    out = joined * 1.0
    jt = cons.control_jacobian_t(out, joined, term, x)
    known = 0.5 * ((a - a.T) ** 2).sum()
    asym, frob = cons.hutchinson_asymmetry(jt, torch.eye(D)[:, None, :].expand(D, 3, D))
    torch.testing.assert_close(asym * D, known.expand(3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(frob * D, (a ** 2).sum().expand(3), rtol=1e-5, atol=1e-6)
    sym = a + a.T  # a symmetric control has none
    term_sym = x @ sym.T
    joined_sym = x + term_sym
    jt_sym = cons.control_jacobian_t(joined_sym * 1.0, joined_sym, term_sym, x)
    assert float(cons.hutchinson_asymmetry(jt_sym, torch.eye(D)[:, None, :].expand(D, 3, D))[0].abs().max()) < 1e-3


def test_the_loss_gradient_is_the_exact_asymmetry_gradient_and_reaches_only_the_control():
    net, x = TinyControlled(seed=6), _x(rows=1, seed=7)
    xg = x.clone().requires_grad_(True)
    out, joined, term = net.tapped(xg)
    loss = cons.simplified_conservativity_loss(out, joined, term, xg, basis_probes(1))
    unet = list(net.conv1.parameters()) + list(net.conv2.parameters())
    # the loss depends on the UNet's parameters too: only the stage keeps them out
    assert any(g is not None and float(g.abs().max()) > 0 for g in torch.autograd.grad(loss, unet, retain_graph=True, allow_unused=True))
    stage = cons.ConservativityStage(2.0, D, "rademacher", 0, [net.phi], None)
    stage.add_gradients(loss, 0.5)
    assert all(p.grad is None for p in unet)
    exact = exact_asymmetry(exact_control_jacobian(net, x[0], create_graph=True)) / D
    torch.testing.assert_close(loss, exact, rtol=1e-5, atol=1e-7)
    (reference,) = torch.autograd.grad(exact, net.phi)
    torch.testing.assert_close(net.phi.grad, reference * 2.0 * 0.5, rtol=1e-4, atol=1e-7)


def _trainer(net, stage_from, seed=0):
    trainer = Trainer(net, {}, 4, batch_size=2, lr_module=1e-2, seed=seed)
    trainer.stage = cons.ConservativityStage(0.5, 2, "rademacher", stage_from, [net.phi],
                                             lambda x, t, idx, empty: net.tapped(x))
    return trainer


def _step(trainer, net, latents):
    alphas = torch.linspace(0.99, 0.01, 1000)
    trainer.train_step(latents, alphas, lambda x_t, t, idx, empty: net.tapped(x_t)[0])


def test_the_stage_starts_at_its_step_and_a_resumed_run_equals_an_uninterrupted_one():
    latents = _x(rows=4, seed=8)
    net = TinyControlled(seed=9)
    straight = _trainer(net, stage_from=2)
    phi_before = net.phi.detach().clone()
    for _ in range(4):
        _step(straight, net, latents)
    assert straight.stage_losses[:2] == [0.0, 0.0] and all(v > 0 for v in straight.stage_losses[2:])
    assert not torch.equal(net.phi, phi_before)

    net2 = TinyControlled(seed=9)
    first = _trainer(net2, stage_from=2)
    for _ in range(3):
        _step(first, net2, latents)
    state = first.state()
    net3 = TinyControlled(seed=9)
    resumed = _trainer(net3, stage_from=2)
    resumed.load_state(state)
    _step(resumed, net3, latents)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    assert resumed.stage_losses == pytest.approx(straight.stage_losses, rel=1e-6)
    torch.testing.assert_close(net3.phi, net.phi, rtol=1e-6, atol=1e-7)


def test_without_the_stage_the_steps_are_unchanged():
    latents = _x(rows=4, seed=8)
    plain_net, staged_net = TinyControlled(seed=9), TinyControlled(seed=9)
    plain = Trainer(plain_net, {}, 4, batch_size=2, lr_module=1e-2, seed=0)
    late = _trainer(staged_net, stage_from=10)  # never reached: same draws, same steps
    for _ in range(2):
        _step(plain, plain_net, latents)
        _step(late, staged_net, latents)
    assert plain.losses == late.losses and torch.equal(plain_net.phi, staged_net.phi)

"""The training recipe's pure parts (models/controlnext_training.py) with torch alone.

References are written here from the recipe: DDPM noising, an epsilon-prediction MSE target,
uniform discrete timesteps, the empty-prompt share, regex selection of UNet weights.
"""
import math

import pytest
import torch

from xctrl.models import controlnext_training as tr

from xctrl.models.controlnext_training import (NUM_TIMESTEPS, Trainer, TrainingError, noised, select_parameters,
                                               weight_differences)


def ddpm_alphas_cumprod(n=NUM_TIMESTEPS):
    """Stable Diffusion's scaled-linear beta schedule, written out."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_noised_is_the_ddpm_forward_process():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 500, 999])
    a = ddpm_alphas_cumprod()
    out = noised(x0, eps, t, a)
    for i in range(3):
        ai = float(a[t[i]])
        expected = math.sqrt(ai) * x0[i].double() + math.sqrt(1 - ai) * eps[i].double()
        torch.testing.assert_close(out[i].double(), expected, atol=1e-6, rtol=0)


def _recover_noise(latents, alphas, module):
    """A 'denoiser' that predicts the true noise exactly, from x_t and the true x_0 (the module
    enters with weight 0, so there is a graph to back-propagate through)."""
    def forward(x_t, t, idx, empty):
        a = alphas[t].reshape(-1, 1, 1, 1)
        return (x_t - a.sqrt() * latents[idx]) / (1 - a).sqrt() + 0.0 * module.weight.sum()
    return forward


def test_the_target_is_the_noise_and_the_loss_its_mse():
    alphas = ddpm_alphas_cumprod()
    latents = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    module = torch.nn.Linear(1, 1)
    exact = Trainer(module, {}, 6, batch_size=3, seed=2)
    assert exact.train_step(latents, alphas, _recover_noise(latents, alphas, module)) < 1e-8
    # predicting x_0 instead (a different objective) is not what the loss rewards
    x0_pred = Trainer(module, {}, 6, batch_size=3, seed=2)
    loss = x0_pred.train_step(latents, alphas, lambda x_t, t, idx, empty: latents[idx] + 0.0 * module.weight.sum())
    assert loss > 0.5


def test_timesteps_are_uniform_over_all_discrete_steps_and_the_empty_share_holds():
    tr = Trainer(torch.nn.Linear(1, 1), {}, 10, batch_size=4000, empty_rate=0.2, seed=3)
    idx, t, noise, empty = tr.draw((1,))
    assert int(t.min()) == 0 and int(t.max()) == NUM_TIMESTEPS - 1
    assert abs(float(t.float().mean()) - (NUM_TIMESTEPS - 1) / 2) < 15  # ~3 standard errors
    assert abs(float(empty.float().mean()) - 0.2) < 0.02
    assert set(idx.tolist()) == set(range(10))
    assert abs(float(noise.std()) - 1.0) < 0.05


def test_select_parameters_fullmatches_and_names_the_fix():
    names = [("input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight", None),
             ("input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight", None),
             ("input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight", None)]
    assert select_parameters(names, r".*attn2.*to_out.*") == [names[1][0]]
    assert select_parameters(names, r".*to_out.*") == [names[0][0], names[1][0]]
    assert select_parameters(names, "") == []
    with pytest.raises(TrainingError, match="matches no UNet parameter"):
        select_parameters(names, "to_out")
    with pytest.raises(TrainingError, match="not a regular expression"):
        select_parameters(names, "(")


class TinyDenoiser(torch.nn.Module):
    """eps prediction from x_t and a control feature: only the control knows x_0 (here, -hint)."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Conv2d(4, 4, 1)
        self.to_out = torch.nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.frozen.weight.copy_(torch.eye(4)[:, :, None, None])
            self.frozen.bias.zero_()
        self.frozen.requires_grad_(False)

    def forward(self, x_t, a, feature):
        x0 = self.to_out(self.frozen(feature))
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    hints = torch.randn(8, 4, 4, 4, generator=g)
    latents = -hints
    torch.manual_seed(seed)
    module = torch.nn.Conv2d(4, 4, 3, padding=1)
    net = TinyDenoiser()
    alphas = torch.linspace(0.95, 0.05, NUM_TIMESTEPS)  # a mild schedule: no 1 / sqrt(1 - a) blow-up near t = 0

    def forward(x_t, t, idx, empty):
        return net(x_t, alphas[t].reshape(-1, 1, 1, 1), module(hints[idx]))

    return module, net, latents, alphas, forward


def test_loss_decreases_within_a_bounded_number_of_steps():
    module, net, latents, alphas, forward = _toy()
    tr = Trainer(module, {"to_out.weight": net.to_out.weight, "to_out.bias": net.to_out.bias}, 8, batch_size=4,
                 lr_module=1e-2, lr_unet=1e-3, seed=0)
    for _ in range(150):
        tr.train_step(latents, alphas, forward)
    first, last = sum(tr.losses[:10]) / 10, sum(tr.losses[-10:]) / 10
    assert last < 0.2 * first, (first, last)


def test_a_step_changes_the_module_and_the_selected_weights_only():
    module, net, latents, alphas, forward = _toy()
    before = {**{f"m.{k}": v.clone() for k, v in module.state_dict().items()},
              **{f"n.{k}": v.clone() for k, v in net.state_dict().items()}}
    tr = Trainer(module, {"to_out.weight": net.to_out.weight}, 8, batch_size=2, seed=0)
    tr.train_step(latents, alphas, forward)
    after = {**{f"m.{k}": v for k, v in module.state_dict().items()}, **{f"n.{k}": v for k, v in net.state_dict().items()}}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"m.weight", "m.bias", "n.to_out.weight"}


def test_resume_from_a_state_continues_the_same_losses():
    def make():
        module, net, latents, alphas, forward = _toy(seed=4)
        return Trainer(module, {"to_out.weight": net.to_out.weight}, 8, batch_size=2, accumulation=2, seed=5,
                       empty_rate=0.3), latents, alphas, forward

    straight, latents, alphas, forward = make()
    for _ in range(6):
        straight.train_step(latents, alphas, forward)
    first, latents2, alphas2, forward2 = make()
    for _ in range(3):
        first.train_step(latents2, alphas2, forward2)
    state = first.state()
    resumed, latents3, alphas3, forward3 = make()
    resumed.load_state(state)
    for _ in range(3):
        resumed.train_step(latents3, alphas3, forward3)
    assert resumed.step == 6
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-7)


def test_weight_differences_added_to_the_base_give_the_trained_weights():
    g = torch.Generator().manual_seed(6)
    base = {"a": torch.randn(3, 3, generator=g).half(), "b": torch.randn(2, generator=g)}
    trained = {k: v.float() + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    diff = weight_differences(trained, base)
    for k in base:
        assert diff[k].dtype == torch.float32
        torch.testing.assert_close(base[k].float() + diff[k], trained[k], atol=1e-7, rtol=0)


def test_a_step_stopped_part_way_changes_nothing_and_resumes_exactly():
    """An interrupt inside the forward (ComfyUI can stop inside a model call) after the batch was
    drawn: the draws, weights and optimizer are as before the step, so the next step is the one an
    uninterrupted run takes."""
    def make():
        torch.manual_seed(0)
        module = torch.nn.Linear(4, 4)
        return tr.Trainer(module, {}, n_items=3, batch_size=2, seed=7), module

    def forward_of(module, stop_at=None):
        calls = []

        def forward(x_t, t, idx, empty):
            calls.append(1)
            if stop_at is not None and len(calls) == stop_at:
                raise KeyboardInterrupt  # a BaseException, as ComfyUI's interrupt is in newer versions
            return module(x_t.flatten(1)).reshape(x_t.shape)
        return forward

    latents, alphas = torch.randn(3, 4, 1, 1), torch.linspace(0.99, 0.01, tr.NUM_TIMESTEPS)
    straight, m1 = make()
    for _ in range(2):
        straight.train_step(latents, alphas, forward_of(m1))
    stopped, m2 = make()
    with pytest.raises(KeyboardInterrupt):
        stopped.train_step(latents, alphas, forward_of(m2, stop_at=1))
    assert stopped.step == 0 and stopped.losses == []
    for _ in range(2):
        stopped.train_step(latents, alphas, forward_of(m2))
    assert stopped.losses == straight.losses
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_a_non_finite_loss_raises_before_the_weights_change():
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = tr.Trainer(module, {}, n_items=2, batch_size=1, seed=1)
    with pytest.raises(tr.NonFiniteError, match="the loss is nan at step 1"):
        trainer.train_step(torch.randn(2, 4, 1, 1), torch.linspace(0.99, 0.01, tr.NUM_TIMESTEPS),
                           lambda x_t, t, idx, empty: module(x_t.flatten(1)).reshape(x_t.shape) * float("nan"))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()) and trainer.step == 0


def test_non_finite_tensors_are_named_in_nested_state():
    state = {"module": {"w": torch.tensor([1.0, float("inf")])}, "losses": torch.tensor([0.1]),
             "opt": {"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}, "gen": torch.zeros(3, dtype=torch.uint8)}
    assert tr.non_finite_tensors(state) == ["module.w", "opt.state.0.exp_avg"]


def test_the_loss_curve_draws_the_conservativity_stage_in_its_own_colour_from_its_first_step():
    losses = [1.0 / (i + 1) for i in range(40)]
    plain = tr.loss_curve_image(losses)
    staged = tr.loss_curve_image(losses, stage_losses=[0.0] * 30 + [0.5 + 0.01 * i for i in range(10)])
    assert plain.shape == staged.shape == (1, 256, 512, 3)

    def orange_columns(img):  # the stage's colour (255, 170, 70): red high, blue low
        px = img[0]
        hit = (px[..., 0] > 0.9) & (px[..., 1] > 0.55) & (px[..., 1] < 0.8) & (px[..., 2] < 0.4)
        return hit[:220].any(0).nonzero().flatten()  # the plot area (its label below it left out)

    assert len(orange_columns(plain)) == 0
    columns = orange_columns(staged)
    first_step_30 = 28 + (512 - 8 - 28) * 30 / 39
    assert len(columns) > 50 and columns.min() >= first_step_30 - 2  # nothing drawn before the stage began
    # the main curve is unchanged by the second one except where they cross
    assert (plain[0, :220] != staged[0, :220]).any(-1).sum() < 0.2 * (staged[0, :220] != 24 / 255).any(-1).sum()

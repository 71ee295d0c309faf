"""MIControlNet on UNets (SD1.5, SDXL) inside a real ComfyUI: runtime/mi.py and nodes/mi_nodes.py
against the independent references of harness/mi_reference.py (ComfyUI's own Apply ControlNet
(Advanced) applies tiny random stock ControlNets; each is run directly for the reference)."""
import logging

import pytest
import torch

from harness.comfy_runtime import node_result, pack_module
from harness.mi_reference import reference_denoised, unet_reference
from harness.mi_setups import (STRENGTHS, apply_controls, denoise_once, full_sample, node_vs_reference, randn, run_node,
                               spec)


# ---------------------------------------------------------------------------- SD1.5 UNet
@pytest.mark.parametrize("n, mode, granularity", [
    (2, "paper", "layer"), (1, "paper", "layer"), (3, "paper", "layer"), (2, "min_norm", "layer"), (2, "paper", "pixel"),
])
def test_sd15_matches_hand_computation(mi_sd15, n, mode, granularity):
    got, want, stock, _ = node_vs_reference(mi_sd15, spec(STRENGTHS[:n]), mode, granularity, reference_denoised)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - stock).abs().max() > 1e-2  # the balancing changed something


def test_sd15_sum_is_stock_bit_for_bit(mi_sd15):
    from comfy_extras import nodes_freelunch

    controls = spec(STRENGTHS[:2], {1: (0.0, 0.6)})
    pos, neg = apply_controls(mi_sd15, controls)
    runtime = pack_module("runtime.mi")
    freeu = lambda m: _freeu(nodes_freelunch, m)  # noqa: E731
    stock = full_sample(mi_sd15["patcher"], pos, neg, mi_sd15["latent"])
    stock_freeu = full_sample(freeu(mi_sd15["patcher"]), pos, neg, mi_sd15["latent"])
    assert not torch.equal(stock, stock_freeu)
    # the node in sum mode
    assert torch.equal(full_sample(*run_node(mi_sd15["patcher"], pos, neg, "sum"), mi_sd15["latent"]), stock)
    # the balancing path itself in sum mode (our combination and injection, plain additions): also exact
    model, mpos, mneg, found = runtime.apply_balance(mi_sd15["patcher"], pos, neg, runtime.Balance("sum"))
    assert found == 1
    assert torch.equal(full_sample(model, mpos, mneg, mi_sd15["latent"]), stock)
    assert torch.equal(full_sample(freeu(model), mpos, mneg, mi_sd15["latent"]), stock_freeu)
    model, mpos, mneg, _ = runtime.apply_balance(freeu(mi_sd15["patcher"]), pos, neg, runtime.Balance("sum"))
    assert torch.equal(full_sample(model, mpos, mneg, mi_sd15["latent"]), stock_freeu)


def _freeu(nodes_freelunch, model):
    cls = nodes_freelunch.FreeU_V2
    if hasattr(cls, "patch"):  # classic node (0.3.x)
        return cls().patch(model, 1.3, 1.4, 0.9, 0.2)[0]
    return cls.execute(model, 1.3, 1.4, 0.9, 0.2)[0]


def test_cond_and_uncond_balanced_independently(mi_sd15):
    pos, neg = apply_controls(mi_sd15, spec(STRENGTHS[:2]))
    model, mpos, mneg = run_node(mi_sd15["patcher"], pos, neg)
    batched_calls, separate_calls = [], []
    batched = denoise_once(model, mpos, mneg, mi_sd15["x"], mi_sd15["sigma"], batched_calls)
    # a copy of the control for the negative: ComfyUI no longer batches cond with uncond
    mneg_alone = [[emb, dict(opts, control=opts["control"].copy())] for emb, opts in mneg]
    separate = denoise_once(model, mpos, mneg_alone, mi_sd15["x"], mi_sd15["sigma"], separate_calls)
    assert any(len(c) == 2 for c in batched_calls) and all(len(c) == 1 for c in separate_calls)
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    stats = mpos[0][1]["control"].balance.report()["layers"]
    assert all({"cond", "uncond"} <= set(kinds) for kinds in stats.values())
    assert any(abs(k["cond"]["mean"] - k["uncond"]["mean"]) > 1e-3 for k in stats.values())


def test_control_outside_its_range_drops_out(mi_sd15):
    late = torch.tensor(float(mi_sd15["base"].model_sampling.percent_to_sigma(0.8)))
    both = spec(STRENGTHS[:2], {1: (0.0, 0.5)})
    pos, neg = apply_controls(mi_sd15, both)
    apos, aneg = apply_controls(mi_sd15, {0: both[0]})
    model, mpos, mneg = run_node(mi_sd15["patcher"], pos, neg)
    amodel, apos, aneg = run_node(mi_sd15["patcher"], apos, aneg)
    # late: control 1 is out of its range, the result is control 0 balanced alone
    assert torch.equal(denoise_once(model, mpos, mneg, mi_sd15["x"], late), denoise_once(amodel, apos, aneg, mi_sd15["x"], late))
    # early (sigma at 30 %): both take part
    early = denoise_once(model, mpos, mneg, mi_sd15["x"], mi_sd15["sigma"])
    assert (early - denoise_once(amodel, apos, aneg, mi_sd15["x"], mi_sd15["sigma"])).abs().max() > 1e-2
    torch.testing.assert_close(early, reference_denoised(mi_sd15, both, mi_sd15["sigma"], "paper", "layer"),
                               rtol=1e-4, atol=1e-4)


def test_coexists_with_freeu(mi_sd15):
    from comfy_extras import nodes_freelunch

    controls = spec(STRENGTHS[:2])
    pos, neg = apply_controls(mi_sd15, controls)
    freeu_model = _freeu(nodes_freelunch, mi_sd15["patcher"])
    m_after, mpos, mneg = run_node(mi_sd15["patcher"], pos, neg)
    m_after = _freeu(nodes_freelunch, m_after)  # FreeU applied after the MI node
    m_before, bpos, bneg = run_node(freeu_model, pos, neg)  # FreeU applied before it
    args = (mi_sd15["x"], mi_sd15["sigma"])
    after = denoise_once(m_after, mpos, mneg, *args)
    assert torch.equal(after, denoise_once(m_before, bpos, bneg, *args))
    # both effects present: FreeU runs after the balanced injection, as it runs after ComfyUI's addition
    freeu_patch = freeu_model.model_options["transformer_options"]["patches"]["output_block_patch"][-1]
    want = reference_denoised(mi_sd15, controls, mi_sd15["sigma"], "paper", "layer",
                              post_output=lambda h, hsp: freeu_patch(h, hsp, {}))
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)
    without_freeu = denoise_once(run_node(mi_sd15["patcher"], pos, neg)[0], mpos, mneg, *args)
    assert (after - without_freeu).abs().max() > 1e-2
    assert (after - denoise_once(freeu_model, pos, neg, *args)).abs().max() > 1e-2


@pytest.mark.parametrize("mode, granularity, sampler", [
    ("min_norm", "layer", "euler"), ("min_norm", "pixel", "heun"), ("paper", "pixel", "dpmpp_2m"),
])
def test_three_controls_full_run_finite(mi_sd15, mode, granularity, sampler):
    pos, neg = apply_controls(mi_sd15, spec(STRENGTHS, {2: (0.2, 0.9)}))
    model, mpos, mneg = run_node(mi_sd15["patcher"], pos, neg, mode, granularity)
    out = full_sample(model, mpos, mneg, mi_sd15["latent"], steps=2, sampler=sampler)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, full_sample(mi_sd15["patcher"], pos, neg, mi_sd15["latent"], steps=2, sampler=sampler))


def fixed_input_control(residuals):
    """A control giving fixed 'input' residuals (like a T2I adapter), to test that path."""
    import comfy.controlnet

    class FixedInputControl(comfy.controlnet.ControlBase):
        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            prev = None
            if self.previous_controlnet is not None:
                prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
            own = {"input": [None if r is None else r.expand(x_noisy.shape[0], *r.shape[1:]).clone()
                             for r in residuals]}
            return self.control_merge(own, prev, None)

        def copy(self):
            c = FixedInputControl()
            self.copy_to(c)
            return c

    return FixedInputControl()


def test_input_residuals_injected_after_input_blocks(mi_sd15):
    import nodes

    shapes = []
    unet_reference(mi_sd15["base"], mi_sd15["x"], mi_sd15["sigma"].reshape(1), mi_sd15["pos"][0][0],
                   lambda kind, i, e: shapes.append(e.shape) or e if kind == "input" else e)
    residuals = [randn(50 + k, *shape) * 0.5 for k, shape in enumerate(reversed(shapes))]
    residuals[3] = None  # a silent entry keeps the alignment
    pos, neg = apply_controls(mi_sd15, spec(STRENGTHS[:1]))
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(
        pos, neg, fixed_input_control(residuals), mi_sd15["hints"][0], 0.7, 0.0, 1.0)
    model, mpos, mneg = run_node(mi_sd15["patcher"], pos, neg)
    got = denoise_once(model, mpos, mneg, mi_sd15["x"], mi_sd15["sigma"])
    want = reference_denoised(mi_sd15, spec(STRENGTHS[:1]), mi_sd15["sigma"], "paper", "layer",
                              input_residuals=[None if r is None else r * 0.7 for r in residuals])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    layers = mpos[0][1]["control"].balance.report()["layers"]
    assert {f"input {i}" for i in range(12) if i != 8} <= set(layers) and "input 8" not in layers
    runtime = pack_module("runtime.mi")
    summed = runtime.apply_balance(mi_sd15["patcher"], pos, neg, runtime.Balance("sum"))[:3]
    args = (mi_sd15["x"], mi_sd15["sigma"])
    assert torch.equal(denoise_once(*summed, *args), denoise_once(mi_sd15["patcher"], pos, neg, *args))


def test_node_applied_twice_balances_each_control_once(mi_sd15):
    pos, neg = apply_controls(mi_sd15, spec(STRENGTHS[:2]))
    once = run_node(mi_sd15["patcher"], pos, neg, "min_norm")
    first = run_node(mi_sd15["patcher"], pos, neg, "paper", "pixel", 5.0)
    twice = run_node(*first, "min_norm")  # the second node's settings win
    assert len(twice[1][0][1]["control"].members) == 2
    args = (mi_sd15["x"], mi_sd15["sigma"])
    torch.testing.assert_close(denoise_once(*twice, *args), denoise_once(*once, *args), rtol=0, atol=0)


def test_lambda_stats_reported(mi_sd15, caplog):
    pos, neg = apply_controls(mi_sd15, spec(STRENGTHS[:2]))
    model, mpos, mneg = run_node(mi_sd15["patcher"], pos, neg)
    with caplog.at_level(logging.INFO, logger="xctrl.mi"):
        out = full_sample(model, mpos, mneg, mi_sd15["latent"], steps=2)
    lines = [r.getMessage() for r in caplog.records if "MI balance" in r.getMessage()]
    assert len(lines) == 1, lines  # once per sampling run
    stats = mpos[0][1]["control"].balance.last_stats
    n_in = len(mi_sd15["base"].diffusion_model.input_blocks)
    assert set(stats["layers"]) == {"middle"} | {f"skip {k}" for k in range(n_in)}
    assert stats["sigma"] < float(mi_sd15["sigma"])  # the last step
    for kinds in stats["layers"].values():
        for s in kinds.values():
            assert 0.0 <= s["min"] <= s["mean"] <= s["max"] <= 20.0
    assert "skip 0" in lines[0] and "middle" in lines[0]
    text = node_result(pack_module("nodes.mi_nodes").MILambdaStats, mpos, {"samples": out})[0]
    assert "skip 11" in text and "cond/uncond" in text


def test_errors_are_clear(mi_sd15):
    pos, neg = apply_controls(mi_sd15, spec(STRENGTHS[:1]))
    _, mpos, mneg = run_node(mi_sd15["patcher"], pos, neg)
    import nodes

    assert {"XCtrl_MIBalancedControl", "XCtrl_MILambdaStats"} <= set(nodes.NODE_CLASS_MAPPINGS)
    with pytest.raises(RuntimeError, match="MODEL output"):
        denoise_once(mi_sd15["patcher"], mpos, mneg, mi_sd15["x"], mi_sd15["sigma"])
    # no ControlNet applied: passed through unchanged
    model, p, n = run_node(mi_sd15["patcher"], mi_sd15["pos"], mi_sd15["neg"])
    assert model is mi_sd15["patcher"] and p is mi_sd15["pos"] and n is mi_sd15["neg"]


def test_sdxl_controls_with_label_embedding(mi_sdxl):
    pos, neg = apply_controls(mi_sdxl, spec(STRENGTHS[:2], {1: (0.0, 0.7)}))
    stock = full_sample(mi_sdxl["patcher"], pos, neg, mi_sdxl["latent"], steps=2)
    assert torch.equal(full_sample(*run_node(mi_sdxl["patcher"], pos, neg, "sum"), mi_sdxl["latent"], steps=2), stock)
    runtime = pack_module("runtime.mi")
    summed = runtime.apply_balance(mi_sdxl["patcher"], pos, neg, runtime.Balance("sum"))[:3]
    assert torch.equal(full_sample(*summed, mi_sdxl["latent"], steps=2), stock)
    model, mpos, mneg = run_node(mi_sdxl["patcher"], pos, neg)
    out = full_sample(model, mpos, mneg, mi_sdxl["latent"], steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, stock)
    assert set(mpos[0][1]["control"].balance.last_stats["layers"]) == {"middle"} | {f"skip {k}" for k in range(9)}


# ---------------------------------------------------------------------------- keyframed and masked members
def _mask_at(mask, r):
    return torch.nn.functional.interpolate(mask, size=tuple(r.shape[-2:]), mode="nearest")


def _keyframed_control_class():
    import comfy.controlnet

    class KeyframedControl(comfy.controlnet.ControlBase):
        """What Advanced-ControlNet's controls do: their residuals come with their own step strength
        (here: a function of sigma) and mask already applied."""

        def __init__(self, inner, strength_at, mask):
            super().__init__()
            self.inner, self.strength_at, self.mask = inner, strength_at, mask

        def copy(self):
            c = KeyframedControl(self.inner.copy(), self.strength_at, self.mask)
            self.copy_to(c)
            return c

        def pre_run(self, model, percent_to_timestep_function):
            super().pre_run(model, percent_to_timestep_function)
            self.inner.pre_run(model, percent_to_timestep_function)

        def cleanup(self):
            self.inner.cleanup()
            super().cleanup()

        def get_models(self):
            return super().get_models() + self.inner.get_models()

        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            out = self.inner.get_control(x_noisy, t, cond, batched_number, transformer_options)
            s = self.strength_at(float(t.reshape(-1)[0]))
            if out is None or s == 0.0:
                return None
            return {k: [None if r is None else r * s * _mask_at(self.mask, r).to(r.dtype) for r in v] for k, v in out.items()}

    return KeyframedControl


@pytest.mark.parametrize("granularity", ["layer", "pixel"])
def test_a_keyframed_masked_control_enters_the_balance_with_both_applied(mi_sd15, granularity):
    """A control whose residuals carry its step strength and mask (as Advanced-ControlNet's do)
    is balanced with them applied; at a step where its strength is 0 it drops out."""
    mask = torch.ones(1, 1, 16, 16)
    mask[..., :, :8] = 0.0  # masked out on the left half: zero residuals there
    early_sigma = float(mi_sd15["sigma"])
    strength_at = lambda sigma: 0.5 if sigma >= early_sigma - 1e-6 else 0.0  # noqa: E731
    inner = mi_sd15["cnets"][0].copy().set_cond_hint(mi_sd15["hints"][0].movedim(-1, 1), STRENGTHS[0], (0.0, 1.0))
    keyframed = _keyframed_control_class()(inner, strength_at, mask)
    pos = [[e, dict(o, control=keyframed)] for e, o in mi_sd15["pos"]]
    neg = [[e, dict(o, control=keyframed)] for e, o in mi_sd15["neg"]]
    pos, neg = apply_controls(mi_sd15, {1: (STRENGTHS[1], 0.0, 1.0)}, pos, neg)
    model, mpos, mneg = run_node(mi_sd15["patcher"], pos, neg, "paper", granularity)
    got = denoise_once(model, mpos, mneg, mi_sd15["x"], mi_sd15["sigma"])
    controls = spec(STRENGTHS[:2])
    want = reference_denoised(mi_sd15, controls, mi_sd15["sigma"], "paper", granularity,
                              shape={0: lambda r: r * 0.5 * _mask_at(mask, r)})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    unmasked = reference_denoised(mi_sd15, controls, mi_sd15["sigma"], "paper", granularity, shape={0: lambda r: r * 0.5})
    assert (got - unmasked).abs().max() > 1e-3  # the mask is in effect
    # later, its strength is 0: control 1 alone
    late = torch.tensor(float(mi_sd15["base"].model_sampling.percent_to_sigma(0.8)))
    alone = reference_denoised(mi_sd15, {1: controls[1]}, late, "paper", granularity)
    torch.testing.assert_close(denoise_once(model, mpos, mneg, mi_sd15["x"], late), alone, rtol=1e-4, atol=1e-4)


def test_single_control_gets_a_note(mi_sd15, caplog):
    pos, neg = apply_controls(mi_sd15, spec(STRENGTHS[:1]))
    with caplog.at_level(logging.INFO, logger="xctrl.mi"):
        run_node(mi_sd15["patcher"], pos, neg)
    assert "one ControlNet only" in caplog.text and "needs two" in caplog.text


def test_unsupported_family_names_it_and_the_supported_ones(pack):
    import types

    class HunyuanVideo:  # a model config of a family MI does not know
        pass

    model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(1, 1),
                                                              model_config=HunyuanVideo()))
    with pytest.raises(ValueError, match=r"supports SD1.5 .* Flux models; this MODEL is HunyuanVideo"):
        run_node(model, [], [])

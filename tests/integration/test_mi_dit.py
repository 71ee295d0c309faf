"""MIControlNet on DiTs (SD3 MMDiT, Flux) inside a real ComfyUI, against the independent references
of harness/mi_reference.py."""
import pytest
import torch

from harness import tiny_models as tm
from harness.comfy_runtime import OtherPacksReplacement, pack_module
from harness.mi_reference import flux_reference, reference_denoised
from harness.mi_setups import STRENGTHS, apply_controls, denoise_once, full_sample, node_vs_reference, run_node, spec


# ---------------------------------------------------------------------------- SD3 MMDiT
@pytest.mark.parametrize("granularity", ["layer", "pixel"])
def test_sd3_matches_hand_computation(mi_sd3, granularity):
    controls = spec(STRENGTHS[:2])
    pos, neg = apply_controls(mi_sd3, controls)
    model, mpos, mneg = run_node(mi_sd3["patcher"], pos, neg, "paper", granularity)
    got = denoise_once(model, mpos, mneg, mi_sd3["x"], mi_sd3["sigma"])
    want = reference_denoised(mi_sd3, controls, mi_sd3["sigma"], "paper", granularity)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    stock = denoise_once(mi_sd3["patcher"], pos, neg, mi_sd3["x"], mi_sd3["sigma"])
    assert (got - stock).abs().max() > 1e-3
    layers = mpos[0][1]["control"].balance.report()["layers"]
    assert set(layers) == {"block 0", "block 1", "block 2"}  # depth 4: output[i] after joint blocks 0..2


def test_sd3_sum_is_stock_bit_for_bit(mi_sd3):
    pos, neg = apply_controls(mi_sd3, spec(STRENGTHS[:2], {1: (0.0, 0.6)}))
    runtime = pack_module("runtime.mi")
    stock = full_sample(mi_sd3["patcher"], pos, neg, mi_sd3["latent"], steps=2)
    assert torch.equal(full_sample(*run_node(mi_sd3["patcher"], pos, neg, "sum"), mi_sd3["latent"], steps=2), stock)
    model, mpos, mneg, _ = runtime.apply_balance(mi_sd3["patcher"], pos, neg, runtime.Balance("sum", channel_dim=-1))
    assert torch.equal(full_sample(model, mpos, mneg, mi_sd3["latent"], steps=2), stock)
    balanced_run = full_sample(*run_node(mi_sd3["patcher"], pos, neg, "min_norm"), mi_sd3["latent"], steps=2)
    assert torch.isfinite(balanced_run).all() and not torch.equal(balanced_run, stock)


@pytest.mark.parametrize("order", ["before", "after"])
def test_sd3_another_packs_block_replacement_is_kept_in_either_order(mi_sd3, order):
    """Another pack's replacement of joint block 1, applied before or after the MI node, runs and
    its change stays: the block's output is changed, then the balanced residual is injected."""

    def change(img):
        return img * 1.25 - 0.1

    other = OtherPacksReplacement("double_block", 1, change)
    controls = spec(STRENGTHS[:2])
    pos, neg = apply_controls(mi_sd3, controls)
    model, mpos, mneg = run_node(other.on(mi_sd3["patcher"]) if order == "before" else mi_sd3["patcher"], pos, neg)
    if order == "after":
        model = other.on(model)
    got = denoise_once(model, mpos, mneg, mi_sd3["x"], mi_sd3["sigma"])
    want = reference_denoised(mi_sd3, controls, mi_sd3["sigma"], "paper", "layer", post_block={1: change})
    assert other.calls, "the other pack's replacement did not run"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert set(mpos[0][1]["control"].balance.report()["layers"]) == {"block 0", "block 1", "block 2"}
    without = reference_denoised(mi_sd3, controls, mi_sd3["sigma"], "paper", "layer")
    assert (want - without).abs().max() > 1e-3  # the other pack's change shows in the result


# ---------------------------------------------------------------------------- Flux
@pytest.mark.parametrize("mode, granularity", [("paper", "layer"), ("paper", "pixel"), ("min_norm", "layer"),
                                               ("min_norm", "pixel")])
def test_flux_matches_hand_computation(mi_flux, mode, granularity):
    got, want, stock, mpos = node_vs_reference(mi_flux, spec(STRENGTHS[:2]), mode, granularity, flux_reference)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - stock).abs().max() > 1e-3
    stats = mpos[0][1]["control"].balance.report()["layers"]
    assert {"double 0", "double 1", "single 0", "single 1"} <= set(stats)


def test_flux_sum_is_stock_bit_for_bit_and_an_inactive_control_drops_out(mi_flux):
    runtime = pack_module("runtime.mi")
    controls = spec(STRENGTHS[:2], {1: (0.0, 0.5)})
    pos, neg = apply_controls(mi_flux, controls)
    stock = full_sample(mi_flux["patcher"], pos, neg, mi_flux["latent"])
    model, mpos, mneg, _ = runtime.apply_balance(mi_flux["patcher"], pos, neg, runtime.Balance("sum", channel_dim=-1))
    assert torch.equal(full_sample(model, mpos, mneg, mi_flux["latent"]), stock)
    late = torch.tensor(float(mi_flux["base"].model_sampling.percent_to_sigma(0.8)))
    model, mpos, mneg = run_node(mi_flux["patcher"], pos, neg)
    torch.testing.assert_close(denoise_once(model, mpos, mneg, mi_flux["x"], late),
                               flux_reference(mi_flux, {0: controls[0]}, late, "paper", "layer"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", ["before", "after"])
def test_flux_another_packs_block_replacement_still_runs(mi_flux, order):
    other = OtherPacksReplacement("single_block", 1, lambda img: img * 1.01)
    controls = spec(STRENGTHS[:2])
    pos, neg = apply_controls(mi_flux, controls)
    base = other.on(mi_flux["patcher"]) if order == "before" else mi_flux["patcher"]
    model, mpos, mneg = run_node(base, pos, neg)
    if order == "after":
        model = other.on(model)
    got = denoise_once(model, mpos, mneg, mi_flux["x"], mi_flux["sigma"])
    assert other.calls, "the other pack's replacement did not run"
    assert "single 1" in mpos[0][1]["control"].balance.report()["layers"], "the balanced injection at that block is gone"
    without = denoise_once(run_node(mi_flux["patcher"], pos, neg)[0], mpos, mneg, mi_flux["x"], mi_flux["sigma"])
    assert (got - without).abs().max() > 1e-4  # and its change is in the result


def test_flux_union_types_are_two_controls(mi_flux):
    import nodes

    union = tm.flux_controlnet(85, num_union_modes=4)
    pos, neg = mi_flux["pos"], mi_flux["neg"]
    for control_type, hint in ((0, mi_flux["hints"][0]), (2, mi_flux["hints"][1])):
        typed = union.copy()
        typed.set_extra_arg("control_type", [control_type])
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, typed, hint, 0.9, 0.0, 1.0)
    _, mpos, _ = run_node(mi_flux["patcher"], pos, neg)
    members = mpos[0][1]["control"].members
    assert [m.extra_args.get("control_type") for m in members] == [[0], [2]]

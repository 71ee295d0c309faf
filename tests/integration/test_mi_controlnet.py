"""MIControlNet glue (runtime/mi.py, nodes/mi_nodes.py) inside a real ComfyUI.

Stock ControlNets are tiny random ones built with ComfyUI's own classes and applied with
ComfyUI's own "Apply ControlNet (Advanced)" node. Independent oracle: each control network
is run directly (its residuals times strength), the residuals are combined and injected with
the formulas written out below in float64 (not via models/mi_balance.py), and the denoiser
is run block by block in a plain loop adding the balanced terms at each control point
(docs/mi_controlnet.md; ComfyUI adds output[k] to the skip of input block k, 'middle' to h
after the middle block, and on SD3 output[i] to the image tokens after joint block i).
"""
import logging

import pytest
import torch

from harness import reference as ref
from harness import tiny_models as tm
from harness.comfy_runtime import node_result, pack_module

CFG = 2.0
STRENGTHS = (0.8, 1.3, 0.6)


# ---------------------------------------------------------------------------- hand formulas
def reduce_dims(x, granularity, channel_dim):
    return tuple(range(1, x.dim())) if granularity == "layer" else (channel_dim % x.dim(),)


def hand_lambda_star(v1, v2, dims):
    """Eq. 8: clip((v2 - v1) . v2 / ||v2 - v1||^2, 0, 1)."""
    d = v2 - v1
    return ((d * v2).sum(dims, keepdim=True) / (d * d).sum(dims, keepdim=True)).clamp(0.0, 1.0)


def hand_lambda(s, cap=20.0):
    """Eq. 9: s / (1 - s), cap when s >= cap / (cap + 1)."""
    return torch.where(s >= cap / (cap + 1.0), torch.full_like(s, cap), s / (1.0 - s))


def hand_combine(residuals, mode, dims):
    """add_com folded in chain order; min_norm (k = 2): the weights swapped."""
    out = residuals[0]
    for r in residuals[1:]:
        s = hand_lambda_star(out, r, dims)
        out = (1 - s) * out + s * r if mode == "paper" else s * out + (1 - s) * r
    return out


def hand_inject(e, c, mode, dims):
    """add_inj: e + lambda(e, c) c (paper) or e + lambda(c, e) c (min_norm)."""
    s = hand_lambda_star(e, c, dims) if mode == "paper" else hand_lambda_star(c, e, dims)
    return e + hand_lambda(s) * c


def balanced(e, residuals, mode, granularity, channel_dim=1):
    """e with the balanced combination of ``residuals`` (None = silent) injected, float64."""
    rs = [r.double() for r in residuals if r is not None]
    if not rs:
        return e
    dims = reduce_dims(e, granularity, channel_dim)
    return hand_inject(e.double(), hand_combine(rs, mode, dims), mode, dims).to(e.dtype)


# ---------------------------------------------------------------------------- reference denoisers
def unet_reference(base, x, sigma, context, at, post_output=None):
    """The tests' UNet loop (harness/reference.py) with ``at(kind, index, tensor)`` at each control
    point: ("input", i) after input block i (skip and next block), ("middle", 0) after the middle
    block, ("skip", k) the skip of input block k where its output block takes it.
    ``post_output(h, hsp)`` runs after that at each output block (another pack's patch)."""
    dm = base.diffusion_model
    hooks = {("middle", 0): lambda h: at("middle", 0, h)}
    for i in range(len(dm.input_blocks)):
        hooks[("input", i, "skip")] = lambda h, i=i: at("input", i, h)
        hooks[("skip", i)] = lambda hsp, i=i: at("skip", i, hsp)
    if post_output is not None:
        hooks.update({("output", j, "pair"): post_output for j in range(len(dm.output_blocks))})
    return ref.unet_denoised(base, x, sigma, context, hooks=hooks)


def mmdit_reference(base, x, sigma, context, y, at):
    """ComfyUI's MMDiT in a plain loop; ``at("block", i, img)`` after joint block i."""
    dm, ms = base.diffusion_model, base.model_sampling
    xc = ms.calculate_input(sigma, x)
    hw = xc.shape[-2:]
    img = dm.x_embedder(xc) + dm.cropped_pos_embed(hw, device=xc.device).to(xc.dtype)
    c = dm.t_embedder(ms.timestep(sigma).float(), dtype=img.dtype) + dm.y_embedder(y)
    ctx = dm.context_embedder(context)
    for i, block in enumerate(dm.joint_blocks):
        ctx, img = block(ctx, img, c=c, use_checkpoint=False)
        img = at("block", i, img)
    out = dm.unpatchify(dm.final_layer(img, c), hw=hw)[:, :, :hw[0], :hw[1]]
    return ms.calculate_denoised(sigma, out, x)


def control_residuals(base, cnet, hint, x, sigma, context, strength, y=None):
    """One stock control's residuals, computed by running its network directly."""
    ms = base.model_sampling
    out = cnet(x=ms.calculate_input(sigma, x), hint=hint, timesteps=ms.timestep(sigma).float(), context=context, y=y)
    return {k: [r * strength for r in v] for k, v in out.items()}


def reference_denoised(setup, controls, sigma, mode, granularity, post_output=None, input_residuals=(), shape=None):
    """CFG-combined denoised output; each row (cond, uncond) computed alone.
    ``input_residuals``: an 'input' list (strength applied) of one more control; ``shape``:
    {control index: f(residual)} applied to that control's residuals before balancing."""
    rows = []
    sigma = sigma.reshape(1)
    shape = shape or {}
    for cond in (setup["pos"], setup["neg"]):
        ctx = cond[0][0]
        y = cond[0][1].get("pooled_output")
        res = [control_residuals(setup["base"], setup["cnets"][i].control_model, setup["hints"][i].movedim(-1, 1),
                                 setup["x"], sigma, ctx, strength, y)
               for i, (strength, start, end) in controls.items() if in_range(setup["base"], sigma, start, end)]
        res = [{k: [shape[i](r) for r in v] for k, v in out.items()} if i in shape else out
               for i, out in zip([i for i, (_, start, end) in controls.items() if in_range(setup["base"], sigma, start, end)], res)]

        def at(kind, idx, e):
            if kind == "middle":
                return balanced(e, [r["middle"][0] for r in res], mode, granularity)
            if kind == "skip":
                return balanced(e, [r["output"][idx] for r in res], mode, granularity)
            if kind == "block":
                return balanced(e, [r["output"][idx] for r in res if idx < len(r["output"])], mode, granularity, -1)
            if input_residuals:  # ComfyUI pops 'input' from the end: block i takes [len - 1 - i]
                return balanced(e, [input_residuals[len(input_residuals) - 1 - idx]], mode, granularity)
            return e  # stock ControlNets give no 'input' residuals

        with torch.no_grad():
            if setup["arch"] == "unet":
                rows.append(unet_reference(setup["base"], setup["x"], sigma, ctx, at, post_output))
            else:
                rows.append(mmdit_reference(setup["base"], setup["x"], sigma, ctx, y, at))
    cond, uncond = rows
    return uncond + (cond - uncond) * CFG


def in_range(base, sigma, start, end):
    ms = base.model_sampling
    return ms.percent_to_sigma(end) <= float(sigma) <= ms.percent_to_sigma(start)


# ---------------------------------------------------------------------------- ComfyUI side
def denoise_once(model, positive, negative, x, sigma, spy=None):
    """The CFG denoised output at (x, sigma) through ComfyUI's sampling machinery (controls,
    batching, patches), via a one-call custom sampler."""
    import comfy.sample
    import comfy.samplers

    got = {}

    def one_call(model_k, noise, sigmas, extra_args=None, callback=None, disable=None):
        with torch.no_grad():  # as ComfyUI's executor samples (newer Flux adds controls in place)
            got["d"] = model_k(x.clone(), sigma.reshape(1).expand(x.shape[0]), **extra_args)
        return noise

    if spy is not None:
        model = model.clone()

        def wrapper(apply_model, args):
            spy.append(list(args["cond_or_uncond"]))
            return apply_model(args["input"], args["timestep"], **args["c"])

        model.set_model_unet_function_wrapper(wrapper)
    comfy.sample.sample_custom(model, torch.zeros_like(x), CFG, comfy.samplers.KSAMPLER(one_call),
                               torch.stack([sigma, torch.zeros(())]), positive, negative, torch.zeros_like(x))
    return got["d"]


def full_sample(model, positive, negative, latent, steps=3, seed=7, sampler="euler"):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 2.5, sampler, "normal", positive, negative, latent, disable_pbar=True)


def apply_controls(setup, controls, positive=None, negative=None):
    """ComfyUI's own Apply ControlNet (Advanced) for each {index: (strength, start, end)}, in order."""
    import nodes

    pos, neg = positive or setup["pos"], negative or setup["neg"]
    for i, (strength, start, end) in controls.items():
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(
            pos, neg, setup["cnets"][i], setup["hints"][i], strength, start, end)
    return pos, neg


def run_node(model, pos, neg, mode="paper", granularity="layer", cap=20.0):
    return node_result(pack_module("nodes.mi_nodes").MIBalancedControl, model, pos, neg, mode, granularity, cap)


def spec(strengths, ranges=None):
    ranges = ranges or {}
    return {i: (s,) + ranges.get(i, (0.0, 1.0)) for i, s in enumerate(strengths)}


def randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def sd15(pack):
    patcher = tm.sd15(seed=0)
    cnets = [tm.unet_controlnet(tm.SD15_TINY, 10 + i) for i in range(3)]
    ms = patcher.model.model_sampling
    return {
        "arch": "unet", "patcher": patcher, "base": patcher.model, "cnets": cnets,
        "hints": [torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(20 + i)) for i in range(3)],
        "pos": tm.text_cond(patcher, seed=1), "neg": tm.text_cond(patcher, seed=2),
        "x": randn(3, 1, 4, 16, 16) * 2.0, "latent": torch.zeros(1, 4, 16, 16),
        "sigma": torch.tensor(float(ms.percent_to_sigma(0.3))),
    }


@pytest.fixture(scope="module")
def sdxl(pack):
    patcher = tm.sdxl(seed=8)
    cnets = [tm.unet_controlnet(tm.SDXL_TINY, 60 + i) for i in range(2)]
    return {
        "arch": "unet", "patcher": patcher, "base": patcher.model, "cnets": cnets,
        "hints": [torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(70 + i)) for i in range(2)],
        "pos": tm.text_cond(patcher, seed=9), "neg": tm.text_cond(patcher, seed=10), "latent": torch.zeros(1, 4, 8, 8),
    }


SD3_CONFIG = dict(tm.SD3_TINY, depth=4, context_embedder_config={
    "target": "torch.nn.Linear", "params": {"in_features": 48, "out_features": 256}})


@pytest.fixture(scope="module")
def sd3(pack):
    import comfy.cldm.mmdit
    import comfy.ops
    import comfy.supported_models as sm

    patcher = tm._patcher(sm.SD3, SD3_CONFIG, seed=4)
    unet_config = {k: v for k, v in patcher.model.model_config.unet_config.items() if k != "dtype"}

    def cnet(num_blocks, seed):
        module = comfy.cldm.mmdit.ControlNet(num_blocks=num_blocks, control_latent_channels=3, device="cpu",
                                             dtype=torch.float32, operations=comfy.ops.disable_weight_init, **unet_config)
        return tm.stock_controlnet(module, seed, compression_ratio=1)

    return {
        # 2 blocks for depth 4: one residual tensor repeated ([o0, o0, o1]); 4 blocks: [o0, o1, o2]
        "arch": "mmdit", "patcher": patcher, "base": patcher.model, "cnets": [cnet(2, 30), cnet(4, 31)],
        "hints": [torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(40 + i)) for i in range(2)],
        "pos": tm.text_cond(patcher, seed=5), "neg": tm.text_cond(patcher, seed=6),
        "x": randn(7, 1, 16, 16, 16), "latent": torch.zeros(1, 16, 16, 16), "sigma": torch.tensor(0.7),
    }


# ---------------------------------------------------------------------------- SD1.5 UNet
@pytest.mark.parametrize("n, mode, granularity", [
    (2, "paper", "layer"), (1, "paper", "layer"), (3, "paper", "layer"), (2, "min_norm", "layer"), (2, "paper", "pixel"),
])
def test_sd15_matches_hand_computation(sd15, n, mode, granularity):
    controls = spec(STRENGTHS[:n])
    pos, neg = apply_controls(sd15, controls)
    model, mpos, mneg = run_node(sd15["patcher"], pos, neg, mode, granularity)
    spy = []
    got = denoise_once(model, mpos, mneg, sd15["x"], sd15["sigma"], spy)
    want = reference_denoised(sd15, controls, sd15["sigma"], mode, granularity)
    stock = denoise_once(sd15["patcher"], pos, neg, sd15["x"], sd15["sigma"])
    assert [0, 1] in spy or [1, 0] in spy, f"cond and uncond were not batched together: {spy}"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - stock).abs().max() > 1e-2  # the balancing changed something


def test_sd15_sum_is_stock_bit_for_bit(sd15):
    from comfy_extras import nodes_freelunch

    controls = spec(STRENGTHS[:2], {1: (0.0, 0.6)})
    pos, neg = apply_controls(sd15, controls)
    runtime = pack_module("runtime.mi")
    freeu = lambda m: _freeu(nodes_freelunch, m)  # noqa: E731
    stock = full_sample(sd15["patcher"], pos, neg, sd15["latent"])
    stock_freeu = full_sample(freeu(sd15["patcher"]), pos, neg, sd15["latent"])
    assert not torch.equal(stock, stock_freeu)
    # the node in sum mode
    assert torch.equal(full_sample(*run_node(sd15["patcher"], pos, neg, "sum"), sd15["latent"]), stock)
    # the balancing path itself in sum mode (our combination and injection, plain additions): also exact
    model, mpos, mneg, found = runtime.apply_balance(sd15["patcher"], pos, neg, runtime.Balance("sum"))
    assert found == 1
    assert torch.equal(full_sample(model, mpos, mneg, sd15["latent"]), stock)
    assert torch.equal(full_sample(freeu(model), mpos, mneg, sd15["latent"]), stock_freeu)
    model, mpos, mneg, _ = runtime.apply_balance(freeu(sd15["patcher"]), pos, neg, runtime.Balance("sum"))
    assert torch.equal(full_sample(model, mpos, mneg, sd15["latent"]), stock_freeu)


def _freeu(nodes_freelunch, model):
    cls = nodes_freelunch.FreeU_V2
    if hasattr(cls, "patch"):  # classic node (0.3.x)
        return cls().patch(model, 1.3, 1.4, 0.9, 0.2)[0]
    return cls.execute(model, 1.3, 1.4, 0.9, 0.2)[0]


def test_cond_and_uncond_balanced_independently(sd15):
    pos, neg = apply_controls(sd15, spec(STRENGTHS[:2]))
    model, mpos, mneg = run_node(sd15["patcher"], pos, neg)
    batched_calls, separate_calls = [], []
    batched = denoise_once(model, mpos, mneg, sd15["x"], sd15["sigma"], batched_calls)
    # a copy of the control for the negative: ComfyUI no longer batches cond with uncond
    mneg_alone = [[emb, dict(opts, control=opts["control"].copy())] for emb, opts in mneg]
    separate = denoise_once(model, mpos, mneg_alone, sd15["x"], sd15["sigma"], separate_calls)
    assert any(len(c) == 2 for c in batched_calls) and all(len(c) == 1 for c in separate_calls)
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    stats = mpos[0][1]["control"].balance.report()["layers"]
    assert all({"cond", "uncond"} <= set(kinds) for kinds in stats.values())
    assert any(abs(k["cond"]["mean"] - k["uncond"]["mean"]) > 1e-3 for k in stats.values())


def test_control_outside_its_range_drops_out(sd15):
    late = torch.tensor(float(sd15["base"].model_sampling.percent_to_sigma(0.8)))
    both = spec(STRENGTHS[:2], {1: (0.0, 0.5)})
    pos, neg = apply_controls(sd15, both)
    apos, aneg = apply_controls(sd15, {0: both[0]})
    model, mpos, mneg = run_node(sd15["patcher"], pos, neg)
    amodel, apos, aneg = run_node(sd15["patcher"], apos, aneg)
    # late: control 1 is out of its range, the result is control 0 balanced alone
    assert torch.equal(denoise_once(model, mpos, mneg, sd15["x"], late), denoise_once(amodel, apos, aneg, sd15["x"], late))
    # early (sigma at 30 %): both take part
    early = denoise_once(model, mpos, mneg, sd15["x"], sd15["sigma"])
    assert (early - denoise_once(amodel, apos, aneg, sd15["x"], sd15["sigma"])).abs().max() > 1e-2
    torch.testing.assert_close(early, reference_denoised(sd15, both, sd15["sigma"], "paper", "layer"),
                               rtol=1e-4, atol=1e-4)


def test_coexists_with_freeu(sd15):
    from comfy_extras import nodes_freelunch

    controls = spec(STRENGTHS[:2])
    pos, neg = apply_controls(sd15, controls)
    freeu_model = _freeu(nodes_freelunch, sd15["patcher"])
    m_after, mpos, mneg = run_node(sd15["patcher"], pos, neg)
    m_after = _freeu(nodes_freelunch, m_after)  # FreeU applied after the MI node
    m_before, bpos, bneg = run_node(freeu_model, pos, neg)  # FreeU applied before it
    args = (sd15["x"], sd15["sigma"])
    after = denoise_once(m_after, mpos, mneg, *args)
    assert torch.equal(after, denoise_once(m_before, bpos, bneg, *args))
    # both effects present: FreeU runs after the balanced injection, as it runs after ComfyUI's addition
    freeu_patch = freeu_model.model_options["transformer_options"]["patches"]["output_block_patch"][-1]
    want = reference_denoised(sd15, controls, sd15["sigma"], "paper", "layer",
                              post_output=lambda h, hsp: freeu_patch(h, hsp, {}))
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)
    without_freeu = denoise_once(run_node(sd15["patcher"], pos, neg)[0], mpos, mneg, *args)
    assert (after - without_freeu).abs().max() > 1e-2
    assert (after - denoise_once(freeu_model, pos, neg, *args)).abs().max() > 1e-2


@pytest.mark.parametrize("mode, granularity, sampler", [
    ("min_norm", "layer", "euler"), ("min_norm", "pixel", "heun"), ("paper", "pixel", "dpmpp_2m"),
])
def test_three_controls_full_run_finite(sd15, mode, granularity, sampler):
    pos, neg = apply_controls(sd15, spec(STRENGTHS, {2: (0.2, 0.9)}))
    model, mpos, mneg = run_node(sd15["patcher"], pos, neg, mode, granularity)
    out = full_sample(model, mpos, mneg, sd15["latent"], steps=2, sampler=sampler)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, full_sample(sd15["patcher"], pos, neg, sd15["latent"], steps=2, sampler=sampler))


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


def test_input_residuals_injected_after_input_blocks(sd15):
    import nodes

    shapes = []
    unet_reference(sd15["base"], sd15["x"], sd15["sigma"].reshape(1), sd15["pos"][0][0],
                   lambda kind, i, e: shapes.append(e.shape) or e if kind == "input" else e)
    residuals = [randn(50 + k, *shape) * 0.5 for k, shape in enumerate(reversed(shapes))]
    residuals[3] = None  # a silent entry keeps the alignment
    pos, neg = apply_controls(sd15, spec(STRENGTHS[:1]))
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(
        pos, neg, fixed_input_control(residuals), sd15["hints"][0], 0.7, 0.0, 1.0)
    model, mpos, mneg = run_node(sd15["patcher"], pos, neg)
    got = denoise_once(model, mpos, mneg, sd15["x"], sd15["sigma"])
    want = reference_denoised(sd15, spec(STRENGTHS[:1]), sd15["sigma"], "paper", "layer",
                              input_residuals=[None if r is None else r * 0.7 for r in residuals])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    layers = mpos[0][1]["control"].balance.report()["layers"]
    assert {f"input {i}" for i in range(12) if i != 8} <= set(layers) and "input 8" not in layers
    runtime = pack_module("runtime.mi")
    summed = runtime.apply_balance(sd15["patcher"], pos, neg, runtime.Balance("sum"))[:3]
    args = (sd15["x"], sd15["sigma"])
    assert torch.equal(denoise_once(*summed, *args), denoise_once(sd15["patcher"], pos, neg, *args))


def test_node_applied_twice_balances_each_control_once(sd15):
    pos, neg = apply_controls(sd15, spec(STRENGTHS[:2]))
    once = run_node(sd15["patcher"], pos, neg, "min_norm")
    first = run_node(sd15["patcher"], pos, neg, "paper", "pixel", 5.0)
    twice = run_node(*first, "min_norm")  # the second node's settings win
    assert len(twice[1][0][1]["control"].members) == 2
    args = (sd15["x"], sd15["sigma"])
    torch.testing.assert_close(denoise_once(*twice, *args), denoise_once(*once, *args), rtol=0, atol=0)


def test_lambda_stats_reported(sd15, caplog):
    pos, neg = apply_controls(sd15, spec(STRENGTHS[:2]))
    model, mpos, mneg = run_node(sd15["patcher"], pos, neg)
    with caplog.at_level(logging.INFO, logger="xctrl.mi"):
        out = full_sample(model, mpos, mneg, sd15["latent"], steps=2)
    lines = [r.getMessage() for r in caplog.records if "MI balance" in r.getMessage()]
    assert len(lines) == 1, lines  # once per sampling run
    stats = mpos[0][1]["control"].balance.last_stats
    n_in = len(sd15["base"].diffusion_model.input_blocks)
    assert set(stats["layers"]) == {"middle"} | {f"skip {k}" for k in range(n_in)}
    assert stats["sigma"] < float(sd15["sigma"])  # the last step
    for kinds in stats["layers"].values():
        for s in kinds.values():
            assert 0.0 <= s["min"] <= s["mean"] <= s["max"] <= 20.0
    assert "skip 0" in lines[0] and "middle" in lines[0]
    text = node_result(pack_module("nodes.mi_nodes").MILambdaStats, mpos, {"samples": out})[0]
    assert "skip 11" in text and "cond/uncond" in text


def test_errors_are_clear(sd15):
    pos, neg = apply_controls(sd15, spec(STRENGTHS[:1]))
    _, mpos, mneg = run_node(sd15["patcher"], pos, neg)
    import nodes

    assert {"XCtrl_MIBalancedControl", "XCtrl_MILambdaStats"} <= set(nodes.NODE_CLASS_MAPPINGS)
    with pytest.raises(RuntimeError, match="MODEL output"):
        denoise_once(sd15["patcher"], mpos, mneg, sd15["x"], sd15["sigma"])
    # no ControlNet applied: passed through unchanged
    model, p, n = run_node(sd15["patcher"], sd15["pos"], sd15["neg"])
    assert model is sd15["patcher"] and p is sd15["pos"] and n is sd15["neg"]


def test_sdxl_controls_with_label_embedding(sdxl):
    pos, neg = apply_controls(sdxl, spec(STRENGTHS[:2], {1: (0.0, 0.7)}))
    stock = full_sample(sdxl["patcher"], pos, neg, sdxl["latent"], steps=2)
    assert torch.equal(full_sample(*run_node(sdxl["patcher"], pos, neg, "sum"), sdxl["latent"], steps=2), stock)
    runtime = pack_module("runtime.mi")
    summed = runtime.apply_balance(sdxl["patcher"], pos, neg, runtime.Balance("sum"))[:3]
    assert torch.equal(full_sample(*summed, sdxl["latent"], steps=2), stock)
    model, mpos, mneg = run_node(sdxl["patcher"], pos, neg)
    out = full_sample(model, mpos, mneg, sdxl["latent"], steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, stock)
    assert set(mpos[0][1]["control"].balance.last_stats["layers"]) == {"middle"} | {f"skip {k}" for k in range(9)}


# ---------------------------------------------------------------------------- SD3 MMDiT
@pytest.mark.parametrize("granularity", ["layer", "pixel"])
def test_sd3_matches_hand_computation(sd3, granularity):
    controls = spec(STRENGTHS[:2])
    pos, neg = apply_controls(sd3, controls)
    model, mpos, mneg = run_node(sd3["patcher"], pos, neg, "paper", granularity)
    got = denoise_once(model, mpos, mneg, sd3["x"], sd3["sigma"])
    want = reference_denoised(sd3, controls, sd3["sigma"], "paper", granularity)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    stock = denoise_once(sd3["patcher"], pos, neg, sd3["x"], sd3["sigma"])
    assert (got - stock).abs().max() > 1e-3
    layers = mpos[0][1]["control"].balance.report()["layers"]
    assert set(layers) == {"block 0", "block 1", "block 2"}  # depth 4: output[i] after joint blocks 0..2


def test_sd3_sum_is_stock_bit_for_bit(sd3):
    pos, neg = apply_controls(sd3, spec(STRENGTHS[:2], {1: (0.0, 0.6)}))
    runtime = pack_module("runtime.mi")
    stock = full_sample(sd3["patcher"], pos, neg, sd3["latent"], steps=2)
    assert torch.equal(full_sample(*run_node(sd3["patcher"], pos, neg, "sum"), sd3["latent"], steps=2), stock)
    model, mpos, mneg, _ = runtime.apply_balance(sd3["patcher"], pos, neg, runtime.Balance("sum", channel_dim=-1))
    assert torch.equal(full_sample(model, mpos, mneg, sd3["latent"], steps=2), stock)
    balanced_run = full_sample(*run_node(sd3["patcher"], pos, neg, "min_norm"), sd3["latent"], steps=2)
    assert torch.isfinite(balanced_run).all() and not torch.equal(balanced_run, stock)


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
def test_a_keyframed_masked_control_enters_the_balance_with_both_applied(sd15, granularity):
    """A control whose residuals carry its step strength and mask (as Advanced-ControlNet's do)
    is balanced with them applied; at a step where its strength is 0 it drops out."""
    mask = torch.ones(1, 1, 16, 16)
    mask[..., :, :8] = 0.0  # masked out on the left half: zero residuals there
    early_sigma = float(sd15["sigma"])
    strength_at = lambda sigma: 0.5 if sigma >= early_sigma - 1e-6 else 0.0  # noqa: E731
    inner = sd15["cnets"][0].copy().set_cond_hint(sd15["hints"][0].movedim(-1, 1), STRENGTHS[0], (0.0, 1.0))
    keyframed = _keyframed_control_class()(inner, strength_at, mask)
    pos = [[e, dict(o, control=keyframed)] for e, o in sd15["pos"]]
    neg = [[e, dict(o, control=keyframed)] for e, o in sd15["neg"]]
    pos, neg = apply_controls(sd15, {1: (STRENGTHS[1], 0.0, 1.0)}, pos, neg)
    model, mpos, mneg = run_node(sd15["patcher"], pos, neg, "paper", granularity)
    got = denoise_once(model, mpos, mneg, sd15["x"], sd15["sigma"])
    controls = spec(STRENGTHS[:2])
    want = reference_denoised(sd15, controls, sd15["sigma"], "paper", granularity,
                              shape={0: lambda r: r * 0.5 * _mask_at(mask, r)})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    unmasked = reference_denoised(sd15, controls, sd15["sigma"], "paper", granularity, shape={0: lambda r: r * 0.5})
    assert (got - unmasked).abs().max() > 1e-3  # the mask is in effect
    # later, its strength is 0: control 1 alone
    late = torch.tensor(float(sd15["base"].model_sampling.percent_to_sigma(0.8)))
    alone = reference_denoised(sd15, {1: controls[1]}, late, "paper", granularity)
    torch.testing.assert_close(denoise_once(model, mpos, mneg, sd15["x"], late), alone, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- Flux
@pytest.fixture(scope="module")
def flux(pack):
    patcher = tm.flux(seed=11)
    return {
        "patcher": patcher, "base": patcher.model,
        "cnets": [tm.flux_controlnet(80), tm.flux_controlnet(81)],
        "hints": [torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(90 + i)) for i in range(2)],
        "pos": tm.text_cond(patcher, seed=12), "neg": tm.text_cond(patcher, seed=13),
        "x": randn(14, 1, 16, 8, 8), "latent": torch.zeros(1, 16, 8, 8),
        "sigma": torch.tensor(float(patcher.model.model_sampling.percent_to_sigma(0.3))),
    }


def flux_residuals(setup, i, cond, sigma, strength):
    """Control i's residuals for one row, from its network run directly (times its strength)."""
    ms = setup["base"].model_sampling
    net = setup["cnets"][i].control_model
    opts = cond[0][1]
    out = net(x=ms.calculate_input(sigma, setup["x"]), hint=setup["hints"][i].movedim(-1, 1),
              timesteps=ms.timestep(sigma).float(), context=cond[0][0], y=opts["pooled_output"],
              guidance=torch.tensor([opts["guidance"]]))
    return {k: [r * strength for r in v] for k, v in out.items()}


def flux_reference(setup, controls, sigma, mode, granularity):
    """Balanced with the hand formulas at each Flux control point, through the test's own block
    replacements on a clone of the base (residuals computed per row, cond and uncond apart)."""
    active = {i: c for i, c in controls.items() if in_range(setup["base"], sigma, c[1], c[2])}
    rows = {kind: [flux_residuals(setup, i, cond, sigma.reshape(1), strength) for i, (strength, _, _) in active.items()]
            for kind, cond in ((0, setup["pos"]), (1, setup["neg"]))}
    state = {}

    def per_row(to, key, index):
        """[per control: the row-stacked residual at (key, index)] for this call's rows."""
        kinds = to["cond_or_uncond"]
        return [torch.cat([rows[k][c][key][index] for k in kinds]) for c in range(len(active))]

    def double(i):
        def block(args, extra):
            out = extra["original_block"](args)
            img = out["img"]
            state["img"] = img.shape[1]
            rs = per_row(args["transformer_options"], "input", i)
            if rs:
                n = rs[0].shape[1]
                out = dict(out, img=torch.cat([balanced(img[:, :n], rs, mode, granularity, -1), img[:, n:]], 1))
            return out
        return block

    def single(i):
        def block(args, extra):
            out = extra["original_block"](args)
            joint = out["img"]
            rs = per_row(args["transformer_options"], "output", i)
            if rs:
                txt, n = joint.shape[1] - state["img"], rs[0].shape[1]
                mid = balanced(joint[:, txt:txt + n], rs, mode, granularity, -1)
                out = dict(out, img=torch.cat([joint[:, :txt], mid, joint[:, txt + n:]], 1))
            return out
        return block

    model = setup["patcher"].clone()
    dm = setup["base"].diffusion_model
    for i in range(len(dm.double_blocks)):
        model.set_model_patch_replace(double(i), "dit", "double_block", i)
    for i in range(len(dm.single_blocks)):
        model.set_model_patch_replace(single(i), "dit", "single_block", i)
    with torch.no_grad():
        return denoise_once(model, setup["pos"], setup["neg"], setup["x"], sigma)


def flux_controls(setup, controls):
    import nodes

    pos, neg = setup["pos"], setup["neg"]
    for i, (strength, start, end) in controls.items():
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, setup["cnets"][i], setup["hints"][i],
                                                                   strength, start, end)
    return pos, neg


@pytest.mark.parametrize("mode, granularity", [("paper", "layer"), ("paper", "pixel"), ("min_norm", "layer"),
                                               ("min_norm", "pixel")])
def test_flux_matches_hand_computation(flux, mode, granularity):
    controls = spec(STRENGTHS[:2])
    pos, neg = flux_controls(flux, controls)
    model, mpos, mneg = run_node(flux["patcher"], pos, neg, mode, granularity)
    spy = []
    got = denoise_once(model, mpos, mneg, flux["x"], flux["sigma"], spy)
    want = flux_reference(flux, controls, flux["sigma"], mode, granularity)
    stock = denoise_once(flux["patcher"], pos, neg, flux["x"], flux["sigma"])
    assert [0, 1] in spy or [1, 0] in spy
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - stock).abs().max() > 1e-3
    stats = mpos[0][1]["control"].balance.report()["layers"]
    assert {"double 0", "double 1", "single 0", "single 1"} <= set(stats)


def test_flux_sum_is_stock_bit_for_bit_and_an_inactive_control_drops_out(flux):
    runtime = pack_module("runtime.mi")
    controls = spec(STRENGTHS[:2], {1: (0.0, 0.5)})
    pos, neg = flux_controls(flux, controls)
    stock = full_sample(flux["patcher"], pos, neg, flux["latent"])
    model, mpos, mneg, _ = runtime.apply_balance(flux["patcher"], pos, neg, runtime.Balance("sum", channel_dim=-1))
    assert torch.equal(full_sample(model, mpos, mneg, flux["latent"]), stock)
    late = torch.tensor(float(flux["base"].model_sampling.percent_to_sigma(0.8)))
    model, mpos, mneg = run_node(flux["patcher"], pos, neg)
    torch.testing.assert_close(denoise_once(model, mpos, mneg, flux["x"], late),
                               flux_reference(flux, {0: controls[0]}, late, "paper", "layer"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", ["before", "after"])
def test_flux_another_packs_block_replacement_still_runs(flux, order):
    calls = []

    def other(args, extra):
        calls.append(1)
        out = extra["original_block"](args)
        return dict(out, img=out["img"] * 1.01)

    def with_other(model):
        model = model.clone()
        model.set_model_patch_replace(other, "dit", "single_block", 1)
        return model

    controls = spec(STRENGTHS[:2])
    pos, neg = flux_controls(flux, controls)
    base = with_other(flux["patcher"]) if order == "before" else flux["patcher"]
    model, mpos, mneg = run_node(base, pos, neg)
    if order == "after":
        model = with_other(model)
    got = denoise_once(model, mpos, mneg, flux["x"], flux["sigma"])
    assert calls, "the other pack's replacement did not run"
    assert "single 1" in mpos[0][1]["control"].balance.report()["layers"], "the balanced injection at that block is gone"
    without = denoise_once(run_node(flux["patcher"], pos, neg)[0], mpos, mneg, flux["x"], flux["sigma"])
    assert (got - without).abs().max() > 1e-4  # and its change is in the result


def test_flux_union_types_are_two_controls(flux):
    import nodes

    union = tm.flux_controlnet(85, num_union_modes=4)
    pos, neg = flux["pos"], flux["neg"]
    for control_type, hint in ((0, flux["hints"][0]), (2, flux["hints"][1])):
        typed = union.copy()
        typed.set_extra_arg("control_type", [control_type])
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, typed, hint, 0.9, 0.0, 1.0)
    _, mpos, _ = run_node(flux["patcher"], pos, neg)
    members = mpos[0][1]["control"].members
    assert [m.extra_args.get("control_type") for m in members] == [[0], [2]]


def test_single_control_gets_a_note(sd15, caplog):
    pos, neg = apply_controls(sd15, spec(STRENGTHS[:1]))
    with caplog.at_level(logging.INFO, logger="xctrl.mi"):
        run_node(sd15["patcher"], pos, neg)
    assert "one ControlNet only" in caplog.text and "needs two" in caplog.text


def test_unsupported_family_names_it_and_the_supported_ones(pack):
    import types

    class HunyuanVideo:  # a model config of a family MI does not know
        pass

    model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(1, 1),
                                                              model_config=HunyuanVideo()))
    with pytest.raises(ValueError, match=r"supports SD1.5 .* Flux models; this MODEL is HunyuanVideo"):
        run_node(model, [], [])

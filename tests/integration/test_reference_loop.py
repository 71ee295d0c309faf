"""The tests' hand-written loops (harness/reference.py, harness/mi_reference.py) are ComfyUI's
forward: without hooks they equal ComfyUI's own apply_model bit for bit, and the MI references put
stock control residuals where ComfyUI does, so a failing parity test points at the method, not at
the loop."""
import pytest
import torch

from harness import reference as ref
from harness import tiny_models as tm


def _inputs(model, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    dm = model.diffusion_model
    x = torch.randn(rows, 4, 8, 8, generator=g)
    sigma = torch.full((rows,), 2.3)
    ctx = torch.randn(rows, 7, tm.SDXL_TINY["context_dim"], generator=g)
    y = torch.randn(rows, dm.label_emb[0][0].in_features, generator=g) if getattr(dm, "label_emb", None) is not None else None
    return x, sigma, ctx, y


@pytest.mark.parametrize("family", ["sd15", "sdxl", "svd"])
def test_loop_without_hooks_is_comfyuis_apply_model(family, pack):
    patcher = getattr(tm, family)()
    model = patcher.model
    frames = 3 if family == "svd" else None
    x, sigma, ctx, y = _inputs(model, frames or 2)
    kw = {}
    if family == "svd":
        ctx = ctx[:, :1]
        kw = dict(c_concat=torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5)), num_video_frames=3)
    with torch.no_grad():
        want = model.apply_model(x, sigma, c_crossattn=ctx, y=y, transformer_options={},
                                 **(dict(kw, image_only_indicator=torch.zeros(1)) if frames else kw))
        got = ref.unet_denoised(model, x, sigma, ctx, y=y, **kw)
    assert torch.equal(got, want)


def test_hooks_change_what_they_say(pack):
    model = tm.sd15().model
    x, sigma, ctx, _ = _inputs(model, 1)
    with torch.no_grad():
        plain = ref.unet_denoised(model, x, sigma, ctx)
        for point in [("input", 3), ("input", 3, "skip"), ("middle", 0), ("output", 2), ("skip", 4)]:
            changed = ref.unet_denoised(model, x, sigma, ctx, hooks={point: lambda h: h * 1.5})
            assert not torch.equal(changed, plain), point


def test_mmdit_loop_without_hooks_is_comfyuis_apply_model(pack):
    from harness.mi_reference import mmdit_reference
    from harness.mi_setups import sd3_setup

    setup = sd3_setup()
    model, cond = setup["base"], setup["pos"][0]
    sigma = setup["sigma"].reshape(1)
    y = cond[1]["pooled_output"]
    with torch.no_grad():
        want = model.apply_model(setup["x"], sigma, c_crossattn=cond[0], y=y, transformer_options={})
        got = mmdit_reference(model, setup["x"], sigma, cond[0], y, lambda kind, i, img: img)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_control_points_of_the_mi_references_are_comfyuis(family, pack):
    """In mode "sum" the MI references add each stock ControlNet's residuals where they say ComfyUI
    does: they then equal ComfyUI's own stock forward with the same ControlNets applied."""
    from harness import mi_reference as mr
    from harness import mi_setups as ms

    setup = getattr(ms, f"{family}_setup")()
    controls = ms.spec(ms.STRENGTHS[:2])
    pos, neg = ms.apply_controls(setup, controls)
    stock = ms.denoise_once(setup["patcher"], pos, neg, setup["x"], setup["sigma"])
    if family == "flux":
        want = mr.flux_reference(setup, controls, setup["sigma"], "sum", "layer")
    else:
        want = mr.reference_denoised(setup, controls, setup["sigma"], "sum", "layer")
    plain = ms.denoise_once(setup["patcher"], setup["pos"], setup["neg"], setup["x"], setup["sigma"])
    assert (stock - plain).abs().max() > 1e-3  # the controls act at these points
    torch.testing.assert_close(want.to(stock.dtype), stock, rtol=1e-5, atol=1e-5)

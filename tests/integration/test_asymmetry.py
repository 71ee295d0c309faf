"""ControlNeXt Jacobian Asymmetry (runtime/asymmetry.py) on a tiny SD1.5 in a real ComfyUI, against
the full Jacobian the control adds, formed here: J_c = (d out / d joined) (d term / d x), with the
SD1.5-Training injection (after input block 3, pool then normalize, eps 1e-12) written out."""
import pytest
import torch

from harness import tiny_models as tm
from harness.comfy_runtime import node_result, pack_module, pack_node_classes
from harness.controlnext_files import controlnext_sd

TIMESTEP, SEED = 400, 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def case(pack):
    g = torch.Generator().manual_seed(0)
    base = tm.sd15(seed=3)
    control = pack_module("runtime.controlnext_apply").LoadedControlNeXt(
        "cnx_asym.safetensors", controlnext_sd("sd15_training", 32, seed=8), trained_for="sd15_training")
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=g)}
    image = torch.rand(1, 64, 64, 3, generator=g)
    return base, control, image, latent, tm.text_cond(base)


def _cross_norm_term(h, c, scale):
    c = torch.nn.functional.adaptive_avg_pool2d(c, h.shape[-2:])
    dims = (1, 2, 3)
    hat = (c - c.mean(dims, keepdim=True)) * h.std(dims, keepdim=True) / (c.std(dims, keepdim=True) + 1e-12)
    return (hat + h.mean(dims, keepdim=True)) * scale


def exact_asymmetry(case, strength):
    """(1/2 ||J_c - J_c^T||_F^2, ||J_c||_F^2) with the whole Jacobian formed."""
    base, control, image, latent, pos = case
    cnx = pack_module("models.controlnext")
    dm = base.model.diffusion_model
    module = cnx.build_controlnext(control.state_dict, "sd15_training").eval()
    sigmas = base.model.model_sampling.sigmas.float()
    a = 1.0 / (sigmas[TIMESTEP] ** 2 + 1.0)
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(SEED))  # the first draw
    x = a.sqrt() * latent["samples"] + (1 - a).sqrt() * noise
    t = torch.tensor([float(TIMESTEP)])
    with torch.no_grad():
        feat = module(image.permute(0, 3, 1, 2), t)
    ctx = pos[0][0]

    def run(x, at_point):
        def patch(h, to):
            return at_point(h) if to.get("block") == ("input", 3) else h
        return dm(x, t, context=ctx, transformer_options={"patches": {"input_block_patch_after_skip": [patch]}})

    seen = {}

    def record(h):
        seen["term"] = _cross_norm_term(h, feat, strength)
        seen["joined"] = h + seen["term"]
        return seen["joined"]

    with torch.enable_grad():
        run(x, record)
        joined = seen["joined"].detach()
        j_rest = torch.autograd.functional.jacobian(lambda j: run(x, lambda h: j), joined)
        j_term = torch.autograd.functional.jacobian(lambda xx: (run(xx, record), seen["term"])[1], x)
    d = x.numel()
    jc = j_rest.reshape(d, joined.numel()) @ j_term.reshape(joined.numel(), d)
    return float(0.5 * ((jc - jc.T) ** 2).sum()), float((jc ** 2).sum())


def test_the_estimate_matches_the_full_jacobian(case):
    base, control, image, latent, pos = case
    measure = pack_module("runtime.asymmetry").measure
    asym, frob = exact_asymmetry(case, 0.8)
    assert asym > 0 and frob > asym * 0.01
    got = measure(base, control, image, latent, pos, strength=0.8, timestep=TIMESTEP, probes=256, seed=SEED)
    assert got.mean == pytest.approx(asym, rel=0.15)
    assert float(got.frobenius[0]) == pytest.approx(frob, rel=0.15)
    assert got.relative == pytest.approx(asym / frob, rel=0.25)
    off = measure(base, control, image, latent, pos, strength=0.0, timestep=TIMESTEP, probes=4, seed=SEED)
    assert off.mean == 0 and off.relative == 0  # no control, no Jacobian part of it


def test_the_node_reports_it_and_refuses_other_models(case):
    base, control, image, latent, pos = case
    node = pack_node_classes()["XCtrl_ControlNeXtAsymmetry"]
    asym, relative, report = node_result(node, base, control, image, latent, pos, 1.0, 500, 4, 0, "gaussian", "refuse")
    assert asym > 0 and 0 <= relative <= 2 and "Asym" in report and "4 probe(s)" in report
    with pytest.raises(ValueError, match=r"ControlNeXt Jacobian Asymmetry \(XCtrl\) measures ControlNeXt on SD1.5 and SDXL"):
        node_result(node, tm.svd(), control, image, latent, pos, 1.0, 500, 4, 0, "rademacher", "refuse")
    with pytest.raises(ValueError, match="2 images for 1 latents"):
        node_result(node, base, control, image.expand(2, -1, -1, -1), latent, pos, 1.0, 500, 4, 0, "rademacher", "refuse")

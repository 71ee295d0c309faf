"""ControlNet Jacobian Asymmetry (runtime/asymmetry.py) on tiny SD1.5 and SDXL models with stock
ControlNets in a real ComfyUI, against the full Jacobian the control adds, formed here: with
out(x, r) the UNet's output on x with residuals r added where ComfyUI adds them (output residual k
into the skip of input block k, the middle residual after the middle block) and r(x) the
ControlNet's residuals times the strength, J_c = d out(x, r(x')) / d x' at x' = x."""
import pytest
import torch

from harness import tiny_models as tm
from harness.comfy_runtime import node_result, pack_module, pack_node_classes
from harness.training_data import random_controlnet_file

TIMESTEP, SEED = 400, 3
NODE_ID = "XCtrl_ControlNetAsymmetry"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def _loaded(controlnet_dir, name, seed, zeroed=()):
    """A ControlNet file in core's layout (the layers of the ``zeroed`` prefixes zero), read by core's
    Load ControlNet node."""
    import nodes

    random_controlnet_file(str(controlnet_dir), name, tm.SD15_LOADABLE, seed, zeroed=zeroed)
    return nodes.ControlNetLoader().load_controlnet(name)[0]


def _inputs(base):
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 64, 64, 3, generator=g), {"samples": torch.randn(1, 4, 8, 8, generator=g)}, tm.text_cond(base)


@pytest.fixture(scope="module")
def sd15(pack, controlnet_dir):
    base = tm.sd15_loadable(seed=3)
    return (base, _loaded(controlnet_dir, "asym_cn_sd15.safetensors", seed=11), *_inputs(base))


@pytest.fixture(scope="module")
def sd15_middle_only(sd15, controlnet_dir):
    """The middle residual alone (every skip's zero convolution zero): a tiny UNet's middle is 1 x 1,
    so with all residuals its share of J_c would hide among the skips'."""
    return (sd15[0], _loaded(controlnet_dir, "asym_cn_middle.safetensors", seed=13, zeroed=("zero_convs.",)), *sd15[2:])


@pytest.fixture(scope="module")
def sdxl(pack):
    base = tm.sdxl(seed=2)
    return (base, tm.unet_controlnet(tm.SDXL_TINY, seed=21), *_inputs(base))


def exact_asymmetry(case, strength):
    """(1/2 ||J_c - J_c^T||_F^2, ||J_c||_F^2) with the whole Jacobian formed."""
    base, control, image, latent, pos = case
    dm, net = base.model.diffusion_model, control.control_model
    sigmas = base.model.model_sampling.sigmas.float()
    a = 1.0 / (sigmas[TIMESTEP] ** 2 + 1.0)
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(SEED))  # the first draw
    x = a.sqrt() * latent["samples"] + (1 - a).sqrt() * noise
    t, ctx = torch.tensor([float(TIMESTEP)]), pos[0][0]
    extra = {"y": base.model.encode_adm(**pos[0][1])} if pos[0][1] else {}
    hint = image.movedim(-1, 1)  # 64 px = 8 x the latent: Apply ControlNet's fit leaves it as it is

    def out_with(res):
        def patch(h, hsp, to):
            j = to["block"][1]
            h = h + res["middle"][0] if j == 0 else h
            return h, hsp + res["output"][len(res["output"]) - 1 - j]
        return dm(x, t, context=ctx, transformer_options={"patches": {"output_block_patch": [patch]}}, **extra)

    def controlled(xx):
        res = net(x=xx, hint=hint, timesteps=t, context=ctx, **extra)
        return out_with({k: [r * strength for r in v] for k, v in res.items() if k in ("middle", "output")})

    with torch.enable_grad():
        jc = torch.autograd.functional.jacobian(controlled, x).reshape(x.numel(), x.numel())
    return float(0.5 * ((jc - jc.T) ** 2).sum()), float((jc ** 2).sum())


@pytest.mark.parametrize("case_name", ["sd15", "sd15_middle_only", "sdxl"])
def test_the_estimate_converges_to_the_full_jacobian(case_name, request):
    case = request.getfixturevalue(case_name)
    measure = pack_module("runtime.asymmetry").measure_controlnet
    asym, frob = exact_asymmetry(case, 0.8)
    assert asym > 0 and frob > asym * 0.01
    got = measure(*case, strength=0.8, timestep=TIMESTEP, probes=256, seed=SEED)
    assert got.mean == pytest.approx(asym, rel=0.1)
    assert float(got.frobenius[0]) == pytest.approx(frob, rel=0.1)
    assert got.relative == pytest.approx(asym / frob, rel=0.15)


def test_no_residual_no_asymmetry(sd15, controlnet_dir):
    measure = pack_module("runtime.asymmetry").measure_controlnet
    base, _, image, latent, pos = sd15
    zero = _loaded(controlnet_dir, "asym_cn_zero.safetensors", seed=12, zeroed=("zero_convs.", "middle_block_out."))
    for control, strength in ((zero, 1.0), (sd15[1], 0.0)):
        got = measure(base, control, image, latent, pos, strength=strength, timestep=TIMESTEP, probes=4, seed=SEED)
        assert got.mean == 0 and got.relative == 0 and float(got.frobenius.abs().max()) == 0


def test_the_node_reports_it_in_inference_mode(sd15):
    base, control, image, latent, pos = sd15
    node = pack_node_classes()[NODE_ID]
    with torch.inference_mode():  # as ComfyUI runs nodes, with tensors other nodes made
        image, latent = image.clone(), {"samples": latent["samples"].clone()}
        pos = [[pos[0][0].clone(), pos[0][1]]]
        asym, relative, report = node_result(node, base, control, image, latent, pos, 1.0, 500, 4, 0, "gaussian")
    assert asym > 0 and 0 <= relative <= 2 and "Asym" in report and "4 probe(s)" in report


def _t2i_adapter():
    import comfy.controlnet

    return comfy.controlnet.T2IAdapter(torch.nn.Identity(), 3, 8, "nearest-exact")


def _control_lora(control):
    """A Control-LoRA as it is after a sampling run (core builds its network in pre_run)."""
    import comfy.controlnet

    lora = comfy.controlnet.ControlLora({})
    lora.control_model = control.control_model
    return lora


def _shuffle(control):
    shuffle = control.copy()
    shuffle.global_average_pooling = True
    return shuffle


@pytest.mark.parametrize("change, says", [
    ("sdxl_controlnet", "this control_net is a ControlNet for another model than this SD1.5 MODEL"),
    ("sdxl_model", "this control_net is a ControlNet for another model than this SDXL MODEL"),
    ("flux_controlnet", r"not a stock UNet ControlNet \(a ControlNet of another architecture: "
                        r"comfy.ldm.flux.controlnet.ControlNetFlux\)"),
    ("t2i_adapter", r"not a stock UNet ControlNet \(a T2I-Adapter\)"),
    ("control_lora", r"not a stock UNet ControlNet \(a Control-LoRA\)"),
    ("shuffle", "shuffle ControlNet"),
    ("svd_model", "measures stock ControlNets on SD1.5 and SDXL models; this MODEL is SVD"),
    ("images", "2 images for 1 latents"),
    ("latents", "2 images for 3 latents"),
])
def test_wrong_input_is_refused_before_measuring(change, says, sd15):
    base, control, image, latent, pos = sd15
    if change == "sdxl_controlnet":
        control = tm.unet_controlnet(tm.SDXL_TINY, seed=1)
    elif change == "sdxl_model":
        base = tm.sdxl()
    elif change == "flux_controlnet":
        control = tm.flux_controlnet(seed=1)
    elif change == "t2i_adapter":
        control = _t2i_adapter()
    elif change == "control_lora":
        control = _control_lora(control)
    elif change == "shuffle":
        control = _shuffle(control)
    elif change == "svd_model":
        base = tm.svd()
    elif change == "images":
        image = image.expand(2, -1, -1, -1)
    elif change == "latents":
        image, latent = image.expand(2, -1, -1, -1), {"samples": latent["samples"].expand(3, -1, -1, -1)}
    node = pack_node_classes()[NODE_ID]
    with pytest.raises(ValueError, match=says) as e:
        node_result(node, base, control, image, latent, pos, 1.0, 500, 4, 0, "rademacher")
    assert "ControlNet Jacobian Asymmetry (XCtrl)" in str(e.value)


def test_the_node_is_registered_in_the_micontrolnet_category():
    schema = pack_node_classes()[NODE_ID].GET_SCHEMA()
    assert schema.display_name == "ControlNet Jacobian Asymmetry (XCtrl)" and schema.category == "XCtrl/MIControlNet"
    names = [i.id for i in schema.inputs]
    assert names == ["model", "control_net", "image", "latents", "positive", "strength", "timestep", "probes", "seed",
                     "probe"]
    assert [o.display_name for o in schema.outputs] == ["asym", "relative", "report"]

"""MIControlNet test setups: tiny random-weight models with stock ControlNets built with ComfyUI's
own classes, and the ComfyUI side of the tests (one denoiser call through ComfyUI's sampling,
full sampling, ComfyUI's own Apply ControlNet (Advanced), the MI node)."""
import torch

from harness import tiny_models as tm
from harness.comfy_runtime import node_result, pack_module

CFG = 2.0
STRENGTHS = (0.8, 1.3, 0.6)


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


def sd15_setup():
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


def sdxl_setup():
    patcher = tm.sdxl(seed=8)
    cnets = [tm.unet_controlnet(tm.SDXL_TINY, 60 + i) for i in range(2)]
    return {
        "arch": "unet", "patcher": patcher, "base": patcher.model, "cnets": cnets,
        "hints": [torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(70 + i)) for i in range(2)],
        "pos": tm.text_cond(patcher, seed=9), "neg": tm.text_cond(patcher, seed=10), "latent": torch.zeros(1, 4, 8, 8),
    }


SD3_CONFIG = dict(tm.SD3_TINY, depth=4, context_embedder_config={
    "target": "torch.nn.Linear", "params": {"in_features": 48, "out_features": 256}})


def sd3_setup():
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


def flux_setup():
    patcher = tm.flux(seed=11)
    return {
        "patcher": patcher, "base": patcher.model,
        "cnets": [tm.flux_controlnet(80), tm.flux_controlnet(81)],
        "hints": [torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(90 + i)) for i in range(2)],
        "pos": tm.text_cond(patcher, seed=12), "neg": tm.text_cond(patcher, seed=13),
        "x": randn(14, 1, 16, 8, 8), "latent": torch.zeros(1, 16, 8, 8),
        "sigma": torch.tensor(float(patcher.model.model_sampling.percent_to_sigma(0.3))),
    }


def node_vs_reference(setup, controls, mode, granularity, reference):
    """One batched cond + uncond call through the MI node's MODEL: (its denoised output, the reference's,
    stock ComfyUI's, the node's positive conditioning)."""
    pos, neg = apply_controls(setup, controls)
    model, mpos, mneg = run_node(setup["patcher"], pos, neg, mode, granularity)
    spy = []
    got = denoise_once(model, mpos, mneg, setup["x"], setup["sigma"], spy)
    assert [0, 1] in spy or [1, 0] in spy, f"cond and uncond were not batched together: {spy}"
    want = reference(setup, controls, setup["sigma"], mode, granularity)
    return got, want, denoise_once(setup["patcher"], pos, neg, setup["x"], setup["sigma"]), mpos

"""Flux, two ControlNets summed (stock) vs balanced (MIControlNet), side by side.

The base is Flux at full width (hidden 3072, 24 heads, T5 context 4096, CLIP vector 768) with
fewer blocks than Flux dev's 19 double + 38 single, so that it fits a CPU run; each ControlNet
has the XLabs layout (2 double blocks, full width). What MI adds is per injection point and
scales with the residuals, not with the blocks: the ratio to the summed run is what matters.
"""
from .measure import param_count
from .runner import sum_vs_balanced, sum_vs_balanced_report

FLUX_DOUBLE, FLUX_SINGLE = 1, 2  # blocks of the benchmark base (Flux dev: 19 and 38)
FLUX_CONFIG = dict(
    image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=768, context_in_dim=4096,
    hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=FLUX_DOUBLE, depth_single_blocks=FLUX_SINGLE,
    axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True,
)
CONTROLNET_DOUBLE = 2  # XLabs Flux ControlNets: 2 double blocks, no single block
TEXT_TOKENS = 64


def _config():
    import dataclasses

    import comfy.ldm.flux.model

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return dict(FLUX_CONFIG, **({"txt_ids_dims": []} if "txt_ids_dims" in fields else {}))


def build_flux(dtype, seed=0):
    import comfy.supported_models as sm

    from .models import random_model

    return random_model(sm.Flux(_config()), dtype, seed)


def flux_controlnet(dtype, seed):
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.model_management as mm
    import comfy.ops

    from .models import init_random_

    cfg = {k: v for k, v in _config().items() if k != "image_model"}
    cfg.update(depth=CONTROLNET_DOUBLE, depth_single_blocks=0)
    net = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, dtype=dtype, device="cpu", **cfg)
    init_random_(net, seed)
    net.to(dtype).eval()
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device(), manual_cast_dtype=None, extra_conds=["y", "guidance"])


def flux_conds(seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return tuple([[torch.randn(1, TEXT_TOKENS, 4096, generator=g),
                   {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]] for _ in range(2))


def run_flux(bench):
    """Measures base / 2 ControlNets summed / balanced on the reduced full-width Flux."""
    from .models import control_images
    from .runner import Config

    a = bench.args
    bench.log(f"[flux] building Flux (full width, {FLUX_DOUBLE} double + {FLUX_SINGLE} single blocks) with random weights ...")
    base = build_flux(bench.dtype)
    cn1, cn2 = flux_controlnet(bench.dtype, 21), flux_controlnet(bench.dtype, 22)
    image, image2 = control_images(a.size, 2)
    pos, neg = flux_conds()
    p2, n2 = bench.apply_cn(pos, neg, cn1, image)
    p2, n2 = bench.apply_cn(p2, n2, cn2, image2)
    cn_params = param_count(cn1.control_model)
    mods = [cn1.control_model, cn2.control_model]
    mi_model, mp, mn = bench.apply_mi(base, p2, n2)
    configs = [Config("base", "base (Flux, reduced depth)", base.clone(), pos, neg),
               Config("cn2_sum", "+ 2 Flux ControlNets, summed (stock)", base.clone(), p2, n2, 2 * cn_params, mods),
               Config("cn2_mi", "+ 2 Flux ControlNets, balanced (MI, paper)", mi_model, mp, mn, 2 * cn_params, mods)]
    bench.flux = sum_vs_balanced(bench, "flux", configs, base, cn_params)


def flux_report(bench):
    return sum_vs_balanced_report(bench, "flux", "Flux: two ControlNets summed vs balanced (MIControlNet)", (
        f"Flux at full width (hidden 3072, 24 heads, T5 context 4096 x {TEXT_TOKENS} tokens) with {FLUX_DOUBLE} double and "
        f"{FLUX_SINGLE} single blocks instead of Flux dev's 19 and 38 ({{base_m}}M parameters: the full 12B model does not "
        f"fit this machine), and two XLabs-layout ControlNets ({CONTROLNET_DOUBLE} double blocks, {{cn_m}}M parameters "
        "each), random weights, {size} x {size} px (latent {lat} x {lat}), CFG batch 2, runs interleaved, median of the "
        "repeats."), flop_column=True)

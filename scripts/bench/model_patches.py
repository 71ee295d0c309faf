"""Z-Image with two Fun ControlNet Union patches, summed (core) vs balanced (MI Balanced Model Patches).

The base is Z-Image's NextDiT with the real block structure (2 context-refiner, 2 noise-refiner
blocks, Z-Image modulation, image tokens padded to 32) at a reduced width and depth that run on
this machine's CPU (``ZIMAGE_CONFIG``; Z-Image-Turbo: width 3840, 30 layers), and two controls in
the 2.1 lite layout (3 control layers, refiner control, inpaint channels) at that width. Each
control acts after both noise-refiner blocks and after main block 0. Condition images are encoded
by the tests' stand-in VAE (a fixed projection), so no VAE weights are needed. What MI adds is per
injection point and scales with the tokens x width, not with the blocks: the ratio to the summed
run is what matters.
"""
from .measure import param_count
from .runner import sum_vs_balanced, sum_vs_balanced_report

ZIMAGE_CONFIG = dict(
    image_model="lumina2", patch_size=2, in_channels=16, dim=1536, cap_feat_dim=2560, n_layers=4, qk_norm=True,
    n_heads=12, n_kv_heads=12, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
    ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
)
CONTROL_CONFIG = dict(n_control_layers=3, additional_in_dim=17, refiner_control=True)  # the 2.1 lite layout
TEXT_TOKENS = 64


def build_zimage(dtype, seed=0):
    import comfy.supported_models as sm

    from .models import random_model

    return random_model(sm.ZImage(dict(ZIMAGE_CONFIG)), dtype, seed)


def zimage_control(dtype, seed):
    import comfy.ldm.lumina.controlnet as zc
    import comfy.ops

    from .models import random_patcher

    net = zc.ZImage_Control(dim=ZIMAGE_CONFIG["dim"], n_heads=ZIMAGE_CONFIG["n_heads"], n_kv_heads=ZIMAGE_CONFIG["n_kv_heads"],
                            dtype=dtype, device="cpu", operations=comfy.ops.manual_cast, **CONTROL_CONFIG)
    return random_patcher(net, dtype, seed)


def zimage_conds(seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return tuple([[torch.randn(1, TEXT_TOKENS, ZIMAGE_CONFIG["cap_feat_dim"], generator=g), {}]] for _ in range(2))


def run_zimage(bench):
    """Measures base / 2 control patches summed / balanced on the reduced Z-Image."""
    import nodes
    import torch

    from harness.model_patch_models import StubVAE

    from .runner import Config, node, run_node

    a = bench.args
    bench.log(f"[zimage] building Z-Image (width {ZIMAGE_CONFIG['dim']}, {ZIMAGE_CONFIG['n_layers']} layers) with random weights ...")
    base = build_zimage(bench.dtype)
    c1, c2 = zimage_control(bench.dtype, 21), zimage_control(bench.dtype, 22)
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(1, a.size, a.size, 3, generator=g) for _ in range(2)]
    apply = nodes.NODE_CLASS_MAPPINGS["ZImageFunControlnet"]()
    vae = StubVAE(3)
    summed = base
    for c, image in zip((c1, c2), images):
        summed = apply.diffsynth_controlnet(summed, c, vae, strength=1.0, image=image)[0]
    balanced = run_node(node("nodes.mi_nodes", "MIBalancedModelPatches"), summed, "paper", "layer", 20.0)[0]
    pos, neg = zimage_conds()
    cn_params = param_count(c1.model)
    configs = [Config("base", "base (Z-Image, reduced)", base.clone(), pos, neg),
               Config("cn2_sum", "+ 2 Fun ControlNet Union patches, summed (core)", summed, pos, neg, 2 * cn_params),
               Config("cn2_mi", "+ 2 Fun ControlNet Union patches, balanced (MI, paper)", balanced, pos, neg, 2 * cn_params)]
    bench.zimage = sum_vs_balanced(bench, "zimage", configs, base, cn_params)
    del configs, base, c1, c2, summed, balanced
    bench.free()


def zimage_report(bench):
    return sum_vs_balanced_report(bench, "zimage", "Z-Image: two Fun ControlNet Union patches summed vs balanced (MIControlNet)", (
        f"Z-Image's NextDiT with the real block structure at width {ZIMAGE_CONFIG['dim']} and {ZIMAGE_CONFIG['n_layers']} "
        "main layers ({base_m}M parameters; Z-Image-Turbo: width 3840, 30 layers, 6B, does not run on this machine's CPU "
        "in reasonable time), two Fun ControlNet Union patches in the 2.1 lite layout ({cn_m}M parameters each; 3 "
        f"injection points each), random weights, text context {TEXT_TOKENS} tokens, {{size}} x {{size}} px (latent "
        "{lat} x {lat}), CFG batch 2, runs interleaved, median of the repeats."))

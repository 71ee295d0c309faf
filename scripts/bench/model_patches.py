"""Z-Image with two Fun ControlNet Union patches, summed (core) vs balanced (MI Balanced Model Patches);
Qwen-Image with an InstantX and a 2512 Fun ControlNet applied with Apply ControlNet, summed (core) vs
balanced (MI Balanced Control).

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
# Qwen-Image's blocks at a reduced width (Qwen-Image: 24 heads, width 3072, 60 blocks); 13 blocks so that
# the 2512 Fun ControlNet acts at two of its points (after blocks 0 and 12)
QWEN_CONFIG = dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=13, attention_head_dim=128,
                   num_attention_heads=4, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
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

    from harness.model_patch_models import StubVAE

    from .models import control_images
    from .runner import Config, node, run_node

    a = bench.args
    bench.log(f"[zimage] building Z-Image (width {ZIMAGE_CONFIG['dim']}, {ZIMAGE_CONFIG['n_layers']} layers) with random weights ...")
    base = build_zimage(bench.dtype)
    c1, c2 = zimage_control(bench.dtype, 21), zimage_control(bench.dtype, 22)
    images = control_images(a.size, 2)
    apply = nodes.NODE_CLASS_MAPPINGS["ZImageFunControlnet"]()
    vae = StubVAE(3)
    summed = base
    for c, image in zip((c1, c2), images):
        summed = apply.diffsynth_controlnet(summed, c, vae, strength=1.0, image=image)[0]
    balanced = run_node(node("nodes.mi_nodes", "MIBalancedModelPatches"), summed, "paper", "layer", 20.0)[0]
    pos, neg = zimage_conds()
    cn_params = param_count(c1.model)
    mods = [c1.model, c2.model]  # their weights count in the control rows' memory
    configs = [Config("base", "base (Z-Image, reduced)", base.clone(), pos, neg),
               Config("cn2_sum", "+ 2 Fun ControlNet Union patches, summed (core)", summed, pos, neg, 2 * cn_params, mods),
               Config("cn2_mi", "+ 2 Fun ControlNet Union patches, balanced (MI, paper)", balanced, pos, neg, 2 * cn_params,
                      mods)]
    bench.zimage = sum_vs_balanced(bench, "zimage", configs, base, cn_params)


def run_qwen(bench):
    """Measures base / InstantX + 2512 Fun ControlNets summed / balanced on the reduced Qwen-Image."""
    import comfy.supported_models as sm
    import nodes
    import torch

    from harness import qwen_controlnets as qcn
    from harness.model_patch_models import StubVAE

    from .models import random_model
    from .runner import Config, node, run_node

    a = bench.args
    width = QWEN_CONFIG["num_attention_heads"] * QWEN_CONFIG["attention_head_dim"]
    bench.log(f"[qwen] building Qwen-Image (width {width}, {QWEN_CONFIG['num_layers']} blocks) with random weights ...")
    base = random_model(sm.QwenImage(dict(QWEN_CONFIG)), bench.dtype)
    cnets = [qcn.instantx(31, 2, QWEN_CONFIG), qcn.fun(32, QWEN_CONFIG) or qcn.instantx(32, 2, QWEN_CONFIG)]
    g = torch.Generator().manual_seed(5)
    pos, neg = ([[torch.randn(1, TEXT_TOKENS, QWEN_CONFIG["joint_attention_dim"], generator=g), {}]] for _ in range(2))
    cpos, cneg = pos, neg
    for cnet in cnets:
        image = torch.rand(1, a.size, a.size, 3, generator=g)
        cpos, cneg = nodes.ControlNetApplyAdvanced().apply_controlnet(cpos, cneg, cnet, image, 1.0, 0.0, 1.0, vae=StubVAE(4, frames=True))
    balanced, bpos, bneg = run_node(node("nodes.mi_nodes", "MIBalancedControl"), base, cpos, cneg, "paper", "layer", 20.0)
    cn_params = sum(param_count(c.control_model) for c in cnets)
    mods = [c.control_model for c in cnets]  # their weights count in the control rows' memory
    configs = [Config("base", "base (Qwen-Image, reduced)", base.clone(), pos, neg),
               Config("cn2_sum", "+ InstantX + 2512 Fun ControlNet, summed (core)", base, cpos, cneg, cn_params, mods),
               Config("cn2_mi", "+ InstantX + 2512 Fun ControlNet, balanced (MI, paper)", balanced, bpos, bneg, cn_params,
                      mods)]
    bench.qwen = sum_vs_balanced(bench, "qwen", configs, base, cn_params)


def zimage_report(bench):
    return sum_vs_balanced_report(bench, "zimage", "Z-Image: two Fun ControlNet Union patches summed vs balanced (MIControlNet)", (
        f"Z-Image's NextDiT with the real block structure at width {ZIMAGE_CONFIG['dim']} and {ZIMAGE_CONFIG['n_layers']} "
        "main layers ({base_m}M parameters; Z-Image-Turbo: width 3840, 30 layers, 6B, does not run on this machine's CPU "
        "in reasonable time), two Fun ControlNet Union patches in the 2.1 lite layout ({cn_m}M parameters each; 3 "
        f"injection points each), random weights, text context {TEXT_TOKENS} tokens, {{size}} x {{size}} px (latent "
        "{lat} x {lat}), CFG batch 2, runs interleaved, median of the repeats."))


def qwen_report(bench):
    width = QWEN_CONFIG["num_attention_heads"] * QWEN_CONFIG["attention_head_dim"]
    title = "Qwen-Image: InstantX + 2512 Fun ControlNets (Apply ControlNet) summed vs balanced (MIControlNet)"
    return sum_vs_balanced_report(bench, "qwen", title, (
        f"Qwen-Image's blocks at width {width}, {QWEN_CONFIG['num_layers']} blocks ({{base_m}}M parameters; Qwen-Image: "
        "width 3072, 60 blocks, 20B), an InstantX ControlNet of 2 blocks and a 2512 Fun ControlNet (5 control blocks) at "
        "that width ({cn_m}M parameters together; a residual at every block, the Fun one at blocks 0 and 12), balanced "
        f"by MI Balanced Control, random weights, text context {TEXT_TOKENS} tokens, {{size}} x {{size}} px (latent "
        "{lat} x {lat}), CFG batch 2, runs interleaved, median of the repeats."))

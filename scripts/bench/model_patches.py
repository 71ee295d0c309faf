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
from .stats import check_mi_vs_sum, fmt, md_table, ratio
from . import GB

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
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    from .models import init_random_

    mc = sm.ZImage(dict(ZIMAGE_CONFIG))
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({})
    init_random_(model.diffusion_model, seed)
    model.diffusion_model.to(dtype).eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def zimage_control(dtype, seed):
    import comfy.ldm.lumina.controlnet as zc
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops

    from .models import init_random_

    net = zc.ZImage_Control(dim=ZIMAGE_CONFIG["dim"], n_heads=ZIMAGE_CONFIG["n_heads"], n_kv_heads=ZIMAGE_CONFIG["n_kv_heads"],
                            dtype=dtype, device="cpu", operations=comfy.ops.manual_cast, **CONTROL_CONFIG)
    init_random_(net, seed)
    net.to(dtype).eval()
    return comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


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
    bench.measure_family("zimage", configs)
    bench.zimage = summary(bench, "zimage", configs, base)
    del configs, base, c1, c2, summed, balanced
    bench.free()


def run_qwen(bench):
    """Measures base / InstantX + 2512 Fun ControlNets summed / balanced on the reduced Qwen-Image."""
    import comfy.supported_models as sm
    import nodes
    import torch

    from harness import qwen_controlnets as qcn
    from harness.model_patch_models import StubVAE
    from harness.tiny_models import _patcher

    from .runner import Config, node, run_node

    a = bench.args
    width = QWEN_CONFIG["num_attention_heads"] * QWEN_CONFIG["attention_head_dim"]
    bench.log(f"[qwen] building Qwen-Image (width {width}, {QWEN_CONFIG['num_layers']} blocks) with random weights ...")
    base = _patcher(sm.QwenImage, QWEN_CONFIG, 0, bench.dtype)
    cnets = [qcn.instantx(31, 2, QWEN_CONFIG), qcn.fun(32, QWEN_CONFIG) or qcn.instantx(32, 2, QWEN_CONFIG)]
    g = torch.Generator().manual_seed(5)
    pos, neg = ([[torch.randn(1, TEXT_TOKENS, QWEN_CONFIG["joint_attention_dim"], generator=g), {}]] for _ in range(2))
    cpos, cneg = pos, neg
    for cnet in cnets:
        image = torch.rand(1, a.size, a.size, 3, generator=g)
        cpos, cneg = nodes.ControlNetApplyAdvanced().apply_controlnet(cpos, cneg, cnet, image, 1.0, 0.0, 1.0, vae=StubVAE(4, frames=True))
    balanced, bpos, bneg = run_node(node("nodes.mi_nodes", "MIBalancedControl"), base, cpos, cneg, "paper", "layer", 20.0)
    cn_params = sum(param_count(c.control_model) for c in cnets)
    configs = [Config("base", "base (Qwen-Image, reduced)", base.clone(), pos, neg),
               Config("cn2_sum", "+ InstantX + 2512 Fun ControlNet, summed (core)", base, cpos, cneg, cn_params),
               Config("cn2_mi", "+ InstantX + 2512 Fun ControlNet, balanced (MI, paper)", balanced, bpos, bneg, cn_params)]
    bench.measure_family("qwen", configs)
    bench.qwen = summary(bench, "qwen", configs, base)
    del configs, base, cnets, balanced
    bench.free()


def summary(bench, family, configs, base):
    """The rows of a summed-vs-balanced family and the ratios the report states."""
    rows = bench.summarize(family, configs, base.model.diffusion_model)
    by = {r["name"]: r for r in rows}
    holds, rel = check_mi_vs_sum(by["cn2_mi"]["time"], by["cn2_sum"]["time"])
    return {"rows": bench.results.pop(family), "size": bench.args.size, "holds": holds, "mi_vs_sum": rel,
            "mem_vs_sum": ratio(by["cn2_mi"]["mem"], by["cn2_sum"]["mem"]),
            "base_params": param_count(base.model.diffusion_model), "cn_params": configs[1].control_params}


def zimage_report(bench):
    zi = getattr(bench, "zimage", None)
    if not zi:
        return ""
    return summed_vs_balanced_report(bench, zi, "## Z-Image: two Fun ControlNet Union patches summed vs balanced (MIControlNet)", (
        f"Z-Image's NextDiT with the real block structure at width {ZIMAGE_CONFIG['dim']} and {ZIMAGE_CONFIG['n_layers']} "
        f"main layers ({zi['base_params'] / 1e6:.0f}M parameters; Z-Image-Turbo: width 3840, 30 layers, 6B, does not run "
        f"on this machine's CPU in reasonable time), two Fun ControlNet Union patches in the 2.1 lite layout "
        f"({zi['cn_params'] / 2e6:.0f}M parameters each; 3 injection points each)"))


def qwen_report(bench):
    qw = getattr(bench, "qwen", None)
    if not qw:
        return ""
    width = QWEN_CONFIG["num_attention_heads"] * QWEN_CONFIG["attention_head_dim"]
    return summed_vs_balanced_report(bench, qw, "## Qwen-Image: InstantX + 2512 Fun ControlNets (Apply ControlNet) summed vs balanced (MIControlNet)", (
        f"Qwen-Image's blocks at width {width}, {QWEN_CONFIG['num_layers']} blocks ({qw['base_params'] / 1e6:.0f}M "
        f"parameters; Qwen-Image: width 3072, 60 blocks, 20B), an InstantX ControlNet of 2 blocks and a 2512 Fun "
        f"ControlNet (5 control blocks) at that width ({qw['cn_params'] / 1e6:.0f}M parameters together; a residual at "
        f"every block, the Fun one at blocks 0 and 12), balanced by MI Balanced Control"))


def summed_vs_balanced_report(bench, data, title, setup):
    size, lat = data["size"], data["size"] // 8
    header = ["configuration", "control params (M)", "step time (s)", "time ratio to base", "peak memory (GB)",
              "memory ratio"]
    body = [[r["label"], fmt(r["control_params"] / 1e6, 0) if r["control_params"] else "-", fmt(r["time"], 2),
             fmt(r["t_ratio"], 3), fmt(r["mem"] / GB if r["mem"] else None, 2), fmt(r["m_ratio"], 3)]
            for r in data["rows"] if not r["error"]]
    verdict = {True: "holds", False: "missed", None: "not measured"}[data["holds"]]
    return "\n".join([
        title,
        "",
        f"{setup}, random weights, text context {TEXT_TOKENS} tokens, {size} x {size} px (latent {lat} x {lat}), "
        "CFG batch 2, runs interleaved, median of the repeats.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in bench.machine.items()) + f". Command: `{' '.join(bench.argv)}`.",
        "",
        md_table(header, body),
        "",
        f"Balanced / summed step time: {fmt(data['mi_vs_sum'], 3)} (goal <= 1.03: {verdict}); peak memory balanced / "
        f"summed: {fmt(data['mem_vs_sum'], 3)}.",
        "",
        "Raw step times (s): " + "; ".join(f"{r['label']}: " + ", ".join(f"{t:.2f}" for t in r["times"])
                                           for r in data["rows"] if not r["error"]) + ".",
        "",
    ])

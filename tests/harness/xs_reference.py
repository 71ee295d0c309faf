"""ControlNet-XS test helpers: tiny bases and control state dicts, and a reference two-stream loop.

The reference runs ComfyUI's UNet blocks (the base model, not the code under test) in a plain
loop and the control side functionally on the vislearn-named weights with the pure suite's
reference blocks (tests/pure/test_controlnet_xs_reference.py), exactly as spec section 1
writes it. It shares no code with nodes/controlnet_xs_runtime.py or models/controlnet_xs.py.
"""
import math

import torch
import torch.nn.functional as F

from harness import tiny_models
from pure.test_controlnet_xs_reference import ref_block, ref_conv, ref_hint


# --------------------------------------------------------------------------- tiny bases
def sd15_768(seed=0):
    """tiny_models.sd15 with SD1.5's text width 768 (ControlNet-XS heads depend on it)."""
    import comfy.supported_models as sm

    return tiny_models._patcher(sm.SD15, dict(tiny_models.SD15_TINY, context_dim=768), seed)


def sd21(seed=0):
    """A tiny SD2.x (linear projections, text width 1024; SD20 forces 64-channel heads)."""
    import comfy.supported_models as sm

    cfg = dict(tiny_models.SD15_TINY, context_dim=1024, model_channels=64, use_linear_in_transformer=True)
    return tiny_models._patcher(sm.SD20, cfg, seed)


# --------------------------------------------------------------------------- tiny XS files
# Control widths with odd group counts (rule: largest divisor of C <= 32): 4 -> 4 groups,
# 324 -> 27, 12 -> 12; concatenated inputs such as 4 + 32 = 36 -> 18, 324 + 64 = 388 -> 4.
TINY_XS = {
    "sd15": dict(family="sd", ctrl_channels=(8, 16, 24, 32), base_channels=(32, 64, 64, 64), transformer_depth=(1, 1, 1, 0),
                 context_dim=768, use_linear_projection=False, learned_time_embedding=False, model_channels=32),
    "sd21": dict(family="sd", ctrl_channels=(4, 8, 324, 12), base_channels=(64, 128, 128, 128), transformer_depth=(1, 1, 1, 0),
                 context_dim=1024, use_linear_projection=True, learned_time_embedding=True, model_channels=64),
    "sdxl": dict(family="sdxl", ctrl_channels=(4, 324, 16), base_channels=(32, 64, 64), transformer_depth=(0, 1, 1),
                 context_dim=32, use_linear_projection=True, learned_time_embedding=False, model_channels=32),
    "sdxl_learned": dict(family="sdxl", ctrl_channels=(12, 20, 36), base_channels=(32, 64, 64), transformer_depth=(0, 1, 2),
                         context_dim=32, use_linear_projection=True, learned_time_embedding=True, model_channels=32),
}


def xs_state_dict(kind, seed=0):
    """A random float32 vislearn-format state dict of a tiny ControlNet-XS of ``TINY_XS[kind]``.

    Only the key layout comes from the pure module (the pure suite checks it against the
    released layouts); the values are seeded random numbers, zero convs included.
    """
    from xctrl.models.controlnet_xs import ControlNetXS
    from xctrl.models.controlnet_xs_keys import XSConfig

    c = TINY_XS[kind]
    levels = len(c["ctrl_channels"])
    cfg = XSConfig(num_heads=(1,) * levels, transformer_depth_middle=1, num_heads_middle=1,
                   time_embed_dim=4 * c["model_channels"], **c)
    shapes = {k: tuple(v.shape) for k, v in ControlNetXS(cfg, device="meta").state_dict().items()}
    return _randomize(shapes, seed)


def _randomize(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("weight") and len(shape) == 1:  # norms: around 1
            out[name] = 1 + 0.2 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            out[name] = 0.5 * torch.randn(shape, generator=g) / math.sqrt(max(1, fan_in))
    return out


# --------------------------------------------------------------------------- reference
def largest_divisor_at_most(n, cap):
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def ref_heads(family, context_dim, channels):
    """Spec section 3: SD1.5 8 heads; SD2.1 C // min-divisor(C, 8); SDXL C // divisor(C, 64)."""
    if family == "sdxl":
        return channels // largest_divisor_at_most(channels, 64)
    if context_dim == 768:
        return 8
    return channels // largest_divisor_at_most(channels, 8)


def xs_denoised(base_model, p, x, sigma, context, hint, scale, y=None):
    """Denoised output of the base with ControlNet-XS, spec section 1, written out.

    ``p``: vislearn state dict (float32); ``hint``: (rows, 3, 8H, 8W) in [0, 1].
    """
    from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed, timestep_embedding

    dm = base_model.diffusion_model
    ms = base_model.model_sampling
    n_in = len(dm.input_blocks)
    family = "sdxl" if n_in == 9 else "sd"
    xc = ms.calculate_input(sigma, x)
    t = ms.timestep(sigma).float()
    t_emb = timestep_embedding(t, dm.model_channels).to(xc.dtype)
    if "control_model.time_embed.0.weight" in p:  # learned, mix = 1: ctrl*1 + base*0
        e = F.linear(t_emb, p["control_model.time_embed.0.weight"], p["control_model.time_embed.0.bias"])
        emb = F.linear(F.silu(e), p["control_model.time_embed.2.weight"], p["control_model.time_embed.2.bias"])
    else:
        emb = dm.time_embed(t_emb)
    if y is not None:
        emb = emb + dm.label_emb(y)
    eps = 1e-6 if family == "sd" else 1e-5
    to = {}

    def heads_at(prefix):
        key = f"{prefix}1.transformer_blocks.0.attn2.to_k.weight"
        if key not in p:
            return 0
        return ref_heads(family, p[key].shape[1], p[key].shape[0])

    g = ref_hint(hint, p)
    h_b = h_c = xc
    hs_b, hs_c = [], []
    for i in range(n_in):
        to["block"] = ("input", i)
        h_b = forward_timestep_embed(dm.input_blocks[i], h_b, emb, context, to)
        pre = f"control_model.input_blocks.{i}."
        h_c = ref_block(pre, h_c, emb, context, p, heads_at(pre), eps)
        if i == 0:
            h_c = h_c + g
        h_b = h_b + ref_conv(h_c, p, f"enc_zero_convs_out.{i}.0") * scale
        hs_b.append(h_b)
        hs_c.append(h_c)
        h_c = torch.cat([h_c, ref_conv(h_b, p, f"enc_zero_convs_in.{i}.0")], dim=1)
    to["block"] = ("middle", 0)
    h_b = forward_timestep_embed(dm.middle_block, h_b, emb, context, to)
    h_c = ref_block("control_model.middle_block.", h_c, emb, context, p, heads_at("control_model.middle_block."), eps)
    h_b = h_b + ref_conv(h_c, p, "middle_block_out.0") * scale
    for j, block in enumerate(dm.output_blocks):
        to["block"] = ("output", j)
        h_b = h_b + ref_conv(hs_c.pop(), p, f"dec_zero_convs_out.{j}.0") * scale
        h_b = torch.cat([h_b, hs_b.pop()], dim=1)
        h_b = forward_timestep_embed(block, h_b, emb, context, to, hs_b[-1].shape if hs_b else None)
    out = dm.out(h_b.type(x.dtype))
    return ms.calculate_denoised(sigma, out, x)

"""ControlNet-XS test helpers: released layouts, an independent vislearn -> diffusers renaming, a
plain functional reference of the control network, tiny bases and control files, and a
reference two-stream loop.

Written from the authors' math and the released files' naming (docs/controlnet_xs.md): F.conv2d,
F.group_norm with the rule's group count, explicit per-head softmax attention, weights read by
their vislearn names; the loop runs ComfyUI's UNet blocks (the base model, not the code under
test) and the control side functionally. Nothing here imports the pack.
"""
import json
import math
import os

import torch
import torch.nn.functional as F

from harness import tiny_models
from harness.layouts import LAYOUT_DIR
from harness.random_weights import random_tensors

CKPT_DIR = LAYOUT_DIR
MODELS = ["sd15_53m", "sd21_14m", "sdxl_20m", "sdxl_48m"]


def layout(fmt, model):
    path = os.path.join(CKPT_DIR, f"controlnet_xs_{fmt}_{model}.json")
    with open(path) as f:
        return {k: tuple(v) for k, v in json.load(f)["keys"].items()}


def meta_sd(keys):
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


# ---- an independent vislearn -> diffusers renaming, written from docs/controlnet_xs.md's table -----

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def vislearn_to_diffusers(key, n_in):
    parts = key.split(".")
    param = parts[-1]
    if parts[0] == "input_hint_block":
        idx = int(parts[1])
        name = "conv_in" if idx == 0 else "conv_out" if idx == 14 else f"blocks.{idx // 2 - 1}"
        return f"controlnet_cond_embedding.{name}.{param}"
    if parts[0] in ("enc_zero_convs_out", "enc_zero_convs_in", "dec_zero_convs_out"):
        n = int(parts[1])
        if parts[0] == "enc_zero_convs_out":
            if n == 0:
                return f"control_to_base_for_conv_in.{param}"
            return f"down_blocks.{(n - 1) // 3}.ctrl_to_base.{(n - 1) % 3}.{param}"
        if parts[0] == "enc_zero_convs_in":
            if n == n_in - 1:
                return f"mid_block.base_to_ctrl.{param}"
            return f"down_blocks.{n // 3}.base_to_ctrl.{n % 3}.{param}"
        return f"up_connections.{n // 3}.ctrl_to_base.{n % 3}.{param}"
    if parts[0] == "middle_block_out":
        return f"mid_block.ctrl_to_base.{param}"
    assert parts[0] == "control_model", key
    if parts[1] == "time_embed":
        return f"time_embedding.linear_{1 if parts[2] == '0' else 2}.{param}"
    rest = ".".join(parts[4:])
    if parts[1] == "middle_block":
        sub = parts[2]
        rest = ".".join(parts[3:])
        if sub == "1":
            return f"mid_block.midblock.attentions.0.{rest}"
        inner = ".".join(parts[3:-1])
        return f"mid_block.midblock.resnets.{0 if sub == '0' else 1}.{RESNET[inner]}.{param}"
    n = int(parts[2])
    if n == 0:
        return f"conv_in.{param}"
    b, j = (n - 1) // 3, (n - 1) % 3
    if parts[3] == "1":
        return f"down_blocks.{b}.attentions.{j}.{rest}"
    if parts[4] == "op":
        return f"down_blocks.{b}.downsamplers.conv.{param}"
    inner = ".".join(parts[4:-1])
    return f"down_blocks.{b}.resnets.{j}.{RESNET[inner]}.{param}"


def vislearn_used(model):
    keys = layout("vislearn", model)
    return {k: v for k, v in keys.items() if k != "scale_list" and not k.startswith("control_model.label_emb.")}


# ---- the functional reference ----------------------------------------------------------------


def ref_groups(c):
    return max(d for d in range(1, 33) if c % d == 0)


def ref_gn(x, p, name, eps):
    return F.group_norm(x, ref_groups(x.shape[1]), p[name + ".weight"], p[name + ".bias"], eps)


def ref_conv(x, p, name, stride=1):
    w = p[name + ".weight"]
    return F.conv2d(x, w, p[name + ".bias"], stride=stride, padding=w.shape[-1] // 2)


def ref_res(x, emb, p, pre):
    h = ref_conv(F.silu(ref_gn(x, p, pre + "in_layers.0", 1e-5)), p, pre + "in_layers.2")
    h = h + F.linear(F.silu(emb), p[pre + "emb_layers.1.weight"], p[pre + "emb_layers.1.bias"])[:, :, None, None]
    h = ref_conv(F.silu(ref_gn(h, p, pre + "out_layers.0", 1e-5)), p, pre + "out_layers.3")
    skip = ref_conv(x, p, pre + "skip_connection") if pre + "skip_connection.weight" in p else x
    return skip + h


def ref_attention(x, ctx, p, pre, heads):
    q = x @ p[pre + "to_q.weight"].T
    k = ctx @ p[pre + "to_k.weight"].T
    v = ctx @ p[pre + "to_v.weight"].T
    b, n, c = q.shape
    d = c // heads
    out = torch.empty_like(q)
    for hd in range(heads):
        s = slice(hd * d, (hd + 1) * d)
        weights = torch.softmax(q[:, :, s] @ k[:, :, s].transpose(1, 2) / math.sqrt(d), dim=-1)
        out[:, :, s] = weights @ v[:, :, s]
    return out @ p[pre + "to_out.0.weight"].T + p[pre + "to_out.0.bias"]


def ref_linear_or_1x1(y, p, name):
    w = p[name + ".weight"]
    return y @ w.reshape(w.shape[0], w.shape[1]).T + p[name + ".bias"]


def ref_transformer(x, ctx, p, pre, heads, eps):
    b, c, h, w = x.shape
    y = ref_gn(x, p, pre + "norm", eps).permute(0, 2, 3, 1).reshape(b, h * w, c)
    y = ref_linear_or_1x1(y, p, pre + "proj_in")
    k = 0
    while f"{pre}transformer_blocks.{k}.norm1.weight" in p:
        t = f"{pre}transformer_blocks.{k}."

        def ln(z, name):
            return F.layer_norm(z, (c,), p[t + name + ".weight"], p[t + name + ".bias"], 1e-5)

        z = ln(y, "norm1")
        y = y + ref_attention(z, z, p, t + "attn1.", heads)
        y = y + ref_attention(ln(y, "norm2"), ctx, p, t + "attn2.", heads)
        a, gate = (ln(y, "norm3") @ p[t + "ff.net.0.proj.weight"].T + p[t + "ff.net.0.proj.bias"]).chunk(2, dim=-1)
        y = y + (a * F.gelu(gate)) @ p[t + "ff.net.2.weight"].T + p[t + "ff.net.2.bias"]
        k += 1
    y = ref_linear_or_1x1(y, p, pre + "proj_out")
    return x + y.reshape(b, h, w, c).permute(0, 3, 1, 2)


def ref_block(pre, x, emb, ctx, p, heads, eps):
    """A control input/middle block from its weights: conv_in, downsampler or res (+ transformer)."""
    if pre + "0.op.weight" in p:
        return ref_conv(x, p, pre + "0.op", stride=2)
    if pre + "0.in_layers.0.weight" not in p:
        return ref_conv(x, p, pre + "0")
    x = ref_res(x, emb, p, pre + "0.")
    if pre + "1.norm.weight" in p:
        x = ref_transformer(x, ctx, p, pre + "1.", heads, eps)
    if pre + "2.in_layers.0.weight" in p:  # middle block
        x = ref_res(x, emb, p, pre + "2.")
    return x


def ref_hint(hint, p):
    g = hint
    for idx in range(0, 15, 2):
        g = ref_conv(g, p, f"input_hint_block.{idx}", stride=2 if idx in (4, 8, 12) else 1)
        if idx < 14:
            g = F.silu(g)
    return g


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


def xs_layout(kind):
    """{vislearn key: shape} of a tiny ControlNet-XS of ``TINY_XS[kind]``, written from the released
    files' naming (see the released layouts in tests/data/checkpoint_layouts) without the pack's code."""
    c = TINY_XS[kind]
    ctrl, base, depth = c["ctrl_channels"], c["base_channels"], c["transformer_depth"]
    levels = len(ctrl)
    n_in = 3 * levels
    mc = c["model_channels"]
    ted = 4 * mc
    ctx = c["context_dim"]
    out = {}

    def level_of(i):
        return 0 if i == 0 else (i - 1) // 3

    def add(name, *shape, bias=True):
        out[name + ".weight"] = tuple(shape)
        if bias:
            out[name + ".bias"] = (shape[0],)

    def res(pre, cin, cout):
        add(pre + "in_layers.0", cin)
        add(pre + "in_layers.2", cout, cin, 3, 3)
        add(pre + "emb_layers.1", cout, ted)
        add(pre + "out_layers.0", cout)
        add(pre + "out_layers.3", cout, cout, 3, 3)
        if cin != cout:
            add(pre + "skip_connection", cout, cin, 1, 1)

    def transformer(pre, ch, blocks):
        inner = ref_attention_width(c["family"], ctx, ch)
        proj = (ch, ch) if c["use_linear_projection"] else (ch, ch, 1, 1)
        add(pre + "norm", ch)
        add(pre + "proj_in", *proj)
        add(pre + "proj_out", *proj)
        for k in range(blocks):
            t = f"{pre}transformer_blocks.{k}."
            for attn, kv in (("attn1", ch), ("attn2", ctx)):
                add(t + attn + ".to_q", inner, ch, bias=False)
                add(t + attn + ".to_k", inner, kv, bias=False)
                add(t + attn + ".to_v", inner, kv, bias=False)
                add(t + attn + ".to_out.0", ch, inner)
            add(t + "ff.net.0.proj", 8 * ch, ch)
            add(t + "ff.net.2", ch, 4 * ch)
            for n in ("norm1", "norm2", "norm3"):
                add(t + n, ch)

    cm = "control_model."
    if c["learned_time_embedding"]:
        add(cm + "time_embed.0", ted, mc)
        add(cm + "time_embed.2", ted, ted)
    add(cm + "input_blocks.0.0", ctrl[0], 4, 3, 3)
    for i in range(1, n_in):
        lv, j = level_of(i), (i - 1) % 3
        cin = ctrl[level_of(i - 1)] + base[level_of(i - 1)]
        pre = f"{cm}input_blocks.{i}."
        if j == 2:  # downsampler
            add(pre + "0.op", ctrl[lv], cin, 3, 3)
            continue
        res(pre + "0.", cin, ctrl[lv])
        if depth[lv]:
            transformer(pre + "1.", ctrl[lv], depth[lv])
    last = n_in - 1
    res(cm + "middle_block.0.", ctrl[level_of(last)] + base[level_of(last)], ctrl[-1])
    transformer(cm + "middle_block.1.", ctrl[-1], 1)
    res(cm + "middle_block.2.", ctrl[-1], ctrl[-1])
    hint = [(16, 3), (16, 16), (32, 16), (32, 32), (96, 32), (96, 96), (256, 96), (ctrl[0], 256)]
    for n, (o, i) in enumerate(hint):
        add(f"input_hint_block.{2 * n}", o, i, 3, 3)
    for i in range(n_in):
        add(f"enc_zero_convs_out.{i}.0", base[level_of(i)], ctrl[level_of(i)], 1, 1)
        add(f"enc_zero_convs_in.{i}.0", base[level_of(i)], base[level_of(i)], 1, 1)
    add("middle_block_out.0", base[-1], ctrl[-1], 1, 1)
    for m in range(n_in):
        base_width = base[-1] if m == 0 else base[levels - 1 - (m - 1) // 3]
        add(f"dec_zero_convs_out.{m}.0", base_width, ctrl[level_of(n_in - 1 - m)], 1, 1)
    return out


def xs_state_dict(kind, seed=0):
    """A random float32 vislearn-format state dict of a tiny ControlNet-XS of ``TINY_XS[kind]``."""
    return random_tensors(xs_layout(kind), seed, gain=0.5, spread=0.2)


# --------------------------------------------------------------------------- reference
def largest_divisor_at_most(n, cap):
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def ref_heads(family, context_dim, channels):
    """The authors' rule: SD1.5 8 heads; SD2.1 C // min-divisor(C, 8); SDXL C // divisor(C, 64)."""
    if family == "sdxl":
        return channels // largest_divisor_at_most(channels, 64)
    if context_dim == 768:
        return 8
    return channels // largest_divisor_at_most(channels, 8)


def ref_attention_width(family, context_dim, channels):
    """heads x head size: SD1.5-style layers use head size max(8, C // 8) (the authors' ldm
    twoStreamControl code), so a layer narrower than 64 channels attends 64 wide."""
    heads = ref_heads(family, context_dim, channels)
    if family != "sdxl" and context_dim == 768:
        return heads * max(heads, channels // heads)
    return channels


def ref_mask_at(mask, size):
    """A (rows, 1, H, W) mask at a term's resolution: bilinear, antialiased when shrinking."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    shrink = mask.shape[-2] > size[0] or mask.shape[-1] > size[1]
    return F.interpolate(mask, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


def xs_denoised(base_model, p, x, sigma, context, hint, scale, y=None, weights=None, mask=None):
    """Denoised output of the base with ControlNet-XS (docs/controlnet_xs.md, the two streams),
    written out on the tests' UNet loop (harness/reference.py): the control stream runs
    alongside the base encoder, trading features after every block.

    ``p``: vislearn state dict (float32); ``hint``: (rows, 3, 8H, 8W) in [0, 1]; ``scale``: a
    number or one per row; ``weights``: one per control -> base connection (encoder blocks, the
    middle, decoder blocks); ``mask``: (rows, 1, H, W), resized to each term.
    """
    from comfy.ldm.modules.diffusionmodules.openaimodel import timestep_embedding

    from harness import reference as ref

    dm = base_model.diffusion_model
    ms = base_model.model_sampling
    n_in = len(dm.input_blocks)
    family = "sdxl" if n_in == 9 else "sd"
    eps = 1e-6 if family == "sd" else 1e-5
    t_emb = timestep_embedding(ms.timestep(sigma).float(), dm.model_channels)
    state = {"h_c": ms.calculate_input(sigma, x), "hs_c": [], "emb": None}
    n_out = len(dm.output_blocks)
    w = list(weights) if weights is not None else [1.0] * (n_in + 1 + n_out)
    s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1, 1, 1)

    def added(term, weight):
        term = term * s * weight
        return term if mask is None else term * ref_mask_at(mask, term.shape[-2:])

    def heads_at(prefix):
        """Heads of a block's transformer from its context width and its channel count C."""
        key = f"{prefix}1.transformer_blocks.0.attn2.to_k.weight"
        if key not in p:
            return 0
        return ref_heads(family, p[key].shape[1], p[f"{prefix}1.norm.weight"].shape[0])

    def on_emb(emb):
        if "control_model.time_embed.0.weight" in p:  # learned, mix = 1: the control's embedding replaces the base's
            e = F.linear(t_emb.to(emb.dtype), p["control_model.time_embed.0.weight"], p["control_model.time_embed.0.bias"])
            emb = F.linear(F.silu(e), p["control_model.time_embed.2.weight"], p["control_model.time_embed.2.bias"])
        state["emb"] = emb if y is None else emb + dm.label_emb(y)  # the control blocks get the ADM sum too
        return emb

    def encoder(i):
        def after_block(h_b):
            pre = f"control_model.input_blocks.{i}."
            h_c = ref_block(pre, state["h_c"], state["emb"], context, p, heads_at(pre), eps)
            if i == 0:
                h_c = h_c + ref_hint(hint, p)
            h_b = h_b + added(ref_conv(h_c, p, f"enc_zero_convs_out.{i}.0"), w[i])
            state["hs_c"].append(h_c)
            state["h_c"] = torch.cat([h_c, ref_conv(h_b, p, f"enc_zero_convs_in.{i}.0")], dim=1)
            return h_b
        return after_block

    def middle(h_b):
        pre = "control_model.middle_block."
        h_c = ref_block(pre, state["h_c"], state["emb"], context, p, heads_at(pre), eps)
        return h_b + added(ref_conv(h_c, p, "middle_block_out.0"), w[n_in])

    def decoder(j):
        return lambda h_b: h_b + added(ref_conv(state["hs_c"].pop(), p, f"dec_zero_convs_out.{j}.0"), w[n_in + 1 + j])

    hooks = {("emb",): on_emb, ("middle", 0): middle}
    hooks.update({("input", i, "skip"): encoder(i) for i in range(n_in)})
    hooks.update({("output", j): decoder(j) for j in range(len(dm.output_blocks))})
    return ref.unet_denoised(base_model, x, sigma, context, y=y, hooks=hooks)


def loaded_sd15_xs(load_node, controlnet_dir, file_name, seed=4):
    """(tiny SD1.5 base at 768 context, its ControlNet-XS state dict, the file loaded by the pack's
    Load ControlNet-XS node from ``controlnet_dir``)."""
    from safetensors.torch import save_file

    from harness.comfy_runtime import node_result

    base = sd15_768()
    sd = xs_state_dict("sd15", seed=seed)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(controlnet_dir, file_name))
    return base, sd, node_result(load_node, file_name)[0]

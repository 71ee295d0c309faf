"""ControlNet-XS test helpers: released layouts, an independent vislearn -> diffusers renaming
and a plain functional reference of the control network, plus tests of those helpers.

The reference is written from the spec and the reference implementation's math (F.conv2d,
F.group_norm with the rule's group count, explicit per-head softmax attention) and reads the
weights by their vislearn names; it shares no code with xctrl.models.controlnet_xs.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from harness.layouts import LAYOUT_DIR

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


# ---- an independent vislearn -> diffusers renaming, written from the spec's table ----------

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


# ---- tests of the helpers themselves -----------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_independent_renaming_reproduces_the_diffusers_files(model):
    vis = vislearn_used(model)
    n_in = sum(1 for k in vis if k.startswith("enc_zero_convs_out.") and k.endswith(".weight"))
    assert {vislearn_to_diffusers(k, n_in): v for k, v in vis.items()} == layout("diffusers", model)


def test_reference_attention_is_softmax_attention():
    x, ctx = torch.randn(2, 5, 6), torch.randn(2, 3, 4)
    p = {"to_q.weight": torch.randn(6, 6), "to_k.weight": torch.randn(6, 4), "to_v.weight": torch.randn(6, 4),
         "to_out.0.weight": torch.eye(6), "to_out.0.bias": torch.zeros(6)}
    mha = torch.nn.MultiheadAttention(6, 2, bias=False, kdim=4, vdim=4, batch_first=True)
    with torch.no_grad():
        mha.q_proj_weight.copy_(p["to_q.weight"])
        mha.k_proj_weight.copy_(p["to_k.weight"])
        mha.v_proj_weight.copy_(p["to_v.weight"])
        mha.out_proj.weight.copy_(torch.eye(6))
        want = mha(x, ctx, ctx, need_weights=False)[0]
    assert torch.allclose(ref_attention(x, ctx, p, "", 2), want, atol=1e-5)


@pytest.mark.parametrize("c, groups", [(4, 4), (12, 12), (324, 27), (1296, 27), (320, 32), (96, 32)])
def test_reference_group_rule(c, groups):
    assert ref_groups(c) == groups

"""Hand-written reference forwards, independent of the pack's production code.

They run ComfyUI's UNet block by block in a plain loop (ComfyUI's blocks are the base
model, not the code under test) and apply each method exactly as docs/ describes it, with
the control networks written functionally on the state-dict tensors.
"""
import math

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- UNet loop
def unet_denoised(base_model, x, sigma, context, y=None, hooks=None, c_concat=None, num_video_frames=None, extra=None):
    """ComfyUI's BaseModel.apply_model for a UNetModel, unrolled, with hook points where the
    methods change features (the one hand-written UNet loop of the tests; without hooks it equals
    ComfyUI's apply_model bit for bit, tested). ``hooks``: {point: fn}, points in block order:

    - ("emb",): fn(emb) -> emb, the time embedding before the class/ADM embedding is added;
    - ("input", i, "skip"): fn(h) after input block i, before its skip is saved (reaches both);
    - ("input", i): fn(h) after the skip was saved (reaches the next block only);
    - ("middle", 0): fn(h) after the middle block;
    - ("output", j): fn(h) at the start of output block j, before the skip is taken;
    - ("skip", k): fn(hsp), the skip of input block k when its output block takes it;
    - ("output", j, "pair"): fn(h, hsp) -> (h, hsp) after those (another pack's output patch).
    """
    from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed, timestep_embedding

    hooks = hooks or {}

    def hook(point, *values):
        fn = hooks.get(point)
        if fn is None:
            return values if len(values) > 1 else values[0]
        return fn(*values)

    dm = base_model.diffusion_model
    ms = base_model.model_sampling
    xc = ms.calculate_input(sigma, x)
    if c_concat is not None:
        xc = torch.cat([xc, c_concat], dim=1)
    t = ms.timestep(sigma).float()
    kw = dict(extra or {})
    if num_video_frames is not None:
        kw["num_video_frames"] = num_video_frames
        kw["image_only_indicator"] = torch.zeros(1)
    to = {}
    emb = hook(("emb",), dm.time_embed(timestep_embedding(t, dm.model_channels).to(xc.dtype)))
    if y is not None:
        emb = emb + dm.label_emb(y)
    h, hs = xc, []
    for i, block in enumerate(dm.input_blocks):
        to["block"] = ("input", i)
        h = hook(("input", i, "skip"), forward_timestep_embed(block, h, emb, context, to, **kw))
        hs.append(h)
        h = hook(("input", i), h)
    to["block"] = ("middle", 0)
    h = hook(("middle", 0), forward_timestep_embed(dm.middle_block, h, emb, context, to, **kw))
    for j, block in enumerate(dm.output_blocks):
        to["block"] = ("output", j)
        h = hook(("output", j), h)
        hsp = hook(("skip", len(hs) - 1), hs.pop())
        h, hsp = hook(("output", j, "pair"), h, hsp)
        h = torch.cat([h, hsp], dim=1)
        out_shape = hs[-1].shape if hs else None
        h = forward_timestep_embed(block, h, emb, context, to, out_shape, **kw)
    eps = dm.out(h.type(x.dtype))
    return ms.calculate_denoised(sigma, eps, x)


# --------------------------------------------------------------------------- ControlNeXt
def sinusoid(t, dim=128):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _res(sd, p, x, temb_act, groups):
    h = F.conv2d(F.silu(F.group_norm(x, groups, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)),
                 sd[p + "conv1.weight"], sd[p + "conv1.bias"], padding=1)
    h = h + F.linear(temb_act, sd[p + "time_emb_proj.weight"], sd[p + "time_emb_proj.bias"])[:, :, None, None]
    h = F.conv2d(F.silu(F.group_norm(h, groups, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)),
                 sd[p + "conv2.weight"], sd[p + "conv2.bias"], padding=1)
    skip = F.conv2d(x, sd[p + "conv_shortcut.weight"], sd[p + "conv_shortcut.bias"]) if p + "conv_shortcut.weight" in sd else x
    return skip + h


def controlnext_feature(sd, variant, hint, t):
    """The control module output (docs/controlnext.md, "Variants"), functionally. ``variant``:
    "sd15", "sdxl", "sd15_training", "svd_v1" or "svd_v2"."""
    temb = F.linear(sinusoid(t), sd["time_embedding.linear_1.weight"], sd["time_embedding.linear_1.bias"])
    temb = F.linear(F.silu(temb), sd["time_embedding.linear_2.weight"], sd["time_embedding.linear_2.bias"])
    temb_act = F.silu(temb)
    x = hint
    if variant == "sd15":
        groups = [1, 8, 8]
    else:
        pads = {"sdxl": (1, 1, 1), "sd15_training": (1, 1, 1), "svd_v2": (1, 0, 0), "svd_v1": (1, 0, 0)}[variant]
        for n, (ci, pad) in enumerate(zip((0, 3, 6), pads)):
            x = F.conv2d(x, sd[f"embedding.{ci}.weight"], sd[f"embedding.{ci}.bias"], stride=2 if n == 0 else 1, padding=pad)
            x = F.relu(F.group_norm(x, 2, sd[f"embedding.{ci + 1}.weight"], sd[f"embedding.{ci + 1}.bias"], 1e-5))
        if variant == "svd_v1":
            x = F.max_pool2d(x, 2)
        groups = [4, 8, 8] if variant == "svd_v1" else [4, 8]
    for i, g in enumerate(groups):
        x = _res(sd, f"down_res.{i}.", x, temb_act, g)
        x = F.conv2d(x, sd[f"down_sample.{i}.conv.weight"], sd[f"down_sample.{i}.conv.bias"], stride=2, padding=1)
    if variant == "sd15":
        x = F.conv2d(F.relu(F.conv2d(x, sd["mid_convs.0.0.weight"], sd["mid_convs.0.0.bias"], padding=1)),
                     sd["mid_convs.0.2.weight"], sd["mid_convs.0.2.bias"], padding=1)
    else:
        r = F.relu(F.conv2d(x, sd["mid_convs.0.0.weight"], sd["mid_convs.0.0.bias"], padding=1))
        r = F.group_norm(r, 8, sd["mid_convs.0.2.weight"], sd["mid_convs.0.2.bias"], 1e-5)
        r = F.conv2d(r, sd["mid_convs.0.3.weight"], sd["mid_convs.0.3.bias"], padding=1)
        x = x + F.group_norm(r, 8, sd["mid_convs.0.4.weight"], sd["mid_convs.0.4.bias"], 1e-5)
    return F.conv2d(x, sd["mid_convs.1.weight"], sd["mid_convs.1.bias"])


def cross_norm_add(h, c, eps, pool_first, s):
    """h + c_hat * s (docs/controlnext.md, "Cross normalization"); s per sample (B,)."""
    def stats(z):
        z = z.float()
        return z.mean(dim=(1, 2, 3), keepdim=True), z.std(dim=(1, 2, 3), keepdim=True)

    c = c.float()
    if pool_first:
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])
    mh, sh = stats(h)
    mc, sc = stats(c)
    c_hat = (c - mc) * sh / (sc + eps) + mh
    if not pool_first:
        c_hat = F.adaptive_avg_pool2d(c_hat, h.shape[-2:])
    return h + (c_hat * s.reshape(-1, 1, 1, 1).float()).to(h.dtype)

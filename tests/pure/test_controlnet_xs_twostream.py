"""The per-step API suffices for the whole two-stream loop (spec section 1).

A tiny stand-in for the base UNet (plain convs with the SD / SDXL block structure and channel
counts) runs in lock-step with a tiny ControlNetXS driven only through its public methods, as
the ComfyUI glue will do with the real UNet. The result must equal the spec's loop written
functionally with the reference blocks.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from xctrl.models.controlnet_xs import ControlNetXS, mix_time_embeddings

from pure.test_controlnet_xs_reference import ref_block, ref_conv, ref_hint  # noqa: E402
from pure.test_controlnet_xs_net import TINY, randomize  # noqa: E402


class TinyBase:
    """Base UNet stand-in: input blocks, middle, output blocks with skip concat, out conv."""

    def __init__(self, cfg, seed=1):
        gen = torch.Generator().manual_seed(seed)
        self.cfg = cfg
        self.w = {}

        def conv(name, cin, cout):
            self.w[name] = (torch.randn(cout, cin, 3, 3, generator=gen) / math.sqrt(9 * cin),
                            0.1 * torch.randn(cout, generator=gen))

        def lin(name, cin, cout):
            self.w[name] = (torch.randn(cout, cin, generator=gen) / math.sqrt(cin), 0.1 * torch.randn(cout, generator=gen))

        n = cfg.num_input_blocks
        lin("time", cfg.model_channels, cfg.time_embed_dim)
        conv("in0", cfg.in_channels, cfg.base_channels[0])
        for i in range(1, n):
            conv(f"in{i}", cfg.base_out(i - 1), cfg.base_out(i))
            lin(f"in{i}.emb", cfg.time_embed_dim, cfg.base_out(i))
            lin(f"in{i}.ctx", cfg.context_dim, cfg.base_out(i))
        conv("mid", cfg.base_channels[-1], cfg.base_channels[-1])
        for m in range(n):
            conv(f"out{m}", cfg.base_dec(m) + cfg.base_out(n - 1 - m), self.out_channels(m))
        conv("final", cfg.base_channels[0], cfg.in_channels)

    def out_channels(self, m):
        cfg = self.cfg
        return cfg.base_dec(m + 1) if m + 1 < cfg.num_input_blocks else cfg.base_channels[0]

    def _conv(self, name, h, stride=1):
        w, b = self.w[name]
        return F.conv2d(h, w, b, stride=stride, padding=1)

    def time_embed(self, t_emb):
        w, b = self.w["time"]
        return F.silu(F.linear(t_emb, w, b))

    def input_block(self, i, h, emb, ctx):
        if i == 0:
            return self._conv("in0", h)
        kind, _ = self.cfg.block_kind(i)
        if kind == "down":
            return self._conv(f"in{i}", h, stride=2)
        extra = F.linear(emb, *self.w[f"in{i}.emb"]) + F.linear(ctx.mean(1), *self.w[f"in{i}.ctx"])
        return F.silu(self._conv(f"in{i}", h)) + extra[:, :, None, None]

    def middle_block(self, h, emb, ctx):
        return h + self._conv("mid", h)

    def output_block(self, m, h, emb, ctx):
        h = F.silu(self._conv(f"out{m}", h))
        level = self.cfg.num_levels - 1 - m // 3
        if m % 3 == 2 and level > 0:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
        return h

    def out(self, h):
        return self._conv("final", h)

    def run(self, x, emb, ctx):
        """The base alone."""
        hs = []
        h = x
        for i in range(self.cfg.num_input_blocks):
            h = self.input_block(i, h, emb, ctx)
            hs.append(h)
        h = self.middle_block(h, emb, ctx)
        for m in range(self.cfg.num_input_blocks):
            h = self.output_block(m, torch.cat([h, hs.pop()], 1), emb, ctx)
        return self.out(h)


def run_with_api(net, base, x, hint, t_emb, ctx, scale, mix=1.0):
    """The loop the ComfyUI glue implements, using only ControlNetXS's public methods."""
    base_emb = base.time_embed(t_emb)
    ctrl_emb = net.time_embedding(t_emb)
    emb = base_emb if ctrl_emb is None else mix_time_embeddings(ctrl_emb, base_emb, mix)
    g = net.embed_hint(hint)
    h_b = h_c = x
    hs_b, hs_c = [], []
    for i in range(net.num_input_blocks):
        h_b = base.input_block(i, h_b, emb, ctx)
        h_c = net.control_block(i, h_c, emb, ctx)
        if i == 0:
            h_c = h_c + g
        h_b = h_b + net.to_base_enc(i, h_c) * scale
        hs_b.append(h_b)
        hs_c.append(h_c)
        h_c = net.concat_base(i, h_c, h_b)
    h_b = base.middle_block(h_b, emb, ctx)
    h_c = net.middle(h_c, emb, ctx)
    h_b = h_b + net.to_base_mid(h_c) * scale
    for j in range(net.num_input_blocks):
        h_b = h_b + net.to_base_dec(j, hs_c.pop()) * scale
        h_b = base.output_block(j, torch.cat([h_b, hs_b.pop()], 1), emb, ctx)
    return base.out(h_b)


def run_reference(p, cfg, base, x, hint, t_emb, ctx, scale):
    """Spec section 1, written with the functional reference blocks and the raw weights."""
    base_emb = base.time_embed(t_emb)
    if "control_model.time_embed.0.weight" in p:
        h = F.linear(t_emb, p["control_model.time_embed.0.weight"], p["control_model.time_embed.0.bias"])
        emb = F.linear(F.silu(h), p["control_model.time_embed.2.weight"], p["control_model.time_embed.2.bias"])
    else:
        emb = base_emb
    eps = 1e-6 if cfg.family == "sd" else 1e-5
    g = ref_hint(hint, p)
    n = cfg.num_input_blocks
    h_b = h_c = x
    hs_b, hs_c = [], []
    for i in range(n):
        heads = cfg.num_heads[cfg.block_kind(i)[1]]
        h_b = base.input_block(i, h_b, emb, ctx)
        h_c = ref_block(f"control_model.input_blocks.{i}.", h_c, emb, ctx, p, heads, eps)
        if i == 0:
            h_c = h_c + g
        h_b = h_b + ref_conv(h_c, p, f"enc_zero_convs_out.{i}.0") * scale
        hs_b.append(h_b)
        hs_c.append(h_c)
        h_c = torch.cat([h_c, ref_conv(h_b, p, f"enc_zero_convs_in.{i}.0")], 1)
    h_b = base.middle_block(h_b, emb, ctx)
    h_c = ref_block("control_model.middle_block.", h_c, emb, ctx, p, cfg.num_heads_middle, eps)
    h_b = h_b + ref_conv(h_c, p, "middle_block_out.0") * scale
    for j in range(n):
        h_b = h_b + ref_conv(hs_c.pop(), p, f"dec_zero_convs_out.{j}.0") * scale
        h_b = base.output_block(j, torch.cat([h_b, hs_b.pop()], 1), emb, ctx)
    return base.out(h_b)


def setup(key, latent=8):
    cfg = TINY[key]
    torch.manual_seed(3)
    net = randomize(ControlNetXS(cfg)).eval()
    base = TinyBase(cfg)
    x = torch.randn(2, cfg.in_channels, latent, latent)
    hint = torch.rand(2, cfg.hint_channels, 8 * latent, 8 * latent)
    t_emb = torch.randn(2, cfg.model_channels)
    ctx = torch.randn(2, 4, cfg.context_dim)
    return cfg, net, base, x, hint, t_emb, ctx


@pytest.mark.parametrize("key", ["xl", "sd"])
def test_api_loop_equals_the_reference_loop(key):
    cfg, net, base, x, hint, t_emb, ctx = setup(key)
    with torch.no_grad():
        got = run_with_api(net, base, x, hint, t_emb, ctx, scale=0.7)
        want = run_reference(dict(net.state_dict()), cfg, base, x, hint, t_emb, ctx, scale=0.7)
        plain = base.run(x, base.time_embed(t_emb), ctx)
    assert got.shape == x.shape
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, err
    assert (got - plain).abs().max() > 1e-2 * plain.abs().max()  # the control does act


def test_scale_zero_leaves_the_base_alone():
    cfg, net, base, x, hint, t_emb, ctx = setup("sd")  # no learned time embedding
    with torch.no_grad():
        got = run_with_api(net, base, x, hint, t_emb, ctx, scale=0.0)
        plain = base.run(x, base.time_embed(t_emb), ctx)
    assert torch.allclose(got, plain, atol=1e-6)


def test_learned_time_embedding_drives_the_base_too():
    """mix = 1: the base runs on the control's embedding; mix = 0: on its own."""
    cfg, net, base, x, hint, t_emb, ctx = setup("xl")
    with torch.no_grad():
        zero_scale = run_with_api(net, base, x, hint, t_emb, ctx, scale=0.0, mix=1.0)
        assert torch.allclose(zero_scale, base.run(x, net.time_embedding(t_emb), ctx), atol=1e-6)
        own = run_with_api(net, base, x, hint, t_emb, ctx, scale=0.0, mix=0.0)
        assert torch.allclose(own, base.run(x, base.time_embed(t_emb), ctx), atol=1e-6)

"""ControlNet-XS control network: strict loading of the released layouts, and numbers.

Numbers are checked against the plain functional reference in tests/harness/xs_reference.py
(F.conv2d, F.group_norm with the rule's group count, explicit softmax attention), which reads
the weights by their vislearn names. Configs are tiny; the released layouts
are only loaded (meta tensors), never run.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xctrl.models.controlnet_xs import ControlNetXS, ResBlock, load_controlnet_xs, mix_time_embeddings
from xctrl.models.controlnet_xs_keys import ControlNetXSFormatError, read_config, to_vislearn

from harness.ops import built_through, recording_ops
from harness.xs_reference import (  # noqa: E402
    MODELS,
    layout,
    meta_sd,
    ref_block,
    ref_conv,
    ref_gn,
    ref_groups,
    ref_hint,
    ref_res,
    ref_transformer,
    vislearn_to_diffusers,
)

torch.manual_seed(0)


from harness.random_weights import random_tensors  # noqa: E402
from harness.xs_configs import TINY, TINY_XL, randomize  # noqa: E402


def tiny_net(key):
    return randomize(ControlNetXS(TINY[key])).eval()


def close(a, b, tol=1e-5):
    assert a.shape == b.shape
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("key", ["xl", "sd"])
def test_every_control_block_matches_the_reference(key):
    cfg = TINY[key]
    net = tiny_net(key)
    p = dict(net.state_dict())
    emb = torch.randn(2, cfg.time_embed_dim)
    ctx = torch.randn(2, 5, cfg.context_dim)
    size = 8
    for i in range(cfg.num_input_blocks):
        kind, level = cfg.block_kind(i)
        heads = cfg.num_heads[level]
        c_in = cfg.in_channels if i == 0 else cfg.ctrl_in(i)
        x = torch.randn(2, c_in, size, size)
        with torch.no_grad():
            got = net.control_block(i, x, emb, ctx)
        want = ref_block(f"control_model.input_blocks.{i}.", x, emb, ctx, p, heads, cfg.transformer_norm_eps)
        close(got, want)
        if kind == "down":
            size //= 2
    last = cfg.num_input_blocks - 1
    x = torch.randn(2, cfg.ctrl_out(last) + cfg.base_out(last), size, size)
    with torch.no_grad():
        got = net.middle(x, emb, ctx)
    close(got, ref_block("control_model.middle_block.", x, emb, ctx, p, cfg.num_heads_middle, cfg.transformer_norm_eps))


@pytest.mark.parametrize("key", ["xl", "sd"])
def test_norm_eps_res_1e5_transformer_1e6_sd_1e5_sdxl(key):
    """Tiny activations make eps visible: the reference with the other eps must be far off."""
    cfg = TINY[key]
    net = tiny_net(key)
    p = dict(net.state_dict())
    i = 4  # res block + transformer (level 1)
    pre = f"control_model.input_blocks.{i}."
    res, transformer = net.control_model.input_blocks[i]
    emb, ctx = torch.randn(1, cfg.time_embed_dim), torch.randn(1, 3, cfg.context_dim)
    x = 1e-3 * torch.randn(1, cfg.ctrl_in(i), 4, 4)
    y = 1e-3 * torch.randn(1, cfg.ctrl_out(i), 4, 4)
    eps, other = cfg.transformer_norm_eps, (1e-5 if cfg.transformer_norm_eps == 1e-6 else 1e-6)
    with torch.no_grad():
        got_res, got_tr = res(x, emb), transformer(y, ctx)
    close(got_res, ref_res(x, emb, p, pre + "0."))
    close(got_tr, ref_transformer(y, ctx, p, pre + "1.", cfg.num_heads[1], eps))
    wrong_tr = ref_transformer(y, ctx, p, pre + "1.", cfg.num_heads[1], other)
    assert (got_tr - wrong_tr).abs().max() > 1e-2 * got_tr.abs().max()
    right = ref_gn(x, p, pre + "0.in_layers.0", 1e-5)
    wrong = ref_gn(x, p, pre + "0.in_layers.0", 1e-6)
    assert (wrong - right).abs().max() > 1e-2 * right.abs().max()


@pytest.mark.parametrize("key", ["xl", "sd"])
def test_group_counts_follow_the_rule(key):
    net = ControlNetXS(TINY[key], device="meta")
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms
    for m in norms:
        assert m.num_groups == ref_groups(m.num_channels)
    seen = {(m.num_groups, m.num_channels) for m in norms}
    assert {4, 12}.issubset({g for g, c in seen}) and any(c > g for g, c in seen)


def test_res_block_324_channels_uses_27_groups():
    block = randomize(ResBlock(324, 4, 16)).eval()
    assert block.in_layers[0].num_groups == 27 and block.out_layers[0].num_groups == 4
    p = {k: v for k, v in block.state_dict().items()}
    x, emb = torch.randn(1, 324, 3, 3), torch.randn(1, 16)
    with torch.no_grad():
        close(block(x, emb), ref_res(x, emb, p, ""))
        # the group count matters: a 36-group norm of the same input is clearly different
        other = F.group_norm(x, 36, p["in_layers.0.weight"], p["in_layers.0.bias"], 1e-5)
        assert not torch.allclose(other, ref_gn(x, p, "in_layers.0", 1e-5), atol=1e-3)


@pytest.mark.parametrize("key", ["xl", "sd"])
def test_hint_time_and_zero_convs_match_the_reference(key):
    cfg = TINY[key]
    net = tiny_net(key)
    p = dict(net.state_dict())
    hint = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        g = net.embed_hint(hint)
        assert g.shape == (2, cfg.ctrl_channels[0], 8, 8)
        close(g, ref_hint(hint, p))
        t_emb = torch.randn(2, cfg.model_channels)
        got = net.time_embedding(t_emb)
        if cfg.learned_time_embedding:
            h = F.linear(t_emb, p["control_model.time_embed.0.weight"], p["control_model.time_embed.0.bias"])
            want = F.linear(F.silu(h), p["control_model.time_embed.2.weight"], p["control_model.time_embed.2.bias"])
            close(got, want)
        else:
            assert got is None
        n = cfg.num_input_blocks
        for i in range(n):
            h_c = torch.randn(2, cfg.ctrl_out(i), 4, 4)
            h_b = torch.randn(2, cfg.base_out(i), 4, 4)
            close(net.to_base_enc(i, h_c), ref_conv(h_c, p, f"enc_zero_convs_out.{i}.0"))
            close(net.to_ctrl(i, h_b), ref_conv(h_b, p, f"enc_zero_convs_in.{i}.0"))
            close(net.concat_base(i, h_c, h_b), torch.cat([h_c, ref_conv(h_b, p, f"enc_zero_convs_in.{i}.0")], 1))
            skip = torch.randn(2, cfg.ctrl_out(n - 1 - i), 4, 4)
            close(net.to_base_dec(i, skip), ref_conv(skip, p, f"dec_zero_convs_out.{i}.0"))
        h_c = torch.randn(2, cfg.ctrl_channels[-1], 4, 4)
        close(net.to_base_mid(h_c), ref_conv(h_c, p, "middle_block_out.0"))


def test_mix_time_embeddings():
    c, b = torch.randn(2, 16), torch.randn(2, 16)
    assert torch.equal(mix_time_embeddings(c, b, 1.0), c)
    close(mix_time_embeddings(c, b, 0.5), c * 0.5 ** 0.3 + b * (1 - 0.5 ** 0.3))
    close(mix_time_embeddings(c, b, 0.0), b)


def test_half_precision_weights_run_with_norms_in_fp32():
    net = tiny_net("xl")
    half = ControlNetXS(TINY_XL, dtype=torch.bfloat16)
    half.load_state_dict(net.state_dict())
    emb, ctx = torch.randn(1, 16), torch.randn(1, 3, 16)
    x = torch.randn(1, TINY_XL.ctrl_in(5), 4, 4)
    with torch.no_grad():
        want = net.control_block(5, x, emb, ctx)
        got = half.control_block(5, x.bfloat16(), emb.bfloat16(), ctx.bfloat16())
    assert got.dtype == torch.bfloat16
    close(got.float(), want, tol=5e-2)


def test_layers_are_built_through_ops():
    ops, made = recording_ops()
    assert built_through(ControlNetXS(TINY_XL, ops=ops, device="meta"), made)


# ---- the released layouts --------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("fmt", ["vislearn", "diffusers"])
def test_released_layout_loads_strictly(fmt, model):
    sd = meta_sd(layout(fmt, model))
    net, cfg = load_controlnet_xs(sd)
    assert cfg == read_config(sd)
    loaded = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert loaded == {k: tuple(v.shape) for k, v in to_vislearn(sd).items()}
    assert net.num_input_blocks == len(net.enc_zero_convs_out) == len(net.dec_zero_convs_out)


def test_wrong_shape_or_missing_key_is_reported():
    keys = dict(layout("vislearn", "sd21_14m"))
    keys["control_model.input_blocks.2.1.proj_in.weight"] = (8, 9)
    with pytest.raises(ControlNetXSFormatError, match="proj_in"):
        load_controlnet_xs(meta_sd(keys))
    keys = dict(layout("vislearn", "sd21_14m"))
    del keys["control_model.input_blocks.5.1.transformer_blocks.0.ff.net.2.bias"]
    with pytest.raises(ControlNetXSFormatError, match="ff.net.2.bias"):
        load_controlnet_xs(meta_sd(keys))


def test_diffusers_file_and_its_vislearn_twin_give_the_same_network():
    keys = layout("vislearn", "sd21_14m")
    vis = random_tensors(keys, seed=0)
    n_in = 12
    diff = {vislearn_to_diffusers(k, n_in): v.clone() for k, v in vis.items() if k != "scale_list"}
    net_v, cfg_v = load_controlnet_xs(vis)
    net_d, cfg_d = load_controlnet_xs(diff)
    assert cfg_v == cfg_d
    sv, sd_ = net_v.state_dict(), net_d.state_dict()
    assert sv.keys() == sd_.keys()
    assert all(torch.equal(sv[k], sd_[k]) for k in sv)
    # and the network really is the file's: one real block, run at a tiny size
    emb, ctx = torch.randn(1, 1280), torch.randn(1, 2, 1024)
    x = torch.randn(1, 4 + 320, 4, 4)
    with torch.no_grad():
        got = net_d.control_block(1, x, emb, ctx)
    close(got, ref_block("control_model.input_blocks.1.", x, emb, ctx, vis, 1, 1e-6), tol=1e-4)


def test_dtype_and_device_arguments():
    sd = {k: torch.zeros(shape, dtype=torch.float16) for k, shape in layout("diffusers", "sd21_14m").items()}
    net, _ = load_controlnet_xs(sd)
    assert {p.dtype for p in net.parameters()} == {torch.float16}
    net, _ = load_controlnet_xs(sd, dtype=torch.float32, device="cpu")
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert {p.device.type for p in net.parameters()} == {"cpu"}

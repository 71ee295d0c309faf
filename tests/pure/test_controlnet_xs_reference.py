"""Tests of the ControlNet-XS reference helpers themselves (tests/harness/xs_reference.py)."""
import pytest
import torch

from harness.xs_reference import (
    MODELS,
    TINY_XS,
    layout,
    ref_attention,
    ref_attention_width,
    ref_groups,
    vislearn_to_diffusers,
    vislearn_used,
    xs_layout,
)


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


@pytest.mark.parametrize("model", MODELS)
def test_attention_width_rule_gives_the_released_widths(model):
    """The released files are all wide enough that the attention width equals the channel count."""
    keys = layout("vislearn", model)
    for k, shape in keys.items():
        if k.endswith("attn1.to_q.weight"):
            assert shape[0] == shape[1], k
    assert ref_attention_width("sd", 768, 16) == 64 and ref_attention_width("sd", 768, 256) == 256
    assert ref_attention_width("sd", 1024, 16) == 16 and ref_attention_width("sdxl", 32, 16) == 16


def test_tiny_layout_follows_the_released_naming():
    """Every key of the tiny generator's SD1.5 layout exists in the released SD1.5 file (and the
    released file has no kind of key it lacks, but for scale_list and label_emb)."""
    import re

    def pattern(k):
        return re.sub(r"\d+", "N", k)

    tiny = {pattern(k) for k in xs_layout("sd15")}
    released = {pattern(k) for k in vislearn_used("sd15_53m")}
    assert tiny == released
    assert set(TINY_XS) == {"sd15", "sd21", "sdxl", "sdxl_learned"}

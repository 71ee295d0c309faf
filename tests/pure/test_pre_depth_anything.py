"""Depth Anything V2 Small: the depth_anything_v2_vits.pth layout, pre/post-processing, batching."""
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from xctrl.models.checkpoint_io import load_state_dict
from xctrl.preprocessors import depth_anything_v2 as dav2
from xctrl.preprocessors.depth_render import render_grey, render_viridis


def real_layout():
    """Key -> shape of depth_anything_v2_vits.pth, written from the reference's description
    (DINOv2 ViT-S/14 at 518 px with LayerScale, block_chunks 0; DPT head features 64, out
    channels 48/96/192/384, no class-token readout), independently of the module."""
    d, L = 384, {}
    L["pretrained.cls_token"] = (1, 1, d)
    L["pretrained.pos_embed"] = (1, 37 * 37 + 1, d)
    L["pretrained.mask_token"] = (1, d)
    L["pretrained.patch_embed.proj.weight"] = (d, 3, 14, 14)
    L["pretrained.patch_embed.proj.bias"] = (d,)
    for i in range(12):
        p = f"pretrained.blocks.{i}."
        for n in ("norm1", "norm2"):
            L[p + n + ".weight"] = (d,)
            L[p + n + ".bias"] = (d,)
        L[p + "attn.qkv.weight"], L[p + "attn.qkv.bias"] = (3 * d, d), (3 * d,)
        L[p + "attn.proj.weight"], L[p + "attn.proj.bias"] = (d, d), (d,)
        L[p + "ls1.gamma"], L[p + "ls2.gamma"] = (d,), (d,)
        L[p + "mlp.fc1.weight"], L[p + "mlp.fc1.bias"] = (4 * d, d), (4 * d,)
        L[p + "mlp.fc2.weight"], L[p + "mlp.fc2.bias"] = (d, 4 * d), (d,)
    L["pretrained.norm.weight"], L["pretrained.norm.bias"] = (d,), (d,)
    h = "depth_head."
    for i, c in enumerate((48, 96, 192, 384)):
        L[f"{h}projects.{i}.weight"], L[f"{h}projects.{i}.bias"] = (c, d, 1, 1), (c,)
        L[f"{h}scratch.layer{i + 1}_rn.weight"] = (64, c, 3, 3)
    L[h + "resize_layers.0.weight"], L[h + "resize_layers.0.bias"] = (48, 48, 4, 4), (48,)
    L[h + "resize_layers.1.weight"], L[h + "resize_layers.1.bias"] = (96, 96, 2, 2), (96,)
    L[h + "resize_layers.3.weight"], L[h + "resize_layers.3.bias"] = (384, 384, 3, 3), (384,)
    for r in range(1, 5):
        p = f"{h}scratch.refinenet{r}."
        L[p + "out_conv.weight"], L[p + "out_conv.bias"] = (64, 64, 1, 1), (64,)
        for u in (1, 2):
            for c in (1, 2):
                L[f"{p}resConfUnit{u}.conv{c}.weight"] = (64, 64, 3, 3)
                L[f"{p}resConfUnit{u}.conv{c}.bias"] = (64,)
    L[h + "scratch.output_conv1.weight"], L[h + "scratch.output_conv1.bias"] = (32, 64, 3, 3), (32,)
    L[h + "scratch.output_conv2.0.weight"], L[h + "scratch.output_conv2.0.bias"] = (32, 32, 3, 3), (32,)
    L[h + "scratch.output_conv2.2.weight"], L[h + "scratch.output_conv2.2.bias"] = (1, 32, 1, 1), (1,)
    return L


def random_file(tmp_path):
    torch.manual_seed(0)
    net = dav2.DepthAnythingV2Small()
    with torch.no_grad():
        net.pretrained.pos_embed.normal_(0, 0.02)
        net.pretrained.cls_token.normal_(0, 0.02)
        net.depth_head.scratch.output_conv2[2].bias.fill_(0.5)  # keep the final ReLU's output non-trivial
    path = tmp_path / dav2.WEIGHT_FILE
    torch.save(net.state_dict(), path)  # the real file is a plain fp32 state dict
    return path


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return dav2.build_depth_anything_v2(load_state_dict(str(random_file(tmp_path_factory.mktemp("dav2")))))


def test_layout_equals_the_real_file():
    model = {k: tuple(v.shape) for k, v in dav2.DepthAnythingV2Small().state_dict().items()}
    layout = real_layout()
    assert model == layout
    # facts from public sources: key names used by other loaders of the same file
    for key in ("pretrained.blocks.0.attn.qkv.weight", "pretrained.blocks.0.ls1.gamma", "pretrained.blocks.7.norm1.weight",
                "depth_head.scratch.refinenet1.resConfUnit1.conv1.weight", "depth_head.scratch.refinenet4.resConfUnit1.conv1.weight",
                "depth_head.resize_layers.0.weight", "depth_head.scratch.layer1_rn.weight", "pretrained.mask_token"):
        assert key in model
    assert model["pretrained.pos_embed"] == (1, 1370, 384)
    total = sum(math.prod(s) for s in layout.values())
    assert total == sum(p.numel() for p in dav2.DepthAnythingV2Small().parameters()) == 24_785_089  # "24.8M"
    assert total * 4 == pytest.approx(99.2e6, rel=0.01)  # fp32 file size


def test_wrong_file_is_refused():
    sd = dav2.DepthAnythingV2Small().state_dict()
    del sd["pretrained.mask_token"]
    with pytest.raises(ValueError, match="depth_anything_v2_vits.pth"):
        dav2.build_depth_anything_v2(sd)
    sd = dav2.DepthAnythingV2Small().state_dict()
    sd["depth_head.projects.0.weight"] = torch.zeros(64, 384, 1, 1)  # the Base model's shape
    with pytest.raises(ValueError, match="projects.0.weight"):
        dav2.build_depth_anything_v2(sd)


@pytest.mark.parametrize("hw, expected", [((480, 640), (518, 686)), ((518, 518), (518, 518)), ((100, 50), (1036, 518)),
                                           ((720, 1280), (518, 924)), ((33, 33), (518, 518))])
def test_network_size_follows_the_reference(hw, expected):
    assert dav2.network_size(*hw) == expected
    nh, nw = dav2.network_size(*hw)
    assert nh % 14 == 0 and nw % 14 == 0 and min(nh, nw) >= 518


def test_network_size_other_input_size():
    assert dav2.network_size(480, 640, 280) == (280, 378)
    with pytest.raises(ValueError, match="multiple of 14"):
        dav2.network_size(480, 640, 500)


def test_prepare_normalises_with_imagenet_statistics():
    img = np.full((1, 28, 42, 3), (124, 116, 104), np.uint8)
    x = dav2.prepare(img, input_size=28)
    assert x.shape == (1, 3, 28, 42) and x.dtype == torch.float32
    expected = (np.array([124, 116, 104]) / 255.0 - np.array(dav2.MEAN)) / np.array(dav2.STD)
    np.testing.assert_allclose(x[0, :, 5, 5].numpy(), expected, atol=1e-5)


def test_sdpa_attention_equals_the_explicit_formula():
    torch.manual_seed(1)
    attn = dav2.Attention()
    x = torch.randn(2, 10, 384)
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, 6, 64).permute(2, 0, 3, 1, 4)
    weights = ((q * 64 ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_position_embedding_is_resized_bicubically():
    vit = dav2.DinoV2Small()
    torch.nn.init.normal_(vit.pos_embed)
    same = vit.position_embedding(37, 37, torch.float32)
    assert same.data_ptr() == vit.pos_embed.data_ptr() or torch.equal(same, vit.pos_embed)
    other = vit.position_embedding(5, 7, torch.float32)
    assert other.shape == (1, 36, 384)
    torch.testing.assert_close(other[:, 0], vit.pos_embed[:, 0])
    grid = vit.pos_embed[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(5.1 / 37, 7.1 / 37), mode="bicubic", antialias=False)
    torch.testing.assert_close(other[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 35, 384))


def test_depth_shapes_range_determinism_and_batch(net):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (3, 45, 61, 3), dtype=np.uint8)  # odd sizes
    depth = dav2.estimate_depth(net, frames, input_size=42)
    assert depth.shape == (3, 45, 61) and depth.dtype == np.float32
    assert np.isfinite(depth).all() and depth.min() >= 0 and depth.max() > depth.min()
    np.testing.assert_array_equal(depth, dav2.estimate_depth(net, frames, input_size=42))
    for i in range(3):  # a batch gives what each frame gives alone
        np.testing.assert_allclose(dav2.estimate_depth(net, frames[i], input_size=42)[0], depth[i], rtol=1e-4, atol=1e-5)
    other = dav2.estimate_depth(net, frames[:1], input_size=42, output_hw=(20, 30))
    assert other.shape == (1, 20, 30)


def test_renderings_of_the_estimate(net):
    frame = np.random.default_rng(4).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    depth = dav2.estimate_depth(net, frame, input_size=28)[0]
    grey = render_grey(depth)
    assert grey.shape == (30, 40, 3) and grey.min() == 0 and grey.max() == 255
    near = np.unravel_index(np.argmax(depth), depth.shape)
    assert tuple(grey[near]) == (255, 255, 255)  # white = near
    assert tuple(render_viridis(depth)[near]) == (68, 1, 84)  # ControlNeXt: near = dark purple


def test_bad_input_is_refused(net):
    with pytest.raises(ValueError, match="empty"):
        dav2.estimate_depth(net, np.zeros((0, 10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        dav2.estimate_depth(net, np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ValueError, match="multiples of 14"):
        net(torch.zeros(1, 3, 30, 28))

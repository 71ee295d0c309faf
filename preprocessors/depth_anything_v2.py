"""Depth Anything V2 Small (`depth_anything_v2_vits.pth`, Apache-2.0): DINOv2 ViT-S/14 + DPT head.

Pure PyTorch (attention through `F.scaled_dot_product_attention`; no timm, no xformers). The
module and parameter names equal the keys of the released file (`pretrained.*` for the ViT,
`depth_head.*` for the DPT head), so the file loads strictly; 24.8M parameters.

As the reference (DepthAnything/Depth-Anything-V2, depth_anything_v2/dpt.py, dinov2.py,
util/blocks.py, util/transform.py):
- ViT-S/14: embed 384, 12 blocks, 6 heads, MLP 1536 (exact GELU), LayerNorm eps 1e-6,
  LayerScale (`ls1.gamma`, `ls2.gamma`), a class token, `pos_embed` for 37 x 37 patches (518 px)
  resized bicubically (scale factor (n + 0.1) / 37, no antialias) to other grids; `mask_token`
  is stored but unused at inference. Features of blocks 2, 5, 8, 11, each through the final
  `norm`, class token dropped (vits does not use it).
- DPT head (features 64, out channels 48, 96, 192, 384): 1x1 projections; x4 and x2 transposed
  convolutions, identity, a stride-2 3x3 conv; `scratch.layer{1..4}_rn` 3x3 convs without bias;
  four fusion blocks (residual conv units, bilinear align_corners=True upsampling, 1x1
  `out_conv`); `output_conv1`, upsampling to 14 x the patch grid, `output_conv2`, ReLU.
- Input: RGB / 255, resized (bicubic) so that the shorter side is `input_size` (518) and both
  sides are multiples of 14 (rounded to the nearest multiple, at least `input_size`), ImageNet
  mean/std. Output: relative inverse depth (larger = nearer), bilinearly resized
  (align_corners=True) to the requested size.
"""
import math

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .image_io import uint8_rgb_batch
from .weights import load_exact

WEIGHT_FILE = "depth_anything_v2_vits.pth"
PATCH = 14
INPUT_SIZE = 518
EMBED_DIM = 384
DEPTH = 12
HEADS = 6
LAYERS = (2, 5, 8, 11)
FEATURES = 64
OUT_CHANNELS = (48, 96, 192, 384)
POS_GRID = 37  # 518 / 14
INTERPOLATE_OFFSET = 0.1
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Working-size limit: 74 x 74 patches, 4x the pixels of the 518 px training size; attention time
# grows with the square of the patch count (about a minute per frame at the limit on two CPU cores).
MAX_PIXELS = 1036 * 1036


# ---------------------------------------------------------------------------------------------
# DINOv2 ViT-S/14


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, EMBED_DIM, PATCH, stride=PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(EMBED_DIM, EMBED_DIM * 3)
        self.proj = nn.Linear(EMBED_DIM, EMBED_DIM)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as the reference
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(EMBED_DIM, EMBED_DIM * 4)
        self.fc2 = nn.Linear(EMBED_DIM * 4, EMBED_DIM)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(EMBED_DIM))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(EMBED_DIM, eps=1e-6)
        self.attn = Attention()
        self.ls1 = LayerScale()
        self.norm2 = nn.LayerNorm(EMBED_DIM, eps=1e-6)
        self.mlp = Mlp()
        self.ls2 = LayerScale()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED_DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, POS_GRID * POS_GRID + 1, EMBED_DIM))
        self.mask_token = nn.Parameter(torch.zeros(1, EMBED_DIM))  # in the file; unused here
        self.blocks = nn.ModuleList([Block() for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(EMBED_DIM, eps=1e-6)

    def position_embedding(self, grid_h, grid_w, dtype):
        """pos_embed for a grid_h x grid_w patch grid, as the reference computes it."""
        if grid_h == POS_GRID and grid_w == POS_GRID:
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, POS_GRID, POS_GRID, EMBED_DIM).permute(0, 3, 1, 2)
        scale = ((grid_h + INTERPOLATE_OFFSET) / POS_GRID, (grid_w + INTERPOLATE_OFFSET) / POS_GRID)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", antialias=False)
        if patch_pos.shape[-2:] != (grid_h, grid_w):
            raise RuntimeError(f"position embedding resized to {tuple(patch_pos.shape[-2:])}, expected {(grid_h, grid_w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, EMBED_DIM)
        return torch.cat([cls_pos, patch_pos], dim=1).to(dtype)

    def intermediate_features(self, x, layers=LAYERS, check=None):
        """x: (B, 3, H, W), H and W multiples of 14 -> [normed patch tokens (B, N, 384)] per layer.
        `check()`, when given, is called after each block (the caller's cancel check raises there)."""
        grid_h, grid_w = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(grid_h, grid_w, tokens.dtype)
        out = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if check is not None:
                check()
            if i in layers:
                out.append(self.norm(tokens)[:, 1:])
        return out


# ---------------------------------------------------------------------------------------------
# DPT head


class ResidualConvUnit(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionBlock(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)  # noqa: N815 (the file's key name)
        self.resConfUnit2 = ResidualConvUnit(features)  # noqa: N815

    def forward(self, x, skip=None, size=None):
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    def __init__(self, features=FEATURES, in_channels=OUT_CHANNELS):
        super().__init__()
        for i, c in enumerate(in_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FusionBlock(features))
        self.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1), nn.ReLU(), nn.Identity()
        )


class DPTHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.projects = nn.ModuleList([nn.Conv2d(EMBED_DIM, c, 1) for c in OUT_CHANNELS])
        c1, c2, _, c4 = OUT_CHANNELS
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c1, c1, 4, stride=4),
            nn.ConvTranspose2d(c2, c2, 2, stride=2),
            nn.Identity(),
            nn.Conv2d(c4, c4, 3, stride=2, padding=1),
        ])
        self.scratch = Scratch()

    def forward(self, features, grid_h, grid_w):
        maps = []
        for tokens, project, resize in zip(features, self.projects, self.resize_layers):
            x = tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[-1], grid_h, grid_w)
            maps.append(resize(project(x)))
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i}_rn")(m) for i, m in enumerate(maps, start=1))
        path = s.refinenet4(l4, size=l3.shape[2:])
        path = s.refinenet3(path, l3, size=l2.shape[2:])
        path = s.refinenet2(path, l2, size=l1.shape[2:])
        path = s.refinenet1(path, l1)
        out = s.output_conv1(path)
        out = F.interpolate(out, (grid_h * PATCH, grid_w * PATCH), mode="bilinear", align_corners=True)
        return s.output_conv2(out)


class DepthAnythingV2Small(nn.Module):
    """(B, 3, H, W) normalised RGB, H and W multiples of 14 -> (B, H, W) relative inverse depth."""

    def __init__(self):
        super().__init__()
        self.pretrained = DinoV2Small()
        self.depth_head = DPTHead()

    def forward(self, x, check=None):
        if x.shape[-2] % PATCH or x.shape[-1] % PATCH:
            raise ValueError(f"Depth Anything needs sides that are multiples of {PATCH}, got {tuple(x.shape[-2:])}.")
        grid_h, grid_w = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        depth = self.depth_head(self.pretrained.intermediate_features(x, check=check), grid_h, grid_w)
        return F.relu(depth).squeeze(1)


def build_depth_anything_v2(state_dict):
    """DepthAnythingV2Small in eval mode loaded strictly from depth_anything_v2_vits.pth's keys."""
    return load_exact(DepthAnythingV2Small(), state_dict, WEIGHT_FILE)


# ---------------------------------------------------------------------------------------------
# Pre- and post-processing


def network_size(height, width, input_size=INPUT_SIZE):
    """(H, W) the reference resizes an image to: the shorter side scaled to `input_size`, each
    side rounded to the nearest multiple of 14 but not below `input_size` (then rounded up)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"The image has zero size ({height} x {width} pixels).")
    if input_size < PATCH or input_size % PATCH:
        raise ValueError(f"The Depth Anything input size must be a positive multiple of {PATCH}, got {input_size}.")
    scale = max(input_size / height, input_size / width)

    def constrain(x):
        y = int(np.round(x / PATCH) * PATCH)
        if y < input_size:
            y = int(math.ceil(x / PATCH) * PATCH)
        return y

    return constrain(scale * height), constrain(scale * width)


def input_size_for(side):
    """The network input size (shorter side, a multiple of 14, at least 14) nearest `side` pixels."""
    return max(PATCH, int(round(side / PATCH)) * PATCH)


def prepare(images, input_size=INPUT_SIZE):
    """(B, H, W, 3) uint8 RGB -> (B, 3, h, w) float32 normalised tensor at the network size."""
    images = uint8_rgb_batch(images, "Depth Anything")
    h, w = images.shape[1:3]
    nh, nw = network_size(h, w, input_size)
    mean, std = np.array(MEAN, np.float32), np.array(STD, np.float32)
    out = np.empty((len(images), 3, nh, nw), np.float32)
    for i, img in enumerate(images):
        x = img.astype(np.float32)
        x /= 255.0  # in place: one float copy of a (possibly large) input frame at a time
        x = cv2.resize(x, (nw, nh), interpolation=cv2.INTER_CUBIC)
        out[i] = ((x - mean) / std).transpose(2, 0, 1)
    return torch.from_numpy(out)


@torch.no_grad()
def estimate_depth(net, images, input_size=INPUT_SIZE, output_hw=None, check=None):
    """Relative inverse depth (larger = nearer), float32 numpy (B, H', W'): (B, H, W, 3) uint8
    RGB frames of one size, on the network's device and dtype; resized bilinearly
    (align_corners=True) to `output_hw` (default: the input H, W). `check`: called between the
    transformer blocks (the caller's cancel check)."""
    images = uint8_rgb_batch(images, "Depth Anything")
    out_h, out_w = output_hw if output_hw is not None else images.shape[1:3]
    param = next(net.parameters())
    x = prepare(images, input_size).to(device=param.device, dtype=param.dtype)
    depth = net(x, check).float()
    depth = F.interpolate(depth[:, None], (int(out_h), int(out_w)), mode="bilinear", align_corners=True)[:, 0]
    return depth.cpu().numpy()

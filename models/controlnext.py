"""ControlNeXt control modules: the small network that turns a condition image into a feature.

The variants (docs/controlnext.md, "Variants"), all with the same building blocks:

- "sd15": SD1.5 released (Pbihao/ControlNeXt, ControlNeXt-SD1.5/*/controlnet.safetensors).
- "sd15_training": the SD1.5-Training code's module (no released weights).
- "sdxl": ControlNeXt-SDXL.
- "svd_v1": ControlNeXt-SVD v1 (pad-0 embedding convs, MaxPool, learned scale).
- "svd_v2": ControlNeXt-SVD v2 (SDXL keys and shapes, pad-0 embedding convs 2 and 3).

"sdxl", "svd_v2" and "sd15_training" files have identical keys and shapes: a file alone
cannot tell them apart. :func:`detect_variant` then returns the family id ``"sdxl_family"``
and the caller picks the member from the base model with :func:`resolve_variant`.

The forward pass is split so that callers can cache the expensive, timestep-independent
start: ``forward(hint, t) == forward_from_stem(stem(hint), t)``. Every layer with weights is
built through ``ops`` (``torch.nn`` or ``comfy.ops.manual_cast``). The module does not cast
its input: give the hint in the dtype the layers compute in.
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint_io import WeightFileError
from .cross_norm import NORM_THEN_POOL, POOL_THEN_NORM

TIME_PROJ_DIM = 128  # sinusoidal embedding width
TIME_EMBED_DIM = 256  # time_embedding.linear_2 output
SDXL_FAMILY = "sdxl_family"

# Scale semantics (docs/controlnext.md, "Cross normalization"), see injection_scales().
LEARNED_X_STRENGTH = "learned_x_strength"  # sd15: learned `scale` * strength
STRENGTH = "strength"  # sdxl, sd15_training, sd3
SIGMOID_LEARNED_X13 = "sigmoid_learned_x1.3"  # svd_v1: sigmoid(scale) * 1.3; uncond rows sigmoid(0) * 1.3
STRENGTH_X02 = "strength_x0.2"  # svd_v2: 0.2 * strength on cond rows, uncond rows none

# The timestep the control module is given (control_timesteps()).
MODEL_TIMESTEP = "model_timestep"  # the denoiser's own timestep (0..999 index for SD1.5 / SDXL / SD3)
QUARTER_LN_SIGMA = "0.25_ln_sigma"  # SVD: 0.25 * ln(sigma)

TOKENS = "tokens"  # MMDiT: per-channel statistics over the token axis


@dataclass(frozen=True)
class Variant:
    name: str
    title: str
    family: str  # what detect_variant() can tell from the file
    # Architecture
    embedding_paddings: tuple  # paddings of the three `embedding` convs; () = no embedding
    embedding_maxpool: bool
    stages: tuple  # (in, out, groups) per [res block, downsample] stage
    mid_residual: bool  # mid_convs.0 = x + [conv, ReLU, GN, conv, GN](x), else [conv, ReLU, conv]
    out_channels: int
    has_learned_scale: bool
    # Numerics of the injection (where it happens is the glue's: runtime/controlnext.py)
    eps: float
    order: str  # cross-normalization order
    scale_mode: str
    timestep: str  # MODEL_TIMESTEP or QUARTER_LN_SIGMA


_SDXL_STAGES = ((128, 128, 4), (128, 256, 8))
# The module of the SDXL release, shared (keys and shapes) by SVD v2, SD1.5-Training and XCtrl's SD3 format.
_SDXL_MODULE = dict(family=SDXL_FAMILY, embedding_paddings=(1, 1, 1), embedding_maxpool=False, stages=_SDXL_STAGES,
                    mid_residual=True, out_channels=320, has_learned_scale=False)

VARIANTS = {
    v.name: v
    for v in (
        Variant(name="sd15", title="SD1.5 (released)", family="sd15", embedding_paddings=(), embedding_maxpool=False,
                stages=((3, 128, 1), (128, 256, 8), (256, 256, 8)), mid_residual=False, out_channels=1280,
                has_learned_scale=True, eps=1e-12, order=POOL_THEN_NORM, scale_mode=LEARNED_X_STRENGTH,
                timestep=MODEL_TIMESTEP),
        Variant(name="sd15_training", title="SD1.5-Training", **_SDXL_MODULE,
                eps=1e-12, order=POOL_THEN_NORM, scale_mode=STRENGTH, timestep=MODEL_TIMESTEP),
        Variant(name="sdxl", title="SDXL", **_SDXL_MODULE,
                eps=1e-12, order=NORM_THEN_POOL, scale_mode=STRENGTH, timestep=MODEL_TIMESTEP),
        Variant(name="svd_v1", title="SVD v1", family="svd_v1", embedding_paddings=(1, 0, 0), embedding_maxpool=True,
                stages=((128, 128, 4), (128, 256, 8), (256, 256, 8)), mid_residual=True, out_channels=1280,
                has_learned_scale=True, eps=1e-5, order=NORM_THEN_POOL, scale_mode=SIGMOID_LEARNED_X13,
                timestep=QUARTER_LN_SIGMA),
        Variant(name="svd_v2", title="SVD v2", **dict(_SDXL_MODULE, embedding_paddings=(1, 0, 0)),
                eps=1e-5, order=NORM_THEN_POOL, scale_mode=STRENGTH_X02, timestep=QUARTER_LN_SIGMA),
        # UNOFFICIAL: the authors released no SD3 code or weights. XCtrl's format: the SDXL module's
        # keys, `mid_convs.1` producing the MMDiT hidden width (e.g. 1536 for SD3 Medium, 2432 for
        # SD3.5 Large); cross-normalized per channel over the image tokens (docs/controlnext.md).
        Variant(name="sd3", title="SD3 / SD3.5 MMDiT (unofficial)", **dict(_SDXL_MODULE, out_channels=1536),
                eps=1e-12, order=TOKENS, scale_mode=STRENGTH, timestep=MODEL_TIMESTEP),
    )
}

# Which member of a family a base model selects (resolve_variant).
BASE_MODELS = ("sd15", "sdxl", "svd", "sd3")
_BY_BASE = {
    ("sd15", "sd15"): "sd15",
    ("svd_v1", "svd"): "svd_v1",
    (SDXL_FAMILY, "sdxl"): "sdxl",
    (SDXL_FAMILY, "svd"): "svd_v2",
    (SDXL_FAMILY, "sd15"): "sd15_training",
    (SDXL_FAMILY, "sd3"): "sd3",
}


def get_variant(variant):
    """A variant name or a :class:`Variant` -> :class:`Variant`."""
    if isinstance(variant, Variant):
        return variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown ControlNeXt variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


# ---------------------------------------------------------------------------- detection

_ANCHOR = "time_embedding.linear_1.weight"


def strip_common_prefix(state_dict):
    """Removes a prefix such as "controlnet." or "module." that every key carries.

    The prefix is read off the time-embedding key, so any nesting depth works.
    """
    for key in state_dict:
        if key.endswith(_ANCHOR):
            prefix = key[: -len(_ANCHOR)]
            if prefix and all(k.startswith(prefix) for k in state_dict):
                return {k[len(prefix):]: v for k, v in state_dict.items()}
            break
    return dict(state_dict)


def detect_variant(state_dict):
    """Returns "sd15", "svd_v1" or "sdxl_family" from the keys and shapes.

    "sdxl_family" covers "sdxl", "svd_v2" and "sd15_training": their files are identical
    in keys and shapes, so only the base model can decide (see :func:`resolve_variant`).
    Raises :class:`WeightFileError` when the dict is not a ControlNeXt control module.
    """
    sd = strip_common_prefix(state_dict)
    if _ANCHOR not in sd or "mid_convs.1.weight" not in sd or "down_res.0.conv1.weight" not in sd:
        raise WeightFileError(
            "not a ControlNeXt control module (it has no time_embedding.linear_1, mid_convs.1 and down_res.0 weights)"
        )
    out_channels = sd["mid_convs.1.weight"].shape[0]
    has_embedding = "embedding.0.weight" in sd
    has_scale = "scale" in sd
    # The structure decides; the output width is read from the file (see build_controlnext)
    # and checked against the model by the caller.
    three_stages = "down_res.2.conv1.weight" in sd
    if not has_embedding and has_scale and three_stages:
        return "sd15"
    if has_embedding and has_scale and three_stages:
        return "svd_v1"
    if has_embedding and not has_scale and not three_stages:
        return SDXL_FAMILY
    raise WeightFileError(
        "ControlNeXt-like keys in an unknown layout "
        f"(embedding: {has_embedding}, learned scale: {has_scale}, output channels: {out_channels}); "
        "supported are the released SD1.5, SDXL, SVD v1 and SVD v2 control modules"
    )


def resolve_variant(detected, base_model):
    """Picks the variant for a detected family (detect_variant) and a base model.

    ``base_model``: "sd15", "sdxl" or "svd". An SDXL-family file on an SD1.5 model becomes
    "sd15_training" (no such weights were released, so such a pairing usually means the
    wrong file); the glue may want to warn about it.
    """
    if base_model not in BASE_MODELS:
        raise ValueError(f"base_model must be one of {BASE_MODELS}, got {base_model!r}")
    name = _BY_BASE.get((detected, base_model))
    if name is None:
        raise WeightFileError(
            f"This ControlNeXt module is made for {module_family_title(detected)} and cannot control a {base_model} model: "
            "load the ControlNeXt file that matches your base model"
        )
    return name


# ---------------------------------------------------------------------------- network


def timestep_embedding(timesteps, dim=TIME_PROJ_DIM, max_period=10000.0):
    """Sinusoidal embedding, cos first, frequency shift 0; float32 (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _TimeEmbedding(nn.Module):
    def __init__(self, ops, **kw):
        super().__init__()
        self.linear_1 = ops.Linear(TIME_PROJ_DIM, TIME_EMBED_DIM, **kw)
        self.linear_2 = ops.Linear(TIME_EMBED_DIM, TIME_EMBED_DIM, **kw)

    def forward(self, t_emb):
        return self.linear_2(F.silu(self.linear_1(t_emb)))


class _ResBlock(nn.Module):
    """Diffusers-style res block, split at the time-embedding addition."""

    def __init__(self, cin, cout, groups, ops, **kw):
        super().__init__()
        self.norm1 = ops.GroupNorm(groups, cin, eps=1e-6, **kw)
        self.conv1 = ops.Conv2d(cin, cout, 3, padding=1, **kw)
        self.time_emb_proj = ops.Linear(TIME_EMBED_DIM, cout, **kw)
        self.norm2 = ops.GroupNorm(groups, cout, eps=1e-6, **kw)
        self.conv2 = ops.Conv2d(cout, cout, 3, padding=1, **kw)
        self.conv_shortcut = ops.Conv2d(cin, cout, 1, **kw) if cin != cout else None

    def before_temb(self, x):
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip, self.conv1(F.silu(self.norm1(x)))

    def after_temb(self, skip, h, temb_act):
        h = h + self.time_emb_proj(temb_act)[:, :, None, None]
        return skip + self.conv2(F.silu(self.norm2(h)))

    def forward(self, x, temb_act):
        return self.after_temb(*self.before_temb(x), temb_act)


class _Downsample(nn.Module):
    def __init__(self, channels, ops, **kw):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, stride=2, padding=1, **kw)

    def forward(self, x):
        return self.conv(x)


class _ResidualMid(nn.Sequential):
    """mid_convs.0 of the embedding variants: x + [conv, ReLU, GN, conv, GN](x)."""

    def forward(self, x):
        return x + super().forward(x)


def _embedding(v, ops, **kw):
    p = v.embedding_paddings
    layers = [
        ops.Conv2d(3, 64, 3, stride=2, padding=p[0], **kw), ops.GroupNorm(2, 64, eps=1e-5, **kw), nn.ReLU(),
        ops.Conv2d(64, 64, 3, padding=p[1], **kw), ops.GroupNorm(2, 64, eps=1e-5, **kw), nn.ReLU(),
        ops.Conv2d(64, 128, 3, padding=p[2], **kw), ops.GroupNorm(2, 128, eps=1e-5, **kw), nn.ReLU(),
    ]
    if v.embedding_maxpool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _mid_convs(v, out_channels, ops, **kw):
    c = v.stages[-1][1]
    if v.mid_residual:
        first = _ResidualMid(
            ops.Conv2d(c, c, 3, padding=1, **kw), nn.ReLU(), ops.GroupNorm(8, c, eps=1e-5, **kw),
            ops.Conv2d(c, c, 3, padding=1, **kw), ops.GroupNorm(8, c, eps=1e-5, **kw),
        )
    else:
        first = nn.Sequential(ops.Conv2d(c, c, 3, padding=1, **kw), nn.ReLU(), ops.Conv2d(c, c, 3, padding=1, **kw))
    return nn.ModuleList([first, ops.Conv2d(c, out_channels, 1, **kw)])


class ControlNeXt(nn.Module):
    """The control module of one variant. ``hint``: (N, 3, H, W), RGB in [0, 1].

    SVD v1 video input (B, F, 3, H, W) must be flattened to (B*F, 3, H, W) by the caller,
    with the timesteps repeated per frame (``t.repeat_interleave(F)``): the module sees
    frames as independent samples.
    """

    def __init__(self, variant, ops=nn, dtype=None, device=None, out_channels=None):
        super().__init__()
        v = get_variant(variant)
        self.variant = v
        # The released files have v.out_channels; the width is read from the file so the
        # module also fits other UNet widths (tiny test models).
        self.out_channels = out_channels or v.out_channels
        kw = {"dtype": dtype, "device": device}
        self.time_embedding = _TimeEmbedding(ops, **kw)
        self.embedding = _embedding(v, ops, **kw) if v.embedding_paddings else None
        self.down_res = nn.ModuleList([_ResBlock(cin, cout, g, ops, **kw) for cin, cout, g in v.stages])
        self.down_sample = nn.ModuleList([_Downsample(cout, ops, **kw) for _, cout, _ in v.stages])
        self.mid_convs = _mid_convs(v, self.out_channels, ops, **kw)
        if v.has_learned_scale:
            self.scale = nn.Parameter(torch.ones((), dtype=dtype, device=device))

    def learned_scale(self):
        """The raw learned ``scale`` stored in the file (a float), or None."""
        return float(self.scale.detach().float()) if self.variant.has_learned_scale else None

    def stem(self, hint):
        """The timestep-independent start, up to the first time-embedding addition.

        Returns the state ``(shortcut, h)`` of the first res block; cache it per hint.
        """
        x = hint if self.embedding is None else self.embedding(hint)
        return self.down_res[0].before_temb(x)

    def forward_from_stem(self, stem_state, timesteps):
        """``timesteps``: a number or a tensor of length 1 or N (the stem's batch size)."""
        skip, h = stem_state
        t = _batch_timesteps(timesteps, h.shape[0], h.device)
        temb_act = F.silu(self.time_embedding(timestep_embedding(t).to(h.dtype)))
        x = self.down_res[0].after_temb(skip, h, temb_act)
        x = self.down_sample[0](x)
        for res, down in zip(self.down_res[1:], self.down_sample[1:]):
            x = down(res(x, temb_act))
        return self.mid_convs[1](self.mid_convs[0](x))

    def forward(self, hint, timesteps):
        return self.forward_from_stem(self.stem(hint), timesteps)


def _batch_timesteps(timesteps, n, device):
    t = torch.as_tensor(timesteps, device=device).reshape(-1)
    if t.numel() == 1:
        return t.expand(n)
    if t.numel() != n:
        raise ValueError(f"got {t.numel()} timesteps for a batch of {n} hints: give one timestep or one per hint")
    return t


# ---------------------------------------------------------------------------- loading


def build_controlnext(state_dict, variant=None, ops=nn, dtype=None, device=None):
    """Builds the control module for ``state_dict`` and loads it strictly.

    ``variant``: a name from :data:`VARIANTS`; None detects it, which works for "sd15" and
    "svd_v1" files only (SDXL-family files need the caller's choice, see resolve_variant).
    fp16 and fp32 files are accepted (values are cast to ``dtype``; None = torch's default
    float). Keys may carry a common prefix such as "controlnet." or "module.".
    """
    sd = strip_common_prefix(state_dict)
    detected = detect_variant(sd)
    if variant is None:
        if detected == SDXL_FAMILY:
            raise WeightFileError(
                "This ControlNeXt file has the SDXL layout, shared by the SDXL, SVD v2 and SD1.5-Training modules, "
                "which the file alone cannot tell apart: pass variant='sdxl', 'svd_v2' or 'sd15_training' "
                "according to the base model"
            )
        variant = detected
    v = get_variant(variant)
    if v.family != detected:
        raise WeightFileError(
            f"This file is a ControlNeXt {module_family_title(detected)} module, not the {v.title} one that was asked for: "
            "pick the variant that matches the file (and the file that matches your base model)"
        )
    out_channels = int(sd["mid_convs.1.weight"].shape[0])
    # The layout is checked against plain layers on the meta device: ops may create layers whose
    # weights only exist once loaded (ComfyUI's lazily initialised layers).
    _check_layout(ControlNeXt(v, device="meta", out_channels=out_channels), sd)
    model = ControlNeXt(v, ops=ops, dtype=dtype, device=device, out_channels=out_channels)
    model.load_state_dict(sd, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


def check_file_layout(state_dict, family):
    """Raises WeightFileError unless the file has exactly its family's keys and shapes (any output width)."""
    sd = strip_common_prefix(state_dict)
    representative = {"sd15": "sd15", "svd_v1": "svd_v1", SDXL_FAMILY: "sdxl"}[family]
    out_channels = int(sd["mid_convs.1.weight"].shape[0])
    _check_layout(ControlNeXt(representative, device="meta", out_channels=out_channels), sd)


def named_as_svd_module(file_name):
    """Whether a file's name (with its folders) says it is an SVD module ("controlnext-svd_v2-...",
    "ControlNeXt-SVD/v2/..."): the SVD v2 module has exactly the SDXL module's keys and shapes."""
    return re.search(r"(^|[^a-z0-9])svd([^a-z0-9]|$)", str(file_name).lower().replace("\\", "/")) is not None


def module_family_title(family):
    """What a file family (detect_variant) is made for, in words."""
    return {"sd15": "SD1.5", "svd_v1": "SVD v1", SDXL_FAMILY: "SDXL-layout (SDXL / SVD v2 / SD1.5-Training)"}[family]


def _check_layout(model, sd):
    """Raises a readable error on any key or shape difference (before load_state_dict)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(expected)
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > 4 else ""
            problems.append(f"{label}: {', '.join(items[:4])}{more}")
    if problems:
        raise WeightFileError(
            f"The weights do not match the ControlNeXt {model.variant.title} control module: {'; '.join(problems)}. "
            "Use the control module file (controlnet.safetensors / .bin, not the UNet file), unmodified, with the "
            "variant that matches it."
        )


# ---------------------------------------------------------------------------- sampling helpers


def control_timesteps(variant, sigma, model_timestep=None):
    """The timestep the control module expects, per the variant's ``timestep`` rule.

    MODEL_TIMESTEP: the denoiser's own timestep for this sigma (e.g. ComfyUI's
    ``model_sampling.timestep(sigma)``), passed as ``model_timestep``; QUARTER_LN_SIGMA:
    ``0.25 * ln(sigma)`` (SVD).
    """
    v = get_variant(variant)
    if v.timestep == MODEL_TIMESTEP:
        if model_timestep is None:
            raise ValueError(f"ControlNeXt {v.title} needs the model's timestep index (model_sampling.timestep(sigma))")
        return model_timestep
    return 0.25 * torch.log(torch.as_tensor(sigma, dtype=torch.float32))


def injection_scales(variant, strength, is_uncond, learned_scale=None):
    """Per-sample scale ``s`` (float32 tensor (B,)) for cross_normalize.

    ``is_uncond``: one bool per sample (True for the negative/uncond rows).
    - sd15: learned ``scale`` * strength on every row;
    - sdxl, sd15_training: strength on every row;
    - svd_v1: sigmoid(learned) * 1.3 * strength on cond rows; the reference feeds the uncond
      rows a raw scale of 0, i.e. sigmoid(0) * 1.3 * strength = 0.65 * strength;
    - svd_v2: 0.2 * strength on cond rows, 0 on uncond rows.
    ``strength`` multiplies every variant (1.0 reproduces the reference).
    """
    v = get_variant(variant)
    uncond = torch.as_tensor([bool(u) for u in is_uncond], dtype=torch.bool)
    if v.has_learned_scale and learned_scale is None:
        raise ValueError(f"ControlNeXt {v.title} needs the learned scale stored in its file (model.learned_scale())")
    if v.scale_mode == LEARNED_X_STRENGTH:
        cond_s, uncond_s = learned_scale * strength, learned_scale * strength
    elif v.scale_mode == STRENGTH:
        cond_s, uncond_s = strength, strength
    elif v.scale_mode == SIGMOID_LEARNED_X13:
        cond_s = 1.3 * strength / (1.0 + math.exp(-learned_scale))
        uncond_s = 1.3 * strength * 0.5
    elif v.scale_mode == STRENGTH_X02:
        cond_s, uncond_s = 0.2 * strength, 0.0
    else:  # pragma: no cover - VARIANTS is closed
        raise AssertionError(v.scale_mode)
    return torch.where(uncond, torch.tensor(float(uncond_s)), torch.tensor(float(cond_s)))

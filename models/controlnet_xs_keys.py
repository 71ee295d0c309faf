"""ControlNet-XS weight files: which format, diffusers -> vislearn names, architecture.

Two released formats hold the same weights (docs/controlnet_xs.md, "Released files" and "Two formats"):

- ``vislearn``: the authors' ``TwoStreamControlNet`` state dict (``.ckpt`` / ``.safetensors``),
  names like ``control_model.input_blocks.1.0.in_layers.0.weight``, ``enc_zero_convs_in.0.0.weight``.
- ``diffusers``: ``ControlNetXSAdapter`` (diffusers >= 0.28), names like
  ``down_blocks.0.resnets.0.norm1.weight``, ``control_to_base_for_conv_in.weight``.

Everything downstream works on vislearn names: :func:`to_vislearn` converts, :func:`read_config`
reads the architecture from the shapes. Pure python + torch tensors (shapes only).
"""
import re
from dataclasses import dataclass, field
from typing import Tuple

from .families import family_of_context_width, family_title
from .checkpoint_io import WeightFileError

VISLEARN = "vislearn"
DIFFUSERS = "diffusers"
DIFFUSERS_LEGACY = "diffusers_legacy"

NUM_RES_BLOCKS = 2  # per level, in every released model (and in SD1.x/2.x/XL)

# Keys of the vislearn format the control network does not use.
_DROPPED_PREFIXES = ("control_model.label_emb.",)  # SDXL 48M: the base's label_emb is used instead
_DROPPED_KEYS = ("scale_list",)  # all ones in every released file


class ControlNetXSFormatError(WeightFileError):
    """A state dict that is not a (supported) ControlNet-XS checkpoint (a ValueError, like
    checkpoint_io.WeightFileError)."""


def largest_divisor_at_most(n, cap):
    """The largest divisor of ``n`` that is <= ``cap`` (``n`` itself when ``n <= cap``).

    The reference's ``find_denominator``: group counts (cap 32) and head sizes (cap 8 or 64).
    """
    if n <= 0 or cap <= 0:
        raise ValueError(f"largest_divisor_at_most needs positive numbers, got n={n}, cap={cap}")
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1  # unreachable: 1 divides everything


def group_count(channels):
    """GroupNorm groups of every ControlNet-XS norm: largest divisor of C that is <= 32."""
    return largest_divisor_at_most(channels, 32)


# ---------------------------------------------------------------------------------------
# Format detection
# ---------------------------------------------------------------------------------------

_LEGACY_PREFIXES = ("down_zero_convs_in.", "down_zero_convs_out.", "up_zero_convs_out.")


def detect_format(sd):
    """Returns ``"vislearn"``, ``"diffusers"`` or ``"diffusers_legacy"``; raises if none fits."""
    if "enc_zero_convs_in.0.0.weight" in sd:
        return VISLEARN
    if "control_to_base_for_conv_in.weight" in sd or "down_blocks.0.base_to_ctrl.0.weight" in sd:
        return DIFFUSERS
    if any(k.startswith(_LEGACY_PREFIXES) for k in sd):
        return DIFFUSERS_LEGACY
    raise ControlNetXSFormatError(_not_xs_message(sd))


def _not_xs_message(sd):
    keys = sorted(sd)
    hint = ""
    if any(k.startswith("zero_convs.") for k in keys) or any(k.startswith("controlnet_down_blocks.") for k in keys):
        hint = " It looks like a regular ControlNet: load it with ComfyUI's ControlNet loader instead."
    elif any(k.startswith(("down_res.", "mid_convs.")) for k in keys):
        hint = " It looks like a ControlNeXt model: use the ControlNeXt loader instead."
    sample = ", ".join(keys[:5])
    return (
        "Not a ControlNet-XS state dict: it has neither the vislearn key 'enc_zero_convs_in.0.0.weight' "
        "nor the diffusers keys 'control_to_base_for_conv_in.weight' / 'down_blocks.0.base_to_ctrl.0.weight'."
        f"{hint} First keys: {sample}"
    )


# ---------------------------------------------------------------------------------------
# diffusers -> vislearn names (docs/controlnet_xs.md, "Two formats")
# ---------------------------------------------------------------------------------------

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _resnet(rest):
    part, _, param = rest.partition(".")
    if part not in _RESNET_PARTS:
        return None
    return f"{_RESNET_PARTS[part]}.{param}"


def _hint_index(name):
    if name == "conv_in":
        return 0
    if name == "conv_out":
        return 14
    return 2 * (int(name.split(".")[1]) + 1)  # blocks.k


def _middle(m):
    kind, index, rest = m[1], m[2], m[3]
    if kind == "attentions":
        return f"control_model.middle_block.1.{rest}" if index == "0" else None
    if index not in ("0", "1"):
        return None
    rest = _resnet(rest)
    return None if rest is None else f"control_model.middle_block.{0 if index == '0' else 2}.{rest}"


def _block(m, offset=1):
    """Input block index of diffusers down block m[1], entry m[2]: 3 b + j + offset."""
    return 3 * int(m[1]) + int(m[2]) + offset


# (diffusers key pattern, vislearn name from the match and N_in); the first match decides.
_RENAMES = (
    (r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.\d+)\.(weight|bias)",
     lambda m, n: f"input_hint_block.{_hint_index(m[1])}.{m[2]}"),
    (r"time_embedding\.linear_([12])\.(weight|bias)", lambda m, n: f"control_model.time_embed.{0 if m[1] == '1' else 2}.{m[2]}"),
    (r"conv_in\.(weight|bias)", lambda m, n: f"control_model.input_blocks.0.0.{m[1]}"),
    (r"control_to_base_for_conv_in\.(weight|bias)", lambda m, n: f"enc_zero_convs_out.0.0.{m[1]}"),
    (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
     lambda m, n: None if _resnet(m[3]) is None else f"control_model.input_blocks.{_block(m)}.0.{_resnet(m[3])}"),
    (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda m, n: f"control_model.input_blocks.{_block(m)}.1.{m[3]}"),
    (r"down_blocks\.(\d+)\.downsamplers\.conv\.(weight|bias)",
     lambda m, n: f"control_model.input_blocks.{3 * int(m[1]) + 3}.0.op.{m[2]}"),
    (r"down_blocks\.(\d+)\.ctrl_to_base\.(\d+)\.(weight|bias)", lambda m, n: f"enc_zero_convs_out.{_block(m)}.0.{m[3]}"),
    (r"down_blocks\.(\d+)\.base_to_ctrl\.(\d+)\.(weight|bias)", lambda m, n: f"enc_zero_convs_in.{_block(m, 0)}.0.{m[3]}"),
    (r"mid_block\.midblock\.(resnets|attentions)\.(\d+)\.(.+)", lambda m, n: _middle(m)),
    (r"mid_block\.base_to_ctrl\.(weight|bias)", lambda m, n: f"enc_zero_convs_in.{n - 1}.0.{m[1]}"),
    (r"mid_block\.ctrl_to_base\.(weight|bias)", lambda m, n: f"middle_block_out.0.{m[1]}"),
    (r"up_connections\.(\d+)\.ctrl_to_base\.(\d+)\.(weight|bias)", lambda m, n: f"dec_zero_convs_out.{_block(m, 0)}.0.{m[3]}"),
)


def _diffusers_key_to_vislearn(key, n_in):
    """Vislearn name of one diffusers adapter key, or None if the key is not known."""
    for pattern, name in _RENAMES:
        m = re.fullmatch(pattern, key)
        if m:
            return name(m, n_in)
    return None


def _diffusers_input_block_count(sd):
    """N_in: conv_in plus one entry per ``down_blocks.b.ctrl_to_base.j``."""
    pattern = re.compile(r"down_blocks\.\d+\.ctrl_to_base\.\d+\.weight")
    return 1 + sum(1 for k in sd if pattern.fullmatch(k))


def to_vislearn(sd):
    """Returns the state dict with vislearn names, minus the unused keys.

    Vislearn input: only ``scale_list`` and ``control_model.label_emb.*`` are dropped.
    Diffusers input: every key is renamed per docs/controlnet_xs.md ("Two formats"); an unknown key raises.
    Legacy diffusers input (before diffusers 0.28): raises, not supported.
    Tensors are not copied.
    """
    fmt = detect_format(sd)
    if fmt == VISLEARN:
        return {k: v for k, v in sd.items() if k not in _DROPPED_KEYS and not k.startswith(_DROPPED_PREFIXES)}
    if fmt == DIFFUSERS_LEGACY:
        raise ControlNetXSFormatError(
            "This ControlNet-XS file uses the old diffusers layout (diffusers before 0.28: keys like "
            "'down_zero_convs_in.0.weight', 'up_zero_convs_out.0.weight'), which is not supported yet. "
            "Use the authors' checkpoint (CVL-Heidelberg/ControlNet-XS) or a diffusers >= 0.28 "
            "ControlNetXSAdapter file (keys 'down_blocks.0.base_to_ctrl.0.weight', ...)."
        )
    n_in = _diffusers_input_block_count(sd)
    out, unknown = {}, []
    for key, value in sd.items():
        new = _diffusers_key_to_vislearn(key, n_in)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ControlNetXSFormatError(
            f"Diffusers ControlNet-XS adapter with {len(unknown)} key(s) this loader does not know: "
            f"{', '.join(sorted(unknown)[:8])}{' ...' if len(unknown) > 8 else ''}"
        )
    return out


# ---------------------------------------------------------------------------------------
# Architecture read from a state dict (docs/controlnet_xs.md, "Reading the architecture")
# ---------------------------------------------------------------------------------------

SD = "sd"
SDXL = "sdxl"


@dataclass(frozen=True)
class XSConfig:
    """Architecture of one ControlNet-XS control network (encoder + middle block).

    Levels are the UNet resolutions (4 for SD1.x/2.x, 3 for SDXL); each level has
    ``NUM_RES_BLOCKS`` res blocks (each followed by a transformer when the level's depth is > 0)
    and, except the last, a downsampler. Input block i: 0 = conv_in, 3l+1 and 3l+2 = res blocks
    of level l, 3l+3 = downsampler after level l.
    """

    family: str  # "sd" (SD1.x/2.x base, 12 input blocks) or "sdxl" (9 input blocks)
    ctrl_channels: Tuple[int, ...]  # control width per level
    base_channels: Tuple[int, ...]  # base UNet width per level
    transformer_depth: Tuple[int, ...]  # transformer blocks per level, 0 = no attention
    transformer_depth_middle: int
    num_heads: Tuple[int, ...]  # attention heads per level (unused where depth is 0)
    num_heads_middle: int
    context_dim: int  # text context width (768 SD1.5, 1024 SD2.1, 2048 SDXL)
    use_linear_projection: bool  # proj_in/proj_out Linear (SD2.1, SDXL) or 1x1 conv (SD1.5)
    learned_time_embedding: bool  # control_model.time_embed present
    in_channels: int = 4  # latent channels
    hint_channels: int = 3  # RGB hint
    model_channels: int = 320  # width of the sinusoidal timestep embedding (time_embed input)
    time_embed_dim: int = 1280  # width of emb (time_embed output, res-block emb input)
    num_params: int = field(default=0, compare=False)  # tensors' elements in the file (informative)
    # Attention width (to_q outputs) per level and in the middle; () / 0 = the level's control width.
    # The authors' SD1.x code gives 8 heads of max(8, C // 8) channels, so a layer narrower than 64
    # attends wider than it is (16 channels: 64); read from the weights.
    attn_inner: Tuple[int, ...] = ()
    attn_inner_middle: int = 0

    def attention_width(self, level=None):
        """The attention width of a level's transformers (``level`` None: the middle block's)."""
        if level is None:
            return self.attn_inner_middle or self.ctrl_channels[-1]
        return (self.attn_inner[level] if self.attn_inner else 0) or self.ctrl_channels[level]

    @property
    def num_levels(self):
        return len(self.ctrl_channels)

    @property
    def num_input_blocks(self):
        """N_in: 12 for SD, 9 for SDXL (conv_in + 2 res blocks per level + downsamplers)."""
        return 1 + (NUM_RES_BLOCKS + 1) * self.num_levels - 1

    @property
    def transformer_norm_eps(self):
        """eps of the transformers' GroupNorm: 1e-6 in the ldm (SD) code, 1e-5 in sgm (SDXL)."""
        return 1e-6 if self.family == SD else 1e-5

    def block_kind(self, i):
        """("conv_in", 0), ("res", level) or ("down", level) for input block i."""
        if not 0 <= i < self.num_input_blocks:
            raise IndexError(f"input block {i} out of range 0..{self.num_input_blocks - 1}")
        if i == 0:
            return "conv_in", 0
        level, j = divmod(i - 1, NUM_RES_BLOCKS + 1)
        return ("down" if j == NUM_RES_BLOCKS else "res"), level

    def ctrl_out(self, i):
        """Control channels after input block i."""
        return self.ctrl_channels[self.block_kind(i)[1]]

    def base_out(self, i):
        """Base UNet channels after input block i."""
        return self.base_channels[self.block_kind(i)[1]]

    def ctrl_in(self, i):
        """Control channels entering input block i >= 1: previous control output + base (concat)."""
        return self.ctrl_out(i - 1) + self.base_out(i - 1)

    def base_dec(self, m):
        """Base channels of h at the start of output block m (before the skip concat)."""
        if m == 0:
            return self.base_channels[-1]  # middle block output
        level = self.num_levels - 1 - (m - 1) // (NUM_RES_BLOCKS + 1)
        return self.base_channels[level]

    @property
    def base_name(self):
        if self.family == SDXL:
            return family_title("sdxl")
        family = family_of_context_width(self.context_dim)
        return family_title(family) if family in ("sd15", "sd21") else "SD"


def heads_for(family, context_dim, channels):
    """Attention heads of a control transformer of width C (docs/controlnet_xs.md; not in the weights).

    SD1.5 (context 768): 8 heads; SD2.1 (context 1024): head size largest divisor of C <= 8;
    SDXL: head size largest divisor of C <= 64 (``C // min(C, 8)`` and ``C // min(C, 64)``
    for the released power-of-two widths).
    """
    if family == SDXL:
        return channels // largest_divisor_at_most(channels, 64)
    if context_dim == 768:
        return 8
    if context_dim == 1024:
        return channels // largest_divisor_at_most(channels, 8)
    raise ControlNetXSFormatError(
        f"ControlNet-XS for an SD base with text context width {context_dim}: unknown attention head "
        "layout (released models use 768 = SD1.5 or 1024 = SD2.1)."
    )


def _shape(sd, key):
    if key not in sd:
        raise ControlNetXSFormatError(f"ControlNet-XS state dict lacks '{key}': the file is incomplete or not ControlNet-XS.")
    return tuple(sd[key].shape)


def _depth(sd, prefix):
    depth = 0
    while f"{prefix}.transformer_blocks.{depth}.norm1.weight" in sd:
        depth += 1
    return depth


def _attention(vis, family, context_dim, ctrl, depth, depth_mid):
    """(heads per level, middle heads, attention width per level, middle attention width)."""
    cm = "control_model."
    levels = range(len(ctrl))
    heads = [heads_for(family, context_dim, ctrl[lv]) if depth[lv] else 0 for lv in levels]
    mid_heads = heads_for(family, context_dim, ctrl[-1]) if depth_mid else 0
    inner = [_shape(vis, f"{cm}input_blocks.{1 + 3 * lv}.1.transformer_blocks.0.attn1.to_q.weight")[0] if depth[lv] else 0
             for lv in levels]
    inner_mid = _shape(vis, f"{cm}middle_block.1.transformer_blocks.0.attn1.to_q.weight")[0] if depth_mid else 0
    for c, h in list(zip(inner, heads)) + [(inner_mid, mid_heads)]:
        if h and c % h:
            raise ControlNetXSFormatError(f"ControlNet-XS attention width {c} is not divisible into {h} attention heads.")
    return heads, mid_heads, inner, inner_mid


def read_config(sd):
    """Reads the architecture from a ControlNet-XS state dict (any supported format)."""
    vis = to_vislearn(sd)
    cm = "control_model."
    n_in = sum(1 for k in vis if re.fullmatch(r"enc_zero_convs_out\.\d+\.0\.weight", k))
    if n_in not in (9, 12):
        raise ControlNetXSFormatError(
            f"ControlNet-XS with {n_in} encoder connections: only SD1.x/2.x (12) and SDXL (9) bases are supported."
        )
    family = SD if n_in == 12 else SDXL
    num_levels = (n_in + 1) // (NUM_RES_BLOCKS + 1)

    conv_in = _shape(vis, f"{cm}input_blocks.0.0.weight")
    ctrl, base, depth = [], [], []
    context_dim, use_linear = None, None
    for level in range(num_levels):
        first = 1 + (NUM_RES_BLOCKS + 1) * level
        ctrl.append(_shape(vis, f"{cm}input_blocks.{first}.0.out_layers.3.weight")[0])
        base.append(_shape(vis, f"enc_zero_convs_in.{first}.0.weight")[0])
        depth.append(_depth(vis, f"{cm}input_blocks.{first}.1"))
    depth_mid = _depth(vis, f"{cm}middle_block.1")

    attn_prefixes = [f"{cm}input_blocks.{1 + 3 * lv}.1" for lv in range(num_levels) if depth[lv]]
    if depth_mid:
        attn_prefixes.append(f"{cm}middle_block.1")
    if attn_prefixes:
        p = attn_prefixes[0]
        context_dim = _shape(vis, f"{p}.transformer_blocks.0.attn2.to_k.weight")[1]
        use_linear = len(_shape(vis, f"{p}.proj_in.weight")) == 2
    else:
        raise ControlNetXSFormatError("ControlNet-XS state dict without any transformer block: not a released layout.")

    heads, mid_heads, inner, inner_mid = _attention(vis, family, context_dim, ctrl, depth, depth_mid)

    learned = f"{cm}time_embed.0.weight" in vis
    emb_shape = _shape(vis, f"{cm}input_blocks.1.0.emb_layers.1.weight")
    model_channels = _shape(vis, f"{cm}time_embed.0.weight")[1] if learned else emb_shape[1] // 4
    hint_channels = _shape(vis, "input_hint_block.0.weight")[1]
    num_params = sum(int(v.numel()) for v in vis.values())
    return XSConfig(
        family=family,
        ctrl_channels=tuple(ctrl),
        base_channels=tuple(base),
        transformer_depth=tuple(depth),
        transformer_depth_middle=depth_mid,
        num_heads=tuple(heads),
        num_heads_middle=mid_heads,
        context_dim=context_dim,
        use_linear_projection=use_linear,
        learned_time_embedding=learned,
        in_channels=conv_in[1],
        hint_channels=hint_channels,
        model_channels=model_channels,
        time_embed_dim=emb_shape[1],
        num_params=num_params,
        attn_inner=tuple(i if i != c else 0 for i, c in zip(inner, ctrl)) if any(i and i != c for i, c in zip(inner, ctrl)) else (),
        attn_inner_middle=inner_mid if inner_mid != ctrl[-1] else 0,
    )


def describe(config):
    """One line for the UI, e.g. ``ControlNet-XS SDXL 20M (control widths 16,32,64)``."""
    size = f" {round(config.num_params / 1e6)}M" if config.num_params else ""
    widths = ",".join(str(c) for c in config.ctrl_channels)
    extra = ", learned time embedding" if config.learned_time_embedding else ""
    return f"ControlNet-XS {config.base_name}{size} (control widths {widths}{extra})"

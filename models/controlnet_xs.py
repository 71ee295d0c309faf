"""ControlNet-XS control network (released "encoder_double" models), pure torch.

The control model is a thin UNet encoder + middle block that runs in lock-step with the base
UNet's encoder (docs/controlnet_xs.md, "The two streams"). This module holds the control side only;
the caller drives the loop with the real base UNet::

    g = net.embed_hint(hint)                              # hint: RGB in [0, 1], 8x the latent
    emb = base_emb, or mix_time_embeddings(net.time_embedding(t_emb), base_emb, mix)
    h_b = h_c = x
    for i in range(net.num_input_blocks):
        h_b = base.input_blocks[i](h_b, emb, context)
        h_c = net.control_block(i, h_c, emb, context)
        if i == 0: h_c = h_c + g
        h_b = h_b + net.to_base_enc(i, h_c) * scale
        hs_b.append(h_b); hs_c.append(h_c)
        h_c = net.concat_base(i, h_c, h_b)
    h_b = base.middle_block(h_b, emb, context); h_c = net.middle(h_c, emb, context)
    h_b = h_b + net.to_base_mid(h_c) * scale
    for j in range(net.num_input_blocks):
        h_b = h_b + net.to_base_dec(j, hs_c.pop()) * scale
        h_b = base.output_blocks[j](cat([h_b, hs_b.pop()], 1), emb, context)

Module and parameter names are the vislearn ones, so a state dict converted by
:func:`controlnet_xs_keys.to_vislearn` loads with ``strict=True``. Every layer is built through
``ops`` (default ``torch.nn``) so ComfyUI can pass ``comfy.ops.manual_cast``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .controlnet_xs_keys import ControlNetXSFormatError, XSConfig, group_count, read_config, to_vislearn

RES_NORM_EPS = 1e-5  # res-block GroupNorms (the reference's GroupNorm_leq32 default)
HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # conv widths of the hint embedding
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)


def group_norm_fp32(norm, x):
    """Applies GroupNorm module ``norm`` in float32 and returns x's dtype (reference GroupNorm32).

    Functional so it works whatever dtype/device the weights are stored in.
    """
    weight = None if norm.weight is None else norm.weight.to(device=x.device, dtype=torch.float32)
    bias = None if norm.bias is None else norm.bias.to(device=x.device, dtype=torch.float32)
    return F.group_norm(x.float(), norm.num_groups, weight, bias, norm.eps).to(x.dtype)


def mix_time_embeddings(ctrl_emb, base_emb, mix=1.0):
    """Timestep embedding of a model with a learned time embedding: ``ctrl*m + base*(1-m)``,
    ``m = mix ** 0.3`` (the reference code; mix = 1 in the released configs, i.e. ctrl only)."""
    m = float(mix) ** 0.3
    return ctrl_emb * m + base_emb * (1.0 - m)


class ResBlock(nn.Module):
    """ldm ResBlock without scale-shift: norm, SiLU, conv3x3, + emb, norm, SiLU, conv3x3, + skip."""

    def __init__(self, in_ch, out_ch, emb_dim, ops=nn, **factory):
        super().__init__()
        self.in_layers = nn.Sequential(
            ops.GroupNorm(group_count(in_ch), in_ch, eps=RES_NORM_EPS, **factory),
            nn.SiLU(),
            ops.Conv2d(in_ch, out_ch, 3, padding=1, **factory),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_dim, out_ch, **factory))
        self.out_layers = nn.Sequential(
            ops.GroupNorm(group_count(out_ch), out_ch, eps=RES_NORM_EPS, **factory),
            nn.SiLU(),
            nn.Identity(),  # dropout slot (inference)
            ops.Conv2d(out_ch, out_ch, 3, padding=1, **factory),
        )
        self.skip_connection = nn.Identity() if in_ch == out_ch else ops.Conv2d(in_ch, out_ch, 1, **factory)

    def forward(self, x, emb):
        h = self.in_layers[2](F.silu(group_norm_fp32(self.in_layers[0], x)))
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.out_layers[3](F.silu(group_norm_fp32(self.out_layers[0], h)))
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """conv3x3 stride 2 (the control downsampler also narrows the concat to the control width)."""

    def __init__(self, in_ch, out_ch, ops=nn, **factory):
        super().__init__()
        self.op = ops.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, **factory)

    def forward(self, x):
        return self.op(x)


def attention(q, k, v, heads):
    """Multi-head softmax attention on (B, N, C) tensors, scale 1/sqrt(C/heads), in float32."""
    b, n, c = q.shape

    def split(t):
        return t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2).float()

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, c).to(q.dtype)


class CrossAttention(nn.Module):
    """to_q/to_k/to_v without bias, to_out.0 with bias; self-attention when context is None.
    ``inner``: the attention width (heads x head size), ``dim`` unless the weights say otherwise."""

    def __init__(self, dim, context_dim, heads, ops=nn, inner=None, **factory):
        super().__init__()
        inner = inner or dim
        self.heads = heads
        self.to_q = ops.Linear(dim, inner, bias=False, **factory)
        self.to_k = ops.Linear(context_dim, inner, bias=False, **factory)
        self.to_v = ops.Linear(context_dim, inner, bias=False, **factory)
        self.to_out = nn.Sequential(ops.Linear(inner, dim, **factory))

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    def __init__(self, dim, inner, ops=nn, **factory):
        super().__init__()
        self.proj = ops.Linear(dim, inner * 2, **factory)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, ops=nn, **factory):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult, ops, **factory), nn.Identity(), ops.Linear(dim * mult, dim, **factory))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """ldm BasicTransformerBlock: self-attn, cross-attn on the text context, GEGLU feed-forward."""

    def __init__(self, dim, heads, context_dim, ops=nn, inner=None, **factory):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, ops, inner, **factory)
        self.ff = FeedForward(dim, ops=ops, **factory)
        self.attn2 = CrossAttention(dim, context_dim, heads, ops, inner, **factory)
        self.norm1 = ops.LayerNorm(dim, **factory)
        self.norm2 = ops.LayerNorm(dim, **factory)
        self.norm3 = ops.LayerNorm(dim, **factory)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in (1x1 conv or Linear), transformer blocks, proj_out, + input."""

    def __init__(self, channels, heads, depth, context_dim, use_linear, norm_eps, ops=nn, inner=None, **factory):
        super().__init__()
        self.use_linear = use_linear
        self.norm = ops.GroupNorm(group_count(channels), channels, eps=norm_eps, **factory)
        if use_linear:
            self.proj_in = ops.Linear(channels, channels, **factory)
            self.proj_out = ops.Linear(channels, channels, **factory)
        else:
            self.proj_in = ops.Conv2d(channels, channels, 1, **factory)
            self.proj_out = ops.Conv2d(channels, channels, 1, **factory)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, context_dim, ops, inner, **factory) for _ in range(depth)
        )

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = group_norm_fp32(self.norm, x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.use_linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, c, h, w)
        if not self.use_linear:
            y = self.proj_out(y)
        return y + x


class ControlBlock(nn.ModuleList):
    """One input/middle block (the reference's TimestepEmbedSequential): layers in order."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ControlUNetEncoder(nn.Module):
    """``control_model``: optional time_embed, input_blocks, middle_block."""

    def __init__(self, config: XSConfig, ops=nn, **factory):
        super().__init__()
        cfg = config
        if cfg.learned_time_embedding:
            self.time_embed = nn.Sequential(
                ops.Linear(cfg.model_channels, cfg.time_embed_dim, **factory),
                nn.SiLU(),
                ops.Linear(cfg.time_embed_dim, cfg.time_embed_dim, **factory),
            )
        else:
            self.time_embed = None

        def transformer(channels, heads, depth, inner):
            return SpatialTransformer(
                channels, heads, depth, cfg.context_dim, cfg.use_linear_projection, cfg.transformer_norm_eps, ops, inner,
                **factory
            )

        blocks = [ControlBlock([ops.Conv2d(cfg.in_channels, cfg.ctrl_channels[0], 3, padding=1, **factory)])]
        for i in range(1, cfg.num_input_blocks):
            kind, level = cfg.block_kind(i)
            if kind == "down":
                blocks.append(ControlBlock([Downsample(cfg.ctrl_in(i), cfg.ctrl_out(i), ops, **factory)]))
                continue
            layers = [ResBlock(cfg.ctrl_in(i), cfg.ctrl_out(i), cfg.time_embed_dim, ops, **factory)]
            if cfg.transformer_depth[level]:
                layers.append(transformer(cfg.ctrl_out(i), cfg.num_heads[level], cfg.transformer_depth[level],
                                          cfg.attention_width(level)))
            blocks.append(ControlBlock(layers))
        self.input_blocks = nn.ModuleList(blocks)

        last = cfg.num_input_blocks - 1
        c_mid = cfg.ctrl_channels[-1]
        middle = [ResBlock(cfg.ctrl_out(last) + cfg.base_out(last), c_mid, cfg.time_embed_dim, ops, **factory)]
        if cfg.transformer_depth_middle:
            middle.append(transformer(c_mid, cfg.num_heads_middle, cfg.transformer_depth_middle, cfg.attention_width()))
        middle.append(ResBlock(c_mid, c_mid, cfg.time_embed_dim, ops, **factory))
        self.middle_block = ControlBlock(middle)


def _zero_conv(in_ch, out_ch, ops, **factory):
    return nn.Sequential(ops.Conv2d(in_ch, out_ch, 1, **factory))


class ControlNetXS(nn.Module):
    """The control network with the connections to and from the base UNet.

    Per-step methods (see the module docstring for the loop): :meth:`embed_hint`,
    :meth:`time_embedding`, :meth:`control_block`, :meth:`middle`, :meth:`to_base_enc`,
    :meth:`to_ctrl` / :meth:`concat_base`, :meth:`to_base_mid`, :meth:`to_base_dec`.
    The ``to_base_*`` outputs are unscaled: the caller multiplies them by the strength.
    """

    def __init__(self, config: XSConfig, ops=nn, device=None, dtype=None):
        super().__init__()
        self.config = cfg = config
        factory = {"device": device, "dtype": dtype}

        hint = []
        in_ch = cfg.hint_channels
        for out_ch, stride in zip(HINT_CHANNELS, HINT_STRIDES):
            hint += [ops.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, **factory), nn.SiLU()]
            in_ch = out_ch
        hint.append(ops.Conv2d(in_ch, cfg.ctrl_channels[0], 3, padding=1, **factory))
        self.input_hint_block = nn.Sequential(*hint)

        self.control_model = ControlUNetEncoder(cfg, ops, **factory)

        n = cfg.num_input_blocks
        self.enc_zero_convs_in = nn.ModuleList(_zero_conv(cfg.base_out(i), cfg.base_out(i), ops, **factory) for i in range(n))
        self.enc_zero_convs_out = nn.ModuleList(_zero_conv(cfg.ctrl_out(i), cfg.base_out(i), ops, **factory) for i in range(n))
        self.middle_block_out = _zero_conv(cfg.ctrl_channels[-1], cfg.base_channels[-1], ops, **factory)
        self.dec_zero_convs_out = nn.ModuleList(
            _zero_conv(cfg.ctrl_out(n - 1 - m), cfg.base_dec(m), ops, **factory) for m in range(n)
        )

    @property
    def num_input_blocks(self):
        return self.config.num_input_blocks

    # -- per-step API ---------------------------------------------------------------------

    def embed_hint(self, hint):
        """Hint image (B, 3, 8H, 8W) in [0, 1] -> feature g (B, C_ctrl0, H, W), added after conv_in."""
        return self.input_hint_block(hint)

    def time_embedding(self, t_emb):
        """Control's own time embedding of the sinusoidal t_emb (B, 320), or None if it has none."""
        if self.control_model.time_embed is None:
            return None
        return self.control_model.time_embed(t_emb)

    def control_block(self, i, h_c, emb, context):
        """Runs control input block i (0 = conv_in; the caller adds the hint after block 0)."""
        return self.control_model.input_blocks[i](h_c, emb, context)

    def middle(self, h_c, emb, context):
        """Control middle block (on the concat of the last control and base encoder outputs)."""
        return self.control_model.middle_block(h_c, emb, context)

    def to_base_enc(self, i, h_c):
        """Control -> base after input block i (to add, times the strength, to the base's h)."""
        return self.enc_zero_convs_out[i](h_c)

    def to_ctrl(self, i, h_b):
        """Base -> control after input block i (concatenated to h_c; never scaled)."""
        return self.enc_zero_convs_in[i](h_b)

    def concat_base(self, i, h_c, h_b):
        """``cat([h_c, to_ctrl(i, h_b)], dim=1)``: the control input of the next block."""
        return torch.cat([h_c, self.to_ctrl(i, h_b)], dim=1)

    def to_base_mid(self, h_c):
        """Control middle output -> base middle output."""
        return self.middle_block_out(h_c)

    def to_base_dec(self, j, h_c_skip):
        """Control skip (``hs_c.pop()``) -> base h before output block j's skip concat."""
        return self.dec_zero_convs_out[j](h_c_skip)


def load_controlnet_xs(sd, ops=nn, device=None, dtype=None):
    """Builds a :class:`ControlNetXS` from a state dict in any supported format.

    Returns ``(net, config)``. The modules are created on the meta device and take the
    state dict's tensors (``assign=True``), then move to ``device`` / ``dtype`` when given.
    Raises :class:`ControlNetXSFormatError` with the mismatching keys if the layout is not
    exactly the expected one.
    """
    vis = to_vislearn(sd)
    config = read_config(vis)
    net = ControlNetXS(config, ops=ops, device="meta")
    try:
        net.load_state_dict(vis, strict=True, assign=True)
    except RuntimeError as e:
        raise ControlNetXSFormatError(f"ControlNet-XS weights do not match the layout read from them: {e}") from e
    if device is not None or dtype is not None:
        net.to(device=device, dtype=dtype)
    return net.eval(), config


def connection_weights(n_blocks, base_multiplier=1.0, explicit=None):
    """Weight of each control -> base connection, in connection order: encoder 0..n-1 (after input
    block i), the middle, decoder 0..n-1 (before output block j): 2n + 1 values.

    ``explicit``: that list (or one value for all). Otherwise ``base_multiplier`` m decays the
    weights away from the deepest connection, the middle (weight 1): encoder i gets m^(n - i) and
    decoder j, which carries encoder n-1-j's control skip, m^(j + 1). m = 1: all 1 (the authors').
    """
    count = 2 * n_blocks + 1
    if explicit is not None:
        values = [float(v) for v in explicit]
        if len(values) == 1:
            return values * count
        if len(values) != count:
            raise ValueError(f"{len(values)} connection weights for {count} connections ({n_blocks} encoder, the middle, "
                             f"{n_blocks} decoder): give 1 or {count}")
        return values
    m = float(base_multiplier)
    return [m ** (n_blocks - i) for i in range(n_blocks)] + [1.0] + [m ** (j + 1) for j in range(n_blocks)]

"""Running ControlNet-XS inside ComfyUI's own UNet forward (thin glue).

The control encoder must run in lock-step with the base encoder and trade features after
every block (docs/controlnet_xs.md, "The two streams"). Instead of re-implementing the UNet forward,
the control stream rides on ComfyUI's hooks, so the base keeps every other pack's patches,
wrappers, stock ControlNets and LoRAs:

- APPLY_MODEL wrapper: decides from this call's sigma (with the model's own model_sampling)
  whether the control is active, and stashes the image size the latents decode to.
- DIFFUSION_MODEL wrapper: when active, opens a per-call state in ``transformer_options``
  (UNet input x, timesteps, text context, SDXL ``y``, hint features per batch row) and
  closes it when the UNet returns.
- ``emb_patch``: with a learned time embedding the base runs on the mixed embedding (the
  control's when mix = 1); the control blocks get that plus the base's ``label_emb(y)``.
- ``input_block_patch`` after input block i: control block i (hint added after block 0),
  ``h_b += enc_zero_convs_out[i](h_c) * s * w_enc[i] * mask`` (reaches the skip and the next
  block), then ``h_c = cat([h_c, enc_zero_convs_in[i](h_b)])`` (never scaled). After the last
  block the control middle block runs.
- ``output_block_patch`` before output block j's skip concatenation: the middle term (j = 0,
  times ``w_mid``) and ``dec_zero_convs_out[j](hs_c.pop()) * s * w_dec[j] * mask``.

``s`` is the strength times the row's step-schedule, latent and uncond multipliers (one value
per batch row), ``w`` the connection weights (models/controlnet_xs.connection_weights), and the
mask (one per row, when given) is resized to each term's resolution.

Outside the active range, or with strength 0, nothing is stashed and every hook returns its
input unchanged: the base output is bit for bit the unpatched one, own time embedding included.
Several ControlNet-XS applied to one MODEL stack (each keyed by its own id).
"""
import torch

import comfy.model_management as mm
import comfy.ops
import comfy.patcher_extension as pe
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

from ..models.controlnet_xs import load_controlnet_xs, mix_time_embeddings
from . import call_patches, batch_rows
from .control_runner import ControlRunner, image_size

STASH = "xctrl_controlnet_xs"
TIME_EMBEDDING_MIX = 1.0  # the released configs: the control's learned embedding replaces the base's
_STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def build_control_net(state_dict, num_params):
    """The control network with ComfyUI's casting ops, on the offload device.

    Weights are stored in the dtype ComfyUI picks for a UNet of that size; manual_cast runs
    each layer in the dtype of its input, i.e. the base UNet's compute dtype. The apply node
    wraps it for model management on the MODEL's devices (control_runner.control_patcher).
    """
    dtype = mm.unet_dtype(model_params=num_params, supported_dtypes=list(_STORAGE_DTYPES))
    if dtype not in _STORAGE_DTYPES:  # e.g. --fp8_e4m3fn-unet: keep the small control net in fp16
        dtype = torch.float16
    # Own copies: tensors read from a safetensors file are views at arbitrary offsets of one
    # buffer, and misaligned weights take other (slower, differently rounding) CPU kernels.
    offload = mm.unet_offload_device()
    state_dict = {k: v.to(device=offload, dtype=dtype if v.is_floating_point() else v.dtype, copy=True) for k, v in state_dict.items()}
    return load_controlnet_xs(state_dict, ops=comfy.ops.manual_cast)


class _Call:
    """State of one UNet call while the control is active (lives in transformer_options)."""

    def __init__(self, net, x, timesteps, context, y, unet, hint, scale, mask):
        self.net = net  # the control network of the device this call runs on
        self.x = x
        self.timesteps = timesteps
        self.context = context
        self.y = y
        self.unet = unet
        self.hint = hint  # (rows, C_ctrl0, h, w): embedded hint of each batch row
        self.scale = scale  # float or (rows, 1, 1, 1)
        self.mask = mask  # (rows, 1, H, W) or None
        self.emb = None  # set by the emb patch
        self.h_c = None  # control stream entering the next block
        self.hs_c = []  # control skips, popped by the decoder side
        self.mid = None  # middle_block_out(control middle) for output block 0
        self.next_block = 0


class ControlNetXSRunner(ControlRunner):
    """One applied ControlNet-XS: control network, hint, strength, step range, mask, further
    strengths and connection weights."""

    STASH = STASH
    NODE = "Apply ControlNet-XS (XCtrl)"
    PER_PROMPT_NODE = "Apply ControlNet-XS to Conditioning (XCtrl)"

    def __init__(self, patcher, hint, strength, start_percent, end_percent, mask=None, strengths=None, weights=None):
        super().__init__(patcher, hint, strength, start_percent, end_percent, mask, strengths)
        n = patcher.model.num_input_blocks
        self.weights = list(weights) if weights is not None else [1.0] * (2 * n + 1)
        if len(self.weights) != 2 * n + 1:
            raise ValueError(f"{self.NODE}: {len(self.weights)} connection weights for {2 * n + 1} connections")

    def hooks(self):
        return [
            (call_patches.WRAPPER, pe.WrappersMP.DIFFUSION_MODEL, self.diffusion_model_wrapper),
            (call_patches.PATCH, "emb_patch", _Hook(self, self.emb_patch)),
            (call_patches.PATCH, "input_block_patch", _Hook(self, self.input_patch)),
            (call_patches.PATCH, "output_block_patch", _Hook(self, self.output_patch)),
        ]

    # ------------------------------------------------------------------ wrappers
    def prepare_call(self, base, x, t, transformer_options, device=None):
        """Whether the control acts in this call, at which row scales, on which lane (that of
        ``device`` or of the call's device): stashed for the UNet wrapper."""
        entry = None
        if self.strength != 0.0 and self.active(base.model_sampling, t):
            layout = batch_rows.BatchLayout(x.shape[0], transformer_options)
            more = self.row_scale(layout, t, base.model_sampling, transformer_options)
            scale = self.strength if more is None else (more * self.strength).to(x.device).reshape(-1, 1, 1, 1)
            if more is None or bool((more != 0).any()):
                entry = (image_size(base, x), scale, self.lane(transformer_options, device))
        self.stash(transformer_options, entry)

    def diffusion_model_wrapper(self, executor, x, timesteps, context=None, y=None, control=None, transformer_options=None, **kwargs):
        stash = (transformer_options or {}).get(STASH, {})
        entry = stash.get(self.uid)
        if not isinstance(entry, tuple):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        size, scale, lane = entry
        layout = batch_rows.BatchLayout(x.shape[0], transformer_options)
        g = self._embedded_hint(lane, layout.items(self.hint.shape[0]), size, x.device, x.dtype)
        if isinstance(scale, torch.Tensor):
            scale = scale.to(x.dtype)
        mask = self.row_mask(layout, x.device)
        stash[self.uid] = _Call(lane.module, x, timesteps, context, y, executor.class_obj, g, scale,
                                None if mask is None else mask.to(x.dtype))
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            stash[self.uid] = None  # frees the control skips

    def _embedded_hint(self, lane, rows, size, device, dtype):
        """input_hint_block of each row's hint image, resized to the image size; cached per frame
        for the run on the lane."""
        return lane.frames.get(rows.tolist(), (tuple(size), str(device), dtype),
                               lambda idx: (lane.module.embed_hint(batch_rows.fit(self.hint[idx], size, self.fit_mode).to(device=device, dtype=dtype)),))[0]

    # ------------------------------------------------------------------ UNet hooks
    def _call(self, transformer_options):
        call = transformer_options.get(STASH, {}).get(self.uid)
        return call if isinstance(call, _Call) else None

    def emb_patch(self, emb, model_channels, transformer_options):
        call = self._call(transformer_options)
        if call is None:
            return emb
        ctrl_emb = call.net.time_embedding(timestep_embedding(call.timesteps, model_channels).to(call.x.dtype))
        if ctrl_emb is not None:
            emb = mix_time_embeddings(ctrl_emb.to(emb.dtype), emb, TIME_EMBEDDING_MIX)
        # The UNet adds label_emb(y) after the emb patches; the control blocks need the sum too.
        call.emb = emb if call.y is None else emb + call.unet.label_emb(call.y)
        return emb

    def input_patch(self, h, transformer_options):
        call = self._call(transformer_options)
        if call is None:
            return h
        kind, i = transformer_options["block"]
        if call.emb is None or kind != "input" or i != call.next_block:
            raise RuntimeError(
                f"ControlNet-XS: the UNet ran {kind} block {i} while the control stream expected input block "
                f"{call.next_block}{'' if call.emb is not None else ' and no timestep embedding reached it'}; "
                "another node replaces the UNet's forward in a way ControlNet-XS cannot follow."
            )
        net = call.net
        if i == 0:
            h_c = net.control_block(0, call.x, call.emb, call.context) + call.hint  # hint after conv_in
        else:
            h_c = net.control_block(i, call.h_c, call.emb, call.context)
        h = h + self._term(call, net.to_base_enc(i, h_c), self.weights[i])
        call.hs_c.append(h_c)
        call.h_c = net.concat_base(i, h_c, h)
        call.next_block = i + 1
        if call.next_block == net.num_input_blocks:
            call.mid = net.to_base_mid(net.middle(call.h_c, call.emb, call.context))
            call.h_c = None
        return h

    def output_patch(self, h, hsp, transformer_options):
        call = self._call(transformer_options)
        if call is None:
            return h, hsp
        j = transformer_options["block"][1]
        n = call.net.num_input_blocks
        if j == 0:
            h = h + self._term(call, call.mid, self.weights[n])
            call.mid = None
        return h + self._term(call, call.net.to_base_dec(j, call.hs_c.pop()), self.weights[n + 1 + j]), hsp

    @staticmethod
    def _term(call, term, weight):
        """A control -> base term times the row scales, the connection weight and the mask."""
        term = term * call.scale
        if weight != 1.0:
            term = term * weight
        if call.mask is not None:
            term = term * batch_rows.resize(call.mask, tuple(term.shape[-2:]))
        return term


class _Hook:
    """A UNet patch calling one runner method; shared (not copied) by ModelPatcher.clone()."""

    def __init__(self, runner, fn):
        self.runner = runner
        self.fn = fn

    def __deepcopy__(self, memo):
        return self

    def models(self):  # the control network loads with the UNet (see control_runner)
        return self.runner.models()

    def __call__(self, *args):
        return self.fn(*args)

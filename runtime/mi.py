"""MIControlNet inside ComfyUI: balanced combination and injection of stock control residuals.

ComfyUI sums the residuals of a chain of applied ControlNets (``control_merge``) and adds the
sum to the denoiser's features in place (``apply_control``). This module replaces both
additions with models/mi_balance.py (docs/mi_controlnet.md; docs/comfyui_hooks.md, "Replacing the plain
addition"), in two halves that talk through the per-call ``transformer_options``:

1. ``BalancedControl`` (a ControlBase) replaces a conditioning's chain of controls. It runs
   every stock control of the chain on its own (each a detached copy keeping its own strength,
   start/end and hint; one outside its step range returns None and drops out), combines their
   residuals per layer with ``mi_balance.combine`` (folded in chain order, oldest first, the
   same order and index alignment as ComfyUI's control_merge), stashes the combined residuals
   under ``STASH`` and returns all-None lists, so ComfyUI's own ``apply_control`` adds nothing.
2. Injection patches on the MODEL add each combined residual c to the feature e with
   ``mi_balance.add_inj(e, c)`` exactly where ComfyUI would have added it:
   - UNet (SD1.5/SD2/SDXL): 'input' residuals in ``input_block_patch``, the 'output' residual k
     to the skip ``hsp`` in ``output_block_patch`` at output block N-1-k (ComfyUI pops from the
     end of the list), the 'middle' residual to ``h`` at output block 0 (``h`` is still the
     middle block's output there).
   - SD3/SD3.5 MMDiT: a ``("dit", "double_block", i)`` replacement runs the block (or another
     pack's replacement of it) and injects ``output[i]`` into the image tokens, as ComfyUI's
     mmdit adds ``control["output"][i]`` after joint block i (i < len(output)).
   - Flux: ``("dit", "double_block", i)`` replacements inject ``input[i]`` into the first
     tokens of the image stream after double block i (``img[:, :n]``, n = the residual's
     tokens), and ``("dit", "single_block", i)`` replacements inject ``output[i]`` into the
     image part of the joint stream after single block i (``img[:, txt:txt + n]``; the text
     length is the joint length minus the image length the double blocks saw), as ComfyUI's
     flux model adds them.
   - Qwen-Image: ``input[i]`` into the first image tokens after double block i, after the
     block's "double_block" patches, together with the DiffSynth model-patch controls there
     (runtime/qwen_control.py: a per-call rewrite of the double-block patch list).
   On SD3 and Flux the block replacements are put in place per model call by an
   APPLY_MODEL wrapper (``call_patches.ReplaceBlocksPerCall``), around whatever replacement of
   the block the call carries, so another pack's replacement of the same blocks runs inside
   ours whether it was applied before or after the MI node.

Patch order: the injection patches are put FIRST in the input/output block patch lists,
because that is where ComfyUI's plain addition happens (before any block patch). Another
pack's patch (e.g. FreeU_V2, which rescales h and filters hsp at some output blocks) therefore
sees the features with the control already injected, as it would with stock ControlNets, and
the result does not depend on whether FreeU is applied before or after the MI node.

Chains: a BalancedControl met in a chain (the node applied twice) is flattened into its
members, so each control is balanced once, with the last node's settings. A stock control
applied AFTER the node chains onto the BalancedControl and is added plainly by ComfyUI.

The settings travel with the stash (the ``Balance`` that produced it), so the model patches
themselves are stateless. Cond and uncond rows get independent weights: every weight is
computed per batch row (and per pixel/token with granularity "pixel").

Visibility: each ``Balance`` keeps the injection weights lambda of the latest sampling step
(the model calls at the last sigma; per layer, cond and uncond rows apart) and, when sampling
ends (the control's cleanup), logs one INFO line with the per-layer mean lambda and keeps the
summary in ``Balance.last_stats`` (read by the MI Lambda Stats node). Layers are named where
the residual goes: "input i" (after input block i), "middle", "skip k" (the skip of input
block k), "block i" (after MMDiT joint block i), "double i" / "single i" (Flux), "Qwen-Image
block i". Sum mode computes no weights.
"""
import logging
import threading

import torch

import comfy.controlnet
import comfy.hooks
import comfy.patcher_extension as pe
from comfy.ldm.flux.model import Flux
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..models import mi_balance as mb
from . import call_patches, batch_rows

try:
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
except ImportError:  # a ComfyUI without Qwen-Image
    QwenImageTransformer2DModel = None

LOG = logging.getLogger("xctrl.mi")

STASH = "xctrl_mi"  # per call: a Stash (the Balance, the members' outputs, their combination per key)
MARK = "xctrl_mi_injection"  # in model_options["transformer_options"]: the MODEL injects the stash
CONTROL_KEYS = ("input", "middle", "output")
UNET, MMDIT, FLUX, QWEN = "unet", "mmdit", "flux", "qwen_image"
CHANNEL_DIM = {UNET: 1, MMDIT: -1, FLUX: -1, QWEN: -1}  # (B, C, H, W) feature maps; (B, tokens, C) image tokens
SUPPORTED = "SD1.5 / SD2.x / SDXL (UNet), SD3 / SD3.5 (MMDiT), Qwen-Image and Flux"
FLUX_IMAGE_TOKENS = "xctrl_mi_flux_image_tokens"  # per call: the image stream's length in the double blocks


def architecture(model_patcher):
    """UNET, MMDIT, FLUX or QWEN for the models whose control points this module knows, else None."""
    dm = model_patcher.model.diffusion_model
    if isinstance(dm, UNetModel):
        return UNET
    if isinstance(dm, MMDiT):
        return MMDIT
    if isinstance(dm, Flux):
        return FLUX
    if QwenImageTransformer2DModel is not None and isinstance(dm, QwenImageTransformer2DModel):
        return QWEN
    return None


# ---------------------------------------------------------------------------- settings + stats
NODE = "MI Balanced Control (XCtrl)"


class Balance:
    """The balancing settings of one node application, and the lambda statistics it produced."""

    def __init__(self, mode="paper", granularity="layer", cap=mb.DEFAULT_CAP, channel_dim=1):
        if mode not in mb.MODES:
            raise ValueError(f"mode must be one of {mb.MODES}, got {mode!r}")
        if granularity not in mb.GRANULARITIES:
            raise ValueError(f"granularity must be one of {mb.GRANULARITIES}, got {granularity!r}")
        cap = float(cap)
        if not 0.0 <= cap < float("inf"):
            raise ValueError(f"cap must be finite and >= 0, got {cap}")
        self.mode, self.granularity, self.cap, self.channel_dim = mode, granularity, cap, channel_dim
        self.node = NODE  # how errors name the node (control_inputs.node_label), set by the node
        self.last_stats = None  # {"sigma": float, "layers": {layer: {"cond"|"uncond": summary}}}
        self._step_sigma = None
        self._step = {}  # layer -> {"cond"|"uncond": [lambda tensors]} of the current step
        self._lock = threading.Lock()  # under core's MultiGPU, cond and uncond calls record at once

    def __repr__(self):
        return f"Balance(mode={self.mode}, granularity={self.granularity}, cap={self.cap:g})"

    def combine(self, residuals):
        return mb.combine(residuals, self.mode, self.granularity, self.channel_dim)

    def combine_key(self, outputs, key):
        """The combination of every control's residual at each control point of ``key``.

        ``outputs``: the controls' {"input"|"middle"|"output": [tensor or None]} dicts, oldest
        first. Lists are aligned by index from the start, as ComfyUI's control_merge aligns
        them; a residual shared by several entries (SD3 and Qwen-Image InstantX ControlNets
        repeat one tensor) is combined once.
        """
        lists = [out.get(key) or [] for out in outputs]
        memo, result = {}, []
        for i in range(max((len(x) for x in lists), default=0)):
            rs = [x[i] for x in lists if i < len(x) and x[i] is not None]
            ids = tuple(id(r) for r in rs)
            if ids not in memo:
                memo[ids] = self.combine(rs)
            result.append(memo[ids])
        return result

    def inject(self, e, c, layer, transformer_options):
        """add_inj(e, c) (e unchanged for c None); a residual of the wrong shape is skipped with a
        warning, as ComfyUI's apply_control does."""
        if c is None:
            return e
        try:
            ok = torch.broadcast_shapes(e.shape, c.shape) == e.shape
        except RuntimeError:
            ok = False
        if not ok:
            LOG.warning("[XCtrl] MI balance: control residual %s does not fit the features %s at %s; skipped",
                        tuple(c.shape), tuple(e.shape), layer)
            return e
        stats = [] if self.mode != "sum" else None
        out = mb.add_inj(e, c.to(e.device), self.mode, self.cap, self.granularity, self.channel_dim, stats)
        if stats:
            self._record(layer, stats[0], transformer_options)
        return out

    # ------------------------------------------------------------------ statistics
    def begin_call(self, sigma):
        """Called once per model call: a new sigma starts a new step's statistics."""
        s = float(sigma.reshape(-1)[0])
        with self._lock:
            if s != self._step_sigma:
                self._step_sigma, self._step = s, {}

    def _record(self, layer, lam, transformer_options):
        kinds = transformer_options.get("cond_or_uncond") or [0]
        rows = lam.shape[0] // len(kinds) if lam.shape[0] % len(kinds) == 0 else None
        with self._lock:
            per_layer = self._step.setdefault(layer, {})
            if rows is None:  # unknown batch layout: keep all rows together
                per_layer.setdefault("all", []).append(lam)
                return
            for n, kind in enumerate(kinds):
                per_layer.setdefault("uncond" if kind == 1 else "cond", []).append(lam[n * rows:(n + 1) * rows])

    def report(self):
        """Summarises the latest step into last_stats and logs it once; no-op without new data."""
        if not self._step:
            return self.last_stats
        layers = {layer: {kind: mb.lambda_summary(ts) for kind, ts in kinds.items()}
                  for layer, kinds in self._step.items()}
        self.last_stats = {"sigma": self._step_sigma, "layers": layers}
        self._step, self._step_sigma = {}, None
        LOG.info("[XCtrl] %s", format_stats(self.last_stats, self))
        return self.last_stats


def format_stats(stats, balance=None):
    """One line: per layer, the mean lambda of cond / uncond rows at the last step."""
    if not stats:
        return "MI balance: no balanced injection happened (no control active)"
    parts = []
    for layer, kinds in stats["layers"].items():
        means = "/".join(f"{kinds[k]['mean']:.3g}" for k in ("cond", "uncond", "all") if k in kinds)
        parts.append(f"{layer} {means}")
    head = f"MI balance ({balance.mode}, {balance.granularity}, cap {balance.cap:g})" if balance else "MI balance"
    return (f"{head}, last step sigma {stats['sigma']:.4g}: mean injection weight lambda per layer "
            f"(cond/uncond; 1 = plain addition): " + ", ".join(parts))


# ---------------------------------------------------------------------------- control side
def chain_members(control):
    """The stock controls of a chain, oldest first, each a detached copy (own strength, range).

    A BalancedControl met in the chain (the node applied twice, or a stock control applied
    after it) contributes its members, so the result balances every control once.
    """
    links = []
    while control is not None:
        links.append(control)
        control = control.previous_controlnet
    members = []
    for link in reversed(links):
        if isinstance(link, BalancedControl):
            members.extend(m.copy() for m in link.members)
        else:
            member = link.copy()
            member.set_previous_controlnet(None)
            members.append(member)
    return members


class BalancedControl(comfy.controlnet.ControlBase):
    """Runs the members separately, stashes their combined residuals, adds nothing itself."""

    def __init__(self, members, balance, view=None):
        super().__init__()
        self.members = list(members)
        self.balance = balance
        self._view = view if view is not None else _View()  # shared with copies (see cond_hint_original)
        hooks = [h for m in self.members for h in m.get_extra_hooks()]
        if hooks:  # ComfyUI collects controls' hooks by walking extra_hooks / previous_controlnet
            self.extra_hooks = comfy.hooks.HookGroup.combine_all_hooks(hooks)

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        if not transformer_options.get(MARK):
            raise RuntimeError(
                f"{self.balance.node}: this conditioning needs the MODEL output of the same "
                "'MI Balanced Control' node. Connect that MODEL to the sampler (the node's conditioning "
                "alone would switch the ControlNets off)."
            )
        control_prev = None
        if self.previous_controlnet is not None:  # a plain control chained after this one by other code
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        self.balance.begin_call(t)
        outputs = [m.get_control(x_noisy, t, cond, batched_number, transformer_options) for m in self.members]
        stash = Stash(self.balance, [o for o in outputs if o is not None])
        transformer_options[STASH] = stash
        return self.control_merge(stash.silent(), control_prev, None)

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        for m in self.members:
            m.pre_run(model, percent_to_timestep_function)

    def cleanup(self):
        for m in self.members:
            m.cleanup()
        self.balance.report()
        super().cleanup()

    def get_models(self):
        out = super().get_models()
        for m in self.members:
            out += m.get_models()
        return out

    def inference_memory_requirements(self, dtype):
        return super().inference_memory_requirements(dtype) + sum(
            m.inference_memory_requirements(dtype) for m in self.members)

    @property
    def cond_hint_original(self):
        """What tilers crop: the members' hints as one image, one block of channels each
        (docs/comfyui_hooks.md, "Tiled upscaling")."""
        if self._view.tensor is None:
            parts = [m.cond_hint_original for m in self.members]
            if parts and all(isinstance(p, torch.Tensor) and p.dim() == 4 for p in parts):
                self._view.tensor = batch_rows.stack_channels(parts)
        return self._view.tensor

    @cond_hint_original.setter
    def cond_hint_original(self, value):
        # None from ControlBase.__init__, the same view from ControlBase.copy_to: nothing to crop
        if value is None or not self.members or value is self.cond_hint_original:
            return
        channels = [m.cond_hint_original.shape[1] for m in self.members]
        for member, part in zip(self.members, batch_rows.split_channels(value, channels)):
            member.cond_hint_original = part
        self._view = _View(value)

    def copy(self):
        c = BalancedControl([m.copy() for m in self.members], self.balance, self._view)
        self.copy_to(c)
        return c

    def deepclone_multigpu(self, load_device, autoregister=False):
        """Core's MultiGPU: this control for ``load_device``, each member deep-cloned there by its
        own class (its own network on that device). The Balance (settings, statistics) stays
        shared: every weight is computed per batch row, so cond and uncond rows are balanced alike
        on whichever device they run."""
        c = BalancedControl([m.deepclone_multigpu(load_device) for m in self.members], self.balance)
        self.copy_to(c)
        if autoregister:
            self.multigpu_clones[load_device] = c
        return c


class Stash(dict):
    """One call's stash: the Balance, the active members' outputs (``"members"``, oldest first)
    and, read per control key, their combination (made when first read: an injection that
    combines per point itself, as on Qwen-Image, never pays for the lists)."""

    def __init__(self, balance, outputs):
        super().__init__(balance=balance, members=outputs)

    def __missing__(self, key):
        if key not in CONTROL_KEYS:
            raise KeyError(key)
        self[key] = self["balance"].combine_key(self["members"], key)
        return self[key]

    def silent(self):
        """All-None lists as long as the members' lists: what ComfyUI itself then adds."""
        return {key: [None] * max((len(o.get(key) or []) for o in self["members"]), default=0) for key in CONTROL_KEYS}

    def at(self, key, index):
        """Every member's own residual at control point ``index`` of ``key`` (None dropped)."""
        return [o[key][index] for o in self["members"] if index < len(o.get(key) or []) and o[key][index] is not None]


class _View:
    """The stacked hints a tiler sees, built once and shared by a BalancedControl's copies."""

    def __init__(self, tensor=None):
        self.tensor = tensor


def balance_conditioning(conditionings, balance):
    """Each conditioning with its control chains replaced by BalancedControls.

    Entries that shared one chain share one BalancedControl, so cond and uncond still batch
    together (ComfyUI batches them only when their control objects are the same).
    Returns (new conditionings, number of distinct chains replaced).
    """
    wrappers = {}
    out = []
    for conditioning in conditionings:
        new = []
        for emb, opts in conditioning:
            head = opts.get("control")
            if head is not None:
                if head not in wrappers:
                    wrappers[head] = BalancedControl(chain_members(head), balance)
                opts = dict(opts, control=wrappers[head])
            new.append([emb, opts])
        out.append(new)
    return out, len(wrappers)


# ---------------------------------------------------------------------------- model side
def _stash(transformer_options):
    return transformer_options.get(STASH)


def _from_end(values, k):
    """values[len - 1 - k]: the entry ComfyUI's apply_control pops at its k-th call."""
    return values[len(values) - 1 - k] if k < len(values) else None


class _Patch:
    # Patch objects live in model_options, which ModelPatcher.clone() deep-copies: share them.
    def __deepcopy__(self, memo):
        return self


class InputInjection(_Patch):
    """input_block_patch: the 'input' residual after input block i, before other patches."""

    def __call__(self, h, transformer_options):
        stash = _stash(transformer_options)
        if stash is None:
            return h
        i = transformer_options["block"][1]
        return stash["balance"].inject(h, _from_end(stash["input"], i), f"input {i}", transformer_options)


class OutputInjection(_Patch):
    """output_block_patch: 'middle' into h at output block 0; 'output' into the skip hsp."""

    def __call__(self, h, hsp, transformer_options):
        stash = _stash(transformer_options)
        if stash is None:
            return h, hsp
        balance = stash["balance"]
        j = transformer_options["block"][1]
        if j == 0:
            h = balance.inject(h, _from_end(stash["middle"], 0), "middle", transformer_options)
        k = len(stash["output"]) - 1 - j  # the skip of input block k (for full-length lists)
        hsp = balance.inject(hsp, _from_end(stash["output"], j), f"skip {k}", transformer_options)
        return h, hsp


class _BlockInjection(_Patch):
    """A dit block replacement for block ``index``: runs the block (or the replacement already
    there), then, in calls that carry a balanced stash, injects into its output (``inject``)."""

    def __init__(self, index, inner=None):
        self.index = index
        self.inner = inner

    def __call__(self, args, extra):
        out = self.inner(args, extra) if self.inner is not None else extra["original_block"](args)
        to = args["transformer_options"]
        stash = _stash(to)
        return out if stash is None else self.inject(out, stash, to)

    def inject(self, out, stash, to):
        raise NotImplementedError


class JointBlockInjection(_BlockInjection):
    """SD3 joint block i: output[i] into the image tokens."""

    def inject(self, out, stash, to):
        if self.index >= len(stash["output"]):
            return out
        return dict(out, img=stash["balance"].inject(out["img"], stash["output"][self.index], f"block {self.index}", to))


class FluxDoubleBlockInjection(_BlockInjection):
    """Flux double block i: input[i] into the first tokens of the image stream."""

    def inject(self, out, stash, to):
        img = out["img"]
        stash[FLUX_IMAGE_TOKENS] = img.shape[1]
        c = stash["input"][self.index] if self.index < len(stash["input"]) else None
        if c is not None and c.shape[1] <= img.shape[1]:
            n = c.shape[1]
            injected = stash["balance"].inject(img[:, :n], c, f"double {self.index}", to)
            out = dict(out, img=torch.cat([injected, img[:, n:]], dim=1))
        return out


class FluxSingleBlockInjection(_BlockInjection):
    """Flux single block i: output[i] into the image part of the joint (text + image) stream."""

    def inject(self, out, stash, to):
        if self.index >= len(stash["output"]) or stash["output"][self.index] is None:
            return out
        joint = out["img"]
        c = stash["output"][self.index]
        txt = joint.shape[1] - stash.get(FLUX_IMAGE_TOKENS, joint.shape[1])
        n = c.shape[1]
        if txt < 0 or txt + n > joint.shape[1]:
            return out
        injected = stash["balance"].inject(joint[:, txt:txt + n], c, f"single {self.index}", to)
        return dict(out, img=torch.cat([joint[:, :txt], injected, joint[:, txt + n:]], dim=1))


def _has_stash(transformer_options):
    return _stash(transformer_options) is not None


class BlockInjectionWrapper(call_patches.ReplaceBlocksPerCall):
    """APPLY_MODEL wrapper of a DiT MODEL: in each call that carries a balanced stash, every block
    of ``blocks`` ((kind, count, injection class) triples) becomes its injection around whatever
    replacement of it the call already has (another pack's, applied before or after the MI
    node). The MODEL's own dicts are not touched."""

    def __init__(self, blocks):
        classes = {}
        for kind, count, injection in blocks:
            classes.update({(kind, i): injection for i in range(count)})
        super().__init__("dit", classes, lambda key, inner: classes[key](key[1], inner), _has_stash)


class FluxInjectionWrapper(BlockInjectionWrapper):
    """Flux: input[i] after double block i, output[i] after single block i."""

    def __init__(self, n_double, n_single):
        super().__init__((("double_block", n_double, FluxDoubleBlockInjection),
                          ("single_block", n_single, FluxSingleBlockInjection)))


def injection_wrapper(model_patcher, arch):
    """The per-call wrapper of a DiT architecture."""
    dm = model_patcher.model.diffusion_model
    if arch == QWEN:  # Qwen-Image's injection lives with its model-patch controls (which import this module)
        from .qwen_control import QwenInjectionWrapper
        return QwenInjectionWrapper()
    if arch == MMDIT:
        return BlockInjectionWrapper((("double_block", len(dm.joint_blocks), JointBlockInjection),))
    return FluxInjectionWrapper(len(dm.double_blocks), len(dm.single_blocks))


def install_injection(model_patcher):
    """Adds the injection patches to a (cloned) MODEL, once. Returns the architecture."""
    arch = architecture(model_patcher)
    if arch is None:
        raise ValueError("unsupported model for MI balancing")
    to = model_patcher.model_options.setdefault("transformer_options", {})
    if to.get(MARK):
        return arch
    if arch == UNET:
        # First in each list: the place of ComfyUI's own apply_control (see module doc).
        patches = dict(to.get("patches", {}))
        patches["input_block_patch"] = [InputInjection()] + list(patches.get("input_block_patch", []))
        patches["output_block_patch"] = [OutputInjection()] + list(patches.get("output_block_patch", []))
        to["patches"] = patches
    else:
        model_patcher.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, MARK, injection_wrapper(model_patcher, arch))
    model_patcher.model_options["transformer_options"][MARK] = True
    return arch


def apply_balance(model, positive, negative, balance):
    """(MODEL clone with injection, positive, negative with balanced controls, controls found)."""
    patched = model.clone()
    install_injection(patched)
    (pos, neg), found = balance_conditioning([positive, negative], balance)
    return patched, pos, neg, found

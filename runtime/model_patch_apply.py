"""Where and when for ComfyUI's model-patch controls (Z-Image Fun ControlNet, Qwen-Image DiffSynth):
a step range, step keyframe schedules, per-latent strengths, an uncond multiplier and a spatial
mask on the control's residual (docs/model_patch_control.md).

The Apply nodes run core's own apply node (same inputs, so the patch is core's, encoding and
all), then put a ``ScheduledPatch`` in the core patch's place in the MODEL's patch lists. At each
injection point it takes the core patch's residual x strength (runtime/model_patch_control.py)
and multiplies it per batch row by ``ControlRunner.row_scale`` (step schedule x latent strength x
uncond multiplier) and per image token by the mask resized to the token grid (2x2 latent pixels
per token); outside [start_percent, end_percent] the control is not run at all. With every
multiplier 1 and no mask nothing is multiplied, so the result is core's bit for bit. MI Balanced
Model Patches balances these residuals like core's.
"""
import uuid

import torch

import comfy.patcher_extension as pe

from . import batch_rows
from . import model_patch_control as mpc
from .control_inputs import mask_batch, require_finite, require_step_range, strengths_from
from .control_runner import ControlRunner, check_mask_aspect

CORE_NODES = {mpc.ZIMAGE: "ZImageFunControlnet", mpc.QWEN: "QwenImageDiffsynthControlnet"}


class ScheduledPatch:
    """A core control patch with the step range, strengths and mask of an XCtrl Apply node."""

    def __init__(self, inner, kind, runner, model_sampling, node):
        self.inner, self.kind, self.runner, self.node = inner, kind, runner, node
        self.model_patch = inner.model_patch
        self.model_sampling = model_sampling
        self.uid = f"xctrl_model_patch_{uuid.uuid4().hex[:12]}"

    def __deepcopy__(self, memo):
        return self

    def xctrl_residual(self, kwargs):
        """This control's term at this point (strength, schedule, mask applied), or None."""
        options = kwargs.get("transformer_options", {})
        sigmas = options.get("sigmas")
        if sigmas is not None and not self.runner.active(self.model_sampling, sigmas):
            return None
        r = mpc.RESIDUAL[self.kind](self.inner, kwargs)
        if r is None:
            return None
        layout = batch_rows.BatchLayout(r.shape[0], options)
        scale = self.runner.row_scale(layout, sigmas, self.model_sampling, options) if sigmas is not None else None
        if scale is not None:
            r = r * scale.to(device=r.device, dtype=r.dtype).view(-1, 1, 1)
        mask = self.runner.row_mask(layout, r.device)
        if mask is not None:
            r = r * token_mask(mask, kwargs["x"], r.shape[1]).to(r.dtype)
        return r

    def __call__(self, kwargs):
        img = kwargs["img"]
        r = self.xctrl_residual(kwargs)
        if r is not None:
            img[:, :r.shape[1]] += r
        if self.kind == mpc.ZIMAGE:
            kwargs.pop("img", None)
            kwargs.pop("txt", None)
        return kwargs

    def to(self, device_or_dtype):
        self.inner.to(device_or_dtype)
        return self

    def models(self):
        return self.inner.models()

    def outer_sample_wrapper(self, executor, noise, *args, **kwargs):
        """Before sampling: the mask and latent strengths against the latent batch."""
        latents = noise.shape[0]
        mask = self.runner.mask
        if mask is not None:
            try:
                batch_rows.check_batch(mask.shape[0], latents, "mask", input_name="control_mask")
            except batch_rows.HintBatchError as e:
                raise batch_rows.HintBatchError(f"{self.node}: {e}") from None
            check_mask_aspect(mask.shape[-2:], noise.shape[-2:], self.node, "control_mask")
        if self.runner.strengths.latents is not None:
            self.runner.strengths.latents.check(latents, self.node)
        return executor(noise, *args, **kwargs)


def token_mask(mask, x, tokens):
    """(rows, 1, H, W) mask -> (rows, tokens, 1) on the 2x2-patch token grid of latent ``x`` (bilinear,
    antialiased when shrinking: docs/model_patch_control.md)."""
    grid = (-(-x.shape[-2] // mpc.PATCH_SIZE), -(-x.shape[-1] // mpc.PATCH_SIZE))
    m = batch_rows.resize(mask.float(), grid).flatten(1).unsqueeze(-1)
    return m[:, :tokens]


def core_apply_node(kind, node):
    """Core's apply node class, or a ValueError when this ComfyUI lacks the family."""
    import nodes as comfy_nodes  # ComfyUI's nodes.py (its node registry), not this pack's nodes/

    reason = mpc.missing_support(kind)
    cls = comfy_nodes.NODE_CLASS_MAPPINGS.get(CORE_NODES[kind])
    if reason is None and cls is None:
        reason = f"this ComfyUI has no {CORE_NODES[kind]} node"
    if reason:
        raise ValueError(mpc.update_message(kind, node, reason))
    return cls


def check_apply(model, model_patch, kind, node):
    """The control and the MODEL belong together, before anything is applied."""
    got = mpc.network_kind(getattr(model_patch, "model", None))
    if got != kind:
        what = f"a {mpc.CONTROL_TITLES[got]}" if got else "not a Z-Image or Qwen-Image control network"
        raise ValueError(f"{node}: the model_patch input is {what}: load a {mpc.CONTROL_TITLES[kind]} with Load Model "
                         "Patch (models/model_patches) for this node.")
    mk = mpc.model_kind(model)
    if mk != kind:
        raise ValueError(f"{node}: the MODEL is not a {mpc.MODEL_TITLES[kind]} model: apply a "
                         f"{mpc.CONTROL_TITLES[kind]} to the model it was made for.")
    cw, mw = mpc.control_width(model_patch.model, kind), mpc.model_width(model, kind)
    if cw != mw:
        raise ValueError(f"{node}: this {mpc.CONTROL_TITLES[kind]} has width {cw}, the MODEL {mw}: use the control "
                         "made for this model.")


def apply_scheduled(kind, node, model, model_patch, core_kwargs, percent_range, control_mask, strengths):
    """Core's apply node on ``model``, then its new patch wrapped in a ScheduledPatch."""
    cls = core_apply_node(kind, node)
    check_apply(model, model_patch, kind, node)
    before = {id(p) for ps in model.model_options.get("transformer_options", {}).get("patches", {}).values() for p in ps}
    patched = cls().diffsynth_controlnet(model, model_patch, **core_kwargs)[0]
    patches = patched.model_options["transformer_options"]["patches"]
    new = [p for p in patches.get("double_block", []) if id(p) not in before]
    if len(new) != 1:
        raise RuntimeError(f"{node}: ComfyUI's {CORE_NODES[kind]} did not add one control patch; report this with "
                           "your ComfyUI version.")
    runner = ControlRunner(model_patch, torch.zeros(1, 3, 8, 8), 1.0, *percent_range, control_mask, strengths)
    runner.NODE = node
    scheduled = ScheduledPatch(new[0], kind, runner, model.get_model_object("model_sampling"), node)
    for site, ps in patches.items():
        patches[site] = [scheduled if p is new[0] else p for p in ps]
    patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, scheduled.uid, scheduled.outer_sample_wrapper)
    patched.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, scheduled.uid, runner.release)
    return patched


def apply_node(kind, node, model, model_patch, core_kwargs, start_percent, end_percent, control_mask, schedule,
               latent_strengths, uncond_multiplier):
    """The Apply node: our inputs checked and converted, then apply_scheduled."""
    require_step_range(start_percent, end_percent, node)
    require_finite(node, strength=core_kwargs["strength"], control_mask=control_mask, uncond_multiplier=uncond_multiplier)
    strengths = strengths_from(schedule, latent_strengths, uncond_multiplier, node)
    return apply_scheduled(kind, node, model, model_patch, core_kwargs, (start_percent, end_percent),
                           mask_batch(control_mask), strengths)

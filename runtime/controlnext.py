"""Running a ControlNeXt control module inside ComfyUI's sampling (thin glue).

An APPLY_MODEL wrapper computes the control feature for each model call (it sees sigma,
the model's timestep and the batch layout), and a UNet block patch at the variant's
injection point adds the cross-normalized feature. The two talk through the call's
``transformer_options`` under ``STASH``, keyed by runner, so several ControlNeXt
runners and other packs' patches coexist. On SD3 the injection point is the input of joint
block 0: a second APPLY_MODEL wrapper replaces that block in each call, around whatever
replacement of it the call carries (another pack's, applied before or after), and the module
rides a patch list no model calls (``MODULES_PATCH``) so it still loads with the MODEL.

Cost: the module runs once per distinct (hint, timestep) per step, however cond and uncond are
batched and however the video is windowed, and its timestep-independent stem once per run and
frame (at most one window's frames are kept: docs/long_video.md, "How the glue does it").
"""
import torch

import comfy.ops

from ..models import controlnext as cnx
from ..models.cross_norm import control_to_tokens, cross_normalize, cross_normalize_tokens
from . import call_patches, batch_rows
from .control_runner import ControlRunner, control_patcher, image_size
from .model_family import compute_dtype

STASH = "xctrl_controlnext"
PATCH_SIZE_KEY = "xctrl_patch_size"

# ComfyUI hooks (docs/comfyui_hooks.md) at each variant's injection point (docs/controlnext.md).
OUTPUT_BLOCK_PATCH = "output_block_patch"
INPUT_BLOCK_PATCH_AFTER_SKIP = "input_block_patch_after_skip"
DIT_DOUBLE_BLOCK_0 = "dit_double_block_0"  # replacement of MMDiT joint block 0 (its input is the patch embedding)
MODULES_PATCH = "xctrl_control_modules"  # a patch list no model calls: it carries modules the MODEL loads


class Injection:
    """Where a variant's feature is added: the hook, the ``transformer_options["block"]`` it acts
    at, and the place in words (for error messages)."""

    def __init__(self, hook, block, where):
        self.hook, self.block, self.where = hook, block, where


_AFTER_INPUT_3 = "after input block 3 (down_blocks[0] with its downsampler), after the skip was saved"
INJECTIONS = {
    "sd15": Injection(OUTPUT_BLOCK_PATCH, ("output", 0), "middle-block output: h at the start of output block 0"),
    "sd15_training": Injection(INPUT_BLOCK_PATCH_AFTER_SKIP, ("input", 3), _AFTER_INPUT_3),
    "sdxl": Injection(INPUT_BLOCK_PATCH_AFTER_SKIP, ("input", 0), "after input block 0 (conv_in), after the skip was saved"),
    "svd_v1": Injection(INPUT_BLOCK_PATCH_AFTER_SKIP, ("input", 11),
                        "after input block 11 (all down blocks), before the middle block, after the skip was saved"),
    "svd_v2": Injection(INPUT_BLOCK_PATCH_AFTER_SKIP, ("input", 3), _AFTER_INPUT_3),
    "sd3": Injection(DIT_DOUBLE_BLOCK_0, ("double_block", 0), "image tokens after patch + positional embedding (input of joint block 0)"),
}


def injection_options(variant, inject, transformer_options=None):
    """``transformer_options`` for a denoiser call of one's own (training, measurements): the UNet
    hook at ``variant``'s injection point (INJECTIONS) calls ``inject(h)`` -> the new h there and
    nowhere else. Chains onto the patches already in ``transformer_options`` (not changed).
    UNet variants only (the MMDiT variant's injection replaces a joint block)."""
    injection = INJECTIONS[variant]
    if injection.hook not in UNET_PATCHES:
        raise ValueError(f"ControlNeXt {variant}: its injection replaces a transformer block; no UNet call of one's own")
    patch = UNET_PATCHES[injection.hook](lambda h, to: inject(h) if to.get("block") == injection.block else h)
    options = dict(transformer_options or {})
    patches = dict(options.get("patches", {}))
    patches[injection.hook] = list(patches.get(injection.hook, [])) + [patch]
    options["patches"] = patches
    return options


def cross_norm_term(variant, feature, scale):
    """h -> the term ControlNeXt adds to h at its injection point: ``feature`` cross-normalized to
    h's statistics, times ``scale`` (a number or one per row), as the variant runs."""
    v = cnx.get_variant(variant)
    return lambda h: cross_normalize(h, feature, v.eps, v.order, scale)


class ControlNeXtRunner(ControlRunner):
    """One applied ControlNeXt: module, hint, strength, step range, mask, further strengths."""

    STASH = STASH
    NODE = "Apply ControlNeXt (XCtrl)"
    PER_PROMPT_NODE = "Apply ControlNeXt to Conditioning (XCtrl)"

    def __init__(self, module_patcher, variant, hint, strength, start_percent, end_percent, mask=None,
                 reference_pose_per_window=True, strengths=None):
        super().__init__(module_patcher, hint, strength, start_percent, end_percent, mask, strengths)
        self.variant = cnx.get_variant(variant)
        self.injection = INJECTIONS[self.variant.name]
        # ControlNeXt-SVD v2's long-video loop gives window position 0 the reference pose (frame 0).
        self.reference_first = bool(reference_pose_per_window) and self.variant.name == "svd_v2"
        self.pose_sequence = self.variant.name.startswith("svd")  # an image model's hints hold no reference pose
        self.learned_scale = module_patcher.model.learned_scale()

    @property
    def module_patcher(self):
        return self.patcher

    def hooks(self):
        hook = self.injection.hook
        if hook in UNET_PATCHES:
            return [(call_patches.PATCH, hook, UNET_PATCHES[hook](self.inject, self.models))]
        # MMDiT: joint block 0, around any replacement of it the call carries
        return [(call_patches.REPLACE, ("dit", ("double_block", 0)), lambda previous: JointBlockInjection(self, previous))]

    def install(self, model):
        super().install(model)
        if self.injection.hook == DIT_DOUBLE_BLOCK_0:  # the module loads with the MODEL though no block patch carries it
            model.set_model_patch(ModuleCarrier(self), MODULES_PATCH)

    def check_model(self, model_options, model_patcher):
        super().check_model(model_options, model_patcher)
        self.check_long_video(model_options)

    def check_sampling(self, latent_shape, model_options, is_windowed=None):
        self.check_long_video(model_options)  # again, for a MODEL windowed after the Apply node
        super().check_sampling(latent_shape, model_options, is_windowed)

    def check_long_video(self, model_options):
        if (model_options or {}).get("transformer_options", {}).get(batch_rows.LONG_VIDEO) and self.variant.name != "svd_v2":
            raise ValueError(
                f"{self.NODE}: XCtrl Long Video runs the authors' ControlNeXt-SVD v2 window loop, but this module is "
                f"ControlNeXt {self.variant.title}: use the SVD v2 control module (or remove the Long Video node)."
            )

    # ------------------------------------------------------------------ per model call
    def prepare_call(self, base_model, x, t, transformer_options, device=None):
        """Computes this call's features (with the lane of ``device`` or of the call's device) and
        stashes them for the injection patch."""
        entry = self._entry(base_model, x, t, transformer_options, self.lane(transformer_options, device))
        self.stash(transformer_options, entry)
        embedder = getattr(base_model.diffusion_model, "x_embedder", None)
        if embedder is not None:  # MMDiT: the patch grid of the image tokens
            transformer_options[PATCH_SIZE_KEY] = embedder.patch_size[0]

    def _entry(self, base_model, x, sigma, transformer_options, lane):
        """(features per row, scale per row, mask per row, latent size) for this call, or None when inactive."""
        if self.strength == 0.0 or not self.active(base_model.model_sampling, sigma):
            return None
        rows = x.shape[0]
        layout = batch_rows.BatchLayout(rows, transformer_options)
        scale = cnx.injection_scales(self.variant, self.strength, layout.uncond, self.learned_scale)
        more = self.row_scale(layout, sigma, base_model.model_sampling, transformer_options)
        if more is not None:
            scale = scale * more
        if not bool((scale != 0).any()):
            return None  # e.g. a call with only SVD v2's uncond rows: nothing to add, nothing to compute
        hint_idx = layout.items(self.hint.shape[0], reference_first=self.reference_first)
        mask = self.row_mask(layout, x.device)  # masks follow the latent
        sigma_rows = sigma.reshape(-1).expand(rows) if sigma.numel() == 1 else sigma.reshape(-1)
        steps = cnx.control_timesteps(self.variant, sigma_rows, base_model.model_sampling.timestep(sigma_rows).float())
        lane.frames.capacity = layout.per_chunk if layout.window is not None else None
        feats = self._features_for(lane, hint_idx, steps, image_size(base_model, x), x.device)
        return feats, scale.to(x.device), mask, tuple(x.shape[-2:])

    def _features_for(self, lane, hint_idx, steps, size, device):
        """The control feature of each row; the lane's module runs once on the (hint, timestep)
        pairs this call needs that the step has not computed yet on this lane (cond and uncond
        rows share them, and so do the overlapping frames of consecutive windows)."""
        module = lane.module
        dtype = next(module.parameters()).dtype
        keys = [(int(i), float(s)) for i, s in zip(hint_idx.tolist(), steps.tolist())]
        # (hint index, timestep) -> (1, C, h, w) feature: this call's only
        lane.step = features = {k: v for k, v in lane.step.items() if k in set(keys)}
        todo = sorted({k for k in keys if k not in features})
        if todo:
            frames = [i for i, _ in todo]
            stem = lane.frames.get(frames, (tuple(size), str(device), dtype),
                                   lambda idx: module.stem(batch_rows.fit(self.hint[idx], size, self.fit_mode).to(device=device, dtype=dtype)))
            ts = torch.tensor([s for _, s in todo], device=device, dtype=torch.float32)
            out = module.forward_from_stem(stem, ts)
            for n, k in enumerate(todo):
                features[k] = out[n:n + 1]
        return torch.cat([features[k] for k in keys], dim=0)

    # ------------------------------------------------------------------ at the injection point
    def inject(self, h, transformer_options):
        entry = transformer_options.get(STASH, {}).get(self.uid)
        if entry is None or transformer_options.get("block") != self.injection.block:
            return h
        feats, scale, mask, _ = entry
        if feats.shape[0] != h.shape[0]:
            raise RuntimeError(f"ControlNeXt: {feats.shape[0]} control rows for a batch of {h.shape[0]}")
        term = cross_normalize(h, feats, self.variant.eps, self.variant.order, scale)
        if mask is not None:
            term = term * batch_rows.resize(mask, tuple(h.shape[-2:])).to(term.dtype)
        return h + term

    def inject_tokens(self, img, transformer_options, patch_size):
        """MMDiT: ``img`` (B, N, hidden) are the patch-embedded image tokens."""
        entry = transformer_options.get(STASH, {}).get(self.uid)
        if entry is None:
            return img
        feats, scale, mask, latent_hw = entry
        grid = (-(-latent_hw[0] // patch_size), -(-latent_hw[1] // patch_size))
        if grid[0] * grid[1] != img.shape[1]:
            raise RuntimeError(f"ControlNeXt: {img.shape[1]} image tokens do not form the {grid} patch grid")
        term = cross_normalize_tokens(img, control_to_tokens(feats, grid), self.variant.eps, scale)
        if mask is not None:
            term = term * control_to_tokens(mask, grid).to(term.dtype)
        return img + term


class InputBlockInjection:
    """UNet patch after an input block's skip: h -> inject(h, transformer_options). ``models`` gives
    the control modules, which ComfyUI loads with the UNet (see control_runner)."""

    def __init__(self, inject, models=list):
        self.inject, self.models = inject, models

    def __deepcopy__(self, memo):
        return self

    def __call__(self, h, transformer_options):
        return self.inject(h, transformer_options)


class OutputBlockInjection(InputBlockInjection):
    """UNet patch at an output block's start: (h, skip) -> (inject(h, transformer_options), skip)."""

    def __call__(self, h, hsp, transformer_options):
        return self.inject(h, transformer_options), hsp


# The UNet hooks ControlNeXt injects at, each with the patch that calls an inject(h, transformer_options)
UNET_PATCHES = {INPUT_BLOCK_PATCH_AFTER_SKIP: InputBlockInjection, OUTPUT_BLOCK_PATCH: OutputBlockInjection}


class ModuleCarrier(InputBlockInjection):
    """Never called: it carries the control module in the MODEL's patches, which ComfyUI loads
    with the UNet, where the injection itself is added per call (joint block 0 of SD3)."""

    def __init__(self, runner):
        super().__init__(None, runner.models)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("ControlNeXt: the module carrier is not a patch to call")


class JointBlockInjection:
    """Replacement of MMDiT joint block 0: adds the control to its image-token input, then
    runs the previous replacement (if another patch had one) or the original block."""

    def __init__(self, runner, previous=None):
        self.runner, self.previous = runner, previous

    def __deepcopy__(self, memo):
        return self

    def models(self):
        return self.runner.models()

    def __call__(self, args, extra):
        to = args["transformer_options"]
        patch_size = to.get(PATCH_SIZE_KEY, 2)
        args = dict(args, img=self.runner.inject_tokens(args["img"], to, patch_size))
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)


def module_patcher(state_dict, variant, model):
    """Builds the control module with ComfyUI's casting ops in the MODEL's compute dtype and wraps
    it for model management on the MODEL's devices."""
    module = cnx.build_controlnext(state_dict, variant, ops=comfy.ops.manual_cast, dtype=compute_dtype(model))
    return control_patcher(module, model)

"""What the ControlNeXt and ControlNet-XS runners share: one applied control on a MODEL.

A runner lives in the MODEL's options (wrappers, patches), which ``ModelPatcher.clone()``
deep-copies: runners are shared between clones, never copied. Each has its own id (its key
for wrappers, callbacks and the per-call stash), the control network's ModelPatcher (loaded
and offloaded with the UNet, on the UNet's own devices), the hint batch, an optional mask
batch, a strength, a step range and the further multipliers (step schedule, latent strengths,
uncond multiplier: models/control_schedule.py), and checks hints, masks and strength lists
against the latent batch before the first step.

The control network is loaded with the UNet through the ``models()`` of the runner's patch
objects (ComfyUI loads a MODEL's patch models with it), not as an "additional model": a
MODEL's clone clones its additional models, and every discarded clone of the control's
ModelPatcher would stay in ComfyUI's list of loaded models as a leak (the module outliving
that patcher). Patch objects are shared between clones, so the one patcher is.

Devices (core's MultiGPU work units, docs/comfyui_hooks.md "MultiGPU"): the control network and
its per-run caches form a :class:`Lane`. The runner's own lane is on the MODEL's device; for
every other device core runs the MODEL on, the runner keeps a lane with its own copy of the
network there (made when core matches its per-device MODEL clones, or when core deep-clones a
conditioning's control), and each model call uses the lane of the device it runs on. Calls on
two devices run at once in core's threads, so nothing they change is shared between lanes; the
step cursor of the schedule, shared by all, is locked.
"""
import copy
import threading
import uuid

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension as pe

from ..models.control_schedule import ScheduleError, Strengths
from . import batch_rows, call_patches
from .model_family import model_family

MASK_ASPECT_TOLERANCE = 0.02  # relative: masks are resized to each resolution, not cropped
MULTIGPU_DEVICE = "multigpu_thread_device"  # transformer_options: the device core's MultiGPU runs the call on


class ControlRunner:
    STASH = "xctrl"  # transformer_options key of the per-call state (per subclass)
    NODE = "XCtrl"  # the node users apply it with, for error messages
    PER_PROMPT_NODE = "XCtrl"  # the conditioning node of the same control, which tilers crop per tile
    pose_sequence = False  # the hints are an SVD pose sequence (frame 0: the reference image's pose)

    def __init__(self, patcher, hint, strength, start_percent, end_percent, mask=None, strengths=None):
        self.uid = f"{self.STASH}_{uuid.uuid4().hex[:12]}"
        self.patcher = patcher
        self.hint = hint  # (B, 3, H, W) float32 on the CPU, RGB in [0, 1]
        self.mask = mask  # (B, 1, H, W) float32 on the CPU, or None
        self.strength = float(strength)
        self.fit_mode = "crop"  # batch_rows.fit: a hint of another shape than the image (the Apply node's resize_mode)
        self.percent_range = (float(start_percent), float(end_percent))
        self.strengths = strengths if strengths is not None else Strengths()
        self._cursor = self.strengths.schedule.cursor() if self.strengths.schedule is not None else None
        self._view = None  # tiler_view(), built when a tiler first asks
        self._cursor_lock = threading.Lock()
        self._main = Lane(patcher)
        self._lanes = {}  # other devices (core's MultiGPU): device -> Lane
        self._sampling_on = set()  # the other devices of the MODEL being sampled (matched this run)

    def __deepcopy__(self, memo):
        return self

    def new_caches(self):
        """Fresh lanes (the same control networks, empty per-run caches) for a copy of this runner
        on other hints: a tile's features are not the whole image's."""
        self._main = Lane(self._main.patcher)
        self._lanes = {device: Lane(lane.patcher) for device, lane in self._lanes.items()}
        self._sampling_on = set()

    def tiler_view(self):
        """The hint as tilers crop it (``cond_hint_original``, (B, C, H, W)): with a mask, the mask
        is one more channel, so the tiler crops both alike (docs/comfyui_hooks.md, "Tiled upscaling")."""
        if self._view is None:
            self._view = batch_rows.stack_channels([self.hint] + ([self.mask] if self.mask is not None else []))
        return self._view

    def for_tile(self, view):
        """This runner on a tiler's crop of ``tiler_view()``: the same module, strengths and step
        range, its own id and caches (a tile's features are not the whole image's)."""
        tile = copy.copy(self)
        tile.uid = f"{self.STASH}_{uuid.uuid4().hex[:12]}"
        channels = [self.hint.shape[1]] + ([self.mask.shape[1]] if self.mask is not None else [])
        parts = batch_rows.split_channels(view.float(), channels)
        tile.hint, tile.mask = parts[0], (parts[1] if self.mask is not None else None)
        tile._view = view
        tile.new_caches()
        return tile

    def hooks(self):
        """The runner's patches, wrappers and block replacements (call_patches' declarations),
        declared once for the MODEL and for per-prompt calls."""
        return []

    def install(self, model):
        """MODEL-level control on a cloned MODEL: the checks the MODEL allows now (the Apply node
        runs), the checks before sampling, clean-up, lanes under MultiGPU, the APPLY_MODEL wrapper
        that prepares each call, and the runner's hooks."""
        self.check_model(model.model_options, model)
        model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, self.uid, self.outer_sample_wrapper)
        model.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, self.uid, self.release)
        matched = getattr(pe.CallbacksMP, "ON_MATCH_MULTIGPU_CLONES", None)
        if matched is not None:  # ComfyUI with MultiGPU work units: a lane per device clone of the MODEL
            model.add_callback_with_key(matched, self.uid, self.on_multigpu_clone)
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, self.uid, self.apply_model_wrapper)
        call_patches.on_model(model, self.uid, self.hooks(), self.has_entry)

    def attach_to_call(self, base_model, x, t, transformer_options, device=None):
        """Conditioning-level control: this call prepared, and the runner's hooks added to this
        call's transformer_options only (the MODEL carries nothing)."""
        self.prepare_call(base_model, x, t, transformer_options, device)
        call_patches.on_call(transformer_options, self.uid, self.hooks())

    def has_entry(self, transformer_options):
        """Whether this call was prepared with work for the runner (its stash entry)."""
        return transformer_options.get(self.STASH, {}).get(self.uid) is not None

    def stash(self, transformer_options, entry):
        """This call's state for this runner, under STASH keyed by its uid (a new dict: the
        options of other calls keep theirs)."""
        transformer_options[self.STASH] = dict(transformer_options.get(self.STASH, {}), **{self.uid: entry})

    def apply_model_wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                            **kwargs):
        """MODEL-level control: this call's work is prepared (``prepare_call``) before the model runs."""
        if transformer_options is None:
            transformer_options = {}
        self.prepare_call(executor.class_obj, x, t, transformer_options)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def models(self):
        """The control network of every lane this run uses, for the ``models()`` of the runner's
        patch objects (each ModelPatcher loads on its own device)."""
        return [self._main.patcher] + [lane.patcher for d, lane in self._lanes.items() if d in self._sampling_on]

    def release(self, *args):
        """Drops per-run state when sampling ends."""
        if self._cursor is not None:
            self._cursor.reset()
        for lane in [self._main, *self._lanes.values()]:
            lane.clear()
        self._sampling_on.clear()

    # ------------------------------------------------------------------ devices
    def on_multigpu_clone(self, model, device_clone):
        """Core built (or, before loading the models of a run, re-matched) the MODEL's clone for
        another device."""
        self.add_device(device_clone.load_device)
        self._sampling_on.add(device_clone.load_device)

    def add_device(self, device):
        """The lane of ``device``, made once: its own copy of the control network there."""
        if device != self._main.patcher.load_device and device not in self._lanes:
            self._lanes[device] = Lane(device_patcher(self._main.patcher, device))
        return self.lane(device=device)

    def lane(self, transformer_options=None, device=None):
        """The lane of ``device``, or of the device core's MultiGPU runs this call on (named in
        the call's transformer_options); the runner's own lane otherwise."""
        if device is None:
            device = (transformer_options or {}).get(MULTIGPU_DEVICE)
        if device is None or device == self._main.patcher.load_device:
            return self._main
        lane = self._lanes.get(device)
        if lane is None:
            raise RuntimeError(f"{self.NODE}: this model call runs on {device}, where the control network has no "
                               "copy: ComfyUI's MultiGPU did not report its model clone for that device (remove "
                               "'MultiGPU CFG Split' to sample on one device, and report this with your workflow).")
        return lane

    def outer_sample_wrapper(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        """Before anything is loaded or sampled: the checks that need the latent batch."""
        options = executor.class_obj.model_options
        self.check_sampling(noise.shape, options)
        check_not_a_tile(self.hint.shape[-2:], image_size(executor.class_obj.model_patcher.model, noise),
                         self.NODE, self.PER_PROMPT_NODE)
        check_core_context_windows(options, noise.shape[0], sigmas, self.NODE)
        check_video_anchor_frames(options, executor.class_obj.model_patcher, self.NODE)
        return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)

    def check_model(self, model_options, model_patcher):
        """What the MODEL given to the Apply node already tells (a windowing node before it): checked
        when the node runs, so ComfyUI marks the Apply node, not the sampler. The same checks run
        again before sampling for a MODEL windowed after it."""
        check_video_anchor_frames(model_options, model_patcher, self.NODE)

    def check_sampling(self, latent_shape, model_options, is_windowed=None):
        """The checks only the latent batch allows (the latent is no input of the Apply node): they
        run before anything loads, and name this node and the input to change."""
        latents = latent_shape[0]
        is_windowed = windowed(model_options) if is_windowed is None else is_windowed
        try:
            batch_rows.check_batch(self.hint.shape[0], latents, windowed=is_windowed, reference=self.pose_sequence,
                                   input_name="image")
            if self.mask is not None:
                batch_rows.check_batch(self.mask.shape[0], latents, "mask", windowed=is_windowed, input_name="mask")
        except batch_rows.HintBatchError as e:
            raise batch_rows.HintBatchError(f"{self.NODE}: {e}") from None
        if self.mask is not None:
            check_mask_aspect(self.mask.shape[-2:], latent_shape[-2:], self.NODE)
        if self.strengths.latents is not None:
            self.strengths.latents.check(latents, self.NODE)

    def row_scale(self, layout, sigma, model_sampling, transformer_options):
        """This call's multiplier of each row (float32 (rows,)): step schedule x latent strengths x
        uncond multiplier; None when every one is 1 (then nothing is multiplied)."""
        s = self.strengths
        latents = s.latents
        scale = None
        if self._cursor is not None:
            sigmas = (transformer_options or {}).get("sample_sigmas")
            max_sigma = float(sigmas.max()) if isinstance(sigmas, torch.Tensor) and sigmas.numel() else float("inf")
            with self._cursor_lock:  # two devices' calls of one step may ask at once
                step, step_latents = self._cursor.at(float(sigma.reshape(-1)[0]), model_sampling.percent_to_sigma, max_sigma)
            if step != 1.0:
                scale = torch.full((layout.rows,), float(step))
            if step_latents is not None:
                scale = _times(scale, step_latents.for_latents(layout.frames(), layout.latent_count()))
        if latents is not None:
            scale = _times(scale, latents.for_latents(layout.frames(), layout.latent_count()))
        if s.uncond_multiplier != 1.0 and any(layout.uncond):
            uncond = torch.tensor(layout.uncond)
            scale = _times(scale, torch.where(uncond, torch.tensor(s.uncond_multiplier), torch.tensor(1.0)))
        return scale

    def row_mask(self, layout, device):
        """The mask of each row (rows, 1, H, W) on ``device``, or None without a mask."""
        if self.mask is None:
            return None
        return self.mask[layout.items(self.mask.shape[0], "mask")].to(device)

    def active(self, model_sampling, sigma):
        """Whether sigma lies in the [start_percent, end_percent] range of sampling."""
        start, end = self.percent_range
        s = float(sigma.reshape(-1)[0])
        return model_sampling.percent_to_sigma(end) <= s <= model_sampling.percent_to_sigma(start)


def _times(scale, factor):
    return factor.float() if scale is None else scale * factor.float()


def check_mask_aspect(mask_hw, latent_hw, node, input_name="mask"):
    """Masks are resized to every resolution they act at: one of another aspect ratio would be
    distorted, so it is refused before sampling."""
    mh, mw = (int(v) for v in mask_hw)
    lh, lw = (int(v) for v in latent_hw)
    if abs((mw / mh) / (lw / lh) - 1.0) > MASK_ASPECT_TOLERANCE:
        raise ScheduleError(f"{node}: the mask is {mw}x{mh} (aspect {mw / mh:.3f}) but the latent is {lw}x{lh} "
                            f"(aspect {lw / lh:.3f}): give the {input_name} input a mask of the image's aspect ratio "
                            "(e.g. from the same image, or resized to the generated size)")


TILE_FACTOR = 1.5


def check_not_a_tile(hint_hw, image_hw, node, per_prompt_node):
    """A MODEL-level control cannot follow a tiled upscaler's tiles (the tiler crops conditioning,
    not MODELs). What it can see of a tile is a sampled image smaller than its hint in both sides
    and of another shape: it stops there rather than squeeze the whole image's hint into the tile
    (docs/comfyui_hooks.md, "Tiled upscaling"). One latent pixel of rounding is allowed."""
    hh, hw = (int(v) for v in hint_hw)
    ih, iw = (int(v) for v in image_hw)
    tolerance = max(MASK_ASPECT_TOLERANCE, 8.0 / min(ih, iw))
    # A hint only somewhat larger and of another shape is ordinary use (a 1024 square pose map for a
    # 512x768 image): only a clearly smaller part (by TILE_FACTOR on both sides) counts as a tile.
    if hh >= TILE_FACTOR * ih and hw >= TILE_FACTOR * iw and abs((hw / hh) / (iw / ih) - 1.0) > tolerance:
        raise ValueError(
            f"{node}: the condition image is {hw}x{hh} but the image being sampled is {iw}x{ih}, a smaller part of "
            f"another shape, as a tiled upscaler samples its tiles. A control on the MODEL would give every tile the whole "
            f"image's condition image: use '{per_prompt_node}' (tilers crop its condition image to each tile). Outside "
            f"tiling, crop the condition image to the generated image's aspect ratio.")


def windowed(model_options):
    """Whether sampling runs the video in context windows (XCtrl Long Video or ComfyUI's)."""
    to = (model_options or {}).get("transformer_options", {})
    return bool(to.get(batch_rows.LONG_VIDEO)) or (model_options or {}).get("context_handler") is not None


def check_core_context_windows(model_options, latents, sigmas, node):
    """ComfyUI 0.3.64's context-window handler fails on the first step for any latent batch > 1
    (it compares the sigma schedule with the per-row timestep, fixed in later versions): say so
    before sampling instead of letting it crash inside KSampler."""
    handler = (model_options or {}).get("context_handler")
    set_step = getattr(handler, "set_step", None)
    if set_step is None or latents < 2 or not isinstance(sigmas, torch.Tensor) or sigmas.numel() < 2:
        return
    try:
        set_step(sigmas[:1].expand(latents * 2), {"transformer_options": {"sample_sigmas": sigmas}})
    except Exception:  # noqa: BLE001 - any failure of the probe is the crash sampling would hit
        raise RuntimeError(
            f"{node}: ComfyUI's Context Windows cannot run a batch of {latents} latents on this ComfyUI version (its "
            "window handler fails on the first step; fixed in ComfyUI 0.8). For ControlNeXt-SVD long videos use "
            "'ControlNeXt-SVD Long Video (XCtrl)' instead, or update ComfyUI."
        ) from None


def check_video_anchor_frames(model_options, model_patcher, node):
    """Newer ComfyUI context windows can run one frame before each window with it (the
    "causal_window_fix" option, on by default) but still tell an SVD model the window's own
    length, which breaks SVD's temporal layers inside KSampler: say so before sampling."""
    handler = (model_options or {}).get("context_handler")
    if getattr(handler, "causal_window_fix", False) and model_family(model_patcher) == "svd":
        raise RuntimeError(
            f"{node}: ComfyUI's Context Windows with causal_window_fix on cannot run an SVD video (each window gets "
            "one extra frame that SVD's temporal layers are not told about). Set causal_window_fix to false in the "
            "Context Windows node, or use 'ControlNeXt-SVD Long Video (XCtrl)', which runs the authors' windows."
        )


def control_patcher(module, model):
    """Wraps a control network for model management on the MODEL's own load/offload devices, so
    that a UNet placed on another GPU (e.g. by a multi-GPU pack) takes its control along."""
    return comfy.model_patcher.ModelPatcher(module, load_device=model.load_device, offload_device=model.offload_device)


def device_patcher(patcher, device):
    """A copy of a control network managed on another ``device``, made as core copies a stock
    ControlNet for MultiGPU: unloaded first, so the copy starts on the offload device and its
    model-management bookkeeping is that of an unloaded module."""
    comfy.model_management.unload_model_and_clones(patcher, unload_additional_models=False)
    return comfy.model_patcher.ModelPatcher(copy.deepcopy(patcher.model), load_device=device,
                                            offload_device=patcher.offload_device)


class Lane:
    """One device's control network and per-run caches: ``frames`` (per-frame results of the
    hints, e.g. ControlNeXt's stem, ControlNet-XS's hint embedding) and ``step`` (results of
    the current step, e.g. ControlNeXt's features)."""

    def __init__(self, patcher):
        self.patcher = patcher
        self.frames = FrameCache()
        self.step = {}

    @property
    def module(self):
        return self.patcher.model

    def clear(self):
        self.frames.clear()
        self.step = {}


class FrameCache:
    """Per-frame results of a timestep-independent function of the hints, kept for a run.

    ``get(indices, key, compute)`` returns ``compute(missing frame indices)`` stacked with the
    cached frames in ``indices`` order; results are tuples of tensors with the frames first.
    ``capacity`` bounds the frames kept (None: all); frames beyond it are computed when needed.
    ``key`` (image size, device, dtype) changes empty the cache.
    """

    def __init__(self, capacity=None):
        self.capacity = capacity
        self.clear()

    def clear(self):
        self._key, self._frames = None, {}

    def get(self, indices, key, compute):
        if key != self._key:
            self._key, self._frames = key, {}
        wanted = list(dict.fromkeys(int(i) for i in indices))
        missing = [i for i in wanted if i not in self._frames]
        fresh = {}
        if missing:
            out = compute(torch.tensor(missing))
            for n, i in enumerate(missing):
                fresh[i] = tuple(part[n:n + 1] for part in out)
                if self.capacity is None or len(self._frames) < self.capacity:
                    self._frames[i] = fresh[i]
        parts = [self._frames.get(i) or fresh[i] for i in (int(j) for j in indices)]
        return tuple(torch.cat(p, dim=0) for p in zip(*parts))


def latent_scale(base_model):
    """Pixels per latent pixel of the model's VAE (8 for SD1.x/2.x, SDXL, SVD and SD3)."""
    return int(getattr(base_model.latent_format, "spacial_downscale_ratio", 8))


def image_size(base_model, x):
    """The image size (H, W) a latent batch ``x`` decodes to."""
    s = latent_scale(base_model)
    return (x.shape[-2] * s, x.shape[-1] * s)


"""ControlNeXt-SVD long videos: every model call runs the video in the authors' windows (glue).

An APPLY_MODEL wrapper, placed outermost (so every other wrapper and patch, ControlNeXt's
included, sees one window at a time), splits each model call of an SVD MODEL into windows of
the video (models/video_windows.py): for each window it slices the batch rows of every chunk
(cond, uncond), the concat latent (image conditioning), the other per-row inputs and any stock
ControlNet residuals, calls the model with ``num_video_frames`` = the window length, and fuses
the denoised windows with the reference's rule. ControlNeXt reads the window from
``transformer_options[batch_rows.WINDOW]`` to give each row its pose (window position 0: the
reference pose, frame 0). Each model call moves the node's progress bar once per window (the
sampler's bar moves once per step, which can take minutes here).

Fusing denoised predictions is exact for the reference loop: an Euler step is affine in the
prediction with coefficients that depend only on sigma, every window steps from the same
sigma, and constant CFG is linear (docs/long_video.md). A per-window-position CFG ramp is
not linear in the fused predictions: the wrapper then also keeps the ramp-weighted averages of
the cond and uncond predictions and a sampler CFG function rebuilds the reference's result.
"""
import threading
import uuid

import torch
from einops import rearrange

import comfy.model_management as mm
import comfy.patcher_extension as pe
import comfy.utils

from ..models import video_windows as vw
from . import batch_rows
from .control_inputs import require_finite
from .model_family import family_title, model_family

NODE = "ControlNeXt-SVD Long Video (XCtrl)"



def sampler_step(sigma, transformer_options):
    """(this model call's sampler step, the number of steps) from the sigmas the sampler runs; (0, 1)
    when the call does not carry them."""
    sigmas = transformer_options.get("sample_sigmas")
    if not isinstance(sigmas, torch.Tensor) or sigmas.numel() < 2:
        return 0, 1
    steps = sigmas.numel() - 1
    s = float(sigma.reshape(-1)[0])
    return min(int((sigmas.float() > s * (1 + 1e-5)).sum()), steps - 1), steps


class LongVideoError(ValueError):
    pass


class LongVideoWindows:
    """The window settings of one node application; installed on a cloned SVD MODEL."""

    def __init__(self, frames_per_window, overlap, min_cfg=None):
        try:
            vw.check_window_settings(frames_per_window, overlap)
        except vw.WindowError as e:
            raise LongVideoError(f"{NODE}: {e}.") from None
        self.uid = f"xctrl_long_video_{uuid.uuid4().hex[:12]}"
        self.frames_per_window = int(frames_per_window)
        self.overlap = int(overlap)
        self.min_cfg = None if min_cfg is None else float(min_cfg)  # None: constant CFG
        self._ramp_step = None  # {"sigma": float, "cond"/"uncond": ramp-weighted prediction}
        self._ramp_lock = threading.Lock()  # under core's MultiGPU, cond and uncond calls keep theirs at once

    def __deepcopy__(self, memo):
        return self

    def install(self, model):
        if model.model_options.get("sampler_cfg_function") is not None and self.min_cfg is not None:
            raise LongVideoError(
                f"{NODE}: this MODEL already has a CFG function (e.g. Video Linear CFG Guidance). The per-window CFG "
                "ramp replaces it: remove that node, or set cfg_ramp to constant to keep it."
            )
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, self.uid, self.apply_model_wrapper)
        _make_outermost(model, pe.WrappersMP.APPLY_MODEL, self.uid)
        model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, self.uid, self.outer_sample_wrapper)
        model.add_wrapper_with_key(pe.WrappersMP.PREPARE_SAMPLING, self.uid, self.prepare_sampling_wrapper)
        model.model_options.setdefault("transformer_options", {})[batch_rows.LONG_VIDEO] = (self.frames_per_window, self.overlap)
        if self.min_cfg is not None:
            model.set_model_sampler_cfg_function(self.cfg_function, disable_cfg1_optimization=True)

    # ------------------------------------------------------------------ before sampling
    def outer_sample_wrapper(self, executor, noise, *args, **kwargs):
        options = executor.class_obj.model_options
        if options.get("context_handler") is not None:
            raise LongVideoError(
                f"{NODE} and ComfyUI's Context Windows both split the video into windows: use one of them "
                "(XCtrl Long Video reproduces the ControlNeXt-SVD v2 authors' loop)."
            )
        self._ramp_step = None
        return executor(noise, *args, **kwargs)

    def prepare_sampling_wrapper(self, executor, model, noise_shape, *args, **kwargs):
        """ComfyUI sizes the memory it keeps free for one model call from the latent batch:
        with windows a call holds one window's frames."""
        shape = list(noise_shape)
        shape[0] = min(shape[0], self.frames_per_window)
        return executor(model, torch.Size(shape), *args, **kwargs)

    # ------------------------------------------------------------------ every model call
    def apply_model_wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        to = transformer_options if transformer_options is not None else {}
        n = int(kwargs.get("num_video_frames") or x.shape[0])
        rows = x.shape[0]
        kinds = list(to.get("cond_or_uncond") or [0])
        if rows != n * len(kinds):
            raise LongVideoError(f"{NODE}: a model call of {rows} rows is not {len(kinds)} chunk(s) of {n} video frames")
        length = vw.window_length(n, self.frames_per_window)
        if length == n and self.min_cfg is None:
            return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)  # one window: the plain call
        starts = vw.window_starts(n, self.frames_per_window, self.overlap)
        fusion = vw.WindowFusion(n, starts, length, ramp=self.min_cfg is not None)
        chunks = len(kinds)
        # A model call of a long video takes minutes on a CPU: the bar moves once per window, as a share of
        # the whole sampling (so it only ever moves forward between the sampler's own steps).
        step, steps = sampler_step(t, to)
        total = steps * len(starts)
        bar = comfy.utils.ProgressBar(total)
        for i, start in enumerate(starts):
            mm.throw_exception_if_processing_interrupted()
            frames = list(range(start, start + length))
            idx = torch.tensor([k * n + f for k in range(chunks) for f in frames], device=x.device)
            window_to = dict(to)
            window_to[batch_rows.WINDOW] = batch_rows.Window(frames, n)
            sub = {key: _rows(v, idx, rows) for key, v in kwargs.items()}
            sub["num_video_frames"] = length
            out = executor(x[idx], _rows(t, idx, rows), _rows(c_concat, idx, rows), _rows(c_crossattn, idx, rows),
                           _control_rows(control, idx, rows), window_to, **sub)
            fusion.add(start, _frames_first(out, chunks, length))
            bar.update_absolute(step * len(starts) + i + 1, total)
        fused = _chunks_first(fusion.result(), chunks)
        if self.min_cfg is not None:
            self._keep_ramp(t, kinds, _chunks_first(fusion.ramp_result(), chunks), n)
        return fused

    # ------------------------------------------------------------------ per-window CFG ramp
    def _keep_ramp(self, sigma, kinds, ramp_out, n):
        s = float(sigma.reshape(-1)[0])
        with self._ramp_lock:
            if self._ramp_step is None or self._ramp_step["sigma"] != s:
                self._ramp_step = {"sigma": s}
            for k, kind in enumerate(kinds):
                name = "uncond" if kind == 1 else "cond"
                if name in self._ramp_step:
                    raise LongVideoError(
                        f"{NODE}: the per-window CFG ramp needs exactly one positive and one negative conditioning "
                        "(this sampler gave several): combine the conditionings, or set cfg_ramp to constant."
                    )
                self._ramp_step[name] = ramp_out[k * n:(k + 1) * n]

    def cfg_function(self, args):
        cond, uncond, x = args["cond_denoised"], args["uncond_denoised"], args["input"]
        step = self._ramp_step or {}
        if "cond" not in step or "uncond" not in step or step["cond"].shape != cond.shape:
            raise LongVideoError(f"{NODE}: the per-window CFG ramp found no windowed predictions for this step")
        guided = vw.ramped_cfg(cond, uncond, step["cond"], step["uncond"], self.min_cfg, float(args["cond_scale"]))
        return x - guided


def _make_outermost(model, wrapper_type, key):
    """Moves this key's wrappers to the front of the wrapper order (the first one runs outermost)."""
    table = model.wrappers.get(wrapper_type, {})
    if key in table and next(iter(table)) != key:
        model.wrappers[wrapper_type] = {key: table[key], **{k: v for k, v in table.items() if k != key}}


def _rows(value, idx, rows):
    """The window's rows of a per-row tensor; anything else (e.g. SVD's image_only_indicator) as is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value.index_select(0, idx.to(value.device))
    return value


def _control_rows(control, idx, rows):
    """Stock ControlNet residuals ({"input"|"middle"|"output": [tensor or None]}) for the window's rows."""
    if not isinstance(control, dict):
        return control
    return {key: [_rows(v, idx, rows) for v in values] if isinstance(values, list) else values
            for key, values in control.items()}


def _frames_first(out, chunks, length):
    """Batch rows (chunk, frame) -> frames first, for the fusion over frames."""
    return rearrange(out, "(chunk frame) ... -> frame chunk ...", chunk=chunks, frame=length)


def _chunks_first(video, chunks):
    """Frames first -> batch rows (chunk, frame), as ComfyUI batches them."""
    return rearrange(video, "frame chunk ... -> (chunk frame) ...", chunk=chunks)


def check_window_inputs(frames_per_window, overlap):
    """True, or the message validate_inputs shows; linked inputs (None) are checked when the node runs."""
    if frames_per_window is None or overlap is None:
        return True
    try:
        vw.check_window_settings(frames_per_window, overlap)
    except vw.WindowError as e:
        return f"{e}. The authors' setting is frames_per_window 24, overlap 6."
    return True


def windowed_model(model, frames_per_window, overlap, cfg_ramp="constant", min_cfg=1.0):
    """ControlNeXt-SVD Long Video: a clone of an SVD MODEL that denoises in the authors' windows."""
    require_finite(NODE, min_cfg=min_cfg if cfg_ramp == "linear" else None)
    family = model_family(model)
    if family != "svd":
        raise LongVideoError(
            f"{NODE} windows Stable Video Diffusion models; this MODEL is {family_title(family)}. "
            "Connect an SVD model (e.g. the ControlNeXt-SVD v2 UNet)."
        )
    patched = model.clone()
    LongVideoWindows(frames_per_window, overlap, min_cfg if cfg_ramp == "linear" else None).install(patched)
    check_applied_controls(patched)
    return patched


def check_applied_controls(model):
    """Controls applied before this node that cannot run in its windows are named now (the other
    order is checked when the Apply node runs): each runner's APPLY_MODEL wrapper leads to it."""
    for wrappers in model.wrappers.get(pe.WrappersMP.APPLY_MODEL, {}).values():
        for wrapper in wrappers:
            check = getattr(getattr(wrapper, "__self__", None), "check_long_video", None)
            if check is not None:
                check(model.model_options)

"""Long videos in overlapping windows, as the ControlNeXt-SVD v2 authors' pipeline makes them.

At every sampling step the reference pipeline denoises a video of N frames in windows of L
frames (``frames_per_window``) overlapping by O frames (``overlap``), then fuses them. The
rules (docs/long_video.md):

- Window starts: ``range(0, N - O, L - O)``; a window that would run past the last frame is
  moved back to start at ``N - L``. L is clamped to N, so a short video is one window.
- Each window is denoised from the same sigma (every window is a full model call on its L
  frames).
- Fusion is a flat average, except that position 0 of every window that does not start at
  frame 0 is left out (that position carries the reference pose, not its own frame's pose).
- With a per-frame guidance ramp ``linspace(min, max, L)`` the CFG is applied per window
  position before fusing.

Everything here is plain torch on (frames, ...) tensors; the glue slices ComfyUI's batch rows.
"""
import torch


class WindowError(ValueError):
    pass


def check_window_settings(frames_per_window, overlap):
    """Raises WindowError for settings the reference loop cannot run."""
    if frames_per_window < 2:
        raise WindowError(f"frames_per_window must be at least 2, got {frames_per_window}")
    if overlap < 1:
        raise WindowError(
            f"overlap must be at least 1, got {overlap}: position 0 of every later window is replaced by the "
            "reference pose and left out of the fusion, so without overlap the first frame of every later window "
            "would be covered by no window"
        )
    if overlap >= frames_per_window:
        raise WindowError(f"overlap ({overlap}) must be smaller than frames_per_window ({frames_per_window})")


def window_starts(n_frames, frames_per_window, overlap):
    """First frame of each window, in the reference loop's order."""
    check_window_settings(frames_per_window, overlap)
    if n_frames < 1:
        raise WindowError(f"the video has no frames ({n_frames})")
    length = min(frames_per_window, n_frames)
    if length == n_frames:
        return [0]
    starts = []
    for start in range(0, n_frames - overlap, length - overlap):
        starts.append(n_frames - length if start + length > n_frames else start)
    return starts


def window_length(n_frames, frames_per_window):
    return min(frames_per_window, n_frames)


def kept_positions(start, length):
    """Positions of a window that take part in the fusion: all, or all but 0 for start > 0."""
    return torch.arange(0 if start == 0 else 1, length)


def fusion_counts(n_frames, starts, length):
    """How many windows contribute to each frame (float32, (N,))."""
    counts = torch.zeros(n_frames)
    for s in starts:
        counts[s + kept_positions(s, length)] += 1
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise WindowError(f"frames {missing[:8]} are covered by no window")
    return counts


def guidance_ramp(length):
    """The position weight r_p = p / (L - 1) of ``linspace(min, max, L) = min + (max - min) * r``."""
    if length == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.linspace(0.0, 1.0, length, dtype=torch.float64)


class WindowFusion:
    """Accumulates per-window outputs (L, ...) of one step into the video (N, ...).

    ``add(start, out)`` for every window, then ``result()`` for the flat average. With
    ``ramp=True`` a second average weighted by the guidance ramp r_p is kept: ``ramp_result()``
    (see docs/long_video.md for how CFG is rebuilt from the two).
    """

    def __init__(self, n_frames, starts, length, ramp=False):
        self.starts, self.length = list(starts), length
        self.counts = fusion_counts(n_frames, self.starts, length)
        self.ramp = guidance_ramp(length) if ramp else None
        self._sum = None
        self._ramp_sum = None

    def add(self, start, out):
        keep = kept_positions(start, self.length)
        frames = start + keep
        if self._sum is None:
            shape = (len(self.counts),) + tuple(out.shape[1:])
            self._sum = torch.zeros(shape, dtype=out.dtype, device=out.device)
            if self.ramp is not None:
                self._ramp_sum = torch.zeros_like(self._sum)
        keep_d = keep.to(out.device)
        self._sum.index_add_(0, frames.to(out.device), out.index_select(0, keep_d))
        if self.ramp is not None:
            w = self.ramp.to(out.device, out.dtype)[keep].reshape((-1,) + (1,) * (out.dim() - 1))
            self._ramp_sum.index_add_(0, frames.to(out.device), out.index_select(0, keep_d) * w)

    def _divide(self, total):
        c = self.counts.to(total.device, total.dtype).reshape((-1,) + (1,) * (total.dim() - 1))
        return total / c

    def result(self):
        return self._divide(self._sum)

    def ramp_result(self):
        return self._divide(self._ramp_sum)


def ramped_cfg(cond, uncond, cond_ramp, uncond_ramp, min_cfg, max_cfg):
    """The fused video's guided prediction when every window applies ``linspace(min, max, L)``.

    Per window position p the reference computes ``u + g_p (c - u)`` with
    ``g_p = min + (max - min) r_p`` and then averages the windows. That average is
    ``U + min (C - U) + (max - min) (R_c - R_u)``, where C, U are the flat averages of the cond
    and uncond predictions and R_c, R_u their averages weighted by r_p
    (:meth:`WindowFusion.ramp_result`). Exact for any batching of cond and uncond.
    """
    return uncond + min_cfg * (cond - uncond) + (max_cfg - min_cfg) * (cond_ramp - uncond_ramp)

"""Condition images (hints) and masks: layout, resizing, and which one each batch row gets.

ComfyUI batches cond and uncond (and several prompts) as chunks of one model call:
``transformer_options["cond_or_uncond"]`` lists one entry per chunk (0 = cond, 1 = uncond),
each chunk holding the latent batch, or the frames of one context window when the video runs
in windows. A hint batch of 1 serves every row; a hint batch equal to the latent batch (the
video's frames) gives hint i to latent i; anything else is an error naming both sizes
(docs/comfyui_hooks.md, "Batch rows").
"""
import math

import torch
import torch.nn.functional as F

# transformer_options keys set by XCtrl Long Video: on the MODEL, its (frames per window, overlap);
# in each windowed model call, that call's Window.
LONG_VIDEO = "xctrl_long_video"
WINDOW = "xctrl_window"


class HintBatchError(ValueError):
    pass


class Window:
    """The frames of the video one model call sees (a context window)."""

    def __init__(self, frames, full_length=None):
        self.frames = [int(f) for f in frames]
        self.full_length = full_length


def current_window(transformer_options):
    """The window of this call from XCtrl Long Video, ComfyUI's context windows
    (``context_window.index_list``) or AnimateDiff-Evolved (``ad_params.sub_idxs``), else None.

    Newer ComfyUI context windows may run one frame before the window with it (the "causal
    window fix": ``causal_anchor_index`` is prepended to the window's frames), so that frame is
    part of the call's rows.
    """
    to = transformer_options or {}
    if isinstance(to.get(WINDOW), Window):
        return to[WINDOW]
    core = to.get("context_window")
    if core is not None and getattr(core, "index_list", None) is not None:
        frames = list(core.index_list)
        anchor = getattr(core, "causal_anchor_index", None)
        if anchor is not None and anchor >= 0:
            frames = [anchor] + frames
        return Window(frames, getattr(core, "total_frames", None) or None)
    ad = to.get("ad_params")
    if isinstance(ad, dict) and ad.get("sub_idxs") is not None:
        return Window(ad["sub_idxs"], ad.get("full_length"))
    return None


def image_to_nchw(image):
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> (B, 3, H, W) float32. Grey is repeated, alpha dropped."""
    if image.dim() != 4 or image.shape[0] == 0:
        raise HintBatchError(f"the condition image must be a non-empty IMAGE batch (B, H, W, C), got shape {tuple(image.shape)}")
    c = image.shape[-1]
    x = image[..., :3] if c >= 3 else image[..., :1].expand(*image.shape[:-1], 3)
    return x.movedim(-1, 1).float().contiguous()


def resize(x, size):
    """Bilinear resize of (B, C, H, W) to ``size`` (H, W), antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


FIT_MODES = ("crop", "stretch", "pad")


def fit(x, size, mode="crop"):
    """(B, C, H, W) to ``size`` (H, W) when its aspect ratio differs: "crop" cuts the centre of the
    generated image's shape first (as ComfyUI's Apply ControlNet does), "pad" adds black borders
    around it, "stretch" resizes as it is. Then a plain resize."""
    h, w = x.shape[-2:]
    th, tw = size
    if mode != "stretch" and h * tw != w * th:
        if mode == "crop":
            # the crop arithmetic of ComfyUI's centre crop: the same rounding, so the same pixels
            if w / h > tw / th:
                cut = round((w - w * ((tw / th) / (w / h))) / 2)
                x = x[..., :, cut:w - cut]
            else:
                cut = round((h - h * ((w / h) / (tw / th))) / 2)
                x = x[..., cut:h - cut, :]
        else:
            ph, pw = (h, round(h * tw / th)) if w / h < tw / th else (round(w * th / tw), w)
            top, left = (ph - h) // 2, (pw - w) // 2
            x = F.pad(x, (left, pw - w - left, top, ph - h - top))
    return resize(x, size)


def check_batch(n_items, latents, what="condition image", windowed=False, reference=False, input_name=None):
    """Raises HintBatchError unless ``n_items`` images can serve a latent batch of ``latents``:
    1 (for all), exactly one per latent, or (without windows) a divisor of it (e.g. the frames of
    one video for a batch of several videos, which repeat, as ComfyUI's stock ControlNet does).
    The message names the input to change (``input_name``); ``reference``: the images are an SVD
    pose sequence, whose frame 0 is the reference image's pose (one short is most likely that)."""
    if n_items == 1 or n_items == latents or (not windowed and latents % n_items == 0):
        return
    missing_reference = " (one short: is the reference image's pose, frame 0, missing?)" \
        if reference and n_items == latents - 1 else ""
    where = f"to the {input_name} input " if input_name else ""
    raise HintBatchError(
        f"the {what} batch has {n_items} images but the latent batch has {latents}{missing_reference}: "
        f"give {where}1 {what} (used for every latent) or exactly {latents}, or sample a latent batch of {n_items}"
    )


class BatchLayout:
    """Per row of one model call: its chunk kind (cond/uncond) and the latent (video frame) it is.

    ``rows`` = chunks x frames per chunk. Under a context window the frames of a chunk are the
    window's frames of the video, else 0..per_chunk-1.
    """

    def __init__(self, rows, transformer_options):
        to = transformer_options or {}
        self.kinds = list(to.get("cond_or_uncond") or [0])
        if rows % len(self.kinds):
            raise HintBatchError(f"{rows} batch rows do not split into {len(self.kinds)} cond/uncond chunks")
        self.rows = rows
        self.per_chunk = rows // len(self.kinds)
        self.window = current_window(to)
        if self.window is not None and len(self.window.frames) != self.per_chunk:
            self.window = None  # not this call's layout (e.g. a nested model call)
        self.uncond = [self.kinds[r // self.per_chunk] == 1 for r in range(rows)]

    def frames(self, reference_first=False):
        """Latent (video frame) index of each row; with ``reference_first`` position 0 of a window
        that does not start at frame 0 is frame 0 (the reference pose, as ControlNeXt-SVD v2's loop)."""
        frames = self.window.frames if self.window is not None else list(range(self.per_chunk))
        if reference_first and self.window is not None:
            frames = [0] + frames[1:]
        return torch.tensor(frames * len(self.kinds), dtype=torch.long)

    def latent_count(self):
        """Size of the whole latent batch the rows belong to (the video length under windows)."""
        if self.window is None:
            return self.per_chunk
        return self.window.full_length or (max(self.window.frames) + 1)

    def items(self, n_items, what="condition image", reference_first=False):
        """Index into a batch of ``n_items`` hints (or masks) for each row (LongTensor); with
        ``reference_first`` the hints are an SVD v2 pose sequence (frame 0: the reference pose)."""
        if n_items == 1:
            return torch.zeros(self.rows, dtype=torch.long)
        windowed = self.window is not None
        latents = self.latent_count()
        if windowed and self.window.full_length is None:
            latents = max(latents, n_items)  # ComfyUI 0.3.64's windows do not say the video length
        check_batch(n_items, latents, what, windowed, reference=reference_first)
        return self.frames(reference_first) % n_items


def stack_channels(parts):
    """Several (B, C, H, W) condition images as one, for tilers that crop ``cond_hint_original``
    (docs/comfyui_hooks.md, "Tiled upscaling"): each resized to the first one's size, batches
    repeated to a common size (the row -> image rule stays the same: row r gets image r mod B),
    stacked along channels. A single part is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    batch = math.lcm(*(p.shape[0] for p in parts))
    out = []
    for p in parts:
        p = resize(p.to(device=first.device, dtype=first.dtype), first.shape[-2:])
        out.append(p.repeat(batch // p.shape[0], 1, 1, 1))
    return torch.cat(out, dim=1)


def split_channels(stacked, channels):
    """The parts of a (cropped) ``stack_channels`` result, ``channels`` per part."""
    if sum(channels) != stacked.shape[1]:
        raise HintBatchError(f"a cropped condition image has {stacked.shape[1]} channels, expected {sum(channels)} "
                             "(a tiler changed more than the region and the size)")
    return list(torch.split(stacked, list(channels), dim=1))

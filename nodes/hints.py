"""Condition images (hints) and masks: layout, resizing, and mapping to batch rows.

ComfyUI batches cond and uncond (and several prompts) as chunks of one model call:
``transformer_options["cond_or_uncond"]`` lists one entry per chunk, each chunk holding the
whole latent batch. A hint batch of 1 serves every row; a hint batch equal to the latent
batch gives hint i to row i of every chunk; anything else is an error naming both sizes.
"""
import torch
import torch.nn.functional as F


class HintBatchError(ValueError):
    pass


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


def rows_to_items(n_items, rows, cond_or_uncond, what="condition image"):
    """Index of the hint (or mask) for each of ``rows`` batch rows (a LongTensor)."""
    chunks = max(1, len(cond_or_uncond or [0]))
    per_chunk = rows // chunks
    if n_items == 1:
        return torch.zeros(rows, dtype=torch.long)
    if per_chunk % n_items != 0:
        raise HintBatchError(
            f"the {what} batch has {n_items} images but the latent batch has {per_chunk}: "
            f"give 1 {what} (used for every latent) or exactly {per_chunk}"
        )
    # n_items == per_chunk: image i for latent i. A divisor of it (e.g. the frames of one
    # video for a batch of several videos) repeats, as ComfyUI's stock ControlNet does.
    return torch.arange(rows, dtype=torch.long) % n_items


def uncond_rows(rows, cond_or_uncond):
    """One bool per row: True where the row belongs to an uncond (negative) chunk."""
    chunks = list(cond_or_uncond or [0])
    per_chunk = rows // len(chunks)
    return [bool(chunks[r // per_chunk] == 1) for r in range(rows)]

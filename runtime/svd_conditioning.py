"""Stable Video Diffusion image-to-video conditioning as the ControlNeXt-SVD v2 reference pipeline
makes it (the arithmetic: models/svd_reference.py, docs/long_video.md)."""
import torch

import comfy.model_management as mm
import comfy.utils

from ..models import svd_reference
from .control_inputs import require_finite


def reference_conditioning(clip_vision, init_image, vae, width, height, video_frames, motion_bucket_id, fps,
                           augmentation_level, seed):
    """positive, negative and the empty video latent, in SVD_img2vid_Conditioning's formats."""
    require_finite("SVD Conditioning, reference pipeline (XCtrl)", init_image=init_image, augmentation_level=augmentation_level)
    pixels = comfy.utils.common_upscale(init_image[..., :3].movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
    pooled = clip_vision.encode_image(svd_reference.clip_pixels(pixels)).image_embeds.unsqueeze(0)
    noisy = svd_reference.augment(pixels, augmentation_level, torch.Generator().manual_seed(seed))
    latent = vae.encode(noisy)
    ids = {"motion_bucket_id": motion_bucket_id, "fps": fps, "augmentation_level": augmentation_level}
    positive = [[pooled, dict(ids, concat_latent_image=latent)]]
    negative = [[torch.zeros_like(pooled), dict(ids, concat_latent_image=torch.zeros_like(latent))]]
    samples = torch.zeros([video_frames, 4, height // 8, width // 8], device=mm.intermediate_device())
    return positive, negative, {"samples": samples}

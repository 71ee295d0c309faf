"""Tiny random-weight Z-Image (Lumina 2 NextDiT) and Qwen-Image models and their model-patch
control networks, built with ComfyUI's own classes in the real key layouts.

Core's ModelPatchLoader builds the control networks at the real widths (3840 / 3072), so tiny
ones are built here with the same classes and the configurations the loader picks for each file
layout (Z-Image Fun ControlNet Union 2.0: 6 control layers; 2.1: 15 control layers, refiner
control, 17 inpaint channels), and wrapped in a ModelPatcher as the loader does. Their state
dicts have the converted keys the loader loads into (``control_layers.i...``,
``control_all_x_embedder.2-1``, ``controlnet_blocks.i.y_rms`` ...).

``StubVAE`` stands in for the VAE the apply nodes take: a fixed random projection of 8x8 pixel
patches to 16 latent channels (4-D for Z-Image, 5-D with one frame for Qwen-Image's Wan VAE).
"""
import torch

from .tiny_models import _patcher, init_weights

ZIMAGE_TINY = dict(
    image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=32, n_layers=6, qk_norm=True,
    n_heads=8, n_kv_heads=8, axes_dims=[8, 12, 12], axes_lens=[64, 32, 32], rope_theta=256.0,
    ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0, multiple_of=16,
    pad_tokens_multiple=32,  # real Z-Image files carry cap_pad_token: image tokens padded to 32
)
QWEN_TINY = dict(
    image_model="qwen_image", in_channels=64, out_channels=16, num_layers=3, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
)
CONTEXT = {"z_image": 32, "qwen_image": 24}


def zimage(seed=0):
    import comfy.supported_models as sm

    return _patcher(sm.ZImage, ZIMAGE_TINY, seed)


def qwen_image(seed=0, num_layers=QWEN_TINY["num_layers"]):
    import comfy.supported_models as sm

    return _patcher(sm.QwenImage, dict(QWEN_TINY, num_layers=num_layers), seed)


def model_patch(net, seed):
    import comfy.model_management as mm
    import comfy.model_patcher

    init_weights(net, seed)
    return comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def zimage_control(seed, layout="2.1"):
    """A Z-Image Fun ControlNet Union of the tiny model's width, in the 2.0 or 2.1 layout."""
    import comfy.ldm.lumina.controlnet as zc
    import comfy.ops

    config = dict(n_control_layers=15, additional_in_dim=17, refiner_control=True) if layout == "2.1" else {}
    net = zc.ZImage_Control(dim=ZIMAGE_TINY["dim"], n_heads=8, n_kv_heads=8, multiple_of=16, dtype=torch.float32,
                            device="cpu", operations=comfy.ops.manual_cast, **config)
    return model_patch(net, seed)


def qwen_control(seed, model_patch_module, inpaint=False, num_layers=QWEN_TINY["num_layers"]):
    """A Qwen-Image DiffSynth block-wise ControlNet of the tiny model's width (core's class)."""
    import comfy.ops

    cls = model_patch_module.QwenImageBlockWiseControlNet
    net = cls(num_layers=num_layers, additional_in_dim=4 if inpaint else 0,
              dim=QWEN_TINY["num_attention_heads"] * QWEN_TINY["attention_head_dim"], dtype=torch.float32,
              device="cpu", operations=comfy.ops.manual_cast)
    return model_patch(net, seed)


class StubVAE:
    def __init__(self, seed=0, frames=False):
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(16, 3 * 64, generator=g) / 8.0
        self.frames = frames

    def spacial_compression_encode(self):
        return 8

    def encode(self, image):
        b, h, w, c = image.shape
        patches = image[..., :3].reshape(b, h // 8, 8, w // 8, 8, 3).permute(0, 1, 3, 5, 2, 4).reshape(b, h // 8, w // 8, -1)
        latent = (patches.float() @ self.proj.T).permute(0, 3, 1, 2).contiguous()
        return latent.unsqueeze(2) if self.frames else latent


def text_cond(kind, batch=1, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, CONTEXT[kind], generator=g), {}]]


def image(seed, size=64, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, size, size, 3, generator=g)

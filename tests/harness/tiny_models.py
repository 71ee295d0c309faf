"""Random-weight tiny models of each family the pack patches, as ComfyUI ModelPatchers.

They keep the real block structure (12 UNet input blocks for SD1.5/SVD, 9 for SDXL;
joint blocks + patch embedding for SD3) at tiny widths, so block indices, injection
points and CFG batching are exercised as on the real models.
"""
import torch

SD15_TINY = dict(
    model_channels=32, channel_mult=[1, 2, 2, 2], num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1, context_dim=32, num_heads=4, num_head_channels=-1,
    use_linear_in_transformer=False, adm_in_channels=None, in_channels=4, out_channels=4,
    use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False,
    image_size=32, use_checkpoint=False,
)
SDXL_TINY = dict(
    model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 1, 1, 1, 1], transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
    transformer_depth_middle=1, context_dim=32, num_head_channels=16, num_heads=-1,
    use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential", in_channels=4,
    out_channels=4, use_spatial_transformer=True, legacy=False, use_temporal_attention=False,
    use_temporal_resblock=False, image_size=32, use_checkpoint=False,
)
SVD_TINY = dict(
    model_channels=64, channel_mult=[1, 1, 1, 1], num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1, context_dim=32, num_heads=-1, num_head_channels=64,
    use_linear_in_transformer=True, adm_in_channels=768, num_classes="sequential", in_channels=8,
    out_channels=4, use_spatial_transformer=True, legacy=False, use_temporal_attention=True,
    use_temporal_resblock=True, extra_ff_mix_layer=True, use_spatial_context=True,
    merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
    disable_temporal_crossattention=False, max_ddpm_temb_period=10000, image_size=32, use_checkpoint=False,
)
SD3_TINY = dict(
    in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=64,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 48, "out_features": 128}},
    num_patches=32 * 32, pos_embed_max_size=32, pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
    qk_norm=None,
)

# Flux with the real block structure, narrow: 2 double and 2 single blocks, hidden 64 (2 heads
# of 32 = the rotary axes 4 + 14 + 14), text context 32, pooled vector 16.
FLUX_TINY = dict(
    image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=16, context_in_dim=32, hidden_size=64,
    mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 14, 14], theta=10000, qkv_bias=True,
    guidance_embed=True,
)


def init_weights(module, seed):
    """comfy.ops.disable_weight_init leaves parameters uninitialised: fill them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if b.is_floating_point():
                b.copy_(0.02 * torch.randn(b.shape, generator=g))


def _patcher(model_config_cls, unet_config, seed, dtype=torch.float32, disable_dynamic=False):
    """``disable_dynamic``: asked for by core when it rebuilds a model from the factory; these
    are plain ModelPatchers anyway."""
    import comfy.model_management as mm
    import comfy.model_patcher

    mc = model_config_cls(dict(unet_config))
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({})
    init_weights(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    # The loader factory core's loaders register (ComfyUI with MultiGPU builds a model per device
    # from it): the same seed gives the same weights.
    patcher.cached_patcher_init = (_patcher, (model_config_cls, unet_config, seed, dtype))
    return patcher


def sd15(seed=0, dtype=torch.float32):
    import comfy.supported_models as sm

    return _patcher(sm.SD15, SD15_TINY, seed, dtype)


# SD1.5-layout with 64-wide heads: a ControlNet file of it is read back by core's loader with the
# same attention heads (core's loader guesses 64-channel heads for a layout it does not know).
SD15_LOADABLE = dict(SD15_TINY, model_channels=64, channel_mult=[1, 1, 1, 1], num_heads=-1, num_head_channels=64)
_LOADABLE_CONFIG = []


def sd15_loadable(seed=0, dtype=torch.float32):
    """A tiny SD1.5 whose ControlNets round-trip through core's Load ControlNet (SD15_LOADABLE)."""
    import comfy.supported_models as sm

    if not _LOADABLE_CONFIG:
        _LOADABLE_CONFIG.append(type("SD15HeadWidth64", (sm.SD15,), {"unet_extra_config": {"num_heads": -1,
                                                                                          "num_head_channels": 64}}))
    return _patcher(_LOADABLE_CONFIG[0], SD15_LOADABLE, seed, dtype)


def sdxl(seed=0, dtype=torch.float32):
    import comfy.supported_models as sm

    return _patcher(sm.SDXL, SDXL_TINY, seed, dtype)


def svd(seed=0, dtype=torch.float32):
    import comfy.supported_models as sm

    return _patcher(sm.SVD_img2vid, SVD_TINY, seed, dtype)


def sd3(seed=0, dtype=torch.float32):
    import comfy.supported_models as sm

    return _patcher(sm.SD3, SD3_TINY, seed, dtype)


def _flux_config():
    """FLUX_TINY plus the fields this ComfyUI's FluxParams requires (0.8.0 added txt_ids_dims)."""
    import dataclasses

    import comfy.ldm.flux.model

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return dict(FLUX_TINY, **({"txt_ids_dims": []} if "txt_ids_dims" in fields else {}))


def flux(seed=0, dtype=torch.float32):
    import comfy.supported_models as sm

    return _patcher(sm.Flux, _flux_config(), seed, dtype)


def flux_controlnet(seed, num_union_modes=0):
    """A stock Flux ControlNet of the tiny Flux's configuration: the XLabs layout (an RGB hint
    embedded by its own convolutions, so no VAE), with a Union mode embedding when asked for."""
    import comfy.ldm.flux.controlnet
    import comfy.ops

    config = {k: v for k, v in _flux_config().items() if k != "image_model"}
    net = comfy.ldm.flux.controlnet.ControlNetFlux(num_union_modes=num_union_modes, operations=comfy.ops.disable_weight_init,
                                                   dtype=torch.float32, device="cpu", **config)
    return stock_controlnet(net, seed, extra_conds=["y", "guidance"])


def text_cond(patcher, batch=1, tokens=7, seed=1):
    """A ComfyUI CONDITIONING list with random embeddings of the model's context width."""
    g = torch.Generator().manual_seed(seed)
    dm = patcher.model.diffusion_model
    name = type(patcher.model.model_config).__name__
    if name == "SD3":
        ctx = dm.context_embedder.in_features
        return [[torch.randn(batch, tokens, ctx, generator=g), {"pooled_output": torch.randn(batch, 64, generator=g)}]]
    if name == "Flux":
        return [[torch.randn(batch, tokens, FLUX_TINY["context_in_dim"], generator=g),
                 {"pooled_output": torch.randn(batch, FLUX_TINY["vec_in_dim"], generator=g), "guidance": 3.5}]]
    ctx = SDXL_TINY["context_dim"]
    extra = {}
    if name.startswith("SDXL"):
        extra = {"pooled_output": torch.randn(batch, 1280, generator=g), "width": 64, "height": 64,
                 "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}
    return [[torch.randn(batch, tokens, ctx, generator=g), extra]]


def stock_controlnet(module, seed, **kwargs):
    """A stock ComfyUI ControlNet object around a control network, with the tests' random weights
    (comfy ops leave weights uninitialised; the zero convolutions must not be zero)."""
    import comfy.controlnet
    import comfy.model_management as mm

    init_weights(module, seed)
    module.eval()
    return comfy.controlnet.ControlNet(module, load_device=mm.get_torch_device(), manual_cast_dtype=None, **kwargs)


def unet_controlnet(unet_config, seed):
    """A stock ControlNet (comfy.cldm) of a tiny UNet's configuration."""
    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in unet_config.items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                                     device="cpu", **config)
    return stock_controlnet(net, seed)

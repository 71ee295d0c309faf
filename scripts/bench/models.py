"""ComfyUI imported for measuring, full-size random-weight base UNets, stock ControlNets, conditionings."""
import os


def import_comfyui(root, force_cpu):
    """ComfyUI on sys.path; CPU mode when there is no CUDA device (or when asked)."""
    import torch

    from harness import comfy_runtime

    comfy_runtime.import_comfyui(root, cpu=force_cpu or not torch.cuda.is_available())
    return comfy_runtime


SD15_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    use_temporal_attention=False, use_temporal_resblock=False,
)
SD21_UNET = dict(
    SD15_UNET, use_linear_in_transformer=True, context_dim=1024, num_head_channels=64, num_heads=-1,
)
SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
    transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    use_temporal_attention=False, use_temporal_resblock=False,
)
SVD_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=768, in_channels=8, model_channels=320,
    num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4],
    transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=1024, num_head_channels=64,
    num_heads=-1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    use_temporal_attention=True, use_temporal_resblock=True, extra_ff_mix_layer=True, use_spatial_context=True,
    merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
    disable_temporal_crossattention=False, max_ddpm_temb_period=10000,
)
CONTEXT = {"sd15": (77, 768), "sd21": (77, 1024), "sdxl": (77, 2048), "svd": (1, 1024)}


def init_random_(module, seed):
    """comfy ops leave weights uninitialised: N(0, 1/fan_in) matrices, norms ~1, small biases."""
    from harness import tiny_models

    tiny_models.init_weights(module, seed)


def random_patcher(model, dtype, seed, network=None):
    """A ModelPatcher over ``model`` (a ComfyUI model or a bare network), ``network`` (default: the
    model) filled with random weights in ``dtype``."""
    import comfy.model_management as mm
    import comfy.model_patcher

    network = model if network is None else network
    init_random_(network, seed)
    network.to(dtype)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def random_model(model_config, dtype, seed=0):
    """The model of a ComfyUI model config (comfy.supported_models) with random weights, as a ModelPatcher."""
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    return random_patcher(model, dtype, seed, model.diffusion_model)


def build_base(family, dtype, seed=0):
    import comfy.supported_models as sm

    cls, cfg = {"sd15": (sm.SD15, SD15_UNET), "sd21": (sm.SD20, SD21_UNET), "sdxl": (sm.SDXL, SDXL_UNET),
                "svd": (sm.SVD_img2vid, SVD_UNET)}[family]
    return random_model(cls(dict(cfg)), dtype, seed)


def stock_controlnet(family, dtype, seed):
    """A full-size stock ControlNet of the family (comfy.cldm.cldm.ControlNet) as ComfyUI's loader builds it."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops

    cfg = {k: v for k, v in {"sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET}[family].items() if k != "out_channels"}
    # dtype given at construction: ComfyUI's ControlNet casts its inputs to control_model.dtype
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=dtype, device="cpu", **cfg)
    init_random_(net, seed)
    net.to(dtype).eval()
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device(), manual_cast_dtype=None)


def random_layout(layout_file, seed):
    """Random tensors with a released key -> shape layout (the tests' generator)."""
    from harness.random_weights import random_layout as layout

    return layout(layout_file, seed)


def save_sd(folder, name, sd):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, name))
    return name


def control_images(size, count, seed=5):
    """count random size x size RGB images (IMAGE batches of one), from one seeded generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, size, size, 3, generator=g) for _ in range(count)]


def text_conds(family, size, frames=None, seed=1):
    """(positive, negative) CONDITIONING with random embeddings; 77 tokens each so they batch."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens, width = CONTEXT[family]
    out = []
    for k in range(2):
        extra = {}
        if family == "sdxl":
            extra = {"pooled_output": torch.randn(1, 1280, generator=g), "width": size, "height": size,
                     "crop_w": 0, "crop_h": 0, "target_width": size, "target_height": size}
        if family == "svd":
            lat = size // 8
            concat = torch.randn(1, 4, lat, lat, generator=g) if k == 0 else torch.zeros(1, 4, lat, lat)
            extra = {"concat_latent_image": concat, "fps": 6, "motion_bucket_id": 127, "augmentation_level": 0.0}
        out.append([[torch.randn(1, tokens, width, generator=g), extra]])
    return out[0], out[1]

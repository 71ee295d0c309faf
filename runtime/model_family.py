"""Which base-model family a ComfyUI MODEL is, for choosing variants and clear errors."""
import comfy.supported_models as sm

from ..models.families import family_title  # noqa: F401  (the vocabulary; re-exported for the nodes)


def model_family(model_patcher):
    """"sd15", "sd21", "sdxl", "svd", "sd3", or the model config's class name for others."""
    return config_family(model_patcher.model.model_config)


def model_signature(base_model):
    """What a control set up for one model needs of another to work on it: the family and the
    denoiser's widths (a BaseModel, as samplers hand it to controls)."""
    config = base_model.model_config
    unet = getattr(config, "unet_config", {}) or {}
    return (config_family(config),) + tuple(unet.get(k) for k in ("model_channels", "context_dim", "in_channels",
                                                                    "hidden_size", "depth"))


def config_family(config):
    # Order matters: subclasses first (SVD derives from BASE, SDXL variants from SDXL).
    for cls, name in ((sm.SVD_img2vid, "svd"), (sm.SDXL, "sdxl"), (sm.SD15, "sd15"), (sm.SD20, "sd21"), (sm.SD3, "sd3")):
        if isinstance(config, cls):
            return name
    return type(config).__name__


def compute_dtype(model_patcher):
    """The dtype the diffusion model computes in (manual cast dtype when weights are stored lower).
    Read through the patcher: a compute-dtype node sets it as an object patch on its clone."""
    return model_patcher.get_model_object("manual_cast_dtype") or model_patcher.model.get_dtype()


def unet_block_channels(model_patcher):
    """{("input", i): channels of input block i's output, ("output", 0): middle-block output}
    for a ComfyUI UNetModel, read from its config (as openaimodel builds the blocks)."""
    cfg = model_patcher.model.model_config.unet_config
    mc, mult, res = cfg["model_channels"], cfg["channel_mult"], cfg["num_res_blocks"]
    res = res if isinstance(res, (list, tuple)) else [res] * len(mult)
    chans = [mc]
    for level, m in enumerate(mult):
        chans += [mc * m] * res[level]
        if level != len(mult) - 1:
            chans.append(mc * m)  # downsample keeps the width
    out = {("input", i): c for i, c in enumerate(chans)}
    out[("output", 0)] = mc * mult[-1]
    return out

"""Tiny Qwen-Image ControlNets of the kinds core's Apply ControlNet takes (InstantX, Qwen-Image 2512
Fun), and an independent reference for balancing them (no pack imports).

The 2512 Fun ControlNet goes through core's own loader (``comfy.controlnet.load_controlnet_state_dict``
reads its width and heads from the file). Core's InstantX loader builds the network at the real
width (it reads only the input channels and the block count), so the tiny one is built with core's
class at the tiny model's width and wrapped as that loader wraps it (Wan 2.1 latent format,
compression 1, VAE-encoded hint); its state dict has the keys the loader routes on.

Reference: each ControlNet's 'input' residuals are computed by running its network directly on
the VAE-encoded hint (Wan 2.1 normalisation), times its strength (the square root of it for the
Fun ControlNet, as core's QwenFunControlNet applies it); a reference patch appended to the
double-block patch list (or standing where the DiffSynth patches were) combines them, with the
DiffSynth patches' own terms, by the float64 formulas of harness/mi_reference.py and injects the
result into the image tokens after each block.
"""
import torch

from harness.mi_reference import balanced
from harness.model_patch_models import QWEN_TINY
from harness.tiny_models import init_weights

LAYERS = 14  # the 2512 Fun ControlNet injects after blocks 0, 12, 24, 36, 48: two of them here
INSTANTX_KEYS = ("controlnet_blocks.0.weight", "transformer_blocks.0.img_mlp.net.0.proj.weight", "txt_norm.weight",
                 "controlnet_x_embedder.weight")


def instantx(seed, num_layers=5, base_config=QWEN_TINY):
    """A Qwen-Image InstantX ControlNet of the base configuration's width (5 blocks: each residual
    repeated for 12 of the 60 points)."""
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.qwen_image.controlnet as qc
    import comfy.model_management as mm
    import comfy.ops

    config = {k: v for k, v in base_config.items() if k != "image_model"}
    net = qc.QwenImageControlNetModel(extra_condition_channels=0, operations=comfy.ops.disable_weight_init, device="cpu",
                                      dtype=torch.float32, **dict(config, num_layers=num_layers))
    init_weights(net, seed)
    assert all(k in net.state_dict() for k in INSTANTX_KEYS)  # the layout core's loader routes to InstantX
    return comfy.controlnet.ControlNet(net, compression_ratio=1, latent_format=comfy.latent_formats.Wan21(),
                                       load_device=mm.get_torch_device(), manual_cast_dtype=None, extra_conds=[])


def fun_state_dict(seed, base_config=QWEN_TINY):
    """The state dict of a Qwen-Image 2512 Fun ControlNet of the base configuration's width (built
    with core's class), or None on a ComfyUI without it."""
    import comfy.ldm.qwen_image.controlnet as qc
    import comfy.ops

    if not hasattr(qc, "QwenImageFunControlNetModel"):
        return None
    heads, head_dim = base_config["num_attention_heads"], base_config["attention_head_dim"]
    net = qc.QwenImageFunControlNetModel(control_in_features=132, inner_dim=heads * head_dim,
                                         num_attention_heads=heads, attention_head_dim=head_dim,
                                         operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32)
    init_weights(net, seed)
    return {k: v.clone().contiguous() for k, v in net.state_dict().items()}


def fun(seed, base_config=QWEN_TINY):
    """A Qwen-Image 2512 Fun ControlNet of the base configuration's width, loaded by core's loader
    from its state dict, or None on a ComfyUI without it."""
    import comfy.controlnet

    sd = fun_state_dict(seed, base_config)
    if sd is None:
        return None
    control = comfy.controlnet.load_controlnet_state_dict(sd)
    assert type(control).__name__ == "QwenFunControlNet"
    return control


# ---------------------------------------------------------------------------- reference
def controlnet_residuals(setup, control, cond, sigma):
    """One ControlNet's 'input' list for one row: its network run directly, times its strength."""
    import comfy.latent_formats

    base, (cnet, hint, strength) = setup["base"].model, control
    ms = base.model_sampling
    latent = comfy.latent_formats.Wan21().process_in(setup["vae"].encode(hint))  # hint at the latent's size x 8
    is_fun = type(cnet).__name__ == "QwenFunControlNet"
    extra = {"base_model": base.diffusion_model} if is_fun else {}
    out = cnet.control_model(x=ms.calculate_input(sigma, setup["x"]), hint=latent, timesteps=ms.timestep(sigma).float(),
                             context=cond[0][0], **extra)
    s = strength ** 0.5 if is_fun else strength
    return [None if r is None else r * s for r in out["input"]]


class ReferencePatch:
    """At block i: every DiffSynth member's term (its addition to a copy, float64) and every
    ControlNet's residual for the call's rows, balanced by the hand formulas."""

    def __init__(self, members, rows, mode, granularity, tokens):
        self.members, self.rows, self.mode, self.granularity, self.tokens = members, rows, mode, granularity, tokens

    def __call__(self, kwargs):
        img, i, n = kwargs["img"], kwargs["block_index"], self.tokens
        e = img[:, :n]
        rs = []
        for p in self.members:
            copy = img.clone()
            p(dict(kwargs, img=copy))
            rs.append(copy[:, :n].double() - e.double())
        kinds = kwargs["transformer_options"]["cond_or_uncond"]
        for c in range(len(self.rows[0])):
            if self.rows[0][c][i] is not None:
                rs.append(torch.cat([self.rows[k][c][i] for k in kinds]).double())
        if rs:
            img[:, :n] = balanced(e.clone(), rs, self.mode, self.granularity, channel_dim=-1)
        return kwargs


def reference_model(setup, model, controls, mode, granularity, tokens):
    """``model`` (the base with DiffSynth patches, or none) with a ReferencePatch standing for them
    and for ``controls`` [(ControlNet, hint image, strength)] at the setup's sigma."""
    rows = {k: [controlnet_residuals(setup, c, cond, setup["sigma"].reshape(1)) for c in controls]
            for k, cond in ((0, setup["pos"]), (1, setup["neg"]))}
    ref = model.clone()
    patches = ref.model_options["transformer_options"].setdefault("patches", {})
    members = [p for p in patches.get("double_block", []) if hasattr(p, "model_patch")]
    rp = ReferencePatch(members, rows, mode, granularity, tokens)
    rest = [p for p in patches.get("double_block", []) if not hasattr(p, "model_patch")]
    patches["double_block"] = ([rp] + rest) if members else (rest + [rp])
    return ref


class BlockInputs:
    """Replacements of blocks 1.. that keep their input image tokens: the features after the
    injection at the block before."""

    def __init__(self, tokens):
        self.tokens, self.seen = tokens, {}

    def install(self, model, layers):
        m = model.clone()
        for i in range(1, layers):
            m.set_model_patch_replace(self.block(i), "dit", "double_block", i)
        return m

    def block(self, i):
        def run(args, extra):
            self.seen[i - 1] = args["img"][:, :self.tokens].clone()
            return extra["original_block"](args)
        return run

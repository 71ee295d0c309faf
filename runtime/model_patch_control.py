"""MIControlNet for ComfyUI's model-patch controls: Z-Image Fun ControlNet (Union) and Qwen-Image
DiffSynth block-wise ControlNets (docs/model_patch_control.md).

Core applies these controls as patch objects in the MODEL's ``transformer_options["patches"]``
(``"noise_refiner"`` and ``"double_block"`` on Z-Image's NextDiT, ``"double_block"`` on
Qwen-Image); every patch adds its residual times its strength to the image tokens in place, so
several controls on one MODEL are summed. ``BalancedModelPatches`` takes their place in those
lists (at the position of the first one, other packs' patches keep theirs): at each injection
point it obtains every control's residual (strength applied) from the same features, combines
them with ``mi_balance.combine`` and injects the result with ``add_inj`` (``runtime.mi.Balance``,
the same settings and statistics as MI Balanced Control). Mode ``sum`` adds the residuals one
after the other in the patches' order, each control seeing the features as core's chain would,
so the result is core's bit for bit.

Residuals:
- Z-Image: core's patch object is called as core calls it, with a zero tensor in place of the
  image tokens; the patch only adds into that tensor (its control input is ``img_input``), so the
  tensor holds exactly residual x strength. Whether the patch added anything at this point is
  read from the tensor's in-place version counter (a control with 3 layers acts at blocks
  0, 10, 20 only). The patch's own per-call state (which control layer comes next) advances as
  in core, since each patch is called once per point, in order.
- Qwen-Image: the control block reads the current image tokens, so the residual is computed
  from the patch's control network and its encoded condition image (``control_block(img[:, :n],
  encoded, block) * strength``); when the latent size differs from the encoded one, the patch is
  first run once on a scratch copy of the tokens so that core itself re-encodes the image.
"""
import logging
import math
import uuid

import torch

import comfy.patcher_extension as pe

from . import mi
from .comfyui_support import needs_comfyui

LOG = logging.getLogger("xctrl.mi")

ZIMAGE, QWEN = "z_image", "qwen_image"
CONTROL_TITLES = {ZIMAGE: "Z-Image Fun ControlNet", QWEN: "Qwen-Image DiffSynth ControlNet"}
MODEL_TITLES = {ZIMAGE: "Z-Image (Lumina 2 NextDiT)", QWEN: "Qwen-Image"}
SITES = {ZIMAGE: ("noise_refiner", "double_block"), QWEN: ("double_block",)}
LAYER_PREFIX = {ZIMAGE: "Z-Image", QWEN: "Qwen-Image"}
SITE_NAMES = {"noise_refiner": "refiner", "double_block": "block"}
PATCH_SIZE = 2  # both control networks patchify the latent 2x2 (one token per 2x2 latent pixels)


# ---------------------------------------------------------------------------- what is where
def zimage_control_class():
    """Core's Z-Image control network class, or None on a ComfyUI without it."""
    try:
        from comfy.ldm.lumina.controlnet import ZImage_Control
    except ImportError:
        return None
    return ZImage_Control


def missing_support(kind):
    """None, or what this ComfyUI lacks to run ``kind``'s control patches (checked by capability)."""
    if kind == ZIMAGE and zimage_control_class() is None:
        return "this ComfyUI has no comfy.ldm.lumina.controlnet"
    if kind == QWEN:
        try:
            import comfy.ldm.qwen_image.model  # noqa: F401
        except ImportError:
            return "this ComfyUI has no Qwen-Image model (comfy.ldm.qwen_image)"
    return None


def update_message(kind, node, reason):
    """The error for a ComfyUI lacking ``kind`` (``reason``: what it lacks), naming the release that has it."""
    return f"{node}: {needs_comfyui(CONTROL_TITLES[kind])} ({reason}): update ComfyUI."


def model_kind(model_patcher):
    """ZIMAGE for a Lumina 2 / Z-Image NextDiT, QWEN for Qwen-Image, else None."""
    module = type(getattr(getattr(model_patcher, "model", None), "diffusion_model", None)).__module__
    if module.startswith("comfy.ldm.lumina."):
        return ZIMAGE
    if module.startswith("comfy.ldm.qwen_image."):
        return QWEN
    return None


def network_kind(net):
    """ZIMAGE / QWEN for core's control networks of those families (a MODEL_PATCH's model), else None."""
    zcls = zimage_control_class()
    if zcls is not None and isinstance(net, zcls):
        return ZIMAGE
    if all(hasattr(net, a) for a in ("control_block", "controlnet_blocks", "process_input_latent_image")):
        return QWEN
    return None


def patch_kind(patch):
    """ZIMAGE / QWEN for the control patch objects of those families (core's and ours), else None."""
    if isinstance(patch, BalancedModelPatches) or hasattr(patch, "xctrl_residual"):
        return patch.kind
    net = getattr(getattr(patch, "model_patch", None), "model", None)
    return None if net is None else network_kind(net)


def control_width(net, kind):
    if kind == ZIMAGE:
        return next(iter(net.control_all_x_embedder.values())).weight.shape[0]
    return net.img_in.weight.shape[0]


def model_width(model_patcher, kind):
    dm = model_patcher.get_model_object("diffusion_model")
    return (dm.x_embedder if kind == ZIMAGE else dm.img_in).weight.shape[0]


def control_patches(model_patcher):
    """The control patches the MODEL carries, in patch-list order, each once: [(patch, kind)]."""
    patches = model_patcher.model_options.get("transformer_options", {}).get("patches", {})
    return members_in([p for site in ("noise_refiner", "double_block") for p in patches.get(site, [])])


def members_in(entries):
    """The control patches among patch-list ``entries``, each once: [(patch, kind)]. A
    BalancedModelPatches contributes its members (the node applied twice)."""
    found = {}
    for p in entries:
        kind = patch_kind(p)
        if kind is None:
            continue
        for member in (p.members if isinstance(p, BalancedModelPatches) else [p]):
            found.setdefault(id(member), (member, kind))
    return list(found.values())


def put_in_place(entries, balanced, kind):
    """``entries`` with their ``kind`` control patches replaced by ``balanced`` at the first one's
    position (other patches keep theirs), and whether there was one."""
    out, placed = [], False
    for p in entries:
        if patch_kind(p) != kind:
            out.append(p)
        elif not placed:
            out.append(balanced)
            placed = True
    return out, placed


# ---------------------------------------------------------------------------- residuals
def image_tokens(x, img):
    """Tokens of the latent image (2x2 patches of the spatial dims), at most the tokens given."""
    return min(math.ceil(x.shape[-2] / PATCH_SIZE) * math.ceil(x.shape[-1] / PATCH_SIZE), img.shape[1])


def zimage_residual(patch, kwargs):
    """residual x strength of core's Z-Image patch at this point, or None where it adds nothing."""
    img = kwargs["img"]
    with torch.inference_mode(False):  # ComfyUI samples in inference mode, whose tensors have no version counter
        out = torch.zeros_like(img)
    version = out._version  # bumped by the patch's in-place addition
    patch(dict(kwargs, img=out))
    if out._version == version:
        return None
    return out[:, :image_tokens(kwargs["x"], img)]


def qwen_residual(patch, kwargs):
    """residual x strength of core's Qwen-Image DiffSynth patch at this block."""
    img, x = kwargs["img"], kwargs["x"]
    scale = patch.vae.spacial_compression_encode()
    if patch.encoded_image is None or patch.encoded_image_size != (x.shape[-2] * scale, x.shape[-1] * scale):
        patch(dict(kwargs, img=img.clone()))  # core re-encodes the image for this size; the sum is dropped
    encoded = patch.encoded_image
    n = encoded.shape[1]
    return patch.model_patch.model.control_block(img[:, :n], encoded.to(img.dtype), kwargs["block_index"]) * patch.strength


RESIDUAL = {ZIMAGE: zimage_residual, QWEN: qwen_residual}


def member_residual(patch, kind, kwargs):
    """A member's term at this point: an XCtrl Apply node's patch scales its own (schedule, mask)."""
    if hasattr(patch, "xctrl_residual"):
        return patch.xctrl_residual(kwargs)
    return RESIDUAL[kind](patch, kwargs)


# ---------------------------------------------------------------------------- the balanced patch
class BalancedModelPatches:
    """One entry in the MODEL's patch lists standing for several control patches of one family."""

    def __init__(self, kind, members, balance):
        self.kind, self.members, self.balance = kind, list(members), balance
        self.uid = f"xctrl_mi_patches_{uuid.uuid4().hex[:12]}"

    def __deepcopy__(self, memo):
        return self

    def __call__(self, kwargs):
        site = "noise_refiner" if kwargs.get("block_type") == "noise_refiner" else "double_block"
        img, i = kwargs["img"], kwargs["block_index"]
        options = kwargs.get("transformer_options", {})
        if i == 0 and site == SITES[self.kind][0] and options.get("sigmas") is not None:
            self.balance.begin_call(options["sigmas"])
        if self.balance.mode == "sum":
            for r in self.terms(kwargs):  # each term made after the previous one is added, as in core
                if r is not None:
                    img[:, :r.shape[1]] += r
        else:
            self.inject(img, list(self.terms(kwargs)), f"{LAYER_PREFIX[self.kind]} {SITE_NAMES[site]} {i}", options)
        if self.kind == ZIMAGE:  # the features were changed in place (a view of the model's tokens)
            kwargs.pop("img", None)
            kwargs.pop("txt", None)
        return kwargs

    def terms(self, kwargs):
        """Each member's term at this point (residual x strength, or None), made when iterated."""
        return (member_residual(p, self.kind, kwargs) for p in self.members)

    def inject(self, img, residuals, layer, options):
        rs = [r for r in residuals if r is not None]
        if not rs:
            return
        n = rs[0].shape[1]
        if any(r.shape[1] != n for r in rs):
            LOG.warning("[XCtrl] MI balance: the controls' residuals cover different tokens at %s; summed there", layer)
            for r in rs:
                img[:, :r.shape[1]] += r
            return
        img[:, :n] = self.balance.inject(img[:, :n], self.balance.combine(rs), layer, options)

    def to(self, device_or_dtype):
        for p in self.members:
            if hasattr(p, "to"):
                p.to(device_or_dtype)
        return self

    def models(self):
        return [m for p in self.members if hasattr(p, "models") for m in p.models()]

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        finally:
            self.balance.report()


def check_members(model, node):
    """The MODEL's control patches (two or more) and its family, or a ValueError naming the problem and the fix."""
    kind, members = check_family(model, node)
    if len(members) < 2:
        found = f"one {CONTROL_TITLES[kind]} patch" if members else "no Z-Image or Qwen-Image control patch"
        raise ValueError(f"{node}: this MODEL carries {found}; balancing needs two or more. Apply two or more "
                         "controls with Apply Z-Image Fun ControlNet / Apply Qwen Image DiffSynth ControlNet before "
                         "this node, or remove the node (one control is added as core adds it).")
    return kind, members


def check_family(model, node):
    """The MODEL's family and control patches (any number), or a ValueError naming a patch of
    another family or width, or one this ComfyUI cannot run, and the fix."""
    members = control_patches(model)
    kind = model_kind(model)
    kinds = sorted({k for _, k in members})
    for k in kinds:
        reason = missing_support(k)
        if reason:
            raise ValueError(update_message(k, node, reason))
    if kind is None and members:
        raise ValueError(f"{node}: the MODEL carries {CONTROL_TITLES[kinds[0]]} patches but is not a "
                         f"{MODEL_TITLES[kinds[0]]} model: apply those controls to the model they were made for.")
    for patch, k in members:
        if k != kind:
            raise ValueError(f"{node}: a {CONTROL_TITLES[k]} patch is applied to a {MODEL_TITLES[kind]} model: "
                             f"use a {CONTROL_TITLES[kind]} with this model (or a {MODEL_TITLES[k]} model).")
        cw, mw = control_width(patch.model_patch.model, k), model_width(model, kind)
        if cw != mw:
            raise ValueError(f"{node}: a {CONTROL_TITLES[k]} of width {cw} is applied to a model of width {mw}: "
                             "use the control made for this model.")
    return kind, [p for p, _ in members]


def balance_model_patches(model, mode, granularity, cap, node):
    """A clone of ``model`` whose control patches are combined by one BalancedModelPatches."""
    kind, members = check_members(model, node)
    balanced = BalancedModelPatches(kind, members, mi.Balance(mode, granularity, cap, channel_dim=-1))
    clone = model.clone()
    patches = clone.model_options["transformer_options"]["patches"]
    for site in SITES[kind]:
        entries, placed = put_in_place(patches.get(site, []), balanced, kind)
        if placed:
            patches[site] = entries
    clone.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, balanced.uid, balanced.outer_sample_wrapper)
    return clone


def balanced_patches(model):
    """The BalancedModelPatches a MODEL carries (for MI Lambda Stats)."""
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    return list(dict.fromkeys(p for ps in patches.values() for p in ps if isinstance(p, BalancedModelPatches)))

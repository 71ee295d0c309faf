"""Training a stock ComfyUI ControlNet (SD1.5, SDXL) the MIControlNet way: the checks before the
first step, the trainable ControlNet, the denoiser call with its residuals injected, the file
(docs/training.md, "Train ControlNet (MIControlNet)"; the node is nodes/training_nodes.py).

The loop, checkpoints, resume, interrupts, loss curve and the conservativity stage are the ones
of Train ControlNeXt (runtime/training.py, models/controlnext_training.py): only what differs
lives here. The trained network is ComfyUI's own ``comfy.cldm.cldm.ControlNet``, built from the
MODEL's UNet configuration, so the saved file is the plain ComfyUI / ldm ControlNet layout
(``input_blocks.*``, ``zero_convs.N.0.*``, ``input_hint_block.*``, ``middle_block_out.0.*``)
that core's Load ControlNet reads. The MODEL is frozen (the paper trains the ControlNet only)
and given back as it was.

Injection while training: each residual goes where ComfyUI adds it (output residual k into
the skip of input block k, the middle residual into h after the middle block), through the MI
node's own output-block patch (runtime/mi.py), with plain addition ("plain", ComfyUI's own
rule) or MIControlNet's add_inj (Eq. 10, one weight per layer and sample, differentiated).
"""
import contextlib
import os

import torch

import comfy.cldm.cldm
import comfy.controlnet
import comfy.ops
import comfy.utils
import folder_paths

from ..models import controlnext_training as tr
from ..models import mi_balance as mb
from . import mi
from . import training as tn
from .model_family import family_title, model_family

NODE = "Train ControlNet (MIControlNet) (XCtrl)"
FROM_UNET = "from_unet"
INJECTIONS = {"balanced": "paper", "plain": "sum", "balanced_min_norm": "min_norm"}  # node choice -> MI mode
FAMILIES = ("sd15", "sdxl")
LR = 1e-5  # the ControlNet authors' learning rate
MODULE_FILE = tn.MODULE_FILE
ZERO_OUTPUTS = ("zero_convs.", "middle_block_out.")  # the layers that make the residuals


def start_options():
    """The node's start choices: a fresh copy of the MODEL's encoder, or a ControlNet file."""
    return [FROM_UNET] + list(folder_paths.get_filename_list("controlnet"))


class Options(tn.Options):
    """The run's settings besides model, data and steps (the node's inputs, with its defaults)."""

    DEFAULTS = {"batch_size": 1, "gradient_accumulation": 1, "lr": LR, "scale": 1.0, "seed": 0,
                "empty_prompt_rate": 0.5, "empty_conditioning": None, "gradient_checkpointing": False,
                "training_dtype": "float32", "name": "my_controlnet", "checkpoint_every": 100, "resume": True,
                "overwrite": False, "start": FROM_UNET, "injection": "plain", "conservativity_weight": 0.0,
                "conservativity_probes": 1, "conservativity_from_step": 0, "conservativity_probe": "rademacher"}

    def settings(self, variant, n):
        return {"variant": variant, "latents": n, "batch_size": int(self.batch_size),
                "gradient_accumulation": int(self.gradient_accumulation), "lr": float(self.lr),
                "scale": float(self.scale), "seed": int(self.seed), "empty_prompt_rate": float(self.empty_prompt_rate),
                "training_dtype": self.training_dtype, "start": self.start, "injection": self.injection}


def train(model, latent, images, positive, steps, **options):
    """Trains a ControlNet (options: :class:`Options`) and saves it; returns a :class:`training.TrainingResult`
    whose ``control`` is the saved file loaded by ComfyUI's own loader."""
    opts = Options(**options)
    with torch.inference_mode(False), torch.enable_grad():
        setup = Setup(model, latent, images, positive, steps, opts)
        trainer, _, _ = tn.run_steps(model, setup, steps, opts)
        path = _save(setup, trainer)
    control = comfy.controlnet.load_controlnet(path, model)
    result = tn.TrainingResult(control, list(trainer.losses), setup.folder, {}, {}, tn.run_note(setup, trainer, steps),
                               trainer.stage_losses)
    result.path, result.module = path, setup.module
    return result


class Setup(tn.Setup):
    """Train ControlNeXt's setup with a ComfyUI ControlNet as the module and the MODEL frozen."""

    node = NODE
    numbers = ("lr", "scale", "empty_prompt_rate")
    lr = "lr"

    def __init__(self, model, latent, images, positive, steps, opts):
        self.family = model_family(model)
        if self.family not in FAMILIES:
            raise tr.TrainingError(f"{NODE} trains SD1.5 and SDXL ControlNets; this MODEL is {family_title(self.family)}: "
                                   "connect an SD1.5 or SDXL checkpoint's MODEL")
        if opts.injection not in INJECTIONS:
            raise tr.TrainingError(f"{NODE}: injection {opts.injection!r} is not one of {sorted(INJECTIONS)}")
        self.variant = f"controlnet_{self.family}"
        self.data(model, latent, images, positive, steps, opts)
        self.names = []  # the UNet is frozen
        self.module = build_controlnet(model, opts.start, opts.seed)
        check_can_learn(self.module, opts.injection, opts.start)
        self.files(opts, opts.settings(self.variant, self.n))

    def forward(self, model, module, device, opts):
        return controlled_forward(self, model, module, device, opts.scale, INJECTIONS[opts.injection],
                                  tn.DTYPES[opts.training_dtype])


def _config(model):
    """The MODEL's UNet configuration as ComfyUI's ControlNet class takes it."""
    skip = ("out_channels", "dtype", "device", "operations")
    return {k: v for k, v in model.model.model_config.unet_config.items() if k not in skip}


def new_controlnet(model, hint_channels=3):
    """An uninitialised float32 ControlNet of the MODEL's configuration (plain torch layers)."""
    return comfy.cldm.cldm.ControlNet(hint_channels=hint_channels, operations=comfy.ops.disable_weight_init,
                                      dtype=torch.float32, device="cpu", **_config(model))


def build_controlnet(model, start, seed):
    """The ControlNet to train: ``start`` is FROM_UNET (the MODEL's encoder copied, the output
    layers zero) or a file under models/controlnet (read by ComfyUI's own loader)."""
    if start == FROM_UNET:
        return controlnet_from_unet(model, seed)
    return controlnet_from_file(model, start)


def controlnet_from_unet(model, seed):
    """ControlNet's own initialisation: time embedding, encoder and middle block copied from the
    UNet, the hint encoder with torch's default initialisation from ``seed`` (the process's random
    state untouched), its last convolution and every zero convolution zero."""
    net = new_controlnet(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for m in net.modules():
            for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm):
                if isinstance(m, base):
                    base.reset_parameters(m)  # comfy's layers skip initialisation: torch's own
                    break
    unet = model.model.diffusion_model.state_dict()
    own = net.state_dict()
    with torch.no_grad():
        for k, p in own.items():
            if k in unet and unet[k].shape == p.shape:
                p.copy_(unet[k].float())
            elif k.startswith(ZERO_OUTPUTS) or k.startswith(last_hint_conv(net)):
                p.zero_()
    return net


def last_hint_conv(net):
    """The prefix of the hint encoder's last convolution (zero at the start, as the ControlNet recipe has it)."""
    convs = [i for i, m in enumerate(net.input_hint_block) if isinstance(m, torch.nn.Conv2d)]
    return f"input_hint_block.{convs[-1]}."


def controlnet_from_file(model, name):
    """A ControlNet file (any layout ComfyUI reads) as a trainable ControlNet of the MODEL's
    configuration; one made for another model family is refused."""
    path = folder_paths.get_full_path("controlnet", name)
    if path is None:
        raise tr.TrainingError(f"{NODE}: no ControlNet file {name!r} under models/controlnet: pick one from the list, "
                               f"or {FROM_UNET} to start from a copy of the MODEL's UNet")
    control = comfy.controlnet.load_controlnet(path, model)
    return controlnet_copy(model, control, name, NODE, f"pick a ControlNet made for this MODEL's family, or {FROM_UNET}")


def control_kind(control):
    """What a CONTROL_NET is, in words, for the errors of nodes that take UNet ControlNets only."""
    if isinstance(control, getattr(comfy.controlnet, "T2IAdapter", ())):
        return "a T2I-Adapter"
    if isinstance(control, getattr(comfy.controlnet, "ControlLora", ())):
        return "a Control-LoRA"
    net = getattr(control, "control_model", None)
    if net is None:
        return type(control).__name__
    return f"a ControlNet of another architecture: {type(net).__module__}.{type(net).__name__}"


def controlnet_copy(model, control, what, node, fix):
    """A float32 copy of the stock UNet ControlNet inside ``control`` (a CONTROL_NET as core's
    loader makes it), built with the MODEL's configuration: a T2I-Adapter, a Control-LoRA or a
    ControlNet of a DiT (SD3, Flux, ...) is refused, and so is one made for another model family
    (its layers differ). ``what`` names the control, ``fix`` ends the messages."""
    # A Control-LoRA holds a comfy.cldm ControlNet of LoRA layers once it has run: never a plain copy.
    control_lora = isinstance(control, getattr(comfy.controlnet, "ControlLora", ()))
    loaded = None if control_lora else getattr(control, "control_model", None)
    if not isinstance(loaded, comfy.cldm.cldm.ControlNet):
        raise tr.TrainingError(f"{node}: {what} is not a stock UNet ControlNet ({control_kind(control)}): this node "
                               f"takes SD1.5 / SDXL ControlNets only; {fix}")
    sd = loaded.state_dict()
    net = new_controlnet(model, sd["input_hint_block.0.weight"].shape[1])
    own = net.state_dict()
    wrong = sorted(set(own) ^ set(sd)) + [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if wrong:
        raise tr.TrainingError(f"{node}: {what} is a ControlNet for another model than this {family_title(model_family(model))} "
                               f"MODEL (its layers differ: {', '.join(wrong[:3])}): {fix}")
    net.load_state_dict({k: v.float() for k, v in sd.items()})
    return net


def check_can_learn(net, injection, start):
    """Balanced injection (paper reading) of a ControlNet whose output layers are all zero adds
    lambda(e, 0) * 0 = 0 with a zero gradient everywhere: such a run would never move. Refused."""
    if INJECTIONS[injection] != "paper":
        return
    outputs = [p for k, p in net.named_parameters() if k.startswith(ZERO_OUTPUTS)]
    if all(not bool(p.detach().any()) for p in outputs):
        raise tr.TrainingError(
            f"{NODE}: injection 'balanced' cannot start from {'a fresh copy of the UNet' if start == FROM_UNET else start}: "
            "its zero convolutions are all zero, and the balanced weight of a zero residual is 0 with zero gradient, "
            "so nothing would ever train (docs/training.md). Train first with injection 'plain' (or "
            "'balanced_min_norm'), then continue from that file with 'balanced'")


class TrainingInjection(mi.Balance):
    """The MI node's injection without statistics; keeps (joined, term) of every point in ``taps``
    when the conservativity stage asks for them."""

    def __init__(self, mode, taps=None):
        super().__init__(mode)
        self.taps = taps

    def inject(self, e, c, layer, transformer_options):
        if c is None:
            return e
        term = mb.injection_term(e, c, self.mode, self.cap, self.granularity, self.channel_dim)
        joined = e + term
        joined = joined if joined.dtype == e.dtype else joined.to(e.dtype)
        if self.taps is not None:
            self.taps.setdefault("joined", []).append(joined)
            self.taps.setdefault("term", []).append(term)
        return joined


def hint_images(images, image_hw):
    """The condition images as Apply ControlNet gives them to the ControlNet: NCHW, scaled to the
    image size of the latents with ControlNet's default (nearest-exact, centre crop)."""
    h, w = image_hw
    return comfy.utils.common_upscale(images.movedim(-1, 1).float(), w, h, "nearest-exact", "center")


def controlled_forward(setup, model, module, device, scale, mode, dtype):
    """(x_t, t, idx, empty, taps=None) -> the denoiser's prediction with the ControlNet's residuals,
    times ``scale``, injected with ``mode`` ("sum": plain, "paper" / "min_norm": balanced). ``setup``
    gives the rows: ``images`` (IMAGE, one per latent), ``image_hw``, ``conds`` ((context, y) per
    latent) and ``empty`` (the empty prompt's, or None); training's setup, or the Asym node's."""
    dm = model.model.diffusion_model
    hints = hint_images(setup.images, setup.image_hw).to(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    patches = {"output_block_patch": [mi.OutputInjection()]}

    def forward(x_t, t, idx, is_empty, taps=None):
        rows = [setup.empty if (bool(e) and setup.empty is not None) else setup.conds[int(i)] for i, e in zip(idx, is_empty)]
        ctx, y = tn.stack_contexts(rows)
        kw = {} if y is None else {"y": y.to(device)}
        ctx = ctx.to(device)
        with autocast:
            res = module(x=x_t, hint=hints[idx.to(device)], timesteps=t.float(), context=ctx, **kw)
            stash = {"balance": TrainingInjection(mode, taps), "input": [],
                     "middle": [r * scale for r in res["middle"]], "output": [r * scale for r in res["output"]]}
            to = {"patches": patches, mi.STASH: stash}
            return dm(x_t, t.float(), context=ctx, transformer_options=to, **kw)

    return forward


def _save(setup, trainer):
    """The last checkpoint, then the ControlNet (float32, ComfyUI's layout) as <name>/controlnet.safetensors."""
    from safetensors.torch import save_file

    sd = {k: t.detach().float().cpu().contiguous() for k, t in setup.module.state_dict().items()}
    setup.saver(trainer)()  # checks every tensor for finite values first
    path = os.path.join(setup.folder, MODULE_FILE)
    tn.atomic_save(path, lambda p: save_file(sd, p, metadata={"xctrl_trained": setup.variant}))
    return path


def train_from_node(model, latents, images, positive, steps, **options):
    """The node's call (as Train ControlNeXt's: runtime/training.from_node); its text names the saved file."""
    return tn.from_node(train, NODE, lambda result: [result.path], model, latents, images, positive, steps, **options)

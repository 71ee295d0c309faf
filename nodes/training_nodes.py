"""Training a ControlNeXt (SD1.5, SDXL) inside ComfyUI: the node, the denoiser call with the
control injected, model management and the files (docs/training.md; the recipe and the loop are
models/controlnext_training.py).

The MODEL is trained in place for the run only: the selected UNet parameters become float32
trainable tensors, everything else is frozen, and every parameter gets its value, dtype and
requires_grad back when training ends, normally, by error or by interrupt. What was learned
leaves as the control (module + UNet differences), never as a changed MODEL.
"""
import contextlib
import logging
import os

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..models import controlnext as cnx
from ..models import controlnext_training as tr
from ..models.cross_norm import cross_normalize
from . import hints
from .controlnext_nodes import TRAINED_LAYOUT_KEY as LAYOUT_KEY
from .controlnext_nodes import TRAINED_UNET_KEY as UNET_SEMANTICS_KEY
from .controlnext_nodes import ControlNeXtType, LoadedControlNeXt
from .control_runner import image_size
from .controlnext_runtime import INJECTIONS
from .model_family import family_title, model_family, unet_block_channels
from .unet_patches import key_map_for

LOG = logging.getLogger("xctrl")
NODE = "Train ControlNeXt (XCtrl)"
CATEGORY = "XCtrl/ControlNeXt"
VARIANT_FOR_FAMILY = {"sdxl": "sdxl", "sd15": "sd15_training"}  # the training code's placement for SD1.5
MODULE_FILE, UNET_FILE, CHECKPOINT_FILE = "controlnet.safetensors", "unet_weight_increasements.safetensors", "checkpoint.pt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingResult:
    """What a run produced (the node's outputs, and what the tests compare)."""

    def __init__(self, control, losses, folder, trained_unet, base_unet):
        self.control, self.losses, self.folder = control, losses, folder
        self.trained_unet, self.base_unet = trained_unet, base_unet


def output_folder(name):
    base = folder_paths.get_folder_paths("controlnet")[0]
    clean = name.strip().strip("/\\")
    if not clean or ".." in clean.replace("\\", "/").split("/"):
        raise tr.TrainingError(f"{NODE}: the name {name!r} must be a folder name under models/controlnet (no '..')")
    return os.path.join(base, clean)


def _conditionings(conditioning, n, model, family, image_hw, what):
    """Per latent: (context, y or None) from a CONDITIONING of 1 or n entries."""
    if len(conditioning) not in (1, n):
        raise tr.TrainingError(f"{NODE}: the {what} has {len(conditioning)} entries but there are {n} latents: give one "
                               f"conditioning for all or one per latent")
    width = model.model.model_config.unet_config.get("context_dim")
    out = []
    for emb, opts in conditioning:
        if emb.shape[-1] != width:
            raise tr.TrainingError(f"{NODE}: the {what} has text embeddings {emb.shape[-1]} wide but this "
                                   f"{family_title(family)} MODEL takes {width}: encode it with this model's CLIP")
        y = None
        if family == "sdxl":
            h, w = image_hw
            kw = {"width": w, "height": h, "target_width": w, "target_height": h, **opts}
            if "pooled_output" not in kw:
                raise tr.TrainingError(f"{NODE}: the {what} has no pooled output: encode it with an SDXL CLIP")
            y = model.model.encode_adm(**kw)
        out.append((emb[:1].clone(), None if y is None else y.clone()))
    return out * n if len(out) == 1 else out


def _stack_contexts(items):
    """Contexts of different token counts repeated to their least common multiple (as ComfyUI batches them)."""
    import math

    tokens = 1
    for ctx, _ in items:
        tokens = tokens * ctx.shape[1] // math.gcd(tokens, ctx.shape[1])
    ctx = torch.cat([c.repeat(1, tokens // c.shape[1], 1) for c, _ in items])
    ys = None if items[0][1] is None else torch.cat([y for _, y in items])
    return ctx, ys


def _owner(dm, name):
    module_name, _, attr = name.rpartition(".")
    return (dm.get_submodule(module_name) if module_name else dm), attr


@contextlib.contextmanager
def trainable_unet(dm, names, device):
    """Selected parameters as float32 trainable tensors on ``device``, the rest frozen; all given back
    on exit (the same values, dtypes and requires_grad). Yields ({name: Parameter}, {name: value before}).

    ComfyUI loads models in inference mode, and autograd can neither track nor save inference
    tensors: frozen parameters that are inference tensors are replaced, one at a time, by normal
    copies of the same values (kept afterwards: only the tensor kind changes)."""
    for module in dm.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and p.is_inference():
                module._parameters[attr] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    originals = {n: _owner(dm, n)[0]._parameters[_owner(dm, n)[1]] for n in names}
    flags = {n: p.requires_grad for n, p in dm.named_parameters()}
    base = {n: p.detach().float().cpu().clone() for n, p in originals.items()}
    trained = {}
    try:
        for p in dm.parameters():
            p.requires_grad_(False)
        for n, p in originals.items():
            owner, attr = _owner(dm, n)
            trained[n] = owner._parameters[attr] = torch.nn.Parameter(p.detach().to(device=device, dtype=torch.float32, copy=True))
        yield trained, base
    finally:
        for n, p in originals.items():
            owner, attr = _owner(dm, n)
            owner._parameters[attr] = p
        for n, p in dm.named_parameters():
            p.requires_grad_(flags.get(n, False))
            p.grad = None


@contextlib.contextmanager
def checkpointed_blocks(dm, enabled):
    """torch.utils.checkpoint around every UNet block while training (activations recomputed in backward)."""
    if not enabled:
        yield
        return
    import torch.utils.checkpoint as ckpt

    blocks = list(dm.input_blocks) + [dm.middle_block] + list(dm.output_blocks)
    for b in blocks:
        original = b.forward
        b.forward = (lambda f: lambda *a, **k: ckpt.checkpoint(f, *a, use_reentrant=False, **k))(original)
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


def _atomic_save(path, write):
    """Writes through ``path``.partial, renamed only when complete: never a half-written file under the name."""
    partial = path + ".partial"
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _to_diffusers_names(model, ldm_sd):
    """{ComfyUI UNet name: tensor} -> diffusers names, as the released UNet files are written."""
    to_diff = {ldm: d for d, ldm in key_map_for(model).items()}
    missing = [k for k in ldm_sd if k not in to_diff]
    if missing:
        raise tr.TrainingError(f"{NODE}: no diffusers name for UNet parameters {missing[:3]}")
    return {to_diff[k]: v for k, v in ldm_sd.items()}


def train(*args, **kwargs):
    """Runs :func:`_train` with autograd on (ComfyUI runs nodes in inference mode)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _train(*args, **kwargs)


def _train(model, latent, images, positive, steps, batch_size=1, gradient_accumulation=1, lr_module=tr.LR_MODULE,
           lr_unet=tr.LR_UNET, unet_pattern="auto", scale=1.0, seed=0, empty_prompt_rate=0.2, empty_conditioning=None,
           gradient_checkpointing=False, training_dtype="float32", name="my_controlnext", checkpoint_every=100,
           resume=True, controlnext=None):
    family = model_family(model)
    if family not in VARIANT_FOR_FAMILY:
        raise tr.TrainingError(f"{NODE} trains ControlNeXt for SD1.5 and SDXL models; this MODEL is {family_title(family)}. "
                               "(SVD training needs the whole UNet on several GPUs: not offered.)")
    variant = VARIANT_FOR_FAMILY[family]
    x0 = latent["samples"].float().clone()  # inference-mode tensors from other nodes: normal copies
    images = images.clone()
    n = x0.shape[0]
    if images.shape[0] != n:
        raise tr.TrainingError(f"{NODE}: {images.shape[0]} condition images for {n} training latents: give one condition "
                               "image per latent (in the same order)")
    if empty_prompt_rate > 0 and empty_conditioning is None:
        raise tr.TrainingError(f"{NODE}: empty_prompt_rate is {empty_prompt_rate} but no empty_conditioning is connected: "
                               "connect CLIP Text Encode with an empty text, or set empty_prompt_rate to 0")
    image_hw = image_size(model.model, x0)
    conds = _conditionings(positive, n, model, family, image_hw, "positive conditioning")
    empty = _conditionings(empty_conditioning, 1, model, family, image_hw, "empty conditioning")[0] \
        if empty_conditioning is not None else None
    pattern = tr.DEFAULT_PATTERNS[family] if unet_pattern.strip() == "auto" else unet_pattern.strip()
    dm = model.model.diffusion_model
    names = tr.select_parameters(dm.named_parameters(), pattern, NODE)
    injection = INJECTIONS[variant]
    width = unet_block_channels(model)[injection.block]
    v = cnx.get_variant(variant)

    if controlnext is not None:
        if controlnext.family != cnx.SDXL_FAMILY:
            raise tr.TrainingError(f"{NODE}: {controlnext.name} is a ControlNeXt {cnx.module_family_title(controlnext.family)} "
                                   "module; training continues modules of the SDXL / SD1.5-Training layout only")
        module = cnx.build_controlnext(controlnext.state_dict, variant)
    else:
        # The module's initialisation from the seed, without touching the process's random state
        # (other nodes and other prompts of the same server draw from it).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            module = cnx.ControlNeXt(variant, out_channels=width)
    folder = output_folder(name)
    os.makedirs(folder, exist_ok=True)
    checkpoint_path = os.path.join(folder, CHECKPOINT_FILE)

    mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device
    module = module.to(device=device, dtype=torch.float32).train()
    hint_all = hints.resize(hints.image_to_nchw(images), image_hw).to(device)
    x0 = x0.to(device)
    sigmas = model.model.model_sampling.sigmas.float()  # the discrete schedule: a_t = 1 / (sigma_t^2 + 1)
    if sigmas.numel() != tr.NUM_TIMESTEPS:
        raise tr.TrainingError(f"{NODE}: the MODEL's noise schedule has {sigmas.numel()} steps, not {tr.NUM_TIMESTEPS}")
    alphas = 1.0 / (sigmas ** 2 + 1.0)
    dtype = DTYPES[training_dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    with trainable_unet(dm, names, device) as (unet_params, base_unet), checkpointed_blocks(dm, gradient_checkpointing):
        trainer = tr.Trainer(module, unet_params, n, batch_size, gradient_accumulation, lr_module, lr_unet,
                             empty_prompt_rate if empty is not None else 0.0, seed)
        if resume and os.path.isfile(checkpoint_path):
            trainer.load_state(torch.load(checkpoint_path, map_location=device, weights_only=True))
            LOG.info("[XCtrl] %s: resuming %s at step %d", NODE, folder, trainer.step)

        def forward(x_t, t, idx, is_empty):
            rows = [empty if (bool(e) and empty is not None) else conds[int(i)] for i, e in zip(idx, is_empty)]
            ctx, y = _stack_contexts(rows)
            feat = module(hint_all[idx.to(device)], t.float())
            s = torch.full((x_t.shape[0],), float(scale), device=device)

            def inject(h, transformer_options):
                if transformer_options.get("block") != injection.block:
                    return h
                return h + cross_normalize(h, feat, v.eps, v.order, s)

            to = {"patches": {"input_block_patch_after_skip": [inject]}}
            kw = {} if y is None else {"y": y.to(device)}
            with autocast:
                return dm(x_t, t.float(), context=ctx.to(device), transformer_options=to, **kw)

        save = lambda: _atomic_save(checkpoint_path, lambda p: torch.save(trainer.state(), p))  # noqa: E731
        pbar = comfy.utils.ProgressBar(steps)
        try:
            while trainer.step < steps:
                mm.throw_exception_if_processing_interrupted()
                loss = trainer.train_step(x0, alphas, forward)
                pbar.update_absolute(trainer.step, steps)
                if trainer.step % 10 == 0 or trainer.step == steps:
                    LOG.info("[XCtrl] %s: step %d/%d, loss %.5f", NODE, trainer.step, steps, loss)
                if checkpoint_every and trainer.step % checkpoint_every == 0 and trainer.step < steps:
                    save()
        except mm.InterruptProcessingException:
            save()  # the run so far is kept; resume continues it
            raise
        trained = {k: p.detach().float().cpu().clone() for k, p in unet_params.items()}

    module_sd = {k: t.detach().float().cpu().contiguous() for k, t in module.state_dict().items()}
    diffs = _to_diffusers_names(model, tr.weight_differences(trained, base_unet)) if trained else None
    from safetensors.torch import save_file

    _atomic_save(os.path.join(folder, MODULE_FILE), lambda p: save_file(module_sd, p, metadata={LAYOUT_KEY: variant}))
    if diffs:
        _atomic_save(os.path.join(folder, UNET_FILE), lambda p: save_file(diffs, p, metadata={UNET_SEMANTICS_KEY: "delta"}))
    save()
    rel = os.path.relpath(folder, folder_paths.get_folder_paths("controlnet")[0])
    control = LoadedControlNeXt(f"{rel}/{MODULE_FILE}", module_sd, f"{rel}/{UNET_FILE}" if diffs else None, diffs,
                                unet_delta=True, trained_for=variant)
    return TrainingResult(control, list(trainer.losses), folder, trained, base_unet)


class TrainControlNeXt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XCtrl_TrainControlNeXt",
            display_name=NODE,
            category=CATEGORY,
            description=(
                "Trains a ControlNeXt for a new condition with the authors' recipe: the whole control module (lr 1e-4) and "
                "the UNet weights matching the pattern (lr 1e-5), epsilon-prediction loss at uniform timesteps, a share of "
                "empty prompts. SD1.5 (the SD1.5-Training placement) and SDXL. Saves controlnet.safetensors and the UNet "
                "differences (unet_weight_increasements.safetensors) into models/controlnet/<name>/, plus a checkpoint to "
                "resume from; the output control works directly with Apply ControlNeXt."
            ),
            inputs=[
                io.Model.Input("model", tooltip="SD1.5 or SDXL base (not changed: what is learned leaves as the control)."),
                io.Latent.Input("latents", tooltip="Training images, VAE-encoded (one latent per image)."),
                io.Image.Input("images", tooltip="The condition image of each training image, in the same order."),
                io.Conditioning.Input("positive", tooltip="The captions: one conditioning for all, or one per latent."),
                io.Int.Input("steps", default=500, min=1, max=1000000),
                io.Int.Input("batch_size", default=1, min=1, max=256),
                io.Int.Input("gradient_accumulation", default=1, min=1, max=1024),
                io.Float.Input("lr_module", default=tr.LR_MODULE, min=0.0, max=1.0, step=1e-6),
                io.Float.Input("lr_unet", default=tr.LR_UNET, min=0.0, max=1.0, step=1e-7),
                io.String.Input("unet_pattern", default="auto", tooltip="Regular expression of the UNet parameters to train "
                                "(ComfyUI names). auto: the authors' default (SDXL .*attn2.*to_out.*, SD1.5 .*to_out.*); "
                                "empty: the control module only."),
                io.Float.Input("scale", default=1.0, min=0.0, max=10.0, step=0.01, tooltip="The control's scale in training."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1),
                io.Float.Input("empty_prompt_rate", default=0.2, min=0.0, max=1.0, step=0.01),
                io.Conditioning.Input("empty_conditioning", optional=True, tooltip="CLIP Text Encode of an empty text (needed "
                                      "for empty_prompt_rate > 0)."),
                io.Boolean.Input("gradient_checkpointing", default=False),
                io.Combo.Input("training_dtype", options=list(DTYPES), default="float32",
                               tooltip="Autocast dtype of the forward (trained weights stay float32)."),
                io.String.Input("name", default="my_controlnext", tooltip="Folder under models/controlnet for the files."),
                io.Int.Input("checkpoint_every", default=100, min=0, max=1000000, tooltip="Steps between checkpoints (0: none)."),
                io.Boolean.Input("resume", default=True, tooltip="Continue from the folder's checkpoint when there is one."),
                ControlNeXtType.Input("controlnext", optional=True, tooltip="A ControlNeXt to continue training (SDXL layout)."),
            ],
            outputs=[ControlNeXtType.Output(display_name="controlnext"), io.Image.Output(display_name="loss_curve"),
                     io.String.Output(display_name="saved")],
            is_output_node=True,
            is_input_list=True,
        )

    @classmethod
    def execute(cls, model, latents, images, positive, steps, batch_size, gradient_accumulation, lr_module, lr_unet,
                unet_pattern, scale, seed, empty_prompt_rate, gradient_checkpointing, training_dtype, name,
                checkpoint_every, resume, empty_conditioning=None, controlnext=None):
        # Inputs arrive as lists (is_input_list), so that the list outputs of ComfyUI's dataset nodes
        # (Load Image and Text Dataset from Folder, Make Training Dataset) plug in as they are.
        one = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731
        result = train(one(model), _joined_latents(latents), _joined_images(images), _per_latent_conditioning(positive),
                       one(steps), one(batch_size), one(gradient_accumulation), one(lr_module), one(lr_unet),
                       one(unet_pattern), one(scale), one(seed), one(empty_prompt_rate), one(empty_conditioning),
                       one(gradient_checkpointing), one(training_dtype), one(name), one(checkpoint_every), one(resume),
                       one(controlnext))
        saved = "\n".join(os.path.join(result.folder, f) for f in (MODULE_FILE, UNET_FILE) if os.path.isfile(os.path.join(result.folder, f)))
        return io.NodeOutput(result.control, tr.loss_curve_image(result.losses), saved, ui={"text": [saved]})


def _joined_latents(latents):
    items = latents if isinstance(latents, list) else [latents]
    return {"samples": _cat([d["samples"] for d in items], "training latents")}


def _joined_images(images):
    return _cat(images if isinstance(images, list) else [images], "condition images")


def _cat(tensors, what):
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) > 1:
        raise tr.TrainingError(f"{NODE}: the {what} have different sizes {sorted(shapes)}: resize them to one size first")
    return torch.cat(tensors)


def _per_latent_conditioning(positive):
    """One CONDITIONING (shared, or one entry per latent), or a list of them (one per latent, as
    Make Training Dataset gives them) -> one CONDITIONING."""
    items = positive if isinstance(positive, list) and positive and isinstance(positive[0], list) \
        and positive[0] and isinstance(positive[0][0], list) else [positive]
    if len(items) == 1:
        return items[0]
    return [c[0] for c in items]


NODES = [TrainControlNeXt]

"""Training a ControlNeXt (SD1.5, SDXL) inside ComfyUI: the checks before the first step, the
denoiser call with the control injected, model management, checkpoints and the files
(docs/training.md; the recipe and the loop are models/controlnext_training.py, the node
nodes/training_nodes.py).

The MODEL is trained in place for the run only: the selected UNet parameters become float32
trainable tensors, everything else is frozen, and every parameter gets its value, dtype and
requires_grad back when training ends, normally, by error or by interrupt. What was learned
leaves as the control (module + UNet differences), never as a changed MODEL.
"""
import contextlib
import hashlib
import logging
import math
import os

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..models import conservativity as cons
from ..models import controlnext as cnx
from ..models import controlnext_training as tr
from ..models.checkpoint_io import WeightFileError, load_pickle, new_file_mode
from . import batch_rows
from .control_runner import image_size
from .controlnext import INJECTIONS, cross_norm_term, injection_options
from .controlnext_apply import TRAINED_LAYOUT_KEY as LAYOUT_KEY
from .controlnext_apply import TRAINED_UNET_KEY as UNET_SEMANTICS_KEY
from .controlnext_apply import LoadedControlNeXt
from .model_family import family_title, model_family, unet_block_channels
from .unet_patches import key_map_for

LOG = logging.getLogger("xctrl")
NODE = "Train ControlNeXt (XCtrl)"
VARIANT_FOR_FAMILY = {"sdxl": "sdxl", "sd15": "sd15_training"}  # the training code's placement for SD1.5
MODULE_FILE, UNET_FILE, CHECKPOINT_FILE = "controlnet.safetensors", "unet_weight_increasements.safetensors", "checkpoint.pt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingResult:
    """What a run produced (the node's outputs, and what the tests compare)."""

    def __init__(self, control, losses, folder, trained_unet, base_unet, note="", stage_losses=()):
        self.control, self.losses, self.folder = control, losses, folder
        self.trained_unet, self.base_unet = trained_unet, base_unet
        self.note, self.stage_losses = note, list(stage_losses)


MAX_NAME_PART = 120  # characters per folder level: file systems stop at 255 bytes


def output_folder(name, node=NODE):
    """models/controlnet/<name>: a folder below the root (never the root itself, never outside it)."""
    base = folder_paths.get_folder_paths("controlnet")[0]
    clean = name.strip().strip("/\\")
    parts = clean.replace("\\", "/").split("/")
    if not clean or any(p in ("", ".", "..") for p in parts) or any(ord(c) < 32 for c in clean):  # NUL, newlines
        raise tr.TrainingError(f"{node}: the name {name!r} must name a folder under models/controlnet (letters, digits, "
                               "'-', '_'; no '.' or '..' levels), e.g. my_controlnext")
    if any(len(p) > MAX_NAME_PART for p in parts):
        raise tr.TrainingError(f"{node}: the name is {len(clean)} characters long: keep each folder name under "
                               f"{MAX_NAME_PART} characters")
    return os.path.join(base, *parts)


def prepare_folder(folder, resume, overwrite, node=NODE):
    """Checks, before the first step, that the run's files can be written and that no earlier run is
    replaced unless asked. Returns True when the folder's checkpoint is to be resumed."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".xctrl-write-test")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise tr.TrainingError(f"{node}: cannot write into {folder} ({e.strerror or e}): make it writable or pick "
                               "another name; nothing was trained") from None
    earlier = [f for f in (MODULE_FILE, UNET_FILE, CHECKPOINT_FILE) if os.path.isfile(os.path.join(folder, f))]
    if overwrite or not earlier:
        return False
    if resume and CHECKPOINT_FILE in earlier:
        return True
    raise tr.TrainingError(
        f"{node}: {folder} already holds an earlier run ({', '.join(earlier)}): pick another name, "
        + ("turn overwrite on to replace it" if resume else "turn resume on to continue it, or overwrite on to replace it"))


def read_checkpoint(path, settings, node=NODE):
    """The folder's checkpoint, read without running code, checked to be this node's and made
    with the same settings (a changed setting is refused, never silently ignored)."""
    fix = "turn overwrite on to start this run again, or pick another name"
    try:
        state = load_pickle(path)
    except WeightFileError as e:
        raise tr.TrainingError(f"{node}: cannot resume from {path}: {e.problem} ({fix})") from None
    needed = ("step", "losses", "module", "unet", "optimizer", "generator")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise tr.TrainingError(f"{node}: {path} is not a checkpoint of this node ({fix})")
    before = state.get("settings") or {}
    changed = [f"{k} {before[k]!r} -> {v!r}" for k, v in settings.items() if k in before and before[k] != v]
    if changed:
        raise tr.TrainingError(f"{node}: the run in {os.path.dirname(path)} was trained with other settings "
                               f"({'; '.join(changed)}): resuming would ignore them. {fix[0].upper() + fix[1:]}, or "
                               "set them back to continue it")
    bad = tr.non_finite_tensors(state)
    if bad:
        raise tr.TrainingError(f"{node}: {path} holds NaN or infinite values ({', '.join(bad[:3])}) ({fix})")
    return state


def check_finite_inputs(tensors, node=NODE):
    """Refuses NaN / inf in the training data before the first step."""
    for what, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise tr.TrainingError(f"{node}: the {what} contain NaN or infinite values: fix the node that makes them "
                                   "(a NaN latent trains a NaN control); nothing was trained")


def conditionings(conditioning, n, model, family, image_hw, what, node=NODE):
    """Per latent: (context, y or None) from a CONDITIONING of 1 or n entries."""
    if len(conditioning) not in (1, n):
        raise tr.TrainingError(f"{node}: the {what} has {len(conditioning)} entries but there are {n} latents: give one "
                               f"conditioning for all or one per latent")
    width = model.model.model_config.unet_config.get("context_dim")
    out = []
    for emb, opts in conditioning:
        if emb.shape[-1] != width:
            raise tr.TrainingError(f"{node}: the {what} has text embeddings {emb.shape[-1]} wide but this "
                                   f"{family_title(family)} MODEL takes {width}: encode it with this model's CLIP")
        y = None
        if family == "sdxl":
            h, w = image_hw
            kw = {"width": w, "height": h, "target_width": w, "target_height": h, **opts}
            if "pooled_output" not in kw:
                raise tr.TrainingError(f"{node}: the {what} has no pooled output: encode it with an SDXL CLIP")
            y = model.model.encode_adm(**kw)
        out.append((emb[:1].clone(), None if y is None else y.clone()))
    return out * n if len(out) == 1 else out


def stack_contexts(items):
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


def _file_mode():
    return new_file_mode()  # reads the umask without setting it (no race with other threads)


FILE_MODE = _file_mode()  # what a plain open() would give: writers that go through a temporary file use 0600


def atomic_save(path, write):
    """Writes through ``path``.partial, renamed only when complete: never a half-written file under the name."""
    partial = path + ".partial"
    try:
        write(partial)
        os.chmod(partial, FILE_MODE)
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


class Options:
    """The run's settings besides model, data and steps (the node's inputs, with its defaults)."""

    DEFAULTS = {"batch_size": 1, "gradient_accumulation": 1, "lr_module": tr.LR_MODULE, "lr_unet": tr.LR_UNET,
                "unet_pattern": "auto", "scale": 1.0, "seed": 0, "empty_prompt_rate": 0.2, "empty_conditioning": None,
                "gradient_checkpointing": False, "training_dtype": "float32", "name": "my_controlnext",
                "checkpoint_every": 100, "resume": True, "controlnext": None, "overwrite": False,
                "conservativity_weight": 0.0, "conservativity_probes": 1, "conservativity_from_step": 0,
                "conservativity_probe": "rademacher"}

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.DEFAULTS))
        if unknown:
            raise TypeError(f"{NODE}: unknown training options {unknown}")
        for k, v in {**self.DEFAULTS, **options}.items():
            setattr(self, k, v)

    def settings(self, variant, n):
        """What a resumed run must share with the checkpoint's run."""
        return {"variant": variant, "latents": n, "batch_size": int(self.batch_size),
                "gradient_accumulation": int(self.gradient_accumulation), "lr_module": float(self.lr_module),
                "lr_unet": float(self.lr_unet), "unet_pattern": self.unet_pattern.strip(), "scale": float(self.scale),
                "seed": int(self.seed), "empty_prompt_rate": float(self.empty_prompt_rate),
                "training_dtype": self.training_dtype}

    def stage(self):
        """The conservativity stage's settings, [weight, probes, probe kind, first step], or None (no stage)."""
        if float(self.conservativity_weight) <= 0:
            return None
        return [float(self.conservativity_weight), int(self.conservativity_probes), self.conservativity_probe,
                int(self.conservativity_from_step)]


def train(model, latent, images, positive, steps, **options):
    """Trains a ControlNeXt (options: :class:`Options`) and saves it; returns a :class:`TrainingResult`.
    Autograd is on for the run (ComfyUI runs nodes in inference mode)."""
    opts = Options(**options)
    with torch.inference_mode(False), torch.enable_grad():
        setup = Setup(model, latent, images, positive, steps, opts)  # everything checked before anything loads
        trainer, trained, base_unet = run_steps(model, setup, steps, opts)
        control = _save_run(model, setup.module, trained, base_unet, setup.variant, setup.folder, setup.saver(trainer))
    return TrainingResult(control, list(trainer.losses), setup.folder, trained, base_unet, run_note(setup, trainer, steps),
                          trainer.stage_losses)


def run_note(setup, trainer, steps):
    """The first lines of a training node's text output: a run that was already at ``steps`` says
    so; the conservativity stage's loss at the last step, when it ran."""
    lines = []
    if setup.already(trainer) >= steps:
        lines.append(f"already trained to step {setup.already(trainer)} (checkpoint in {setup.folder}): nothing new was "
                     "trained")
    if trainer.stage_losses and trainer.stage_losses[-1]:
        lines.append(f"conservativity loss at the last step: {trainer.stage_losses[-1]:.6g}")
    return "\n".join(lines)


class Setup:
    """Everything checked and prepared before the first step: data, conditionings, the parameters
    to train, the module, the output folder and the checkpoint to resume (nothing loaded to a device)."""

    node = NODE
    numbers = ("lr_module", "lr_unet", "scale", "empty_prompt_rate")  # inputs that must be finite
    lr = "lr_module"  # the learning rate of the module the conservativity stage trains

    def __init__(self, model, latent, images, positive, steps, opts):
        self.family = model_family(model)
        if self.family not in VARIANT_FOR_FAMILY:
            raise tr.TrainingError(f"{NODE} trains ControlNeXt for SD1.5 and SDXL models; this MODEL is "
                                   f"{family_title(self.family)}. (SVD training needs the whole UNet on several GPUs: not offered.)")
        self.variant = VARIANT_FOR_FAMILY[self.family]
        self.data(model, latent, images, positive, steps, opts)
        pattern = tr.DEFAULT_PATTERNS[self.family] if opts.unet_pattern.strip() == "auto" else opts.unet_pattern.strip()
        self.names = tr.select_parameters(model.model.diffusion_model.named_parameters(), pattern, NODE)
        self.injection = INJECTIONS[self.variant]
        self.module = self._module(model, opts.controlnext, opts.seed)
        self.files(opts, opts.settings(self.variant, self.n))

    def data_fingerprint(self):
        """A short hash of the training data (latents, condition images sampled every 4th pixel, the
        prompts' tensors): a run resumed on other data would silently return the old module."""
        h = hashlib.sha256()
        tensors = [self.x0, self.images[:, ::4, ::4]] + [t for cond in self.conds for t in cond if t is not None]
        seen = set()
        for t in tensors:
            if id(t) not in seen:  # one prompt for every latent is one tensor
                seen.add(id(t))
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def data(self, model, latent, images, positive, steps, opts):
        """The training data, the numbers and the stage's inputs checked; the conditionings per latent."""
        self.x0 = latent["samples"].float().clone()  # inference-mode tensors from other nodes: normal copies
        self.images = images.clone()
        self.n = n = self.x0.shape[0]
        _check_numbers(opts, self.numbers, self.node)
        _check_data(model, self.x0, self.images, positive, opts.empty_conditioning, opts.empty_prompt_rate, self.node)
        _check_stage(opts, steps, self.node, self.lr)
        self.image_hw = image_size(model.model, self.x0)
        self.conds = conditionings(positive, n, model, self.family, self.image_hw, "positive conditioning", self.node)
        self.empty = conditionings(opts.empty_conditioning, 1, model, self.family, self.image_hw, "empty conditioning",
                                   self.node)[0] if opts.empty_conditioning is not None else None

    def files(self, opts, settings):
        """The output folder checked writable, and the checkpoint to resume (same settings and data) if any."""
        self.settings = dict(settings, **{DATA_KEY: self.data_fingerprint()})
        self.folder = output_folder(opts.name, self.node)
        self.checkpoint_path = os.path.join(self.folder, CHECKPOINT_FILE)
        resuming = prepare_folder(self.folder, opts.resume, opts.overwrite, self.node)
        self.state = read_checkpoint(self.checkpoint_path, self.settings, self.node) if resuming else None
        self.settings[STAGE_KEY] = opts.stage()
        if self.state is not None:
            _check_stage_change(self.state, opts.stage(), self.folder, self.node)

    def _module(self, model, controlnext, seed):
        if controlnext is not None:
            if controlnext.family != cnx.SDXL_FAMILY:
                raise tr.TrainingError(f"{NODE}: {controlnext.name} is a ControlNeXt {cnx.module_family_title(controlnext.family)} "
                                       "module; training continues modules of the SDXL / SD1.5-Training layout only")
            return cnx.build_controlnext(controlnext.state_dict, self.variant)
        # The module's initialisation from the seed, without touching the process's random state
        # (other nodes and other prompts of the same server draw from it).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return cnx.ControlNeXt(self.variant, out_channels=unet_block_channels(model)[self.injection.block])

    def already(self, trainer):
        """The step the run was resumed at (0 for a new run)."""
        return int(self.state["step"]) if self.state is not None else 0

    def forward(self, model, module, device, opts):
        return _forward(self, model, module, device, opts.scale, DTYPES[opts.training_dtype])

    def saver(self, trainer):
        return lambda: _save_checkpoint(trainer, self.settings, self.checkpoint_path, self.node)


DATA_KEY = "data (latents, condition images, prompts)"  # its fingerprint in a checkpoint's settings
STAGE_KEY = "conservativity"  # the stage's settings in a checkpoint (may change while no step of it ran)


def _check_numbers(opts, keys=("lr_module", "lr_unet", "scale", "empty_prompt_rate"), node=NODE):
    """NaN / infinite learning rates, scale or empty-prompt rate: refused before any step."""
    bad = [k for k in keys if not math.isfinite(float(getattr(opts, k)))]
    if bad:
        raise tr.TrainingError(f"{node}: {', '.join(bad)} must be a finite number, got NaN or infinity; nothing was trained")


def _check_stage(opts, steps, node=NODE, lr="lr_module"):
    """The conservativity stage's inputs, before the first step."""
    if opts.conservativity_probe not in cons.PROBES:
        raise tr.TrainingError(f"{node}: conservativity_probe {opts.conservativity_probe!r} is not one of {cons.PROBES}")
    if float(opts.conservativity_weight) <= 0:
        return
    weight, start = float(opts.conservativity_weight), int(opts.conservativity_from_step)
    if start >= int(steps):
        raise tr.TrainingError(f"{node}: conservativity_from_step is {start} but the run ends at step {steps}: the "
                               "conservativity stage would never run. Set it below steps (the paper: after stage 1 "
                               "converged), raise steps, or set conservativity_weight to 0")
    nothing = ("conservativity_probes is 0" if int(opts.conservativity_probes) < 1 else
               f"{lr} is 0 (the loss trains the control module only, the UNet is kept out of it)"
               if float(getattr(opts, lr)) == 0 else
               "scale is 0 (the control adds nothing, so there is no Jacobian of it)" if float(opts.scale) == 0 else None)
    if nothing:
        raise tr.TrainingError(f"{node}: conservativity_weight is {weight:g} but {nothing}: there is nothing to apply it "
                               "to. Set conservativity_weight to 0, or fix that input")


def _check_stage_change(state, now, folder, node=NODE):
    """A resumed run may change the conservativity stage only while none of its steps has run."""
    before = (state.get("settings") or {}).get(STAGE_KEY)
    before = list(before) if before else None
    if before == now:
        return
    first = min(s[3] for s in (before, now) if s)
    if int(state["step"]) > first:
        raise tr.TrainingError(f"{node}: the run in {folder} is at step {int(state['step'])}, past the conservativity "
                               f"stage's first step {first}, and its conservativity settings changed ({before} -> {now}): "
                               "resuming would mix them. Set them back to continue it, turn overwrite on to start again, "
                               "or pick another name")


def _check_data(model, x0, images, positive, empty_conditioning, empty_prompt_rate, node=NODE):
    n = x0.shape[0]
    channels = model.model.latent_format.latent_channels
    if x0.dim() != 4 or x0.shape[1] != channels:
        raise tr.TrainingError(f"{node}: the training latents have shape {tuple(x0.shape)} but this "
                               f"{family_title(model_family(model))} MODEL takes {channels} latent channels: encode the "
                               "images with this model's VAE")
    if images.shape[0] != n:
        raise tr.TrainingError(f"{node}: {images.shape[0]} condition images for {n} training latents: give one condition "
                               "image per latent (in the same order)")
    if empty_prompt_rate > 0 and empty_conditioning is None:
        raise tr.TrainingError(f"{node}: empty_prompt_rate is {empty_prompt_rate} but no empty_conditioning is connected: "
                               "connect CLIP Text Encode with an empty text, or set empty_prompt_rate to 0")
    conds = [c[0] for c in positive] + [c[0] for c in (empty_conditioning or [])]
    check_finite_inputs({"training latents": x0, "condition images": images,
                         "conditionings": torch.cat([c.flatten().float() for c in conds]) if conds else None}, node)


def run_steps(model, setup, steps, opts):
    """Loads the MODEL, trains to ``steps`` (resuming the checkpoint if any) and gives the MODEL
    back; returns (trainer, trained UNet tensors, their values before)."""
    mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device
    sigmas = model.model.model_sampling.sigmas.float()  # the discrete schedule: a_t = 1 / (sigma_t^2 + 1)
    if sigmas.numel() != tr.NUM_TIMESTEPS:
        raise tr.TrainingError(f"{setup.node}: the MODEL's noise schedule has {sigmas.numel()} steps, not {tr.NUM_TIMESTEPS}")
    module = setup.module.to(device=device, dtype=torch.float32).train()
    dm = model.model.diffusion_model
    with trainable_unet(dm, setup.names, device) as (unet_params, base_unet), \
            checkpointed_blocks(dm, opts.gradient_checkpointing):
        trainer = tr.Trainer(module, unet_params, setup.n, opts.batch_size, opts.gradient_accumulation,
                             float(getattr(opts, setup.lr)), getattr(opts, "lr_unet", 0.0),
                             opts.empty_prompt_rate if setup.empty is not None else 0.0, opts.seed)
        if setup.state is not None:
            _resume(trainer, setup.state, device, setup.checkpoint_path, setup.node)
        forward = setup.forward(model, module, device, opts)
        stage = opts.stage()
        if stage is not None:
            trainer.stage = cons.ConservativityStage(stage[0], stage[1], stage[2], stage[3], module.parameters(),
                                                     _tapped(forward))
        _loop(trainer, steps, setup.x0.to(device), 1.0 / (sigmas ** 2 + 1.0), forward, setup.saver(trainer),
              opts.checkpoint_every, setup.node)
        trained = {k: p.detach().float().cpu().clone() for k, p in unet_params.items()}
    return trainer, trained, base_unet


def _resume(trainer, state, device, path, node=NODE):
    try:
        trainer.load_state({k: (v if k == "generator" else _to(v, device)) for k, v in state.items()})
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise tr.TrainingError(f"{node}: cannot resume from {path}: it does not fit this run ({e}); turn overwrite on "
                               "to start again, or pick another name") from None
    LOG.info("[XCtrl] %s: resuming %s at step %d", node, os.path.dirname(path), trainer.step)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _forward(setup, model, module, device, scale, dtype):
    """The denoiser's prediction with the control injected at the variant's point (training's own call)."""
    dm = model.model.diffusion_model
    hint_all = batch_rows.resize(batch_rows.image_to_nchw(setup.images), setup.image_hw).to(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def forward(x_t, t, idx, is_empty, taps=None):
        rows = [setup.empty if (bool(e) and setup.empty is not None) else setup.conds[int(i)] for i, e in zip(idx, is_empty)]
        ctx, y = stack_contexts(rows)
        feat = module(hint_all[idx.to(device)], t.float())
        term = cross_norm_term(setup.variant, feat, torch.full((x_t.shape[0],), float(scale), device=device))
        to = injection_options(setup.variant, lambda h: joined_with(h, term(h), taps))
        kw = {} if y is None else {"y": y.to(device)}
        with autocast:
            return dm(x_t, t.float(), context=ctx.to(device), transformer_options=to, **kw)

    return forward


def joined_with(h, term, taps):
    """h with the control's term added; ``taps`` (a dict, or None) gets both (for the conservativity stage)."""
    joined = h + term
    if taps is not None:
        taps["term"], taps["joined"] = term, joined
    return joined


def _tapped(forward):
    """(x, t, idx, empty) -> (output, activation after the control joined, the control's term there).
    Attention runs as plain tensor operations here: the loss differentiates a backward pass, which
    fused attention kernels do not support."""
    def tapped(x, t, idx, is_empty):
        taps = {}
        with math_attention():
            out = forward(x, t, idx, is_empty, taps)
        return out, taps["joined"], taps["term"]

    return tapped


def math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: its default scaled_dot_product_attention path
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _loop(trainer, steps, x0, alphas, forward, save, checkpoint_every, node=NODE):
    """The steps; a checkpoint every ``checkpoint_every`` steps and on an interrupt. A non-finite
    loss stops the run before that step changes anything, keeping the last good checkpoint."""
    pbar = comfy.utils.ProgressBar(steps)
    try:
        while trainer.step < steps:
            mm.throw_exception_if_processing_interrupted()
            loss = trainer.train_step(x0, alphas, forward)
            pbar.update_absolute(trainer.step, steps)
            if trainer.step % 10 == 0 or trainer.step == steps:
                LOG.info("[XCtrl] %s: step %d/%d, loss %.5f", node, trainer.step, steps, loss)
            if checkpoint_every and trainer.step % checkpoint_every == 0 and trainer.step < steps:
                save()
    except mm.InterruptProcessingException:
        save()  # the run so far is kept; resume continues it
        raise
    except tr.NonFiniteError as e:
        raise tr.TrainingError(f"{node}: {e}: the run stopped and nothing of it was saved past the last checkpoint "
                               "(resume continues from there). Lower the learning rate(s), or train in float32") from None


def _save_checkpoint(trainer, settings, path, node=NODE):
    state = trainer.state()
    bad = tr.non_finite_tensors(state)
    if bad:  # never replace a good checkpoint with a broken one
        raise tr.TrainingError(f"{node}: the weights became NaN or infinite ({', '.join(bad[:3])}): the run stopped and "
                               f"the last good checkpoint in {os.path.dirname(path)} is kept. Lower the learning rate(s)")
    state["settings"] = settings
    atomic_save(path, lambda p: torch.save(state, p))


def _save_run(model, module, trained, base_unet, variant, folder, save):
    """The module, the UNet differences (a stale file of an earlier run removed) and the last checkpoint."""
    from safetensors.torch import save_file

    module_sd = {k: t.detach().float().cpu().contiguous() for k, t in module.state_dict().items()}
    diffs = _to_diffusers_names(model, tr.weight_differences(trained, base_unet)) if trained else None
    save()  # checks every tensor for finite values first
    atomic_save(os.path.join(folder, MODULE_FILE), lambda p: save_file(module_sd, p, metadata={LAYOUT_KEY: variant}))
    unet_path = os.path.join(folder, UNET_FILE)
    if diffs:
        atomic_save(unet_path, lambda p: save_file(diffs, p, metadata={UNET_SEMANTICS_KEY: "delta"}))
    elif os.path.isfile(unet_path):
        os.remove(unet_path)  # an earlier run's UNet differences do not belong to this module
    rel = os.path.relpath(folder, folder_paths.get_folder_paths("controlnet")[0])
    return LoadedControlNeXt(f"{rel}/{MODULE_FILE}", module_sd, f"{rel}/{UNET_FILE}" if diffs else None, diffs,
                             unet_delta=True, trained_for=variant)


LR_MODULE, LR_UNET = tr.LR_MODULE, tr.LR_UNET  # the node's defaults
PROBES = cons.PROBES


def train_from_node(model, latents, images, positive, steps, **options):
    """Train ControlNeXt's node call (see from_node); its text names the module and UNet files."""
    return from_node(train, NODE, _saved_files, model, latents, images, positive, steps, **options)


def _saved_files(result):
    return [os.path.join(result.folder, f) for f in (MODULE_FILE, UNET_FILE) if os.path.isfile(os.path.join(result.folder, f))]


def from_node(train_run, node, saved_files, model, latents, images, positive, steps, **options):
    """A training node's inputs as it gets them (is_input_list: every input a list, so that the list
    outputs of ComfyUI's dataset nodes plug in as they are) -> ``train_run``'s (control, loss curve
    image, text: the run's note and ``saved_files(result)``)."""
    one = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731
    options = {k: one(v) for k, v in options.items()}
    options["overwrite"] = bool(options.get("overwrite", False))
    result = train_run(one(model), joined_latents(latents, node), joined_images(images, node),
                       per_latent_conditioning(positive), one(steps), **options)
    saved = "\n".join([result.note] * bool(result.note) + saved_files(result))
    return result.control, tr.loss_curve_image(result.losses, stage_losses=result.stage_losses), saved


def joined_latents(latents, node=NODE):
    items = latents if isinstance(latents, list) else [latents]
    return {"samples": _cat([d["samples"] for d in items], "training latents", node)}


def joined_images(images, node=NODE):
    return _cat(images if isinstance(images, list) else [images], "condition images", node)


def _cat(tensors, what, node=NODE):
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) > 1:
        raise tr.TrainingError(f"{node}: the {what} have different sizes {sorted(shapes)}: resize them to one size first")
    return torch.cat(tensors)


def per_latent_conditioning(positive):
    """One CONDITIONING (shared, or one entry per latent), or a list of them (one per latent, as
    Make Training Dataset gives them) -> one CONDITIONING."""
    items = positive if isinstance(positive, list) and positive and isinstance(positive[0], list) \
        and positive[0] and isinstance(positive[0][0], list) else [positive]
    if len(items) == 1:
        return items[0]
    return [c[0] for c in items]


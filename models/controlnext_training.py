"""Training a ControlNeXt module (and a subset of UNet weights) with the authors' recipe.

Pure torch; the glue gives :class:`Trainer` a function that runs the denoiser (docs/training.md):

- trained: the whole control module (learning rate 1e-4) and the UNet parameters whose name
  matches a pattern (the authors' SDXL default ``attn2 ... to_out``, SD1.5 every ``to_out``;
  learning rate 1e-5); everything else frozen. AdamW, as the authors' scripts.
- loss: epsilon prediction MSE at uniformly drawn discrete timesteps 0..999 (DDPM training:
  x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps), with a share of empty prompts (default 20 %).
- the control feature is cross-normalized into the UNet at the variant's training point with
  scale ``scale`` (SDXL: after conv_in; SD1.5: the SD1.5-Training placement, after input block 3).
- saved: the module (``controlnet.safetensors``, the released key layout) and the UNet part as
  weight differences W_trained - W_base (``unet_weight_increasements.safetensors``, the name the
  authors' training scripts give them; differences are base-agnostic).

Everything random (batch order, timesteps, noise, empty prompts) comes from one seeded
generator, whose state is part of a checkpoint: a resumed run continues the same sequence.
"""
import re

import torch

LR_MODULE, LR_UNET = 1e-4, 1e-5
DEFAULT_PATTERNS = {"sdxl": r".*attn2.*to_out.*", "sd15": r".*to_out.*"}  # the authors' training defaults
NUM_TIMESTEPS = 1000


class TrainingError(ValueError):
    """Training cannot start as configured (the message names the fix)."""


class NonFiniteError(TrainingError):
    """A loss or a weight became NaN or infinite."""


def non_finite_tensors(tensors):
    """Names of the tensors in {name: tensor} (nested dicts and lists walked) holding NaN or inf."""
    bad = []

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(prefix)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)

    walk("", tensors)
    return bad


def select_parameters(named_parameters, pattern, node="XCtrl"):
    """Names (in order) of the parameters matching ``pattern`` (re.fullmatch); empty pattern: none."""
    if not pattern:
        return []
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise TrainingError(f"{node}: the UNet parameter pattern {pattern!r} is not a regular expression ({e})") from None
    names = [n for n, _ in named_parameters if rx.fullmatch(n)]
    if not names:
        raise TrainingError(f"{node}: the UNet parameter pattern {pattern!r} matches no UNet parameter (names look like "
                            "'input_blocks.4.1.transformer_blocks.0.attn2.to_out.0.weight'): fix the pattern, or leave it "
                            "empty to train the control module only")
    return names


def noised(x0, noise, timesteps, alphas_cumprod):
    """DDPM forward process: sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
    a = alphas_cumprod.to(x0.device, torch.float32)[timesteps].reshape(-1, *([1] * (x0.dim() - 1)))
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


class Trainer:
    """Optimizer, step counter, losses and the random stream of one training run.

    ``forward(x_t, timesteps, batch_indices, empty)`` -> (predicted eps) is given by the glue:
    it builds the control feature from the module and runs the denoiser with it injected.
    """

    def __init__(self, module, unet_params, n_items, batch_size=1, accumulation=1, lr_module=LR_MODULE,
                 lr_unet=LR_UNET, empty_rate=0.0, seed=0):
        self.module = module
        self.unet_params = dict(unet_params)  # name -> Parameter (trained in place)
        groups = [{"params": list(module.parameters()), "lr": lr_module}]
        if self.unet_params:
            groups.append({"params": list(self.unet_params.values()), "lr": lr_unet})
        self.optimizer = torch.optim.AdamW(groups)
        self.n_items, self.batch_size, self.accumulation = int(n_items), int(batch_size), max(1, int(accumulation))
        self.empty_rate = float(empty_rate)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.step = 0
        self.losses = []
        self.stage = None  # an optional second stage adding a loss (conservativity.ConservativityStage)
        self.stage_losses = []  # its loss per step it ran (0.0 before it starts)

    def draw(self, x0_shape):
        """(batch indices, timesteps, noise, empty-prompt flags) of one micro-batch."""
        g = self.generator
        idx = torch.randint(0, self.n_items, (self.batch_size,), generator=g)
        t = torch.randint(0, NUM_TIMESTEPS, (self.batch_size,), generator=g)
        noise = torch.randn((self.batch_size, *x0_shape), generator=g)
        empty = torch.rand(self.batch_size, generator=g) < self.empty_rate
        return idx, t, noise, empty

    def train_step(self, latents, alphas_cumprod, forward):
        """One optimizer step over ``accumulation`` micro-batches; returns the mean loss.

        All or nothing: a step stopped part-way (an interrupt inside the forward, an error) leaves
        the random draws, the weights and the optimizer as they were before it, so a checkpoint
        written then resumes with exactly this step. A non-finite loss raises before the weights change.
        """
        draws = self.generator.get_state()
        try:
            return self._train_step(latents, alphas_cumprod, forward)
        except BaseException:
            self.generator.set_state(draws)
            self.optimizer.zero_grad(set_to_none=True)
            raise

    def _train_step(self, latents, alphas_cumprod, forward):
        self.optimizer.zero_grad(set_to_none=True)
        total = extra = 0.0
        for _ in range(self.accumulation):
            idx, t, noise, empty = self.draw(tuple(latents.shape[1:]))
            x0 = latents[idx]
            noise = noise.to(x0.device, x0.dtype)
            x_t = noised(x0, noise, t.to(x0.device), alphas_cumprod)
            pred = forward(x_t, t.to(x0.device), idx, empty)
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            if not torch.isfinite(loss.detach()):
                raise NonFiniteError(f"the loss is {float(loss.detach())} at step {self.step + 1}")
            (loss / self.accumulation).backward()
            total += float(loss.detach())
            if self.stage is not None and self.stage.active(self.step):
                extra += self._stage_loss(x_t, t.to(x0.device), idx, empty)
        self.optimizer.step()
        self.step += 1
        self.losses.append(total / self.accumulation)
        if self.stage is not None:
            self.stage_losses.append(extra / self.accumulation)
        return self.losses[-1]

    def _stage_loss(self, x_t, t, idx, empty):
        """The second stage's loss on this micro-batch; its gradient goes to the stage's parameters only."""
        loss = self.stage.loss(x_t, t, idx, empty, self.generator)
        if not torch.isfinite(loss.detach()):
            raise NonFiniteError(f"the conservativity loss is {float(loss.detach())} at step {self.step + 1}")
        self.stage.add_gradients(loss, 1.0 / self.accumulation)
        return float(loss.detach())

    # ------------------------------------------------------------------ checkpoints
    def state(self):
        """Everything a resume needs (tensors, numbers, lists: loadable with weights_only=True)."""
        return {"step": self.step, "losses": torch.tensor(self.losses, dtype=torch.float64),
                "module": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
                "unet": {k: p.detach().cpu().clone() for k, p in self.unet_params.items()},
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "stage_losses": torch.tensor(self.stage_losses, dtype=torch.float64)}

    def load_state(self, state):
        self.module.load_state_dict(state["module"])
        with torch.no_grad():
            for k, p in self.unet_params.items():
                if k not in state["unet"]:
                    raise TrainingError(f"the checkpoint holds no UNet parameter {k}: it was trained with another pattern")
                p.copy_(state["unet"][k].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.losses = [float(v) for v in state["losses"]]
        self.stage_losses = [float(v) for v in state.get("stage_losses", [])]


def weight_differences(trained, base):
    """{name: W_trained - W_base} in float32 on the CPU."""
    return {k: (trained[k].detach().float().cpu() - base[k].float().cpu()).contiguous() for k in trained}


def loss_curve_image(losses, width=512, height=256, stage_losses=()):
    """A plot of the loss per step (smoothed line over the raw points) as float32 (1, H, W, 3) in [0, 1]; with
    the conservativity stage's loss per step (0 before the stage), its curve too, in orange on its own scale."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (24, 24, 28))
    d = ImageDraw.Draw(img)
    pad = 28
    box = (pad, 8, width - 8, height - pad)
    d.rectangle(box, outline=(90, 90, 100))
    if losses:
        lo, hi = _draw_curve(d, box, len(losses), list(enumerate(losses)), (120, 200, 255), dots=True)
        d.text((pad + 4, 10), f"loss {hi:.4g}", fill=(200, 200, 200))
        d.text((pad + 4, height - pad - 14), f"{lo:.4g}", fill=(200, 200, 200))
        d.text((width - 120, height - pad + 6), f"{len(losses)} steps", fill=(200, 200, 200))
    stage = [(i, v) for i, v in enumerate(stage_losses) if v]
    if losses and stage:
        lo, hi = _draw_curve(d, box, len(losses), stage, (255, 170, 70))
        d.text((pad + 4, height - pad + 6), f"conservativity loss {lo:.3g} .. {hi:.3g} (from step {stage[0][0] + 1})",
               fill=(255, 170, 70))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def _draw_curve(d, box, n, points, colour, dots=False):
    """(step, value) points on the step axis of n steps, scaled to their own range: a smoothed line (over the
    raw points when ``dots``). Returns the range."""
    values = [v for _, v in points]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    left, top, right, bottom = box

    def at(i, v):
        return left + (right - left) * (i / max(1, n - 1)), top + (bottom - top) * (1 - (v - lo) / span)

    if dots:
        for i, v in points:
            d.point(at(i, v), fill=(120, 120, 140))
    k = max(1, len(points) // 20)
    smooth = [sum(values[max(0, j - k):j + 1]) / len(values[max(0, j - k):j + 1]) for j in range(len(values))]
    line = [at(i, v) for (i, _), v in zip(points, smooth)]
    d.line(line if len(line) > 1 else line * 2, fill=colour, width=2)
    return lo, hi


"""Silent-signal data balancing on a toy: does balanced data raise the total variation that the
controlled denoiser generates where the condition is silent? (MIControlNet's data claim,
docs/mi_training.md.)

Toy task (the tiny SD1.5-like UNet of bench/training.py, latent 8 x 8): the latent is cut into
four 4 x 4 quadrants; each is independently textured (a +-1 checkerboard of random phase on
channel 0) or flat (0), with probability 1/2. The condition is white over the textured
quadrants and black (silent) over the flat ones, as an edge map is empty where an image is
smooth: in this plain data a silent condition always means a flat image. The balanced data is
the same pairs through models/silent_signal.balance with the quadrants as the segments (as user
masks would give them), keep_rate 1/2: a textured quadrant keeps its condition with probability
1/2, so a silent quadrant is textured in 1/3 of the balanced pairs.

The tiny UNet is first trained on the latents alone (unconditional), then two runs from that
base with the same module initialisation, optimizer, batch order and seed train the control
(ControlNeXt module + to_out, the recipe's learning rates) on the plain or on the balanced
pairs. Measured on held-out conditions, sampling with DDIM (eta 0) from fixed noise: the total
variation (models/mi_metrics.total_variation, in latent space: there is no VAE) inside the
silent quadrants, and inside the active quadrants (control fidelity: the textured quadrants
should stay textured).
"""
import time

from .stats import fmt, md_table

LATENT, QUAD = 8, 4
N_TRAIN, N_HELD_OUT, NOISES = 64, 16, 2
PRETRAIN_STEPS, STEPS = 400, 200
SEEDS = (0, 1)
DDIM_STEPS = 20
KEEP_RATE = 0.5
LR_MODULE, LR_UNET = 1e-4, 1e-5


def toy_pairs(n, seed):
    """(latents (n, 4, 16, 16), conditions (n, 128, 128, 3) IMAGE layout, textured (n, 2, 2) bool)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    textured = torch.rand(n, 2, 2, generator=g) < 0.5
    phase = torch.randint(0, 2, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(LATENT), torch.arange(LATENT), indexing="ij")
    checker = ((yy + xx)[None] + phase[:, None, None]) % 2 * 2.0 - 1.0
    quad_mask = textured.repeat_interleave(QUAD, 1).repeat_interleave(QUAD, 2)
    latents = torch.zeros(n, 4, LATENT, LATENT)
    latents[:, 0] = checker * quad_mask
    cond = quad_mask.repeat_interleave(8, 1).repeat_interleave(8, 2).float()[..., None].expand(-1, -1, -1, 3).contiguous()
    return latents, cond, textured


def quadrant_labels(n):
    import torch

    from harness.comfy_runtime import pack_module

    return pack_module("models.silent_signal").grid_segments(n, LATENT * 8, LATENT * 8, 2) if n else torch.zeros(0)


def balanced_pairs(latents, cond, seed):
    """The balanced conditions of the pairs (the latents stay as they are: variants = 1)."""
    import torch

    from harness.comfy_runtime import pack_module

    ss = pack_module("models.silent_signal")
    images = torch.zeros_like(cond)  # the target side passes through untouched; the toy's targets are the latents
    _, conds, _ = ss.balance(images, cond, quadrant_labels(cond.shape[0]), KEEP_RATE, 1, seed)
    return conds


def _pretrained(steps):
    from .training import pretrain_toy_unet

    return pretrain_toy_unet(toy_pairs(N_TRAIN, seed=1)[0], steps)


def _controlled(pretrained, seed):
    """(UNet call with the control, module, to_out parameters, alphas) from the pretrained base."""
    import torch

    from harness.comfy_runtime import pack_module

    from .training import toy_call, toy_control

    injection = pack_module("runtime.controlnext")
    dm, alphas, ctx, unet, module = toy_control(pretrained, seed)

    def call(x_t, t, hints):
        term = injection.cross_norm_term("sd15_training", module(hints, t.float()), torch.ones(x_t.shape[0]))
        return toy_call(dm, ctx, x_t, t, term)

    return call, module, unet, alphas


def _run(pretrained, data, seed):
    """(losses, the trained call) for one run on ``data`` = (latents, NCHW hints)."""
    from harness.comfy_runtime import pack_module

    tr = pack_module("models.controlnext_training")
    call, module, unet, alphas = _controlled(pretrained, seed)
    latents, hints = data
    trainer = tr.Trainer(module, unet, latents.shape[0], batch_size=4, lr_module=LR_MODULE, lr_unet=LR_UNET, seed=seed)
    for _ in range(STEPS):
        trainer.train_step(latents, alphas, lambda x_t, t, idx, empty: call(x_t, t, hints[idx]))
    return trainer.losses, call, alphas


def ddim_sample(call, alphas, hints, noise, steps=DDIM_STEPS):
    """DDIM, eta 0, epsilon prediction, timesteps 999 down to 0 in ``steps`` even strides. The
    predicted x0 is clipped to the data's range [-1, 1] and eps recomputed from it (as DDPM's
    clip_sample): at t = 999, 1 / sqrt(a_t) ~ 15 would otherwise blow a tiny model's error up."""
    import torch

    ts = torch.linspace(999, 0, steps).round().long()
    x = noise.clone()
    with torch.no_grad():
        for i, t in enumerate(ts):
            a = alphas[t]
            eps = call(x, torch.full((x.shape[0],), int(t)), hints)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            a_prev = alphas[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def measure(call, alphas, held):
    """TV per pixel pair and channel of the generated latents in the silent / the active quadrants."""
    import torch

    from harness.comfy_runtime import pack_module

    mt = pack_module("models.mi_metrics")
    latents, cond, _ = held
    hints = cond.permute(0, 3, 1, 2).repeat(NOISES, 1, 1, 1)
    noise = torch.randn((hints.shape[0],) + latents.shape[1:], generator=torch.Generator().manual_seed(7))
    x = ddim_sample(call, alphas, hints, noise).permute(0, 2, 3, 1)  # NHWC, as the metric takes images
    silent = mt.silent_region(cond, 0.5, 0)[:, ::8, ::8].repeat(NOISES, 1, 1)
    return _tv(mt, x, silent), _tv(mt, x, ~silent), x


def _tv(mt, x, region):
    total, pairs, _ = mt.total_variation(x, region)
    return float(total.sum() / (pairs.sum() * x.shape[-1]).clamp(min=1))


def run_silent_signal(bench):
    import torch

    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI's import leaves autograd off
        _run_all(bench)


def _run_all(bench):
    import torch

    from harness.comfy_runtime import pack_module

    t0 = time.perf_counter()
    pretrained, pre_losses = _pretrained(PRETRAIN_STEPS)
    bench.log(f"  [silent_signal] base: loss {pre_losses[0]:.3f} -> {sum(pre_losses[-20:]) / 20:.3f} ({time.perf_counter() - t0:.0f}s)")
    latents, cond, _ = toy_pairs(N_TRAIN, seed=1)
    held = toy_pairs(N_HELD_OUT, seed=2)
    mt = pack_module("models.mi_metrics")
    reference = _tv(mt, latents.permute(0, 2, 3, 1), torch.ones(N_TRAIN, LATENT, LATENT, dtype=torch.bool))
    rows = {}
    for seed in SEEDS:
        for kind in ("plain", "balanced"):
            t0 = time.perf_counter()
            conds = cond if kind == "plain" else balanced_pairs(latents, cond, seed=100 + seed)
            losses, call, alphas = _run(pretrained, (latents, conds.permute(0, 3, 1, 2).contiguous()), seed)
            tv_silent, tv_active, _ = measure(call, alphas, held)
            silent_textured = float((latents[:, 0].abs() > 0)[conds[:, ::8, ::8, 0] < 0.5].float().mean())
            rows[kind, seed] = {"silent": tv_silent, "active": tv_active, "loss": sum(losses[-10:]) / 10,
                                "silent_textured": silent_textured, "seconds": time.perf_counter() - t0}
            bench.log(f"  [silent_signal] {kind} seed {seed}: TV silent {tv_silent:.4f}, active {tv_active:.4f} "
                      f"({rows[kind, seed]['seconds']:.0f}s)")
    bench.silent_signal = {"rows": rows, "pretrain": (pre_losses[0], sum(pre_losses[-20:]) / 20), "reference": reference,
                           "threads": torch.get_num_threads()}


def silent_signal_report(bench):
    info = getattr(bench, "silent_signal", None)
    if not info:
        return ""
    body = [[kind, str(seed), fmt(r["silent"], 4), fmt(r["active"], 4), fmt(r["loss"], 4)]
            for (kind, seed), r in sorted(info["rows"].items(), key=lambda kv: (kv[0][1], kv[0][0] != "plain"))]
    textured = sum(r["silent_textured"] for (k, _), r in info["rows"].items() if k == "balanced") / len(SEEDS)
    return "\n".join([
        "## MIControlNet data balancing: total variation in silent regions (toy)",
        "",
        f"Toy task (tiny SD1.5-like UNet, latent {LATENT} x {LATENT}, {N_TRAIN} training pairs, {N_HELD_OUT} held-out "
        f"conditions x {NOISES} noises): four quadrants, each a +-1 checkerboard (channel 0, random phase) or flat, the "
        "condition white over the textured ones and silent over the flat ones. Balanced = the same pairs through "
        f"Silent Signal Balance's code with the quadrants as segments, keep_rate {KEEP_RATE} (in the balanced data "
        f"{textured:.0%} of the pixels under a silent condition are textured; in the plain data none). UNet first "
        f"trained on the latents alone ({PRETRAIN_STEPS} steps, loss {info['pretrain'][0]:.3f} -> {info['pretrain'][1]:.3f}); "
        f"each run then trains the ControlNeXt module + to_out for {STEPS} steps (AdamW, lr {LR_MODULE:g} / {LR_UNET:g}, "
        f"batch 4), same initialisation and batch order per seed. TV = total variation per neighbouring pixel pair and "
        f"channel of the DDIM ({DDIM_STEPS} steps, eta 0, x0 clipped to [-1, 1]) samples, in latent space (a textured quadrant's inside has 0.5, "
        f"a flat one 0; the training latents {info['reference']:.3f} on average over the whole latent).",
        "",
        md_table(["data", "seed", "TV in silent quadrants", "TV in active quadrants", "final loss (mean of last 10)"], body),
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in bench.machine.items()) + f" (torch threads {info['threads']}). "
        f"Command: `{' '.join(bench.argv)}`.",
        "",
    ])

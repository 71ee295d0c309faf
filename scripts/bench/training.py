"""Training: the paper's convergence claim on a toy task, and training throughput.

Toy task (a tiny SD1.5-like UNet): the condition is a white square at a random place, the
target latent is the same square (+1 on channel 0, -1 on channel 1, 0 elsewhere), so only the
control can tell the denoiser where it is. The tiny UNet is first trained on the targets alone
(unconditionally: it learns "a square somewhere", not where), then two runs from that same base,
same module, data, seeds and optimizer, train the control (module + the UNet's to_out weights,
as the recipe): joined by cross normalization (ControlNeXt), or added through a zero-initialised
output projection (ControlNet's zero convolution: the module's last 1x1 conv starts at 0 and its
output is added as it is). Fidelity: the share of held-out pairs whose square the denoiser puts in
the right place (within one latent pixel) when it sees pure noise (t = 999), where nothing but
the control can tell it.

Throughput: Train ControlNeXt (XCtrl) on full-size SD1.5 and SDXL UNets (random weights), steps
per second and peak memory, next to ComfyUI's own Train LoRA node on the same latents when this
ComfyUI has it.
"""
import time

from . import GB
from .stats import fmt, md_table

TOY_LATENT, TOY_SQUARE, TOY_STEPS, TOY_EVAL_EVERY, TOY_TRAIN, TOY_HELD_OUT = 16, 4, 300, 10, 64, 32
TOY_PRETRAIN_STEPS = 400
TOY_SEEDS = (0, 1)  # module initialisation and batch order
EARLY = 50  # fidelity averaged over the first EARLY steps: how fast control is picked up
TOY_LR_MODULE, TOY_LR_UNET = 1e-4, 1e-5  # the recipe's
FIDELITY = 0.9  # the fidelity both runs are timed to


def toy_data(n, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    lat = TOY_LATENT
    latents = torch.zeros(n, 4, lat, lat)
    hints = torch.zeros(n, 3, lat * 8, lat * 8)
    size = TOY_SQUARE
    for i in range(n):
        y, x = (int(v) for v in torch.randint(0, lat - size, (2,), generator=g))
        latents[i, 0, y:y + size, x:x + size] = 1.0
        latents[i, 1, y:y + size, x:x + size] = -1.0
        hints[i, :, y * 8:(y + size) * 8, x * 8:(x + size) * 8] = 1.0
    return latents, hints


def square_position(maps):
    """(row, col) per map of the TOY_SQUARE x TOY_SQUARE window where channel 0 - channel 1 sums highest."""
    import torch

    score = torch.nn.functional.avg_pool2d((maps[:, 0] - maps[:, 1])[:, None], TOY_SQUARE, stride=1)[:, 0]
    flat = score.flatten(1).argmax(1)
    return torch.stack([flat // score.shape[-1], flat % score.shape[-1]], 1)


def located_share(predicted_x0, true_x0):
    """Share of maps whose predicted square lies within one latent pixel of the true one."""
    error = (square_position(predicted_x0) - square_position(true_x0)).abs().max(1).values
    return float((error <= 1).float().mean())


def _toy_unet(state=None):
    """The tiny SD1.5-like UNet of the toy (``state``: weights to load), its a_t and an empty context."""
    import torch

    from harness import tiny_models as tm

    base = tm.sd15(seed=3)
    dm = base.model.diffusion_model
    if state is not None:
        dm.load_state_dict(state)
    sigmas = base.model.model_sampling.sigmas.float()
    return base, dm, 1.0 / (sigmas ** 2 + 1.0), torch.zeros(1, 1, 32)


def pretrain_toy_unet(latents, steps):
    """The tiny UNet trained unconditionally on ``latents`` for ``steps`` (a toy's shared base):
    (its weights, the losses)."""
    import torch

    from harness.comfy_runtime import pack_module

    tr = pack_module("models.controlnext_training")
    _, dm, alphas, ctx = _toy_unet()
    for p in dm.parameters():
        p.requires_grad_(True)  # ComfyUI builds the model frozen
    trainer = tr.Trainer(torch.nn.Linear(1, 1), dict(dm.named_parameters()), latents.shape[0], batch_size=8, lr_unet=1e-3,
                         seed=5)
    for _ in range(steps):
        trainer.train_step(latents, alphas, lambda x_t, t, idx, empty: dm(x_t, t.float(), context=ctx.expand(x_t.shape[0], -1, -1)))
    return {k: v.detach().clone() for k, v in dm.state_dict().items()}, trainer.losses


def _pretrained_toy_unet():
    """The tiny UNet trained unconditionally on the toy targets (the shared base of both runs)."""
    return pretrain_toy_unet(toy_data(TOY_TRAIN, seed=1)[0], TOY_PRETRAIN_STEPS)


def toy_control(pretrained, seed, variant="sd15_training"):
    """A toy's trainable parts on the pretrained base: (dm, a_t, context, the to_out parameters
    (trainable, the rest frozen), a new ControlNeXt module initialised from ``seed``)."""
    import torch

    from harness.comfy_runtime import pack_module

    cnx = pack_module("models.controlnext")
    block = pack_module("runtime.controlnext").INJECTIONS[variant].block
    base, dm, alphas, ctx = _toy_unet(pretrained)
    for p in dm.parameters():
        p.requires_grad_(False)
    unet = {n: p for n, p in dm.named_parameters() if ".to_out." in n}
    for p in unet.values():
        p.requires_grad_(True)
    torch.manual_seed(seed)
    width = pack_module("runtime.model_family").unet_block_channels(base)[block]
    return dm, alphas, ctx, unet, cnx.ControlNeXt(variant, out_channels=width)


def toy_call(dm, ctx, x_t, t, term, variant="sd15_training", taps=None):
    """The toy UNet's prediction with ``term(h)`` added at ``variant``'s injection point; ``taps`` (a
    dict, or None) gets the term and the activation after it joined (conservativity stage, Asym)."""
    from harness.comfy_runtime import pack_module

    joined_with = pack_module("runtime.training").joined_with
    return toy_inject(dm, ctx, x_t, t, lambda h: joined_with(h, term(h), taps), variant)


def toy_inject(dm, ctx, x_t, t, inject, variant="sd15_training"):
    """The toy UNet's prediction with the activation h at ``variant``'s injection point replaced by ``inject(h)``."""
    from harness.comfy_runtime import pack_module

    injection = pack_module("runtime.controlnext")
    return dm(x_t, t.float(), context=ctx.expand(x_t.shape[0], -1, -1),
              transformer_options=injection.injection_options(variant, inject))


def _toy_run(join, steps, pretrained, seed=0):
    """(losses, [(step, fidelity)]) of one run; ``join``: "cross_norm" or "zero_conv"."""
    import torch

    from harness.comfy_runtime import pack_module

    tr = pack_module("models.controlnext_training")
    injection = pack_module("runtime.controlnext")
    variant = "sd15_training"
    dm, alphas, ctx, unet, module = toy_control(pretrained, seed, variant)
    latents, hints = toy_data(TOY_TRAIN, seed=1)
    held_lat, held_hints = toy_data(TOY_HELD_OUT, seed=2)
    if join == "zero_conv":
        with torch.no_grad():
            module.mid_convs[1].weight.zero_()
            module.mid_convs[1].bias.zero_()
    trainer = tr.Trainer(module, unet, TOY_TRAIN, batch_size=4, lr_module=TOY_LR_MODULE, lr_unet=TOY_LR_UNET, seed=seed)

    def run_unet(x_t, t, feat):
        if join == "cross_norm":
            term = injection.cross_norm_term(variant, feat, torch.ones(x_t.shape[0]))
        else:
            term = lambda h: torch.nn.functional.adaptive_avg_pool2d(feat, h.shape[-2:])  # noqa: E731
        return toy_call(dm, ctx, x_t, t, term, variant)

    def forward(x_t, t, idx, empty):
        return run_unet(x_t, t, module(hints[idx], t.float()))

    def fidelity():
        g = torch.Generator().manual_seed(7)
        t = torch.full((TOY_HELD_OUT,), 999)
        noise = torch.randn(held_lat.shape, generator=g)
        x_t = tr.noised(held_lat, noise, t, alphas)
        with torch.no_grad():
            eps = run_unet(x_t, t, module(held_hints, t.float()))
        a = alphas[t].reshape(-1, 1, 1, 1)
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        return located_share(x0, held_lat)

    curve = [(0, fidelity())]
    for _ in range(steps):
        trainer.train_step(latents, alphas, forward)
        if trainer.step % TOY_EVAL_EVERY == 0:
            curve.append((trainer.step, fidelity()))
    return trainer.losses, curve


def run_training(bench):
    import torch

    tr_threads = torch.get_num_threads()
    rows = {}
    t0 = time.perf_counter()
    pretrained, pre_losses = _pretrained_toy_unet()
    bench.log(f"  [training] toy base: unconditional loss {pre_losses[0]:.3f} -> {sum(pre_losses[-20:]) / 20:.3f} "
              f"in {TOY_PRETRAIN_STEPS} steps ({time.perf_counter() - t0:.0f}s)")
    for join in ("cross_norm", "zero_conv"):
        for seed in TOY_SEEDS:
            t0 = time.perf_counter()
            losses, curve = _toy_run(join, TOY_STEPS, pretrained, seed=seed)
            reached = next((s for s, f in curve if f >= FIDELITY), None)
            rows[join, seed] = {"losses": losses, "curve": curve, "seconds": time.perf_counter() - t0, "reached": reached}
            bench.log(f"  [training] {join} seed {seed}: fidelity {[round(f, 3) for _, f in curve[::5]]} "
                      f"reaches {FIDELITY} at step {reached}")
    bench.training = {"toy": rows, "threads": tr_threads, "pretrain": (pre_losses[0], sum(pre_losses[-20:]) / 20),
                      "throughput": _throughput(bench)}


THROUGHPUT_SIZE, THROUGHPUT_STEPS = 256, 3


def _throughput(bench):
    """Steps/s and peak memory of Train ControlNeXt on full-size SD1.5 and SDXL UNets (random
    weights), next to ComfyUI's Train LoRA node on the same latents and prompt."""
    import tempfile

    import torch

    from .models import build_base
    from harness.comfy_runtime import pack_module
    import folder_paths

    training = pack_module("runtime.training")
    lora_node = _core_train_lora()
    out = tempfile.mkdtemp(prefix="xctrl_train_bench_")
    folder_paths.add_model_folder_path("controlnet", out, is_default=True)
    size, steps = THROUGHPUT_SIZE, THROUGHPUT_STEPS
    rows = []
    for family, pattern, width, pooled, checkpointing in (("sd15", "every to_out", 768, None, False),
                                                          ("sdxl", "attn2 to_out", 2048, 1280, True)):
        base = build_base(family, torch.float32)
        g = torch.Generator().manual_seed(0)
        latent = {"samples": torch.randn(2, 4, size // 8, size // 8, generator=g)}
        images = torch.rand(2, size, size, 3, generator=g)
        extra = {"pooled_output": torch.randn(1, pooled, generator=g)} if pooled else {}
        pos = [[torch.randn(1, 77, width, generator=g), extra]]
        runs = [(f"Train ControlNeXt (XCtrl), module + {pattern} (the authors' default)",
                 lambda: training.train(base, latent, images, pos, steps, name=f"bench_{family}_a", empty_prompt_rate=0.0,
                                        checkpoint_every=0, gradient_checkpointing=checkpointing)),
                ("Train ControlNeXt (XCtrl), module only",
                 lambda: training.train(base, latent, images, pos, steps, name=f"bench_{family}_b", empty_prompt_rate=0.0,
                                        checkpoint_every=0, gradient_checkpointing=checkpointing, unet_pattern=""))]
        if lora_node is not None:  # last: its gradient checkpointing rewraps the shared UNet's forwards
            runs.append(("ComfyUI Train LoRA, rank 8 (fp32)", lambda: _run_core_lora(lora_node, base, latent, pos, steps, checkpointing)))
        for label, fn in runs:
            bench.free()
            row = {"family": family, "label": label, "checkpointing": checkpointing, "steps_per_s": None, "peak": None}
            try:
                t0 = time.perf_counter()
                row["peak"] = _peak_rss_during(fn)
                row["steps_per_s"] = steps / (time.perf_counter() - t0)
                bench.log(f"  [training] {family} {label}: {row['steps_per_s']:.3f} steps/s, peak RSS {row['peak'] / GB:.1f} GB")
            except (RuntimeError, MemoryError) as e:  # e.g. out of memory: the row says so, the others still run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                bench.log(f"  [training] {family} {label}: failed: {row['error']}")
            rows.append(row)
        del base, runs
        bench.free()
    folder_paths.folder_names_and_paths["controlnet"][0].remove(out)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return {"size": size, "steps": steps, "rows": rows,
            "lora": "measured" if lora_node is not None else "not measured: this ComfyUI has no Train LoRA node"}


def _core_train_lora():
    try:
        from comfy_extras.nodes_train import TrainLoraNode
    except Exception:  # older ComfyUI, or its training extras failed to import
        return None
    return TrainLoraNode


def _run_core_lora(node, base, latent, pos, steps, checkpointing):
    from comfy.weight_adapter import adapter_maps

    kwargs = {"model": base, "latents": latent, "positive": pos, "batch_size": 1, "steps": steps,
              "grad_accumulation_steps": 1, "learning_rate": 5e-4, "rank": 8, "optimizer": "AdamW", "loss_function": "MSE",
              "seed": 0, "training_dtype": "fp32", "lora_dtype": "fp32", "algorithm": next(iter(adapter_maps)),
              "gradient_checkpointing": checkpointing, "existing_lora": "[None]", "bucket_mode": False}
    node.execute(**{k: [v] for k, v in kwargs.items()})  # an is_input_list node: every input a list


def _peak_rss_during(fn):
    """Peak resident memory of the process while ``fn`` runs (sampled every 50 ms)."""
    import threading

    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    peak = [rss()]
    done = threading.Event()

    def watch():
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss())

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return peak[0]


def training_report(bench):
    info = getattr(bench, "training", None)
    if not info:
        return ""
    toy = info["toy"]
    header = ["join", "seed", "fidelity at step 0 / 10 / 20 / 50", f"mean fidelity, steps 0-{EARLY}",
              f"first step with fidelity >= {FIDELITY}", "mean fidelity, last 100 steps", "final loss (mean of last 10)"]

    def at(curve, step):
        return next((f for s, f in curve if s == step), None)

    def mean(values):
        return sum(values) / len(values)

    body = []
    titles = {"cross_norm": "cross normalization (ControlNeXt)", "zero_conv": "zero-initialised projection (ControlNet)"}
    for (join, seed), r in toy.items():
        c = r["curve"]
        body.append([titles[join], str(seed), " / ".join(fmt(at(c, s), 3) for s in (0, 10, 20, 50)),
                     fmt(mean([f for s, f in c if s <= EARLY]), 3),
                     str(r["reached"]) if r["reached"] is not None else f"not within {TOY_STEPS}",
                     fmt(mean([f for s, f in c if s > TOY_STEPS - 100]), 3), fmt(mean(r["losses"][-10:]), 4)])
    tp = info["throughput"]
    tbody = [[{"sd15": "SD1.5", "sdxl": "SDXL"}[r["family"]], r["label"], "on" if r["checkpointing"] else "off",
              fmt(r["steps_per_s"], 3) if r["steps_per_s"] else r["error"], fmt(r["peak"] / GB, 2) if r["peak"] else "-"]
             for r in tp["rows"]]
    curves = "; ".join(f"{join} seed {seed}: " + ", ".join(f"{s}:{f:.2f}" for s, f in r["curve"]) for (join, seed), r in toy.items())
    return "\n".join([
        "## Training: the convergence claim on a toy task, and throughput",
        "",
        f"Toy task (tiny SD1.5-like UNet, {TOY_TRAIN} training pairs, {TOY_HELD_OUT} held out): the condition is a white "
        "square, the target latent the same square; only the control tells where it is. The UNet was first trained on the "
        f"targets alone ({TOY_PRETRAIN_STEPS} steps, loss {info['pretrain'][0]:.3f} -> {info['pretrain'][1]:.3f}); both runs "
        f"start from it with the same module initialisation, data and optimizer for a seed (AdamW, module lr {TOY_LR_MODULE:g}, "
        f"to_out lr {TOY_LR_UNET:g}: the recipe's, batch 4); fidelity = the share of held-out pairs whose square the "
        "denoiser puts in the right place (within one latent pixel) from pure noise (t = 999), where only the control can "
        "tell it.",
        "",
        md_table(header, body),
        "",
        f"Fidelity curves (step:fidelity, every {TOY_EVAL_EVERY} steps): {curves}.",
        "",
        f"Training throughput on full-size SD1.5 and SDXL UNets (random weights), two {tp['size']} x {tp['size']} px latents, "
        f"batch 1, {tp['steps']} steps per run (the first steps, optimizer set-up included), float32 on the CPU "
        f"({info['threads']} threads), the same latents and prompt for every row; peak = the process's resident memory "
        f"during the run (the base UNet's weights included). ComfyUI's Train LoRA node: {tp['lora']}.",
        "",
        md_table(["model", "run", "gradient checkpointing", "steps / s", "peak RSS (GB)"], tbody),
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in bench.machine.items()) + f". Command: `{' '.join(bench.argv)}`.",
        "",
    ])

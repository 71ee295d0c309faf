"""Training: the paper's convergence claim on a toy task, and training throughput.

Toy task (a tiny SD1.5-like UNet): the condition is a white square at a random place, the
target latent is the same square (+1 on channel 0, -1 on channel 1, 0 elsewhere), so only the
control can tell the denoiser where it is. The tiny UNet is first trained on the targets alone
(unconditionally: it learns "a square somewhere", not where), then two runs from that same base,
same module, data, seeds and optimizer, train the control (module + the UNet's to_out weights,
as the recipe): joined by cross normalization (ControlNeXt), or added through a zero-initialised
output projection (ControlNet's zero convolution: the module's last 1x1 conv starts at 0 and its
output is added as it is). Fidelity: at t = 500 on held-out pairs, the cosine similarity of the
x_0 the denoiser predicts with the true x_0.

Throughput: Train ControlNeXt (XCtrl) on a full-size SD1.5 UNet (random weights), steps per
second and peak memory, next to ComfyUI's own Train LoRA node on the same latents when this
ComfyUI has it.
"""
import time

from . import GB
from .stats import fmt, md_table

TOY_LATENT, TOY_STEPS, TOY_EVAL_EVERY, TOY_TRAIN, TOY_HELD_OUT = 16, 300, 10, 64, 16
TOY_PRETRAIN_STEPS = 400
TOY_LR_MODULE, TOY_LR_UNET = 1e-3, 1e-4  # the recipe's ratio, ten times faster for a 300-step toy
FIDELITY = 0.5  # the fidelity both runs are timed to


def toy_data(n, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    lat = TOY_LATENT
    latents = torch.zeros(n, 4, lat, lat)
    hints = torch.zeros(n, 3, lat * 8, lat * 8)
    for i in range(n):
        size = 4
        y, x = (int(v) for v in torch.randint(0, lat - size, (2,), generator=g))
        latents[i, 0, y:y + size, x:x + size] = 1.0
        latents[i, 1, y:y + size, x:x + size] = -1.0
        hints[i, :, y * 8:(y + size) * 8, x * 8:(x + size) * 8] = 1.0
    return latents, hints


def _pretrained_toy_unet():
    """The tiny UNet trained unconditionally on the toy targets (the shared base of both runs)."""
    import sys

    import torch

    from . import TESTS_DIR

    sys.path.insert(0, TESTS_DIR)
    from harness import tiny_models as tm
    from harness.comfy_runtime import pack_module

    tr = pack_module("models.controlnext_training")
    base = tm.sd15(seed=3)
    dm = base.model.diffusion_model
    sigmas = base.model.model_sampling.sigmas.float()
    alphas = 1.0 / (sigmas ** 2 + 1.0)
    latents, _ = toy_data(TOY_TRAIN, seed=1)
    ctx = torch.zeros(1, 1, 32)
    trainer = tr.Trainer(torch.nn.Linear(1, 1), dict(dm.named_parameters()), TOY_TRAIN, batch_size=8, lr_unet=1e-3, seed=5)
    for _ in range(TOY_PRETRAIN_STEPS):
        trainer.train_step(latents, alphas, lambda x_t, t, idx, empty: dm(x_t, t.float(), context=ctx.expand(x_t.shape[0], -1, -1)))
    return {k: v.detach().clone() for k, v in dm.state_dict().items()}, trainer.losses


def _toy_run(join, steps, pretrained, seed=0):
    """(losses, [(step, fidelity)]) of one run; ``join``: "cross_norm" or "zero_conv"."""
    import sys

    import torch

    from . import TESTS_DIR

    sys.path.insert(0, TESTS_DIR)
    from harness import tiny_models as tm
    from harness.comfy_runtime import pack_module

    cnx = pack_module("models.controlnext")
    tr = pack_module("models.controlnext_training")
    cross_normalize = pack_module("models.cross_norm").cross_normalize

    base = tm.sd15(seed=3)
    dm = base.model.diffusion_model
    dm.load_state_dict(pretrained)
    for p in dm.parameters():
        p.requires_grad_(False)
    unet = {n: p for n, p in dm.named_parameters() if ".to_out." in n}
    for p in unet.values():
        p.requires_grad_(True)
    sigmas = base.model.model_sampling.sigmas.float()
    alphas = 1.0 / (sigmas ** 2 + 1.0)
    latents, hints = toy_data(TOY_TRAIN, seed=1)
    held_lat, held_hints = toy_data(TOY_HELD_OUT, seed=2)
    ctx = torch.zeros(1, 1, 32)
    variant = cnx.get_variant("sd15_training")
    torch.manual_seed(seed)
    width = pack_module("nodes.model_family").unet_block_channels(base)[("input", 3)]
    module = cnx.ControlNeXt("sd15_training", out_channels=width)
    if join == "zero_conv":
        with torch.no_grad():
            module.mid_convs[1].weight.zero_()
            module.mid_convs[1].bias.zero_()
    trainer = tr.Trainer(module, unet, TOY_TRAIN, batch_size=4, lr_module=TOY_LR_MODULE, lr_unet=TOY_LR_UNET, seed=seed)

    def run_unet(x_t, t, feat):
        s = torch.ones(x_t.shape[0])

        def inject(h, to):
            if to.get("block") != ("input", 3):
                return h
            if join == "cross_norm":
                return h + cross_normalize(h, feat, variant.eps, variant.order, s)
            return h + torch.nn.functional.adaptive_avg_pool2d(feat, h.shape[-2:])

        return dm(x_t, t.float(), context=ctx.expand(x_t.shape[0], -1, -1),
                  transformer_options={"patches": {"input_block_patch_after_skip": [inject]}})

    def forward(x_t, t, idx, empty):
        return run_unet(x_t, t, module(hints[idx], t.float()))

    def fidelity():
        g = torch.Generator().manual_seed(7)
        t = torch.full((TOY_HELD_OUT,), 500)
        noise = torch.randn(held_lat.shape, generator=g)
        x_t = tr.noised(held_lat, noise, t, alphas)
        with torch.no_grad():
            eps = run_unet(x_t, t, module(held_hints, t.float()))
        a = alphas[t].reshape(-1, 1, 1, 1)
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        return tr.cosine(x0, held_lat)

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
        t0 = time.perf_counter()
        losses, curve = _toy_run(join, TOY_STEPS, pretrained)
        rows[join] = {"losses": losses, "curve": curve, "seconds": time.perf_counter() - t0}
        reached = next((s for s, f in curve if f >= FIDELITY), None)
        rows[join]["reached"] = reached
        bench.log(f"  [training] {join}: fidelity {[round(f, 3) for _, f in curve[::5]]} reaches {FIDELITY} at step {reached}")
    bench.training = {"toy": rows, "threads": tr_threads, "pretrain": (pre_losses[0], sum(pre_losses[-20:]) / 20),
                      "throughput": _throughput(bench)}


def _throughput(bench):
    """Steps/s and peak memory of Train ControlNeXt on a full-size SD1.5 UNet (random weights)."""
    import os
    import sys
    import tempfile

    import torch

    from . import TESTS_DIR
    from .models import build_base

    sys.path.insert(0, TESTS_DIR)
    from harness.comfy_runtime import pack_module
    import folder_paths

    training = pack_module("nodes.training_nodes")
    out = tempfile.mkdtemp(prefix="xctrl_train_bench_")
    folder_paths.add_model_folder_path("controlnet", out, is_default=True)
    base = build_base("sd15", torch.float32)
    size = 256
    g = torch.Generator().manual_seed(0)
    latent = {"samples": torch.randn(2, 4, size // 8, size // 8, generator=g)}
    images = torch.rand(2, size, size, 3, generator=g)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    rows = []
    for label, kw in (("Train ControlNeXt, module + to_out (authors' SD1.5 default)", {}),
                      ("Train ControlNeXt, module only", {"unet_pattern": ""})):
        steps = 3
        t0 = time.perf_counter()
        peak = _peak_rss_during(lambda: training.train(base, latent, images, pos, steps, name=f"bench_{len(rows)}",
                                                       empty_prompt_rate=0.0, checkpoint_every=0, **kw))
        rows.append({"label": label, "steps_per_s": steps / (time.perf_counter() - t0), "peak": peak})
        bench.log(f"  [training] {label}: {rows[-1]['steps_per_s']:.3f} steps/s, peak RSS {peak / GB:.1f} GB")
    folder_paths.folder_names_and_paths["controlnet"][0].remove(out)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    del base
    bench.free()
    return {"size": size, "rows": rows, "lora": "not measured: ComfyUI's Train LoRA node needs a dataset of its own "
            "format on this version; see the reading below"}


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
    header = ["join", "fidelity at step 0", "fidelity at 100 / 200 / 300", f"first step with fidelity >= {FIDELITY}",
              "final loss (mean of last 10)", "run time (s)"]

    def at(curve, step):
        return next((f for s, f in curve if s == step), None)

    body = []
    for join, title in (("cross_norm", "cross normalization (ControlNeXt)"), ("zero_conv", "zero-initialised projection (ControlNet)")):
        r = toy[join]
        body.append([title, fmt(r["curve"][0][1], 3), " / ".join(fmt(at(r["curve"], s), 3) for s in (100, 200, 300)),
                     str(r["reached"]) if r["reached"] is not None else f"not within {TOY_STEPS}",
                     fmt(sum(r["losses"][-10:]) / 10, 4), fmt(r["seconds"], 1)])
    tp = info["throughput"]
    tbody = [[r["label"], fmt(r["steps_per_s"], 3), fmt(r["peak"] / GB, 2)] for r in tp["rows"]]
    curves = "; ".join(f"{join}: " + ", ".join(f"{s}:{f:.3f}" for s, f in toy[join]["curve"]) for join in toy)
    return "\n".join([
        "## Training: the convergence claim on a toy task, and throughput",
        "",
        f"Toy task (tiny SD1.5-like UNet, {TOY_TRAIN} training pairs, {TOY_HELD_OUT} held out): the condition is a white "
        "square, the target latent the same square; only the control tells where it is. The UNet was first trained on the "
        f"targets alone ({TOY_PRETRAIN_STEPS} steps, loss {info['pretrain'][0]:.3f} -> {info['pretrain'][1]:.3f}); both runs "
        f"start from it with the same module initialisation, data, seeds and optimizer (AdamW, module lr {TOY_LR_MODULE:g}, "
        f"to_out lr {TOY_LR_UNET:g}, batch 4); fidelity = cosine of the predicted x_0 with the true one at t = 500 on the "
        "held-out pairs.",
        "",
        md_table(header, body),
        "",
        f"Fidelity curves (step:fidelity): {curves}.",
        "",
        f"Throughput of Train ControlNeXt on a full-size SD1.5 UNet (random weights), {tp['size']} x {tp['size']} px, batch 1, "
        f"float32 on the CPU ({info['threads']} threads); peak = the process's resident memory during the run:",
        "",
        md_table(["run", "steps / s", "peak RSS (GB)"], tbody),
        "",
        f"ComfyUI's Train LoRA node: {tp['lora']}.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in bench.machine.items()) + f". Command: `{' '.join(bench.argv)}`.",
        "",
    ])

"""MIControlNet's Asym for a ControlNeXt and a stock ControlNet, and what the conservativity stage costs.

On a full-size random-weight SD1.5 UNet: the Asym estimate (docs/conservativity.md) of a freshly
initialised ControlNeXt (SD1.5-Training placement; ControlNeXt Jacobian Asymmetry's measurement)
for 1, 4 and 16 probes and of a random-weight stock SD1.5 ControlNet (ControlNet Jacobian
Asymmetry's) for 4 probes, each over three seeds (each seed: other noise, other probes) with its
time; and Train ControlNeXt's time per step without the conservativity stage and with it at 1 and
2 probes (docs/training.md). --quick: one seed, fewer probe counts (QUICK), 128 px.
"""
import time

from .stats import fmt, md_table

ASYM_PROBES, ASYM_SEEDS, TIMESTEP = (1, 4, 16), (0, 1, 2), 500
CONTROLNET_PROBES = (4,)  # a stock ControlNet's products also run backward through the ControlNet: one row
STAGE_PROBES, STAGE_STEPS = (0, 1, 2), 2  # 0: no stage
QUICK = {"probes": (1, 4), "seeds": (0,), "stage": (0, 1)}  # --quick: a smoke test of every row kind


def _case(size):
    import torch

    from harness.comfy_runtime import pack_module

    from .models import build_base

    cnx = pack_module("models.controlnext")
    base = build_base("sd15", torch.float32)
    block = pack_module("runtime.controlnext").INJECTIONS["sd15_training"].block
    width = pack_module("runtime.model_family").unet_block_channels(base)[block]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = cnx.ControlNeXt("sd15_training", out_channels=width)
    control = pack_module("runtime.controlnext_apply").LoadedControlNeXt(
        "bench_asym.safetensors", module.state_dict(), trained_for="sd15_training")
    g = torch.Generator().manual_seed(0)
    latent = {"samples": torch.randn(1, 4, size // 8, size // 8, generator=g)}
    image = torch.rand(1, size, size, 3, generator=g)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    return base, control, image, latent, pos


def _rows(bench, control_name, measure, probe_counts, seeds):
    """One row per probe count: the estimate over ``seeds`` and the seconds each took."""
    rows = []
    for probes in probe_counts:
        values, seconds = [], []
        for seed in seeds:
            t0 = time.perf_counter()
            values.append(measure(probes, seed))
            seconds.append(time.perf_counter() - t0)
        rows.append({"control": control_name, "probes": probes, "asym": [v.mean for v in values],
                     "relative": [v.relative for v in values], "seconds": seconds})
        bench.log(f"  [asymmetry] {control_name}, {probes} probes: Asym {[round(v.mean, 4) for v in values]}, "
                  f"{min(seconds):.1f} s")
    return rows


def run_asymmetry(bench):
    import torch
    from harness.comfy_runtime import pack_module

    from .models import stock_controlnet

    asym = pack_module("runtime.asymmetry")
    quick = bench.args.quick
    size, seeds = min(bench.args.size, 256), QUICK["seeds"] if quick else ASYM_SEEDS
    base, control, image, latent, pos = _case(size)
    rows = _rows(bench, "ControlNeXt", lambda probes, seed: asym.measure(
        base, control, image, latent, pos, timestep=TIMESTEP, probes=probes, seed=seed),
        QUICK["probes"] if quick else ASYM_PROBES, seeds)
    controlnet = stock_controlnet("sd15", torch.float32, seed=0)
    rows += _rows(bench, "stock ControlNet", lambda probes, seed: asym.measure_controlnet(
        base, controlnet, image, latent, pos, timestep=TIMESTEP, probes=probes, seed=seed), CONTROLNET_PROBES, seeds)
    del controlnet
    stage = _stage_cost(bench, base, latent, image, pos, QUICK["stage"] if quick else STAGE_PROBES)
    bench.asymmetry = {"size": size, "rows": rows, "seeds": seeds, "stage": stage}


def _stage_cost(bench, base, latent, image, pos, stage_probes):
    """Seconds per Train ControlNeXt step without the stage and with it at ``stage_probes`` probes."""
    import shutil
    import tempfile

    import folder_paths
    from harness.comfy_runtime import pack_module

    training = pack_module("runtime.training")
    out = tempfile.mkdtemp(prefix="xctrl_asym_bench_")
    folder_paths.add_model_folder_path("controlnet", out, is_default=True)
    rows = []
    try:
        for probes in stage_probes:
            stage = {"conservativity_weight": 0.01, "conservativity_probes": probes} if probes else {}
            t0 = time.perf_counter()
            training.train(base, latent, image, pos, STAGE_STEPS, name=f"stage_{probes}", empty_prompt_rate=0.0,
                           checkpoint_every=0, **stage)
            rows.append({"probes": probes, "seconds_per_step": (time.perf_counter() - t0) / STAGE_STEPS})
            bench.log(f"  [asymmetry] training, stage probes {probes}: {rows[-1]['seconds_per_step']:.1f} s/step")
    finally:
        folder_paths.folder_names_and_paths["controlnet"][0].remove(out)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def asymmetry_report(bench):
    info = getattr(bench, "asymmetry", None)
    if not info:
        return ""

    def mean(v):
        return sum(v) / len(v)

    def spread(v):  # n/a for one seed (--quick)
        m = mean(v)
        return (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 / abs(m) if m and len(v) > 1 else float("nan")

    body = [[r.get("control", "ControlNeXt"), str(r["probes"]), f"{mean(r['asym']):.4g}", fmt(spread(r["asym"]), 3),
             fmt(mean(r["relative"]), 3), fmt(min(r["seconds"]), 2)] for r in info["rows"]]
    plain = next(r["seconds_per_step"] for r in info["stage"] if r["probes"] == 0)
    stage = [["none" if r["probes"] == 0 else f"{r['probes']} probe(s)", fmt(r["seconds_per_step"], 2),
              fmt(r["seconds_per_step"] / plain, 2)] for r in info["stage"]]
    return "\n".join([
        "## Asym of a ControlNeXt and a stock ControlNet, and the cost of the conservativity stage",
        "",
        f"Full-size SD1.5 UNet (random weights), a freshly initialised ControlNeXt (SD1.5-Training placement) and a "
        f"random-weight stock SD1.5 ControlNet (every residual non-zero), one {info['size']} x {info['size']} px latent "
        f"at timestep {TIMESTEP}; seeds {tuple(info.get('seeds', ASYM_SEEDS))} (noise and probes). Asym = "
        "1/2 ||J_c - J_c^T||_F^2 of the Jacobian part the control adds (docs/conservativity.md); spread = standard "
        "deviation over the seeds / mean.",
        "",
        md_table(["control", "probes", "Asym (mean over seeds)", "spread", "relative Asym", "seconds (best)"], body),
        "",
        f"Train ControlNeXt, batch 1, {STAGE_STEPS} steps per run (set-up included), the conservativity stage on from "
        "step 0:",
        "",
        md_table(["conservativity stage", "seconds / step", "x plain step"], stage),
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in bench.machine.items()) + f". Command: `{' '.join(bench.argv)}`.",
        "",
    ])

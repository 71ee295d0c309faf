"""ControlNeXt-SVD v2 long videos (XCtrl Long Video): time per generated frame and peak memory
of one denoising step for videos of 1, 3 and 6 windows, next to the ideal cost ratio
(windows x frames per window / frames), and one unwindowed video for contrast."""
import time

from .measure import CallCounter, Probe
from .models import build_base, text_conds
from .runner import GB, Config, node, run_node
from .stats import fmt, interleaved, md_table, median

WINDOW, OVERLAP = 4, 1  # the authors' 24 / 6 scaled down (overlap a quarter of the window)
VIDEOS = ((4, True), (10, True), (19, True), (10, False))  # (frames, windowed): 1, 3, 6 windows; 3 windows' frames unwindowed


def windows_of(n):
    starts = [min(s, n - WINDOW) for s in range(0, n - OVERLAP, WINDOW - OVERLAP)] if n > WINDOW else [0]
    return len(starts)


def run_long_video(bench):
    import torch

    a = bench.args
    t0 = time.perf_counter()
    bench.log("[long_video] building the full-size SVD UNet with random weights ...")
    base = build_base("svd", bench.dtype, seed=0)
    bench.log(f"[long_video] built in {time.perf_counter() - t0:.0f}s")
    loaded = bench.load_cnx("svd_v2", seed=12)
    long_video = node("nodes.controlnext_nodes", "ControlNeXtSVDLongVideo")
    size = a.long_video_size
    saved_size, a.size = a.size, size  # bench.sample reads the latent size from args
    configs = []
    for n, windowed in VIDEOS:
        poses = torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(n))
        model = bench.apply_cnx(base, loaded, poses)
        if windowed:
            model = run_node(long_video, model, WINDOW, OVERLAP, "constant", 1.0)[0]
        pos, neg = text_conds("svd", size)
        label = f"{n} frames, {windows_of(n)} window(s) of {WINDOW}" if windowed else f"{n} frames, no windows (one call)"
        c = Config(f"{n}_{windowed}", label, model, pos, neg)
        c.frames, c.windowed = n, windowed
        c.probe = Probe(bench.device)
        c.probe.install(model)
        module = loaded.module_patcher("svd_v2", model).model
        c.rows = CallCounter(f"module_rows_{c.name}", module, "forward_from_stem", rows=lambda stem, ts: int(stem[1].shape[0]))
        c.probe.counters = [c.rows]
        configs.append(c)
    try:
        for c in configs:
            c.instrumented = bench.run(c, 1, "instrument", c.frames)
            bench.log(f"  [long_video] instrumented {c.label}: live peak {(c.instrumented[0].get('live_peak') or 0) / GB:.2f} GB")
        for rep, name in interleaved([c.name for c in configs], a.repeats):
            c = next(x for x in configs if x.name == name)
            steps = bench.run(c, 1, "time", c.frames)
            c.timed.append(steps[0]["time"])
            c.cuda_peaks.append(steps[0].get("cuda_peak"))
            bench.log(f"  [long_video] repeat {rep + 1}/{a.repeats} {c.label}: {steps[0]['time']:.2f}s")
    finally:
        a.size = saved_size
    first = configs[0]
    rows = []
    for c in configs:
        t = median(c.timed)
        per_frame = t / c.frames
        ideal = (windows_of(c.frames) * WINDOW / c.frames) if c.windowed else 1.0
        step = c.instrumented[0]
        cuda_peak = median(c.cuda_peaks)
        rows.append({
            "label": c.label, "time": t, "per_frame": per_frame, "ratio": per_frame / (median(first.timed) / first.frames),
            "ideal": ideal, "live_peak": step.get("live_peak"), "cuda_peak": cuda_peak,
            "unet_rows": step["unet_rows"], "module_rows": step["counts"].get(c.rows.name, (None, None))[1],
            "times": list(c.timed),
        })
    bench.long_video = {"rows": rows, "size": size, "window": WINDOW, "overlap": OVERLAP}


def long_video_report(bench):
    lv = bench.long_video
    if not lv:
        return ""
    size, lat = lv["size"], lv["size"] // 8
    cuda = any(r["cuda_peak"] for r in lv["rows"])
    memory = "peak CUDA memory of the step (GB)" if cuda else "peak activation memory of the step (GB)"
    header = ["video", "step time (s)", "time per frame (s)", "per-frame ratio to 1 window", "ideal ratio (windows x L / N)",
              memory, "UNet calls x rows", "ControlNeXt module frames per step"]
    body = [[r["label"], fmt(r["time"], 2), fmt(r["per_frame"], 3), fmt(r["ratio"], 3), fmt(r["ideal"], 3),
             fmt((r["cuda_peak"] if cuda else r["live_peak"] or 0) / GB, 3), " + ".join(str(x) for x in r["unet_rows"]),
             r["module_rows"]] for r in lv["rows"]]
    return "\n".join([
        f"## ControlNeXt-SVD v2 long videos (XCtrl Long Video), windows of {lv['window']} frames, overlap {lv['overlap']}",
        "",
        f"Full-size random-weight SVD UNet + ControlNeXt-SVD v2 at {size} x {size} px (latent {lat} x {lat}), one Euler "
        "step per timed run with CFG (cond and uncond batched), median of the repeats, runs interleaved. Peak memory: on "
        "CUDA torch.cuda.max_memory_allocated during the step (weights included); on the CPU the peak bytes of tensors "
        "created during the step and alive at once (weights excluded).",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in bench.machine.items()) + f". Command: `{' '.join(bench.argv)}`.",
        "",
        md_table(header, body),
        "",
        "Raw step times (s): " + "; ".join(f"{r['label']}: " + ", ".join(f"{t:.2f}" for t in r["times"]) for r in lv["rows"]) + ".",
        "",
    ])

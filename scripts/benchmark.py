#!/usr/bin/env python
"""Step-time, memory and FLOP overhead of each XCtrl method next to the alternatives.

Run with the project's venv, outside the test suite:

    ~/.cache/xctrl-nodes/venv/bin/python scripts/benchmark.py --comfyui ~/comfy/ComfyUI \
        [--size 256] [--repeats 3] [--only sd15,sdxl,svd,long_video,pre,flux,training,zimage,qwen,asymmetry,two_controls] [--out docs/benchmarks.md] [--quick]

What it measures and how is said in the report it writes (docs/benchmarks.md); the parts of the
script are in scripts/bench/ (see its __init__). The report's generated blocks are replaced, the
hand-written reading of the numbers around them is kept.
"""
import argparse
import contextlib
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import PACK_DIR  # noqa: E402
from bench.flux import flux_report, run_flux  # noqa: E402
from bench.model_patches import qwen_report, run_qwen, run_zimage, zimage_report  # noqa: E402
from bench.training import run_training, training_report  # noqa: E402
from bench.silent_signal import run_silent_signal, silent_signal_report  # noqa: E402
from bench.asymmetry import asymmetry_report, run_asymmetry  # noqa: E402
from bench.two_controls import run_two_controls, two_controls_report  # noqa: E402
from bench.long_video import long_video_report, run_long_video  # noqa: E402
from bench.models import import_comfyui  # noqa: E402
from bench.preprocessors import run_preprocessors  # noqa: E402
from bench.report import argv_for_report, machine_info, replace_block, write_report  # noqa: E402
from bench.runner import Bench  # noqa: E402

FAMILIES = ("sd15", "sdxl", "sd21", "svd", "long_video", "pre", "flux", "training", "zimage", "qwen", "silent_signal",
            "asymmetry", "two_controls")
DEFAULT_FAMILIES = ("sd15", "sdxl", "sd21", "svd", "long_video", "pre", "flux", "zimage", "qwen")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI root (default: $COMFYUI_PATH)")
    p.add_argument("--size", type=int, default=None, help="image size in px (default 256 on CPU, 512 on CUDA; --quick 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=1,
                   help="sampler steps per timed run (default 1: the step timed is a run's first, including per-run work "
                        "such as ControlNeXt's stem; N > 1: steps 2..N are timed, steady state, N x the time)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a loaded machine 1 thread is faster and steadier)")
    p.add_argument("--only", default=None, help=f"comma list of {','.join(FAMILIES)} (default {','.join(DEFAULT_FAMILIES)})")
    p.add_argument("--configs", default="cnx,cn,cn2,xs", help="configurations besides the base: cnx,cn,cn2,xs")
    p.add_argument("--frames", type=int, default=None, help="SVD clip length in frames (default 4; --quick 2)")
    p.add_argument("--long-video-size", type=int, default=128,
                   help="image size in px of the long_video family (default 128: its 6-window video runs 48 UNet rows per step)")
    p.add_argument("--pre-size", type=int, default=512, help="preprocessor input size in px (default 512)")
    p.add_argument("--pre-frames", type=int, default=None, help="frames per preprocessor call (default 2; --quick 1)")
    p.add_argument("--sdxl-controlnet", choices=["auto", "on", "off"], default=None,
                   help="stock SDXL ControlNet (~5 GB fp32): auto = when RAM allows (default; off with --quick)")
    p.add_argument("--sdxl-cn2", choices=["on", "off"], default=None,
                   help="SDXL two-ControlNet rows (summed, balanced; one weight set shared by both, for RAM): on by "
                        "default whenever the stock SDXL ControlNet runs; off with --quick")
    p.add_argument("--ignore-ram", action="store_true", help="build every model even when RAM looks short")
    p.add_argument("--no-profile", action="store_true", help="do not profile missed targets")
    p.add_argument("--profile-all", action="store_true", help="profile every target configuration, missed or not")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    p.add_argument("--quick", action="store_true", help="smoke test: 128 px, 1 repeat, fewer configurations")
    p.add_argument("--save-state", default=None, help="also pickle the measured results to this file")
    p.add_argument("--render", default=None, help="only write the report from a --save-state file")
    p.add_argument("--out", default=os.path.join(PACK_DIR, "docs", "benchmarks.md"), help="markdown report path")
    a = p.parse_args(argv)
    if not a.comfyui and not a.render:
        p.error("give --comfyui or set COMFYUI_PATH to the ComfyUI folder (the one with main.py)")
    a.comfyui = os.path.expanduser(a.comfyui) if a.comfyui else None
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.frames = a.frames or (2 if a.quick else 4)
    a.sdxl_cn2 = (a.sdxl_cn2 or ("off" if a.quick else "on")) == "on"
    a.pre_frames = a.pre_frames or (1 if a.quick else 2)
    a.sdxl_controlnet = a.sdxl_controlnet or ("off" if a.quick else "auto")
    if a.only:
        fams = [f.strip() for f in a.only.split(",") if f.strip()]
        bad = [f for f in fams if f not in FAMILIES]
        if bad:
            p.error(f"unknown --only entries {bad}; choose from {','.join(FAMILIES)}")
        a.families = fams
    else:
        a.families = [f for f in DEFAULT_FAMILIES if not (a.quick and f == "sd21")]
    a.configs = {c.strip() for c in a.configs.split(",") if c.strip()}
    if a.steps < 1 or a.repeats < 1:
        p.error("--steps and --repeats must be >= 1")
    return a


def snapshot(bench, started):
    """Everything the report needs, picklable (--save-state, --render)."""
    import types

    return types.SimpleNamespace(
        args=argparse.Namespace(**vars(bench.args)), device_type=bench.device.type, machine=machine_info(bench),
        results=bench.results, notes=bench.notes, pre=bench.pre, profiles=bench.profiles, long_video=bench.long_video,
        flux=bench.flux, training=getattr(bench, "training", None), zimage=getattr(bench, "zimage", None), qwen=getattr(bench, "qwen", None),
        silent_signal=getattr(bench, "silent_signal", None),
        asymmetry=getattr(bench, "asymmetry", None), two_controls=getattr(bench, "two_controls", None),
        elapsed=time.time() - started, started=started, argv=argv_for_report())


def write_all(state, out):
    """The generated blocks of the report from a run's state (partial runs included)."""
    write_report(state, out)
    for name, report in (("long_video", long_video_report), ("flux", flux_report), ("training", training_report),
                         ("zimage", zimage_report), ("qwen", qwen_report), ("silent_signal", silent_signal_report),
                         ("asymmetry", asymmetry_report), ("two_controls", two_controls_report)):
        if getattr(state, name, None):
            replace_block(out, name, report(state))


def run_family(bench, family):
    a = bench.args
    if family in ("sd15", "sd21", "sdxl"):
        saved = set(a.configs)
        if a.quick and family == "sdxl":
            a.configs = a.configs & {"cnx", "xs"}
        try:
            bench.family_unet(family)
        finally:
            a.configs = saved
        return
    {"svd": lambda b: b.family_svd(), "pre": run_preprocessors, "long_video": run_long_video, "flux": run_flux,
     "training": run_training, "zimage": run_zimage, "qwen": run_qwen, "silent_signal": run_silent_signal,
     "asymmetry": run_asymmetry, "two_controls": run_two_controls}[family](bench)


def main(argv=None):
    started = time.time()
    a = parse_args(argv)
    if a.render:  # re-render a saved run (e.g. after editing the report text), no measuring
        with open(a.render, "rb") as f:
            state = pickle.load(f)  # a state file this script wrote (--save-state), never a downloaded one
        write_all(state, a.out)
        print(f"report written to {a.out} from {a.render}")
        return
    comfy_runtime = import_comfyui(a.comfyui, a.cpu)
    import torch
    import comfy.model_management as mm

    if a.threads:
        torch.set_num_threads(a.threads)
    a.load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    if a.size is None:
        a.size = 128 if a.quick else (512 if mm.get_torch_device().type == "cuda" else 256)
    if a.size % 64:
        raise SystemExit("--size must be a multiple of 64")
    comfy_runtime.load_nodes()
    bench = Bench(a)
    print(f"XCtrl benchmark: device {bench.device}, dtype {bench.dtype}, size {a.size}, repeats {a.repeats}, "
          f"steps/run {a.steps}, families {a.families}", flush=True)
    for family in a.families:
        t0 = time.perf_counter()
        run_family(bench, family)
        bench.free()  # the family's models are gone with its locals
        print(f"[{family}] done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        a.load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
        state = snapshot(bench, started)
        if a.save_state:
            with open(a.save_state, "wb") as f:
                pickle.dump(state, f)
        write_all(state, a.out)  # after each family: partial results survive a crash
    print(f"report written to {a.out} ({(time.time() - started) / 60:.1f} min)")
    with contextlib.suppress(Exception):
        import shutil

        shutil.rmtree(bench.tmp)


if __name__ == "__main__":
    main()

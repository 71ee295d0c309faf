"""The configurations of each model family (base, + ControlNeXt, + stock ControlNet(s), + MI,
+ ControlNet-XS) and how they are measured side by side: one instrumented run each (also the
warm-up), then timed runs interleaved A B C A B C ..."""
import gc
import os
import tempfile
import time

from . import GB
from .measure import CallCounter, Probe, mem_available, param_bytes, param_count
from .models import build_base, random_layout, save_sd, stock_controlnet, text_conds
from .stats import check_cnx_floor, check_mi_vs_sum, check_xs_vs_cn, fmt, interleaved, md_table, median, ratio

RAM_MARGIN = 4 * GB  # left free for the activations and for other processes on a shared machine
# Parameters of the full-size base UNets (for the RAM check before building one)
BASE_PARAMS = {"sd15": 0.86e9, "sd21": 0.87e9, "sdxl": 2.57e9, "svd": 1.53e9}
FAMILY_TITLES = {"sd15": "SD1.5", "sd21": "SD2.1", "sdxl": "SDXL", "svd": "SVD (img2vid UNet, 320 channels)"}


def node(module, name):
    """A node class of the pack, as ComfyUI loaded it."""
    from harness.comfy_runtime import pack_module

    return getattr(pack_module(module), name)


def run_node(cls, *args):
    return cls.execute(*args).result


class Config:
    def __init__(self, name, label, model, positive, negative, control_params=0, control_modules=(), note=""):
        self.name, self.label = name, label
        self.model, self.positive, self.negative = model, positive, negative
        self.control_params = control_params
        self.control_modules = list(control_modules)
        self.note = note
        self.per_run_work = False
        self.probe = None
        self.stem_counter = None
        self.module_counter = None
        self.instrumented = None  # list of step records of the instrumented run
        self.timed = []  # step time per timed run
        self.first_steps = []  # time of the first step of each timed run
        self.cuda_peaks = []
        self.error = None


def cnx_counters(loaded):
    """CallCounters on the ControlNeXt module instance(s) the XCtrl runner uses."""
    built = loaded.built_modules()  # built by the apply node, cached per (variant, dtype, devices)
    if not built:
        return None, None
    module = built[-1]
    stem = CallCounter("stem", module, "stem")
    rows = CallCounter("forward_from_stem", module, "forward_from_stem", rows=lambda stem_state, ts: int(stem_state[1].shape[0]))
    return stem, rows


class Bench:
    def __init__(self, args):
        import comfy.model_management as mm
        import torch

        self.args = args
        self.device = mm.get_torch_device()
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.tmp = tempfile.mkdtemp(prefix="xctrl_bench_")
        self.controlnet_dir = os.path.join(self.tmp, "controlnet")
        self.annotator_dir = os.path.join(self.tmp, "annotators")
        os.makedirs(self.controlnet_dir)
        os.makedirs(self.annotator_dir)
        import folder_paths

        folder_paths.add_model_folder_path("controlnet", self.controlnet_dir)
        self.results = {}  # family -> list of Config (models dropped)
        self.notes = {}  # family -> list of str
        self.pre = []  # preprocessor rows
        self.long_video = None  # long-video rows (bench/long_video.py)
        self.flux = None  # Flux summed vs balanced (bench/flux.py)
        self.zimage = None  # Z-Image control patches summed vs balanced (bench/model_patches.py)
        self.qwen = None  # Qwen-Image Apply-ControlNet controls summed vs balanced (bench/model_patches.py)
        self.profiles = []  # (title, text)
        self.log = print

    # ------------------------------------------------------------------ nodes
    def load_cnx(self, variant, seed):
        from harness.controlnext_files import LAYOUTS

        name = save_sd(self.controlnet_dir, f"controlnext_{variant}.safetensors", random_layout(LAYOUTS[variant], seed))
        return run_node(node("nodes.controlnext_nodes", "LoadControlNeXt"), name, "none")[0]

    def apply_cnx(self, model, loaded, image):
        return run_node(node("nodes.controlnext_nodes", "ApplyControlNeXt"), model, loaded, image, 1.0, 0.0, 1.0)[0]

    def load_xs(self, size_name, seed):
        name = save_sd(self.controlnet_dir, f"{size_name}.safetensors",
                       random_layout(f"controlnet_xs_vislearn_{size_name}.json", seed))
        return run_node(node("nodes.controlnet_xs_nodes", "LoadControlNetXS"), name)[0]

    def apply_xs(self, model, loaded, image):
        return run_node(node("nodes.controlnet_xs_nodes", "ApplyControlNetXS"), model, loaded, image, 1.0, 0.0, 1.0)[0]

    @staticmethod
    def apply_cn(pos, neg, cn, image):
        import nodes

        return nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, cn, image, 1.0, 0.0, 1.0)[:2]

    def apply_mi(self, model, pos, neg):
        return run_node(node("nodes.mi_nodes", "MIBalancedControl"), model, pos, neg, "paper", "layer", 20.0)

    # ------------------------------------------------------------------ runs
    def sample(self, cfg, steps, frames=None):
        import comfy.sample
        import torch

        lat = self.args.size // 8
        batch = frames or 1
        channels = cfg.model.model.latent_format.latent_channels
        latent = comfy.sample.fix_empty_latent_channels(cfg.model, torch.zeros(batch, channels, lat, lat))  # Qwen-Image: 5-D
        noise = comfy.sample.prepare_noise(latent, 0)
        with torch.inference_mode():
            out = comfy.sample.sample(cfg.model, noise, steps, 5.0, "euler", "normal", cfg.positive, cfg.negative,
                                      latent, disable_pbar=True, seed=0)
        return out

    def run(self, cfg, steps, mode, frames=None):
        probe = cfg.probe
        probe.mode = mode
        start = len(probe.steps)
        out = self.sample(cfg, steps, frames)
        import torch

        if not torch.isfinite(out).all():
            cfg.note = (cfg.note + " " if cfg.note else "") + "(non-finite output with random weights)"
        return probe.steps[start:]

    def measure_family(self, family, configs, frames=None):
        """Instrumented run per config (also the warm-up), then interleaved timed runs."""
        a = self.args
        for cfg in configs:
            cfg.probe = Probe(self.device)
            cfg.probe.install(cfg.model)
            cfg.probe.counters = [c for c in (cfg.stem_counter, cfg.module_counter) if c is not None]
        for cfg in configs:
            t0 = time.perf_counter()
            try:
                # two steps where a run does work once (ControlNeXt stem, ControlNet-XS hint embedding):
                # the first step shows it, the second the steady state
                n = max(2 if cfg.per_run_work else 1, a.steps)
                cfg.instrumented = self.run(cfg, n, "instrument", frames)
                stem_calls = cfg.stem_counter.calls if cfg.stem_counter else None
                cfg.stem_calls_per_run = stem_calls
            except Exception as e:  # report, keep the other configurations
                import traceback

                traceback.print_exc()
                cfg.error = f"{type(e).__name__}: {e}"
            self.log(f"  [{family}] instrumented {cfg.label}: {time.perf_counter() - t0:.1f}s "
                     f"flops/step={[s.get('flops') for s in (cfg.instrumented or [])]}")
        live = [c for c in configs if c.error is None]
        for rep, name in interleaved([c.name for c in live], a.repeats):
            cfg = next(c for c in live if c.name == name)
            t0 = time.perf_counter()
            steps = self.run(cfg, a.steps, "time", frames)
            times = [s["time"] for s in steps]
            cfg.first_steps.append(times[0])
            cfg.timed.append(median(times[1:]) if len(times) > 1 else times[0])
            cfg.cuda_peaks += [s["cuda_peak"] for s in steps[1:] if "cuda_peak" in s] or [s["cuda_peak"] for s in steps if "cuda_peak" in s]
            self.log(f"  [{family}] repeat {rep + 1}/{a.repeats} {cfg.label}: steps {['%.2f' % t for t in times]} "
                     f"(run {time.perf_counter() - t0:.1f}s)")

    def summarize(self, family, configs, base_module):
        rows = []
        base_weights = param_bytes(base_module)
        for cfg in configs:
            r = {"name": cfg.name, "label": cfg.label, "note": cfg.note, "error": cfg.error,
                 "control_params": cfg.control_params, "distinct_hints": getattr(cfg, "distinct_hints", 1)}
            steady = (cfg.instrumented or [])[1:] or (cfg.instrumented or [])
            r["flops_steady"] = steady[-1].get("flops") if steady else None
            r["flops_first"] = cfg.instrumented[0].get("flops") if cfg.instrumented else None
            # the FLOPs of the step that is timed: steady state, or the first step of a run
            r["flops"] = r["flops_steady"] if self.args.steps > 1 else r["flops_first"]
            r["live_peak"] = max(s.get("live_peak") or 0 for s in cfg.instrumented) if cfg.instrumented else None
            r["weights"] = base_weights + param_bytes(*cfg.control_modules)
            r["unet_rows"] = steady[-1]["unet_rows"] if steady else None
            r["time"] = median(cfg.timed)
            r["time_first"] = median(cfg.first_steps)
            r["times"] = list(cfg.timed)
            if self.device.type == "cuda":
                r["mem"] = median(cfg.cuda_peaks)
            else:
                r["mem"] = None if r["live_peak"] is None else r["weights"] + r["live_peak"]
            if cfg.instrumented:
                per_step = [s["counts"].get("forward_from_stem") for s in cfg.instrumented]
                r["cnx_calls"] = per_step if cfg.module_counter else None
                r["stem_calls_per_run"] = getattr(cfg, "stem_calls_per_run", None)
                r["instrumented_steps"] = len(cfg.instrumented)
            rows.append(r)
        b = rows[0]
        for r in rows:
            r["t_ratio"] = ratio(r["time"], b["time"])
            r["f_ratio"] = ratio(r["flops"], b["flops"])
            r["f_ratio_steady"] = ratio(r["flops_steady"], b["flops_steady"])
            r["m_ratio"] = ratio(r["mem"], b["mem"])
        self.results[family] = rows
        return rows

    def profile_pair(self, title, base_cfg, cfg, frames=None, top=12):
        """One profiled step of base and of cfg; the ops whose self time grew most."""
        from collections import defaultdict

        def self_times(c):
            self.run(c, 1, "profile", frames)
            prof = c.probe.profile
            c.probe.profile = None
            acc = defaultdict(lambda: [0.0, 0])
            for e in prof.key_averages():
                acc[e.key][0] += e.self_device_time_total if self.device.type == "cuda" else e.self_cpu_time_total
                acc[e.key][1] += e.count
            total = sum(v[0] for v in acc.values())
            return acc, total

        base_t, base_total = self_times(base_cfg)
        cfg_t, cfg_total = self_times(cfg)
        keys = set(base_t) | set(cfg_t)
        deltas = sorted(((cfg_t[k][0] - base_t[k][0], k) for k in keys), reverse=True)
        extra = cfg_total - base_total
        rows = []
        for d, k in deltas[:top]:
            rows.append([f"`{k}`", f"{base_t[k][0] / 1e3:.0f}", f"{cfg_t[k][0] / 1e3:.0f}", f"{d / 1e3:+.0f}",
                         fmt(100 * d / extra, 0, "%") if extra > 0 else "n/a", f"{base_t[k][1]} / {cfg_t[k][1]}"])
        ops_base = sum(v[1] for v in base_t.values())
        ops_cfg = sum(v[1] for v in cfg_t.values())
        text = (f"One profiled step each (single samples: absolute deltas are noisy on a shared CPU; op counts are "
                f"exact). Reference ({base_cfg.label}) {base_total / 1e6:.2f} s of op self time ({ops_base} op calls), "
                f"{cfg.label} {cfg_total / 1e6:.2f} s ({ops_cfg} op calls): +{extra / 1e6:.2f} s, "
                f"+{ops_cfg - ops_base} op calls.\n\n")
        text += md_table(["op", "reference ms", "config ms", "delta ms", "share of extra", "calls reference / config"], rows)
        self.profiles.append((title, text))
        return {"extra_s": extra / 1e6, "extra_calls": ops_cfg - ops_base, "base_s": base_total / 1e6}

    # ------------------------------------------------------------------ families
    def family_unet(self, family):
        import torch

        a = self.args
        if not self.ram_ok(family):
            return
        t0 = time.perf_counter()
        self.log(f"[{family}] building the full-size UNet with random weights ...")
        base = build_base(family, self.dtype, seed=0)
        self.log(f"[{family}] built in {time.perf_counter() - t0:.0f}s ({param_count(base.model.diffusion_model) / 1e6:.0f}M params)")
        g = torch.Generator().manual_seed(5)
        image = torch.rand(1, a.size, a.size, 3, generator=g)
        image2 = torch.rand(1, a.size, a.size, 3, generator=g)
        pos, neg = text_conds(family, a.size)
        configs = self.unet_configs(family, base, image, image2, pos, neg)  # its locals (modules) end there
        self.measure_family(family, configs)
        rows = self.summarize(family, configs, base.model.diffusion_model)
        self.check_and_profile(family, configs, rows)
        del configs, base
        self.free()

    def unet_configs(self, family, base, image, image2, pos, neg):
        """The configurations of a UNet family, each on its own clone of ``base``."""
        configs = [Config("base", "base", base.clone(), pos, neg)]
        configs += self._controlnext_configs(family, base, image, pos, neg)
        configs += self._stock_controlnet_configs(family, base, image, image2, pos, neg)
        configs += self._controlnet_xs_configs(family, base, image, pos, neg)
        return configs

    def _controlnext_configs(self, family, base, image, pos, neg):
        """The released ControlNeXt module of the family."""
        configs = []
        cnx_variant = {"sd15": "sd15", "sdxl": "sdxl"}.get(family)
        if cnx_variant and "cnx" in self.args.configs:
            loaded = self.load_cnx(cnx_variant, seed=11)
            model = self.apply_cnx(base, loaded, image)
            stem, rows = cnx_counters(loaded)
            module = loaded.built_modules()[0]
            label = {"sd15": "+ ControlNeXt SD1.5 (released, 1280 out)", "sdxl": "+ ControlNeXt SDXL"}[family]
            c = Config("cnx", label, model, pos, neg, param_count(module), [module])
            c.stem_counter, c.module_counter = stem, rows
            c.per_run_work = True
            configs.append(c)
        return configs

    def _stock_controlnet_configs(self, family, base, image, image2, pos, neg):
        """One stock ControlNet; two summed and two balanced by MI."""
        import torch

        a = self.args
        configs = []
        notes = self.notes.setdefault(family, [])
        want_cn = "cn" in a.configs or ("cn2" in a.configs and (family != "sdxl" or a.sdxl_cn2))
        cn_ok = want_cn and family in ("sd15", "sdxl")
        if cn_ok and family == "sdxl" and a.sdxl_controlnet != "on":
            need = 1.25e9 * torch.tensor([], dtype=self.dtype).element_size() * 1.1
            avail = mem_available()
            if a.sdxl_controlnet == "off" or (avail is not None and avail < need + RAM_MARGIN):
                cn_ok = False
                notes.append("Stock SDXL ControlNet rows skipped: "
                             + ("--sdxl-controlnet off." if a.sdxl_controlnet == "off" else
                                f"only {avail / GB:.1f} GB RAM available, {need / GB:.1f} GB + {RAM_MARGIN / GB:.0f} GB margin needed "
                                "(--sdxl-controlnet on forces it)."))
        if cn_ok:
            cn1 = stock_controlnet(family, self.dtype, seed=21)
            cn_params = param_count(cn1.control_model)
            if "cn" in a.configs:
                p1, n1 = self.apply_cn(pos, neg, cn1, image)
                configs.append(Config("cn", "+ ControlNet (stock ComfyUI)", base.clone(), p1, n1, cn_params, [cn1.control_model]))
            if family == "sdxl" and "cn2" in a.configs and not a.sdxl_cn2:
                notes.append("SDXL two-ControlNet rows (summed, balanced) not run (--sdxl-cn2 on adds them: two more "
                             "configurations at ~1.8x the base step time).")
            if "cn2" in a.configs and (family != "sdxl" or a.sdxl_cn2):
                shared = family == "sdxl"
                cn2 = cn1 if shared else stock_controlnet(family, self.dtype, seed=22)
                if shared:
                    notes.append("The two SDXL ControlNets share one weight set (RAM); each runs on its own hint, "
                                 "so the compute is that of two networks, the weight memory that of one.")
                p2, n2 = self.apply_cn(pos, neg, cn1, image)
                p2, n2 = self.apply_cn(p2, n2, cn2, image2)
                mods = [cn1.control_model] + ([] if shared else [cn2.control_model])
                configs.append(Config("cn2_sum", "+ 2 ControlNets, summed (stock)", base.clone(), p2, n2, 2 * cn_params, mods))
                mi_model, mp, mn = self.apply_mi(base, p2, n2)
                configs.append(Config("cn2_mi", "+ 2 ControlNets, balanced (MI, paper)", mi_model, mp, mn, 2 * cn_params, mods))
        return configs

    def _controlnet_xs_configs(self, family, base, image, pos, neg):
        """Each released ControlNet-XS size of the family."""
        configs = []
        if "xs" in self.args.configs:
            for size_name in {"sd15": ["sd15_53m"], "sd21": ["sd21_14m"], "sdxl": ["sdxl_20m", "sdxl_48m"]}.get(family, []):
                loaded = self.load_xs(size_name, seed=31)
                model = self.apply_xs(base, loaded, image)
                net = loaded.net
                label = f"+ ControlNet-XS {size_name.split('_')[1].upper()}"
                c = Config(f"xs_{size_name}", label, model, pos, neg, param_count(net), [net])
                c.per_run_work = True
                configs.append(c)
        return configs

    def family_svd(self):
        import torch

        a = self.args
        frames = a.frames
        if not self.ram_ok("svd"):
            return
        t0 = time.perf_counter()
        self.log("[svd] building the full-size SVD UNet with random weights ...")
        base = build_base("svd", self.dtype, seed=0)
        self.log(f"[svd] built in {time.perf_counter() - t0:.0f}s ({param_count(base.model.diffusion_model) / 1e6:.0f}M params)")
        poses = torch.rand(frames, a.size, a.size, 3, generator=torch.Generator().manual_seed(7))
        pos, neg = text_conds("svd", a.size)
        configs = [Config("base", "base (SVD img2vid UNet)", base.clone(), pos, neg)]
        loaded = self.load_cnx("svd_v2", seed=12)
        model = self.apply_cnx(base, loaded, poses)
        stem, rows = cnx_counters(loaded)
        module = loaded.built_modules()[0]
        c = Config("cnx", "+ ControlNeXt-SVD v2", model, pos, neg, param_count(module), [module])
        c.stem_counter, c.module_counter = stem, rows
        c.distinct_hints = frames
        c.per_run_work = True
        configs.append(c)
        self.measure_family("svd", configs, frames=frames)
        rows = self.summarize("svd", configs, base.model.diffusion_model)
        self.check_and_profile("svd", configs, rows, frames=frames)
        del configs, base
        self.free()

    def ram_ok(self, family):
        """Whether the base fits in the RAM available now (the machine may be shared); else a note."""
        import torch

        need = BASE_PARAMS[family] * torch.tensor([], dtype=self.dtype).element_size() * 1.1
        avail = mem_available()
        if self.args.ignore_ram or avail is None or avail >= need + RAM_MARGIN:
            return True
        msg = (f"{FAMILY_TITLES[family]} not run: {avail / GB:.1f} GB RAM available, the base needs {need / GB:.1f} GB "
               f"+ {RAM_MARGIN / GB:.0f} GB margin (--ignore-ram to try anyway).")
        self.notes.setdefault("skipped", []).append(msg)
        self.log("  " + msg)
        return False

    def free(self):
        import comfy.model_management as mm

        gc.collect()
        mm.unload_all_models()
        mm.soft_empty_cache()
        gc.collect()

    # ------------------------------------------------------------------ targets
    def want_profile(self, holds):
        return self.args.profile_all or (holds is False and not self.args.no_profile)

    def check_and_profile(self, family, configs, rows, frames=None):
        by = {r["name"]: r for r in rows}
        cfgs = {c.name: c for c in configs}
        checks = self.notes.setdefault(("targets", family), [])
        if "cnx" in by and by["cnx"]["error"] is None:
            r = by["cnx"]
            holds, rel = check_cnx_floor(r["t_ratio"], r["f_ratio"])
            checks.append(("cnx_floor", r["label"], holds, rel, r))
            if self.want_profile(holds):
                info = self.profile_pair(f"{family}: {r['label']} vs base", cfgs["base"], cfgs["cnx"], frames)
                r["profile"] = info
        if "cn" in by:
            for name, r in by.items():
                if name.startswith("xs_") and r["error"] is None:
                    holds, rel = check_xs_vs_cn(r["t_ratio"], by["cn"]["t_ratio"])
                    checks.append(("xs_vs_cn", r["label"], holds, rel, r))
                    if self.want_profile(holds):
                        r["profile"] = self.profile_pair(f"{family}: {r['label']} vs base", cfgs["base"], cfgs[name], frames)
        if "cn2_sum" in by and "cn2_mi" in by:
            holds, rel = check_mi_vs_sum(by["cn2_mi"]["time"], by["cn2_sum"]["time"])
            checks.append(("mi_vs_sum", by["cn2_mi"]["label"], holds, rel, by["cn2_mi"]))
            if self.want_profile(holds):
                by["cn2_mi"]["profile"] = self.profile_pair(f"{family}: balanced vs summed two-control", cfgs["cn2_sum"], cfgs["cn2_mi"], frames)


def sum_vs_balanced(bench, family, configs, base, cn_params):
    """Times base / two controls summed ("cn2_sum") / balanced ("cn2_mi") side by side; the result
    ``sum_vs_balanced_report`` writes."""
    bench.measure_family(family, configs)
    rows = bench.summarize(family, configs, base.model.diffusion_model)
    by = {r["name"]: r for r in rows}
    holds, rel = check_mi_vs_sum(by["cn2_mi"]["time"], by["cn2_sum"]["time"])
    return {"rows": bench.results.pop(family), "size": bench.args.size, "holds": holds, "mi_vs_sum": rel,
            "mem_vs_sum": ratio(by["cn2_mi"]["mem"], by["cn2_sum"]["mem"]),
            "base_params": param_count(base.model.diffusion_model), "cn_params": cn_params}


def sum_vs_balanced_report(bench, family, title, setting, flop_column=False):
    """The section of the family's ``sum_vs_balanced`` result ("" if it did not run): the setting (a format
    string of size, lat, base_m and cn_m: image and latent size, parameters in millions), the machine, the
    table, the verdict."""
    result = getattr(bench, family, None)
    if not result:
        return ""
    setting = setting.format(size=result["size"], lat=result["size"] // 8, base_m=f"{result['base_params'] / 1e6:.0f}",
                             cn_m=f"{result['cn_params'] / 1e6:.0f}")
    header = ["configuration", "control params (M)", "step time (s)", "time ratio to base"]
    header += ["FLOP ratio (floor)"] * flop_column + ["peak memory (GB)", "memory ratio"]
    ok = [r for r in result["rows"] if not r["error"]]
    body = [[r["label"], fmt(r["control_params"] / 1e6, 0) if r["control_params"] else "-", fmt(r["time"], 2),
             fmt(r["t_ratio"], 3)] + [fmt(r["f_ratio"], 3)] * flop_column
            + [fmt(r["mem"] / GB if r["mem"] else None, 2), fmt(r["m_ratio"], 3)] for r in ok]
    verdict = {True: "holds", False: "missed", None: "not measured"}[result["holds"]]
    return "\n".join([
        f"## {title}", "", setting, "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in bench.machine.items()) + f". Command: `{' '.join(bench.argv)}`.",
        "", md_table(header, body), "",
        f"Balanced / summed step time: {fmt(result['mi_vs_sum'], 3)} (goal <= 1.03: {verdict}); peak memory balanced / "
        f"summed: {fmt(result['mem_vs_sum'], 3)}.", "",
        "Raw step times (s): " + "; ".join(f"{r['label']}: " + ", ".join(f"{t:.2f}" for t in r["times"]) for r in ok) + ".",
        "",
    ])

"""What a step costs: the step probe (time, UNet rows), FLOPs, live tensor bytes, call counters."""
import time
import weakref


class LiveTensorBytes:
    """Peak bytes of tensor storages created while active (activations, temporaries) and still
    alive, tracked op by op with a TorchDispatchMode and weakref finalizers. Weights and other
    tensors that existed before are not counted; buffers internal to one kernel are not seen.
    Allocator-independent, so comparable between configurations on the CPU (where the process
    RSS says little: glibc keeps freed memory)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._seen(args, kwargs, out)
                return out

        self.mode = _Mode()
        self.storages = {}  # storage key -> [nbytes, live tensor objects]
        self.tensors = set()  # ids of tracked tensor objects
        self.current = 0
        self.peak = 0

    @staticmethod
    def _key(t):
        try:
            return (t.device.type, t.device.index, t.untyped_storage().data_ptr())
        except Exception:
            return None

    def _seen(self, args, kwargs, out):
        import torch
        from torch.utils._pytree import tree_flatten

        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:
            return
        inputs = {self._key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in outs:
            if id(t) in self.tensors:
                continue  # in-place op: the same object
            key = self._key(t)
            if key is None or key[2] == 0:
                continue
            entry = self.storages.get(key)
            if entry is None:
                if key in inputs:
                    continue  # a view of a tensor that existed before (weights, inputs)
                nbytes = t.untyped_storage().nbytes()
                entry = self.storages[key] = [nbytes, 0]
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            self.tensors.add(id(t))
            weakref.finalize(t, self._release, id(t), key)

    def _release(self, tid, key):
        self.tensors.discard(tid)
        entry = self.storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.current -= entry[0]
            del self.storages[key]

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def flop_counter():
    """FlopCounterMode, plus a formula for the CPU flash-attention op it does not know."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    custom = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        def sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
            b, h, lq, d = q_shape
            lk = k_shape[-2]
            dv = v_shape[-1]
            return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv

        custom[op] = sdpa_cpu_flops
    return FlopCounterMode(display=False, custom_mapping=custom)


def param_bytes(*modules):
    seen, total = set(), 0
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def param_count(module):
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Probe:
    """Wrappers on one configuration's MODEL: times each denoising step (PREDICT_NOISE = control
    networks + UNet + CFG), counts UNet calls/rows (APPLY_MODEL) and, when asked, instruments a
    step (FLOPs, live tensor bytes, profiler)."""

    KEY = "xctrl_benchmark_probe"

    def __init__(self, device):
        self.device = device
        self.mode = "time"  # "time" | "instrument" | "profile"
        self.steps = []
        self.counters = []  # CallCounter objects to snapshot per step
        self.profile = None

    def __deepcopy__(self, memo):
        return self

    def install(self, model):
        import comfy.patcher_extension as pe

        model.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, self.KEY, self.predict_noise)
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, self.KEY, self.apply_model)

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def apply_model(self, executor, x, *args, **kwargs):
        if self.steps:
            self.steps[-1]["unet_rows"].append(int(x.shape[0]))
        return executor(x, *args, **kwargs)

    def predict_noise(self, executor, *args, **kwargs):
        import torch

        record = {"unet_rows": [], "counts": {}}
        self.steps.append(record)
        before = {id(c): c.snapshot() for c in self.counters}
        if self.mode == "instrument":
            counter, live = flop_counter(), LiveTensorBytes()
            with counter, live:
                out = executor(*args, **kwargs)
            record["flops"] = counter.get_total_flops()
            record["live_peak"] = live.peak
            del live
        elif self.mode == "profile":
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._sync()
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                out = executor(*args, **kwargs)
                self._sync()
            record["time"] = time.perf_counter() - t0
            self.profile = prof
        else:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self._sync()
            t0 = time.perf_counter()
            out = executor(*args, **kwargs)
            self._sync()
            record["time"] = time.perf_counter() - t0
            if self.device.type == "cuda":
                record["cuda_peak"] = torch.cuda.max_memory_allocated(self.device)
        for c in self.counters:
            record["counts"][c.name] = c.delta(before[id(c)])
        return out


class CallCounter:
    """Counts calls (and batch rows) of one bound method of one module instance."""

    def __init__(self, name, obj, method, rows=None):
        self.name = name
        self.calls = 0
        self.rows = 0
        function = getattr(type(obj), method)
        owner = weakref.ref(obj)  # no reference cycle: the module dies with its ModelPatcher

        def counted(*args, **kwargs):
            self.calls += 1
            if rows is not None:
                self.rows += rows(*args, **kwargs)
            return function(owner(), *args, **kwargs)

        setattr(obj, method, counted)  # an attribute of this benchmark's own module instance

    def snapshot(self):
        return (self.calls, self.rows)

    def delta(self, before):
        return (self.calls - before[0], self.rows - before[1])

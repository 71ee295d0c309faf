"""MIControlNet's training recipe on a toy: two controls combined, and the conservativity stage.

Toy task (the tiny SD1.5-like UNet, latent 8 x 8): the image is one or two SIDE x SIDE squares
(+1 on channel 0, -1 on channel 1). Two different conditions say where a square is: control A
sees it filled white, control B sees only its outline (a 4 px band), so the two are separate
ControlNeXt modules with their own inputs. Plain data: one square per image, its condition
complete (the condition says everything about the image, silent = flat, as conditions extracted
from images are). Balanced data: two squares per image, each square's condition kept with
probability KEEP_RATE (Silent Signal Balance's code, the squares and the background as segments),
the image keeping both squares.

Runs per control from one UNet base (trained unconditionally on one- and two-square images):
plain (plain data, STAGE1 + STAGE2 steps), balanced stage 1 only (balanced data, STAGE1 + STAGE2
steps) and the recipe (balanced data, the same first STAGE1 steps, then STAGE2 steps with the
conservativity stage). Measured on held-out images with two squares, A's at one place and B's at
another: each control alone (its own square's presence), the two combined by summing their terms
(h + a + b) or by MIControlNet's balanced combination and injection (h + add_inj(h, add_com(a, b))),
and the Asym of each control's Jacobian part (models/conservativity.py) at timestep ASYM_T.
"""
import copy
import time

from .stats import md_table

LATENT, SIDE, PX = 8, 3, 8  # latent size, square side (latent px), image px per latent px
N_TRAIN, N_HELD_OUT, NOISES = 64, 16, 2
PRETRAIN_STEPS, STAGE1, STAGE2 = 300, 80, 40
SEEDS = (0, 1)
KEEP_RATE = 0.5
LR_MODULE = 3e-3  # 30 x the recipe's: at 1e-4 the toy's control barely moves the prediction in 150 steps
CONS_WEIGHT, CONS_PROBES = 10.0, 1  # weight 1: the stage's loss ~0.01 next to a denoising loss ~0.05
ASYM_T, ASYM_PROBES = 500, 16
T_EVAL = 999
CONTROLS = ("A", "B")
RUNS = ("plain", "balanced, stage 1", "recipe (balanced + stage 2)")


def square_positions(n, count, seed):
    """(n, count, 2) top-left corners of ``count`` non-overlapping SIDE x SIDE squares per image."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, count, 2, dtype=torch.long)
    for i in range(n):
        k = 0
        while k < count:
            p = torch.randint(0, LATENT - SIDE + 1, (2,), generator=g)
            if all(int((p - out[i, j]).abs().max()) >= SIDE for j in range(k)):
                out[i, k] = p
                k += 1
    return out


def render(pos):
    """Latents (n, 4, LATENT, LATENT) with the squares at ``pos`` and their segment labels at image
    resolution (n, LATENT * PX, LATENT * PX): square j is label j + 1, the background 0."""
    import torch

    n, count, _ = pos.shape
    latents = torch.zeros(n, 4, LATENT, LATENT)
    labels = torch.zeros(n, LATENT, LATENT, dtype=torch.long)
    for i in range(n):
        for j in range(count):
            y, x = (int(v) for v in pos[i, j])
            latents[i, 0, y:y + SIDE, x:x + SIDE] = 1.0
            latents[i, 1, y:y + SIDE, x:x + SIDE] = -1.0
            labels[i, y:y + SIDE, x:x + SIDE] = j + 1
    return latents, labels.repeat_interleave(PX, 1).repeat_interleave(PX, 2)


def condition(labels, control):
    """IMAGE-layout condition (n, H, W, 3) of the squares in ``labels``: A fills them white, B draws
    their outline (a PX // 2 wide band inside each square)."""
    import torch

    inside = (labels > 0).float()[:, None]
    if control == "B":
        band = PX // 2
        eroded = -torch.nn.functional.max_pool2d(-inside, 2 * band + 1, stride=1, padding=band)
        inside = inside - eroded
    return inside[:, 0, ..., None].expand(-1, -1, -1, 3).contiguous()


def presence(x, pos):
    """Per image, how much of the square at ``pos`` (n, 2) is there: the mean of (channel 0 -
    channel 1) / 2 over its SIDE x SIDE window (1: as in the data, 0: flat)."""
    import torch

    score = (x[:, 0] - x[:, 1]) / 2
    return torch.stack([score[i, y:y + SIDE, x_:x_ + SIDE].mean() for i, (y, x_) in enumerate(pos.tolist())])


def mean(values):
    return sum(values) / len(values)


class Control:
    """One toy ControlNeXt on the shared frozen base UNet (module only: the UNet's weights stay the
    base's, so two controls can run in one UNet call), its data and its trainer."""

    def __init__(self, pretrained, seed, hints, latents):
        import torch

        from harness.comfy_runtime import pack_module

        from .training import toy_control

        tr = pack_module("models.controlnext_training")
        self.dm, self.alphas, self.ctx, unet, self.module = toy_control(pretrained, seed)
        for p in unet.values():
            p.requires_grad_(False)
        self.hints, self.latents = hints, latents
        self.trainer = tr.Trainer(self.module, {}, latents.shape[0], batch_size=4, lr_module=LR_MODULE, seed=seed)
        self.generator = torch.Generator().manual_seed(seed)

    def term(self, hints, t):
        import torch

        from harness.comfy_runtime import pack_module

        feat = self.module(hints, t.float())
        return pack_module("runtime.controlnext").cross_norm_term("sd15_training", feat, torch.ones(hints.shape[0]))

    def call(self, x_t, t, hints, taps=None):
        from .training import toy_call

        return toy_call(self.dm, self.ctx, x_t, t, self.term(hints, t), taps=taps)

    def train(self, steps, stage=False):
        from harness.comfy_runtime import pack_module

        if stage:
            cons = pack_module("models.conservativity")
            tapped = self._tapped
            self.trainer.stage = cons.ConservativityStage(CONS_WEIGHT, CONS_PROBES, "rademacher", 0,
                                                          self.module.parameters(), tapped)
        for _ in range(steps):
            self.trainer.train_step(self.latents, self.alphas, lambda x_t, t, idx, empty: self.call(x_t, t, self.hints[idx]))
        self.trainer.stage = None

    def _tapped(self, x, t, idx, empty):
        from harness.comfy_runtime import pack_module

        taps = {}
        with pack_module("runtime.training").math_attention():
            out = self.call(x, t, self.hints[idx], taps)
        return out, taps["joined"], taps["term"]

    def asym(self, latents, hints, seed):
        """(mean Asym, mean relative Asym) of this control's Jacobian part on ``latents`` noised to ASYM_T."""
        import torch

        from harness.comfy_runtime import pack_module

        cons = pack_module("models.conservativity")
        tr = pack_module("models.controlnext_training")
        g = torch.Generator().manual_seed(seed)
        t = torch.full((latents.shape[0],), ASYM_T)
        x = tr.noised(latents, torch.randn(latents.shape, generator=g), t, self.alphas).requires_grad_(True)
        taps = {}
        with pack_module("runtime.training").math_attention():
            out = self.call(x, t, hints, taps)
        jt = cons.control_jacobian_t(out, taps["joined"], taps["term"], x)
        asym, frob = cons.hutchinson_asymmetry(jt, cons.probe_vectors(tuple(out.shape), ASYM_PROBES, "rademacher", g))
        return float(asym.mean()), float(asym.mean() / frob.mean().clamp(min=1e-12))


def training_data(control, seed):
    """{"plain": (latents, NCHW hints), "balanced": (...)} of ``control`` (N_TRAIN pairs each)."""
    import torch

    from harness.comfy_runtime import pack_module

    ss = pack_module("models.silent_signal")
    k = CONTROLS.index(control)
    lat1, lab1 = render(square_positions(N_TRAIN, 1, 1000 * seed + 10 + k))
    lat2, lab2 = render(square_positions(N_TRAIN, 2, 1000 * seed + 20 + k))
    cond2 = condition(lab2, control)
    _, balanced, _ = ss.balance(torch.zeros_like(cond2), cond2, lab2, KEEP_RATE, 1, 1000 * seed + 30 + k)
    nchw = lambda c: c.permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return {"plain": (lat1, nchw(condition(lab1, control))), "balanced": (lat2, nchw(balanced))}


def held_out(seed):
    """Held-out images with two squares (A's = square 0, B's = square 1), each noise: (latents,
    positions, {control: its NCHW hint}, noise)."""
    import torch

    pos = square_positions(N_HELD_OUT, 2, 1000 * seed + 3).repeat(NOISES, 1, 1)
    latents, labels = render(pos)
    hints = {c: condition((labels == k + 1).long(), c).permute(0, 3, 1, 2).contiguous() for k, c in enumerate(CONTROLS)}
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1000 * seed + 7))
    return latents, pos, hints, noise


def sample(controls, held, mode, base):
    """Presence of square 0 and of square 1 (each the mean over the held-out images) in what the
    denoiser predicts from pure noise (x0 at t = 999, where only the controls can say where the
    squares are) with ``controls`` ({name: Control}) applied: "sum" h + the sum of their terms,
    "balanced" MIControlNet's add_inj(h, combine(terms)) (paper mode, per layer)."""
    import torch

    from harness.comfy_runtime import pack_module

    from .training import toy_inject

    mb = pack_module("models.mi_balance")
    latents, pos, hints, noise = held
    t = torch.full((noise.shape[0],), T_EVAL)
    terms = [c.term(hints[name], t) for name, c in controls.items()]

    def inject(h):
        rs = [f(h) for f in terms]
        if not rs:
            return h
        return h + sum(rs) if mode == "sum" else mb.add_inj(h, mb.combine(rs, "paper"), "paper")

    with torch.no_grad():
        eps = toy_inject(base.dm, base.ctx, noise, t, inject)
    a = base.alphas[T_EVAL]
    x0 = (noise - (1 - a).sqrt() * eps) / a.sqrt()
    return [float(presence(x0, pos[:, k]).mean()) for k in range(2)]


def train_runs(bench, pretrained, seed):
    """{run: {control: trained Control}} for RUNS; the recipe continues the balanced run's first STAGE1 steps."""
    runs = {run: {} for run in RUNS}
    for k, name in enumerate(CONTROLS):
        data = training_data(name, seed)
        t0 = time.perf_counter()
        plain = Control(pretrained, 10 * seed + k, data["plain"][1], data["plain"][0])
        plain.train(STAGE1 + STAGE2)
        balanced = Control(pretrained, 10 * seed + k, data["balanced"][1], data["balanced"][0])
        balanced.train(STAGE1)
        recipe = copy.deepcopy(balanced)
        balanced.train(STAGE2)
        recipe.train(STAGE2, stage=True)
        for run, c in zip(RUNS, (plain, balanced, recipe)):
            runs[run][name] = c
        bench.log(f"  [two_controls] seed {seed} control {name}: loss plain {mean(plain.trainer.losses[-10:]):.4f}, "
                  f"balanced {mean(balanced.trainer.losses[-10:]):.4f}, recipe {mean(recipe.trainer.losses[-10:]):.4f}, "
                  f"stage loss {mean(recipe.trainer.stage_losses[-10:]):.3g} ({time.perf_counter() - t0:.0f}s)")
    return runs


def measure_run(controls, held, seed):
    """Presences (alone, summed, balanced) and Asym of one run's two controls on ``held``."""
    base = next(iter(controls.values()))
    out = {"sum": sample(controls, held, "sum", base), "balanced": sample(controls, held, "balanced", base)}
    for name, c in controls.items():
        out["alone", name] = sample({name: c}, held, "sum", base)
        out["asym", name] = c.asym(held[0][:N_HELD_OUT], held[2][name][:N_HELD_OUT], seed)
    return out


def run_two_controls(bench):
    import torch

    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI's import leaves autograd off
        _run_all(bench)


def _run_all(bench):
    import torch

    from .training import pretrain_toy_unet

    rows, pretrain = {}, {}
    for seed in SEEDS:
        t0 = time.perf_counter()
        latents = torch.cat([render(square_positions(N_TRAIN, count, 1000 * seed + count))[0] for count in (1, 2)])
        pretrained, losses = pretrain_toy_unet(latents, PRETRAIN_STEPS)
        pretrain[seed] = (losses[0], mean(losses[-20:]))
        bench.log(f"  [two_controls] seed {seed} base: loss {losses[0]:.3f} -> {pretrain[seed][1]:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)")
        runs = train_runs(bench, pretrained, seed)
        held = held_out(seed)
        rows[seed, "no control"] = {"sum": sample({}, held, "sum", runs[RUNS[0]]["A"])}
        for run, controls in runs.items():
            rows[seed, run] = measure_run(controls, held, seed)
            bench.log(f"  [two_controls] seed {seed} {run}: {rows[seed, run]}")
    bench.two_controls = {"rows": rows, "pretrain": pretrain, "threads": torch.get_num_threads()}


def claims(rows, seeds):
    """The toy's verdicts from the measured rows: [(claim, the numbers compared, verdict)], one row per control for the
    conservativity stage: its Asym and its relative Asym (a stage that only weakens a control lowers the first, not the
    second)."""
    plain, stage1, recipe = RUNS

    def avg(run, key, k):
        return mean([rows[s, run][key][k] for s in seeds])

    ours = [avg(recipe, "balanced", k) for k in range(2)]
    theirs = [avg(plain, "sum", k) for k in range(2)]
    out = [("two controls: each control's presence, recipe + balanced vs plain + summed",
            f"A {ours[0]:.3f} vs {theirs[0]:.3f}, B {ours[1]:.3f} vs {theirs[1]:.3f}",
            "reproduced" if all(o > t for o, t in zip(ours, theirs)) else "not reproduced")]
    for k, c in enumerate(CONTROLS):
        asym = [avg(run, ("asym", c), 0) for run in (recipe, stage1)]
        relative = [avg(run, ("asym", c), 1) for run in (recipe, stage1)]
        alone = [avg(run, ("alone", c), k) for run in (recipe, stage1)]
        verdict = ("reproduced" if asym[0] < asym[1] and relative[0] < relative[1] else
                   "only as a weaker control (relative Asym not lower)" if asym[0] < asym[1] else "not reproduced")
        out.append((f"conservativity stage, control {c}: Asym, stage 1 + 2 vs stage 1 only",
                    f"{asym[0]:.4g} vs {asym[1]:.4g}; relative {relative[0]:.3f} vs {relative[1]:.3f}; "
                    f"{c} alone, presence {alone[0]:.3f} vs {alone[1]:.3f}", verdict))
    return out


NOT_SHOWN = [
    "A tiny UNet on 8 x 8 latents, two seeds, one task: the direction of an effect, not its size on real models.",
    f"The stage's weight ({CONS_WEIGHT:g}) was chosen for the toy: the loss is a sum over the latent's elements, so its "
    "scale (and the paper's weight) does not carry over between model sizes.",
    "Asym falls when a control's Jacobian shrinks; the relative Asym and the presence of the control alone say whether "
    "the stage made the control more conservative or only weaker.",
    "Presence from pure noise (t = 999) measures where each control puts its square, not image quality or FID.",
]


def two_controls_report(bench):
    info = getattr(bench, "two_controls", None)
    if not info:
        return ""
    rows, seeds = info["rows"], sorted(info["pretrain"])
    pair = lambda v: f"{v[0]:.3f} / {v[1]:.3f}"  # noqa: E731
    body = []
    for seed in seeds:
        body.append([str(seed), "no control", "-", "-", pair(rows[seed, "no control"]["sum"]), "-", "-", "-"])
        for run in RUNS:
            r = rows[seed, run]
            body.append([str(seed), run, pair(r["alone", "A"]), pair(r["alone", "B"][::-1]), pair(r["sum"]), pair(r["balanced"]),
                         f"{r['asym', 'A'][0]:.4g} ({r['asym', 'A'][1]:.3f})", f"{r['asym', 'B'][0]:.4g} ({r['asym', 'B'][1]:.3f})"])
    base = "; ".join(f"seed {s}: {a:.3f} -> {b:.3f}" for s, (a, b) in info["pretrain"].items())
    return "\n".join([
        "## MIControlNet's training recipe: two controls combined, and the conservativity stage (toy)",
        "",
        f"Toy task (tiny SD1.5-like UNet, latent {LATENT} x {LATENT}): images of one or two {SIDE} x {SIDE} squares. Control A "
        "sees a square filled white, control B only its outline: two ControlNeXt modules with their own conditions, on the "
        "same frozen base UNet (module only, so both run in one UNet call). Plain data: one square per image, its condition "
        f"complete; balanced data: two squares per image, each square's condition kept with probability {KEEP_RATE} "
        f"(Silent Signal Balance's code), the image keeping both; {N_TRAIN} pairs each. Base: trained unconditionally on one- "
        f"and two-square images ({PRETRAIN_STEPS} steps, loss {base}). Runs per control (AdamW, lr {LR_MODULE:g}, batch 4): "
        f"plain ({STAGE1 + STAGE2} steps), balanced stage 1 only ({STAGE1 + STAGE2} steps), the recipe (the same first "
        f"{STAGE1} balanced steps, then {STAGE2} with the conservativity stage: weight {CONS_WEIGHT:g}, {CONS_PROBES} "
        f"Rademacher probe). Held out: {N_HELD_OUT} images x {NOISES} noises with A's square at one place and B's at another, "
        f"measured on the denoiser's prediction of x0 from pure noise (t = {T_EVAL}: only the controls can say where the squares "
        "are). Presence = mean of (channel 0 - channel 1) / 2 over a square's window (1: the square as in the data, 0: flat). Summed = h + a + b; balanced = MIControlNet's "
        f"add_inj(h, add_com(a, b)) (paper mode, per layer). Asym = 1/2 ||J_c - J_c^T||_F^2 at timestep {ASYM_T} "
        f"({ASYM_PROBES} probes), relative Asym (/ ||J_c||_F^2) in brackets.",
        "",
        md_table(["seed", "run", "A alone: at A's / at B's square", "B alone: at B's / at A's square",
                  "summed: A's / B's square", "balanced: A's / B's square", "Asym A", "Asym B"], body),
        "",
        md_table(["claim", "numbers (toy, mean over the seeds)", "toy verdict"], [list(c) for c in claims(rows, seeds)]),
        "",
        "What this does not show:",
        "",
        *[f"- {line}" for line in NOT_SHOWN],
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in bench.machine.items()) + f" (torch threads {info['threads']}). "
        f"Command: `{' '.join(bench.argv)}`.",
        "",
    ])

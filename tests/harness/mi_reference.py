"""Independent references for MIControlNet (no production imports): the balancing formulas written
out in float64 (paper Eqs. 8-10, docs/mi_controlnet.md; min_norm for three or more controls: the
min-norm point of their convex hull, solved exactly face by face), each stock control network run directly,
and the denoisers with the balanced terms added at each control point: the tests' UNet loop, a
plain MMDiT loop, and Flux through block replacements of the test's own (ComfyUI adds output[k]
to the skip of input block k, 'middle' to h after the middle block, on SD3 output[i] to the image
tokens after joint block i, on Flux 'input' / 'output' to the image tokens of double / single
blocks). tests/integration/test_reference_loop.py holds each loop against ComfyUI's own forward."""
import itertools

import torch

from harness import reference as ref
from harness.mi_setups import CFG, denoise_once


def reduce_dims(x, granularity, channel_dim):
    return tuple(range(1, x.dim())) if granularity == "layer" else (channel_dim % x.dim(),)


def hand_lambda_star(v1, v2, dims):
    """Eq. 8: clip((v2 - v1) . v2 / ||v2 - v1||^2, 0, 1)."""
    d = v2 - v1
    return ((d * v2).sum(dims, keepdim=True) / (d * d).sum(dims, keepdim=True)).clamp(0.0, 1.0)


def hand_lambda(s, cap=20.0):
    """Eq. 9: s / (1 - s), cap when s >= cap / (cap + 1)."""
    return torch.where(s >= cap / (cap + 1.0), torch.full_like(s, cap), s / (1.0 - s))


def simplex_min_norm_weights(gram):
    """w >= 0, sum w = 1 minimising w^T G w, for a batch of Gram matrices G (R, k, k), float64.

    Exact, face by face: on every support S the stationary points of the problem restricted to
    S's affine hull solve G_S w = mu 1, sum w = 1; the optimum is such a point, inside the simplex,
    on its own support, so the feasible solution of least objective over all supports is it."""
    rows, k, _ = gram.shape
    best_w, best_f = gram.new_zeros(rows, k), gram.new_full((rows,), float("inf"))
    scale = 1.0 + gram.abs().flatten(1).amax(1)
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            kkt = gram.new_zeros(rows, size + 1, size + 1)
            kkt[:, :size, :size] = gram[:, s][:, :, s]
            kkt[:, :size, size], kkt[:, size, :size] = -1.0, 1.0
            rhs = gram.new_zeros(rows, size + 1, 1)
            rhs[:, size] = 1.0
            sol = torch.linalg.pinv(kkt) @ rhs
            solved = (kkt @ sol - rhs).abs().flatten(1).amax(1) <= 1e-9 * scale
            w = gram.new_zeros(rows, k)
            w[:, s] = sol[:, :size, 0]
            f = torch.einsum("ri,rij,rj->r", w, gram, w)
            better = solved & (w.amin(1) >= -1e-12) & (f < best_f)
            best_w = torch.where(better[:, None], w.clamp_min(0.0), best_w)
            best_f = torch.where(better, f, best_f)
    return best_w


def hand_min_norm_point(residuals, dims):
    """The min-norm element of the residuals' convex hull, per row (and token / pixel)."""
    k = len(residuals)
    gram = torch.stack([torch.stack([(a * b).sum(dims, keepdim=True) for b in residuals], -1) for a in residuals], -2)
    row_shape = gram.shape[:-2]
    w = simplex_min_norm_weights(gram.reshape(-1, k, k)).T.reshape(k, *row_shape)
    return sum(w[i] * residuals[i] for i in range(k))


def hand_combine(residuals, mode, dims):
    """add_com folded in chain order; min_norm: for k = 2 the weights swapped (the segment's
    min-norm point), for k >= 3 the min-norm point of the hull (order independent)."""
    if mode == "min_norm" and len(residuals) >= 3:
        return hand_min_norm_point(residuals, dims)
    out = residuals[0]
    for r in residuals[1:]:
        s = hand_lambda_star(out, r, dims)
        out = (1 - s) * out + s * r if mode == "paper" else s * out + (1 - s) * r
    return out


def hand_inject(e, c, mode, dims):
    """add_inj: e + lambda(e, c) c (paper) or e + lambda(c, e) c (min_norm)."""
    s = hand_lambda_star(e, c, dims) if mode == "paper" else hand_lambda_star(c, e, dims)
    return e + hand_lambda(s) * c


def balanced(e, residuals, mode, granularity, channel_dim=1):
    """e with the balanced combination of ``residuals`` (None = silent) injected, float64;
    mode "sum": plain addition in the dtype of e, as stock ComfyUI adds control residuals."""
    rs = [r.double() for r in residuals if r is not None]
    if not rs:
        return e
    if mode == "sum":
        for r in residuals:
            e = e + r if r is not None else e
        return e
    dims = reduce_dims(e, granularity, channel_dim)
    return hand_inject(e.double(), hand_combine(rs, mode, dims), mode, dims).to(e.dtype)


def unet_reference(base, x, sigma, context, at, post_output=None):
    """The tests' UNet loop (harness/reference.py) with ``at(kind, index, tensor)`` at each control
    point: ("input", i) after input block i (skip and next block), ("middle", 0) after the middle
    block, ("skip", k) the skip of input block k where its output block takes it.
    ``post_output(h, hsp)`` runs after that at each output block (another pack's patch)."""
    dm = base.diffusion_model
    hooks = {("middle", 0): lambda h: at("middle", 0, h)}
    for i in range(len(dm.input_blocks)):
        hooks[("input", i, "skip")] = lambda h, i=i: at("input", i, h)
        hooks[("skip", i)] = lambda hsp, i=i: at("skip", i, hsp)
    if post_output is not None:
        hooks.update({("output", j, "pair"): post_output for j in range(len(dm.output_blocks))})
    return ref.unet_denoised(base, x, sigma, context, hooks=hooks)


def mmdit_reference(base, x, sigma, context, y, at, post_block=None):
    """ComfyUI's MMDiT in a plain loop; ``at("block", i, img)`` after joint block i, after
    ``post_block[i](img)`` (another pack's replacement of block i changing its output)."""
    post_block = post_block or {}
    dm, ms = base.diffusion_model, base.model_sampling
    xc = ms.calculate_input(sigma, x)
    hw = xc.shape[-2:]
    img = dm.x_embedder(xc) + dm.cropped_pos_embed(hw, device=xc.device).to(xc.dtype)
    c = dm.t_embedder(ms.timestep(sigma).float(), dtype=img.dtype) + dm.y_embedder(y)
    ctx = dm.context_embedder(context)
    for i, block in enumerate(dm.joint_blocks):
        ctx, img = block(ctx, img, c=c, use_checkpoint=False)
        img = at("block", i, post_block[i](img) if i in post_block else img)
    out = dm.unpatchify(dm.final_layer(img, c), hw=hw)[:, :, :hw[0], :hw[1]]
    return ms.calculate_denoised(sigma, out, x)


def control_residuals(base, cnet, hint, x, sigma, context, strength, y=None):
    """One stock control's residuals, computed by running its network directly."""
    ms = base.model_sampling
    out = cnet(x=ms.calculate_input(sigma, x), hint=hint, timesteps=ms.timestep(sigma).float(), context=context, y=y)
    return {k: [r * strength for r in v] for k, v in out.items()}


def reference_denoised(setup, controls, sigma, mode, granularity, post_output=None, input_residuals=(), shape=None,
                       post_block=None):
    """CFG-combined denoised output; each row (cond, uncond) computed alone.
    ``input_residuals``: an 'input' list (strength applied) of one more control; ``shape``:
    {control index: f(residual)} applied to that control's residuals before balancing."""
    rows = []
    sigma = sigma.reshape(1)
    shape = shape or {}
    for cond in (setup["pos"], setup["neg"]):
        ctx = cond[0][0]
        y = cond[0][1].get("pooled_output")
        res = [control_residuals(setup["base"], setup["cnets"][i].control_model, setup["hints"][i].movedim(-1, 1),
                                 setup["x"], sigma, ctx, strength, y)
               for i, (strength, start, end) in controls.items() if in_range(setup["base"], sigma, start, end)]
        res = [{k: [shape[i](r) for r in v] for k, v in out.items()} if i in shape else out
               for i, out in zip([i for i, (_, start, end) in controls.items() if in_range(setup["base"], sigma, start, end)], res)]

        def at(kind, idx, e):
            if kind == "middle":
                return balanced(e, [r["middle"][0] for r in res], mode, granularity)
            if kind == "skip":
                return balanced(e, [r["output"][idx] for r in res], mode, granularity)
            if kind == "block":
                return balanced(e, [r["output"][idx] for r in res if idx < len(r["output"])], mode, granularity, -1)
            if input_residuals:  # ComfyUI pops 'input' from the end: block i takes [len - 1 - i]
                return balanced(e, [input_residuals[len(input_residuals) - 1 - idx]], mode, granularity)
            return e  # stock ControlNets give no 'input' residuals

        with torch.no_grad():
            if setup["arch"] == "unet":
                rows.append(unet_reference(setup["base"], setup["x"], sigma, ctx, at, post_output))
            else:
                rows.append(mmdit_reference(setup["base"], setup["x"], sigma, ctx, y, at, post_block))
    cond, uncond = rows
    return uncond + (cond - uncond) * CFG


def in_range(base, sigma, start, end):
    ms = base.model_sampling
    return ms.percent_to_sigma(end) <= float(sigma) <= ms.percent_to_sigma(start)


def flux_residuals(setup, i, cond, sigma, strength):
    """Control i's residuals for one row, from its network run directly (times its strength)."""
    ms = setup["base"].model_sampling
    net = setup["cnets"][i].control_model
    opts = cond[0][1]
    out = net(x=ms.calculate_input(sigma, setup["x"]), hint=setup["hints"][i].movedim(-1, 1),
              timesteps=ms.timestep(sigma).float(), context=cond[0][0], y=opts["pooled_output"],
              guidance=torch.tensor([opts["guidance"]]))
    return {k: [r * strength for r in v] for k, v in out.items()}


def flux_reference(setup, controls, sigma, mode, granularity):
    """Balanced with the hand formulas at each Flux control point, through the test's own block
    replacements on a clone of the base (residuals computed per row, cond and uncond apart)."""
    active = {i: c for i, c in controls.items() if in_range(setup["base"], sigma, c[1], c[2])}
    rows = {kind: [flux_residuals(setup, i, cond, sigma.reshape(1), strength) for i, (strength, _, _) in active.items()]
            for kind, cond in ((0, setup["pos"]), (1, setup["neg"]))}
    state = {}

    def per_row(to, key, index):
        """[per control: the row-stacked residual at (key, index)] for this call's rows."""
        kinds = to["cond_or_uncond"]
        return [torch.cat([rows[k][c][key][index] for k in kinds]) for c in range(len(active))]

    def double(i):
        def block(args, extra):
            out = extra["original_block"](args)
            img = out["img"]
            state["img"] = img.shape[1]
            rs = per_row(args["transformer_options"], "input", i)
            if rs:
                n = rs[0].shape[1]
                out = dict(out, img=torch.cat([balanced(img[:, :n], rs, mode, granularity, -1), img[:, n:]], 1))
            return out
        return block

    def single(i):
        def block(args, extra):
            out = extra["original_block"](args)
            joint = out["img"]
            rs = per_row(args["transformer_options"], "output", i)
            if rs:
                txt, n = joint.shape[1] - state["img"], rs[0].shape[1]
                mid = balanced(joint[:, txt:txt + n], rs, mode, granularity, -1)
                out = dict(out, img=torch.cat([joint[:, :txt], mid, joint[:, txt + n:]], 1))
            return out
        return block

    model = setup["patcher"].clone()
    dm = setup["base"].diffusion_model
    for i in range(len(dm.double_blocks)):
        model.set_model_patch_replace(double(i), "dit", "double_block", i)
    for i in range(len(dm.single_blocks)):
        model.set_model_patch_replace(single(i), "dit", "single_block", i)
    with torch.no_grad():
        return denoise_once(model, setup["pos"], setup["neg"], setup["x"], sigma)

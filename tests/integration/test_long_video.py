"""ControlNeXt-SVD v2 long videos (XCtrl Long Video) against a hand-written version of the
authors' denoising loop, on the tiny SVD model; ComfyUI's own context windows."""
import inspect
import types

import pytest
import torch

from harness import reference as ref
from harness import tiny_models as tm
from harness.comfy_runtime import comfyui_version, node_result, pack_module
from harness.controlnext_files import apply, controlnext_sd, load, rel_err, write

SIGMAS = [3.0, 1.2, 0.5]  # below sigma_max: ComfyUI starts from noise * sigma (no max-denoise scaling)
CFG, STRENGTH = 2.5, 0.9


@pytest.fixture(scope="module")
def setup(nodes_mod, controlnet_dir):
    base = tm.svd()
    sd = controlnext_sd("svd_v2", 64, seed=4)
    return base, sd, load(nodes_mod, write(controlnet_dir, "long_v2.safetensors", sd))


def video_inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    poses = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(64, 64)).movedim(1, -1)
    image_emb = torch.randn(1, 1, 32, generator=g)
    concat = torch.randn(n, 4, 8, 8, generator=g)  # differs per frame: slicing it wrongly shows
    noise = torch.randn(n, 4, 8, 8, generator=g)
    return poses, image_emb, concat, noise


SVD_IDS = {"fps": 7, "motion_bucket_id": 128, "augmentation_level": 0.02}


def conds(image_emb, concat):
    pos = [[image_emb, dict(SVD_IDS, concat_latent_image=concat)]]
    neg = [[torch.zeros_like(image_emb), dict(SVD_IDS, concat_latent_image=torch.zeros_like(concat))]]
    return pos, neg


# ----------------------------------------------------------------------------- the reference loop
def reference_windows(n, length, overlap):
    length = min(length, n)
    if length == n:
        return [0], length
    starts = []
    for s in range(0, n - overlap, length - overlap):
        starts.append(n - length if s + length > n else s)
    return starts, length


def authors_loop(base, sd, poses, image_emb, concat, noise, length, overlap, cfg=CFG, min_cfg=None,
                 replace_first_pose=True, drop_first_position=True, frame_strengths=None):
    """The ControlNeXt-SVD v2 pipeline's denoising loop, written out (Euler, v-prediction through
    ComfyUI's own UNet blocks): per step and window slice the latents, the image latents and the
    poses (window position 0 = the sequence's pose 0), control on the cond half only (scale
    0.2 * strength, control timestep 0.25 ln sigma, eps 1e-5, normalize then pool, after input
    block 3), CFG per window position, an Euler step of the window from the step's sigma; the
    stepped windows are summed into the video (position 0 of windows not starting at 0 left out)
    and divided by their count. ``frame_strengths``: a further control multiplier per video frame."""
    model = base.model
    n = noise.shape[0]
    starts, length = reference_windows(n, length, overlap)
    y = model.encode_adm(**SVD_IDS)
    hint_all = poses.movedim(-1, 1).float()
    x = noise * SIGMAS[0]
    guidance = torch.linspace(cfg if min_cfg is None else min_cfg, cfg, length)[:, None, None, None]
    with torch.no_grad():
        for sigma, sigma_next in zip(SIGMAS[:-1], SIGMAS[1:]):
            total, count = torch.zeros_like(x), torch.zeros(n, 1, 1, 1)
            s = torch.full((length,), sigma)
            for start in starts:
                xw = x[start:start + length]
                hint = hint_all[start:start + length].clone()
                if replace_first_pose:
                    hint[0] = hint_all[0]
                feat = ref.controlnext_feature({k: v.float() for k, v in sd.items()}, "svd_v2", hint, 0.25 * torch.log(s))
                scale = torch.full((length,), 0.2 * STRENGTH)
                if frame_strengths is not None:
                    scale = scale * torch.tensor(frame_strengths[start:start + length])
                hooks = {("input", 3): lambda h: ref.cross_norm_add(h, feat, 1e-5, False, scale)}
                cond = ref.unet_denoised(model, xw, s, image_emb.expand(length, -1, -1), y=y.expand(length, -1),
                                         c_concat=concat[start:start + length], num_video_frames=length, hooks=hooks)
                uncond = ref.unet_denoised(model, xw, s, torch.zeros(length, 1, 32), y=y.expand(length, -1),
                                           c_concat=torch.zeros(length, 4, 8, 8), num_video_frames=length)
                denoised = uncond + guidance * (cond - uncond)
                stepped = xw + (xw - denoised) / sigma * (sigma_next - sigma)
                keep = slice(0 if (start == 0 or not drop_first_position) else 1, length)
                total[start + keep.start:start + length] += stepped[keep]
                count[start + keep.start:start + length] += 1
            x = total / count
    return model.process_latent_out(x)


# ----------------------------------------------------------------------------- the pack
def long_video_model(nodes_mod, base, loaded, poses, length, overlap, cfg_ramp="constant", min_cfg=1.0, **apply_kw):
    if apply_kw:
        controlled = node_result(nodes_mod.ApplyControlNeXt, base, loaded, poses, STRENGTH, 0.0, 1.0, **apply_kw)[0]
    else:
        controlled = apply(nodes_mod, base, loaded, poses, strength=STRENGTH)
    return node_result(nodes_mod.ControlNeXtSVDLongVideo, controlled, length, overlap, cfg_ramp, min_cfg)[0]


def sample(model, image_emb, concat, noise, cfg=CFG):
    import comfy.sample
    import comfy.samplers

    pos, neg = conds(image_emb, concat)
    return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object("euler"), torch.tensor(SIGMAS),
                                      pos, neg, torch.zeros_like(noise), disable_pbar=True, seed=0)


@pytest.mark.parametrize("n, length, overlap", [(6, 4, 2), (7, 4, 2)])  # windows 0, 2 and 0, 2, 3
def test_long_video_equals_the_authors_loop(n, length, overlap, setup, nodes_mod):
    base, sd, loaded = setup
    poses, image_emb, concat, noise = video_inputs(n, seed=n)
    got = sample(long_video_model(nodes_mod, base, loaded, poses, length, overlap), image_emb, concat, noise)
    want = authors_loop(base, sd, poses, image_emb, concat, noise, length, overlap)
    assert rel_err(got, want) < 1e-5
    # each rule matters: without it the reference gives another video
    assert rel_err(want, authors_loop(base, sd, poses, image_emb, concat, noise, length, overlap,
                                      replace_first_pose=False)) > 1e-4
    assert rel_err(want, authors_loop(base, sd, poses, image_emb, concat, noise, length, overlap,
                                      drop_first_position=False)) > 1e-4


def test_latent_strengths_follow_each_windows_frames(setup, nodes_mod, pack):
    from harness.comfy_runtime import pack_node_classes

    base, sd, loaded = setup
    poses, image_emb, concat, noise = video_inputs(6, seed=3)
    strengths = [1.0, 0.2, 0.5, 0.9, 0.0, 0.7]
    latents = node_result(pack_node_classes()["XCtrl_LatentStrengths"], ", ".join(map(str, strengths)))[0]
    got = sample(long_video_model(nodes_mod, base, loaded, poses, 4, 2, latent_strengths=latents), image_emb, concat, noise)
    want = authors_loop(base, sd, poses, image_emb, concat, noise, 4, 2, frame_strengths=strengths)
    assert rel_err(got, want) < 1e-5
    assert rel_err(want, authors_loop(base, sd, poses, image_emb, concat, noise, 4, 2)) > 1e-4


def test_per_window_cfg_ramp_equals_the_authors_loop(setup, nodes_mod):
    base, sd, loaded = setup
    poses, image_emb, concat, noise = video_inputs(7, seed=11)
    model = long_video_model(nodes_mod, base, loaded, poses, 4, 2, "linear", 1.0)
    got = sample(model, image_emb, concat, noise)
    want = authors_loop(base, sd, poses, image_emb, concat, noise, 4, 2, min_cfg=1.0)
    assert rel_err(got, want) < 1e-5
    assert rel_err(want, authors_loop(base, sd, poses, image_emb, concat, noise, 4, 2)) > 1e-4


def test_video_of_one_window_is_the_plain_model(setup, nodes_mod):
    base, sd, loaded = setup
    poses, image_emb, concat, noise = video_inputs(4, seed=2)
    windowed = sample(long_video_model(nodes_mod, base, loaded, poses, 24, 6), image_emb, concat, noise)
    plain = sample(apply(nodes_mod, base, loaded, poses, strength=STRENGTH), image_emb, concat, noise)
    assert torch.equal(windowed, plain)


def test_cond_and_uncond_batched_or_apart_give_the_same_windows(setup, nodes_mod):
    import comfy.model_management as mm

    base, _, loaded = setup
    n = 7
    poses, image_emb, concat, noise = video_inputs(n, seed=5)
    model = long_video_model(nodes_mod, base, loaded, poses, 4, 2)
    mm.load_models_gpu([model])
    y = base.model.encode_adm(**SVD_IDS).expand(n, -1)

    def call(chunks):
        rows = len(chunks) * n
        to = dict(model.model_options["transformer_options"], wrappers=model.wrappers, cond_or_uncond=list(chunks))
        ctx = torch.cat([image_emb.expand(n, -1, -1) if c == 0 else torch.zeros(n, 1, 32) for c in chunks])
        cc = torch.cat([concat if c == 0 else torch.zeros_like(concat) for c in chunks])
        with torch.no_grad():
            return model.model.apply_model(torch.cat([noise * 2] * len(chunks)), torch.full((rows,), 2.0), c_concat=cc,
                                           c_crossattn=ctx, y=torch.cat([y] * len(chunks)), transformer_options=to,
                                           num_video_frames=n, image_only_indicator=torch.zeros(1))

    both = call([0, 1])
    torch.testing.assert_close(both, torch.cat([call([0]), call([1])]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(call([1, 0]), torch.cat([both[n:], both[:n]]), rtol=1e-5, atol=1e-5)


def test_module_runs_on_window_frames_only_and_stems_once_per_frame(setup, nodes_mod, monkeypatch):
    """Cost rule: per step the module runs once per window on the frames no earlier window of
    the step computed; its stem once per run per frame (the cache holds one window)."""
    base, _, loaded = setup
    runtime = pack_module("runtime.controlnext")
    n, length = 10, 4  # windows 0, 2, 4, 6 (overlap 2)
    poses, image_emb, concat, noise = video_inputs(n, seed=7)
    model = long_video_model(nodes_mod, base, loaded, poses, length, 2)
    module = loaded.module_patcher("svd_v2", model).model
    calls = {"forward": [], "stem": []}
    forward, stem = module.forward_from_stem, module.stem
    monkeypatch.setattr(module, "forward_from_stem", lambda s, t: calls["forward"].append(s[0].shape[0]) or forward(s, t))
    monkeypatch.setattr(module, "stem", lambda h: calls["stem"].append(h.shape[0]) or stem(h))
    sample(model, image_emb, concat, noise)
    steps = len(SIGMAS) - 1
    # frame 0 and the window's new frames: 4 for the first window, then 2 each
    assert calls["forward"] == [4, 2, 2, 2] * steps
    assert max(calls["forward"]) <= length
    assert sum(calls["stem"]) <= length + (n - length) * steps  # the window's frames stay cached
    assert calls["stem"][0] == 4 and all(c <= length for c in calls["stem"])
    assert runtime.ControlNeXtRunner  # the runtime under test


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_sampling(setup, nodes_mod):
    base, _, loaded = setup
    long_video = nodes_mod.ControlNeXtSVDLongVideo
    assert "overlap must be at least 1" in long_video.validate_inputs(24, 0)
    assert "smaller than frames_per_window" in long_video.validate_inputs(24, 24)
    assert "at least 2" in long_video.validate_inputs(1, 0)
    assert long_video.validate_inputs(24, 6) is True
    with pytest.raises(ValueError, match="Stable Video Diffusion.*SD1.5"):
        node_result(long_video, tm.sd15(), 24, 6)
    poses, image_emb, concat, noise = video_inputs(7)
    short = long_video_model(nodes_mod, base, loaded, poses[1:], 4, 2)  # reference pose missing
    with pytest.raises(ValueError, match=r"Apply ControlNeXt.*6 images but the latent batch has 7.*reference"):
        sample(short, image_emb, concat, noise)


def test_svd_v1_under_windows_is_refused_by_the_second_node_in_either_order(nodes_mod, controlnet_dir):
    """Both nodes see both: whichever runs second refuses (ComfyUI marks that node, not the sampler)."""
    base = tm.svd()
    v1 = load(nodes_mod, write(controlnet_dir, "long_v1.safetensors", controlnext_sd("svd_v1", 64)))
    poses = video_inputs(7)[0]
    with pytest.raises(ValueError, match="Apply ControlNeXt.*SVD v1: use the SVD v2"):
        node_result(nodes_mod.ControlNeXtSVDLongVideo, apply(nodes_mod, base, v1, poses), 4, 2)
    with pytest.raises(ValueError, match="Apply ControlNeXt.*SVD v1: use the SVD v2"):
        apply(nodes_mod, node_result(nodes_mod.ControlNeXtSVDLongVideo, base, 4, 2)[0], v1, poses)


# ----------------------------------------------------------------------------- ComfyUI's context windows
def core_windows(model, length, overlap, causal_window_fix=False):
    """ComfyUI's Context Windows (Manual); newer versions' causal_window_fix set as asked where it exists."""
    from comfy_extras import nodes_context_windows as ncw

    node = getattr(ncw, "ContextWindowsManualNode")
    params = inspect.signature(node.execute).parameters
    values = dict(context_length=length, context_overlap=overlap, context_schedule="standard_static", context_stride=1,
                  closed_loop=False, fuse_method="flat", dim=0, freenoise=False, cond_retain_index_list="",
                  split_conds_to_windows=False, causal_window_fix=causal_window_fix)
    return node.execute(model.clone(), **{k: v for k, v in values.items() if k in params}).result[0]


def test_core_causal_anchor_frames_on_svd_are_refused_before_sampling(setup, nodes_mod):
    """Newer ComfyUI runs one frame before each window with it but tells SVD the window's own
    length (SVD's temporal layers then fail inside KSampler): the pack says what to change."""
    from comfy_extras import nodes_context_windows as ncw

    if "causal_window_fix" not in inspect.signature(ncw.ContextWindowsManualNode.execute).parameters:
        pytest.skip("this ComfyUI's Context Windows have no causal anchor frames")
    base, _, loaded = setup
    poses, image_emb, concat, noise = video_inputs(7, seed=3)
    controlled = node_result(nodes_mod.ApplyControlNeXt, base, loaded, poses, 1.0, 0.0, 1.0, None, 1.0, "refuse", True)[0]
    with pytest.raises(RuntimeError, match="causal_window_fix on cannot run an SVD video.*Set causal_window_fix to false"):
        sample(core_windows(controlled, 4, 2, causal_window_fix=True), image_emb, concat, noise)
    # Context Windows before the Apply node: refused when Apply runs (ComfyUI marks it, not the sampler)
    with pytest.raises(RuntimeError, match="causal_window_fix on cannot run an SVD video"):
        node_result(nodes_mod.ApplyControlNeXt, core_windows(base, 4, 2, causal_window_fix=True), loaded, poses, 1.0,
                    0.0, 1.0)


def test_a_causal_anchor_frame_gets_its_own_pose(pack):
    """The anchor frame newer ComfyUI runs before a window is a row of the call: it gets its frame's
    pose (or, with reference_first, position 0 gets frame 0's)."""
    hints = pack_module("runtime.batch_rows")
    window = types.SimpleNamespace(index_list=[4, 5, 6], total_frames=7, causal_anchor_index=3)
    layout = hints.BatchLayout(8, {"cond_or_uncond": [0, 1], "context_window": window})
    assert layout.items(7).tolist() == [3, 4, 5, 6] * 2
    assert layout.items(7, reference_first=True).tolist() == [0, 4, 5, 6] * 2
    window.causal_anchor_index = None  # the first window has none
    assert hints.BatchLayout(6, {"cond_or_uncond": [0, 1], "context_window": window}).items(7).tolist() == [4, 5, 6] * 2


@pytest.mark.parametrize("reference_first", [True, False])
def test_comfyui_context_windows_give_each_window_its_poses(reference_first, setup, nodes_mod, comfy_root, monkeypatch):
    base, _, loaded = setup
    hints = pack_module("runtime.batch_rows")
    n = 7
    poses, image_emb, concat, noise = video_inputs(n, seed=3)
    controlled = node_result(nodes_mod.ApplyControlNeXt, base, loaded, poses, 1.0, 0.0, 1.0, None, 1.0, "refuse", reference_first)[0]
    model = core_windows(controlled, 4, 2)
    if comfyui_version(comfy_root).startswith("0.3."):
        with pytest.raises(RuntimeError, match="Context Windows cannot run a batch of 7.*Long Video"):
            sample(model, image_emb, concat, noise)
        return
    seen = []
    items = hints.BatchLayout.items

    def spy(self, n_items, what="condition image", reference_first=False):
        out = items(self, n_items, what, reference_first)
        if what == "condition image":
            seen.append((self.window.frames if self.window else None, out.reshape(len(self.kinds), -1)))
        return out

    monkeypatch.setattr(hints.BatchLayout, "items", spy)
    sample(model, image_emb, concat, noise)
    windows = [[0, 1, 2, 3], [2, 3, 4, 5], [3, 4, 5, 6]]  # standard_static, 7 frames, 4 / 2
    assert [w for w, _ in seen] == windows * (len(SIGMAS) - 1)
    for frames, rows in seen:
        expect = ([0] + frames[1:]) if reference_first else frames
        assert all(r.tolist() == expect for r in rows)


def test_animatediff_context_options_give_each_window_its_poses(pack):
    hints = pack_module("runtime.batch_rows")
    to = {"cond_or_uncond": [0, 1], "ad_params": {"sub_idxs": [5, 6, 7, 8], "full_length": 9}}
    layout = hints.BatchLayout(8, to)
    assert layout.items(9).tolist() == [5, 6, 7, 8] * 2
    assert layout.items(9, reference_first=True).tolist() == [0, 6, 7, 8] * 2
    assert layout.items(1).tolist() == [0] * 8
    with pytest.raises(ValueError, match="8 images but the latent batch has 9.*reference"):
        layout.items(8, reference_first=True)
    with pytest.raises(ValueError, match=r"8 images but the latent batch has 9: give 1") as refused:
        layout.items(8)  # not an SVD v2 pose sequence: no reference pose to miss
    assert "reference" not in str(refused.value)


# ----------------------------------------------------------------------------- reference settings
def test_euler_karras_is_the_reference_schedulers_sigma_schedule(pack):
    """The authors sample with SVD-XT 1.1's EulerDiscreteScheduler (use_karras_sigmas, sigma_min
    0.002, sigma_max 700, rho 7, a final 0): ComfyUI's 'karras' scheduler for an SVD model gives
    the same 26 sigmas, so KSampler euler/karras/25 steps follows the reference's steps."""
    import numpy as np

    import comfy.samplers

    steps, rho, lo, hi = 25, 7.0, 0.002, 700.0
    ramp = np.linspace(0, 1, steps)
    want = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    want = torch.tensor(np.concatenate([want, [0.0]]), dtype=torch.float32)
    got = comfy.samplers.calculate_sigmas(tm.svd().model.model_sampling, "karras", steps)
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=0)


def test_conditioning_fps_7_is_fps_id_6(pack):
    """The reference pipeline feeds fps id 6 (hard-coded); ComfyUI's SVD conditioning subtracts 1."""
    model = tm.svd().model
    ids = model.encode_adm(fps=7, motion_bucket_id=128, augmentation_level=0.02)
    want = torch.cat([model.embedder(torch.Tensor([v])) for v in (6, 128, 0.02)]).flatten()
    torch.testing.assert_close(ids.flatten(), want)


def test_reference_conditioning_node_feeds_clip_and_vae_as_the_pipeline(nodes_mod, pack):
    """XCtrl's SVD conditioning: CLIP gets the whole cover-cropped image squashed to 224 with the
    pipeline's resize, the VAE gets it with the augmentation noise in [-1, 1] space (seeded)."""
    import comfy.utils

    sr = pack_module("models.svd_reference")
    seen = {}

    class Clip:
        def encode_image(self, image):
            seen["clip"] = image
            return type("Out", (), {"image_embeds": torch.ones(1, 32)})()

    class Vae:
        def encode(self, pixels):
            seen["vae"] = pixels
            return torch.ones(1, 4, pixels.shape[1] // 8, pixels.shape[2] // 8)

    image = torch.rand(1, 80, 120, 3, generator=torch.Generator().manual_seed(0))  # landscape: cropped to portrait
    pos, neg, latent = node_result(nodes_mod.SVDReferenceConditioning, Clip(), image, Vae(), 64, 96, 5, 128, 7, 0.02, 3)
    cropped = comfy.utils.common_upscale(image.movedim(-1, 1), 64, 96, "bilinear", "center").movedim(1, -1)
    torch.testing.assert_close(seen["clip"], sr.clip_pixels(cropped))
    noise = torch.randn(cropped.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(seen["vae"], cropped + 0.01 * noise)
    assert pos[0][1]["fps"] == 7 and pos[0][1]["motion_bucket_id"] == 128 and pos[0][1]["augmentation_level"] == 0.02
    assert torch.equal(neg[0][0], torch.zeros(1, 1, 32)) and not neg[0][1]["concat_latent_image"].any()
    assert latent["samples"].shape == (5, 4, 12, 8)


def test_progress_bar_moves_once_per_window_inside_each_model_call(setup, nodes_mod):
    """A step of a long video runs several windows (minutes on a CPU): each window reports."""
    import comfy.utils

    base, sd, loaded = setup
    poses, image_emb, concat, noise = video_inputs(7, seed=5)
    seen = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, *a, **k: seen.append((value, total)))
    try:
        sample(long_video_model(nodes_mod, base, loaded, poses, 4, 2), image_emb, concat, noise)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    steps = len(SIGMAS) - 1  # euler: one model call per step (cond and uncond batched)
    # 7 frames in windows of 4, overlap 2: starts 0, 2, 3; each window one move of the whole sampling's bar
    windows = [(v, t) for v, t in seen if t == 3 * steps]
    assert windows == [(3 * k + i, 3 * steps) for k in range(steps) for i in (1, 2, 3)], seen
    shares = [v / t for v, t in seen]
    assert shares == sorted(shares), seen  # with the sampler's own step reports in between: only forward

"""ControlNeXt-SVD v1 and v2 on ComfyUI's native SVD image-to-video model (tiny twin)."""
import math

import pytest
import torch

from harness import reference as ref
from harness import tiny_models as tm

from harness.controlnext_files import apply, controlnext_sd, load, rel_err, write

FRAMES = 3


def svd_inputs(chunks, seed=3):
    g = torch.Generator().manual_seed(seed)
    rows = chunks * FRAMES
    x = torch.randn(rows, 4, 8, 8, generator=g) * 3
    sigma = torch.full((rows,), 2.5)
    ctx = torch.randn(rows, 1, 32, generator=g)
    y = torch.randn(rows, 768, generator=g)
    concat = torch.randn(rows, 4, 8, 8, generator=g)
    poses = torch.nn.functional.interpolate(torch.rand(FRAMES, 3, 4, 4, generator=g), size=(64, 64)).movedim(1, -1)
    return x, sigma, ctx, y, concat, poses


def denoise_svd(patcher, x, sigma, ctx, y, concat, cond_or_uncond):
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    to = patcher.model_options["transformer_options"].copy()
    to["wrappers"] = patcher.wrappers
    to.update(cond_or_uncond=list(cond_or_uncond), sigmas=sigma)
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_concat=concat, c_crossattn=ctx, y=y, transformer_options=to,
                                         num_video_frames=FRAMES, image_only_indicator=torch.zeros(x.shape[0] // FRAMES, FRAMES))


def svd_reference(base, variant, sd, poses, x, sigma, ctx, y, concat, cond_or_uncond, strength):
    """docs/controlnext.md: control timestep 0.25*ln(sigma); v2 at input block 3 (after the skip), 0.2*strength on
    cond rows only; v1 after input block 11, sigmoid(scale)*1.3*strength on cond rows and the
    reference's raw scale 0 (sigmoid(0)*1.3 = 0.65) * strength on uncond rows; eps 1e-5, normalize then pool."""
    rows = x.shape[0]
    t = 0.25 * torch.log(sigma.float())
    frames = poses.movedim(-1, 1).repeat(rows // FRAMES, 1, 1, 1)
    uncond = torch.tensor([cond_or_uncond[r // FRAMES] == 1 for r in range(rows)])
    with torch.no_grad():
        c = ref.controlnext_feature({k: v.float() for k, v in sd.items()}, variant, frames, t)
        if variant == "svd_v2":
            s = torch.where(uncond, 0.0, 0.2 * strength)
            block = ("input", 3)
        else:
            cond_s = 1.3 / (1 + math.exp(-float(sd["scale"]))) * strength
            s = torch.where(uncond, 0.65 * strength, cond_s)
            block = ("input", 11)
        hooks = {block: lambda h: ref.cross_norm_add(h, c, 1e-5, False, s)}
        return ref.unet_denoised(base.model, x, sigma, ctx, y=y, c_concat=concat, num_video_frames=FRAMES, hooks=hooks)


@pytest.mark.parametrize("variant", ["svd_v1", "svd_v2"])
def test_svd_parity_with_reference(variant, nodes_mod, controlnet_dir):
    base = tm.svd()
    sd = controlnext_sd(variant, 64, seed=2)
    cnx = load(nodes_mod, write(controlnet_dir, f"{variant}.safetensors", sd))
    x, sigma, ctx, y, concat, poses = svd_inputs(chunks=2)
    patched = apply(nodes_mod, base, cnx, poses, strength=0.9)
    got = denoise_svd(patched, x, sigma, ctx, y, concat, [0, 1])
    want = svd_reference(base, variant, sd, poses, x, sigma, ctx, y, concat, [0, 1], 0.9)
    plain = svd_reference(base, variant, sd, poses, x, sigma, ctx, y, concat, [0, 1], 0.0)
    assert rel_err(want, plain) > 1e-3
    assert rel_err(got, want) < 1e-5
    if variant == "svd_v2":  # cond only: the uncond rows are the base's
        assert rel_err(want[FRAMES:], plain[FRAMES:]) == 0.0


@pytest.mark.parametrize("variant", ["svd_v1", "svd_v2"])
def test_svd_cond_uncond_together_equal_apart_and_uncond_first(variant, nodes_mod, controlnet_dir):
    base = tm.svd()
    cnx = load(nodes_mod, write(controlnet_dir, f"{variant}_b.safetensors", controlnext_sd(variant, 64, seed=3)))
    x, sigma, ctx, y, concat, poses = svd_inputs(chunks=2)
    patched = apply(nodes_mod, base, cnx, poses)
    both = denoise_svd(patched, x, sigma, ctx, y, concat, [0, 1])
    f = FRAMES
    cond = denoise_svd(patched, x[:f], sigma[:f], ctx[:f], y[:f], concat[:f], [0])
    uncond = denoise_svd(patched, x[f:], sigma[f:], ctx[f:], y[f:], concat[f:], [1])
    torch.testing.assert_close(both, torch.cat([cond, uncond]), rtol=1e-5, atol=1e-5)
    swapped = denoise_svd(patched, torch.cat([x[f:], x[:f]]), sigma, torch.cat([ctx[f:], ctx[:f]]),
                          torch.cat([y[f:], y[:f]]), torch.cat([concat[f:], concat[:f]]), [1, 0])
    torch.testing.assert_close(swapped, torch.cat([uncond, cond]), rtol=1e-5, atol=1e-5)


def test_pose_frame_count_mismatch_is_a_clear_error(nodes_mod, controlnet_dir):
    base = tm.svd()
    cnx = load(nodes_mod, write(controlnet_dir, "v2_count.safetensors", controlnext_sd("svd_v2", 64)))
    x, sigma, ctx, y, concat, poses = svd_inputs(chunks=1)
    patched = apply(nodes_mod, base, cnx, torch.cat([poses, poses[:1]]))  # 4 poses, 3 frames
    with pytest.raises(ValueError, match="4 images but the latent batch has 3"):
        denoise_svd(patched, x, sigma, ctx, y, concat, [0])


def test_svd_v2_module_on_sdxl_and_sdxl_family_file_on_svd(nodes_mod, controlnet_dir):
    """The SDXL and SVD-v2 files share a layout: the model decides, and widths are checked."""
    cnx = load(nodes_mod, write(controlnet_dir, "v2_fam.safetensors", controlnext_sd("svd_v2", 64)))
    with pytest.raises(ValueError, match="64 channels.*32|channels"):
        apply(nodes_mod, tm.sdxl(), cnx, torch.rand(1, 64, 64, 3))
    v1 = load(nodes_mod, write(controlnet_dir, "v1_fam.safetensors", controlnext_sd("svd_v1", 64)))
    with pytest.raises(ValueError, match="SVD"):
        apply(nodes_mod, tm.sd15(), v1, torch.rand(1, 64, 64, 3))


def test_svd_sampling_end_to_end(nodes_mod, controlnet_dir):
    import comfy.sample

    base = tm.svd()
    cnx = load(nodes_mod, write(controlnet_dir, "v2_e2e.safetensors", controlnext_sd("svd_v2", 64, seed=6)))
    _, _, _, _, _, poses = svd_inputs(chunks=1)
    patched = apply(nodes_mod, base, cnx, poses)
    lat = torch.zeros(FRAMES, 4, 8, 8)

    def cond(m, seed, image):
        c = tm.text_cond(m, seed=seed)
        c[0][1].update({"concat_latent_image": image, "fps": 6, "motion_bucket_id": 127, "augmentation_level": 0.0})
        return c

    def run(m):
        return comfy.sample.sample(m, comfy.sample.prepare_noise(lat, 0), 3, 3.0, "euler", "karras",
                                   cond(m, 1, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))),
                                   cond(m, 2, torch.zeros(1, 4, 8, 8)), lat)

    out = run(patched)
    assert torch.isfinite(out).all() and not torch.allclose(out, run(base))

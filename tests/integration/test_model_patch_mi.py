"""MIControlNet for ComfyUI's model-patch controls (runtime/model_patch_control.py, "MI Balanced
Model Patches") inside a real ComfyUI: tiny random-weight Z-Image and Qwen-Image models with
control patches applied by ComfyUI's own Apply Z-Image Fun ControlNet / Apply Qwen Image DiffSynth
ControlNet nodes.

Independent oracle: a reference patch (written here and in harness/mi_reference.py, no pack code) takes the place of the
control patches; at each injection point it lets every core patch add its term to its own copy
of the features (the difference, in float64, is that control's residual x strength as core
would add it), combines and injects them with the MI formulas written out in float64, and
writes the result back. The features after every injection point are recorded in both runs and
compared, as is the denoised output. docs/model_patch_control.md.

XCtrl's Apply nodes: the reference wraps core's patch in ``ScaledReference``, which scales its
addition by hand per row (schedule, latent strength, uncond multiplier, the call's sigma) and per
token (the mask reduced to the token grid by ``hand_token_mask``), for one call or for each step of
a short sampling run, and alone or balanced as above.
"""
import re

import pytest
import torch

from harness import model_patch_models as mpm
from harness.mi_reference import balanced as hand_balanced
from harness.comfy_runtime import node_result, pack_module

CFG = 2.0
STRENGTHS = (0.8, 1.3)
NODE = re.escape("MI Balanced Model Patches (XCtrl)")
LATENT_HW = (8, 8)
TOKENS = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)  # 2x2 patches: where the controls add


def has_zimage():
    try:
        import comfy.ldm.lumina.controlnet  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------- reference (float64)
class ReferencePatch:
    """Stands for the control patches in the reference run (see the module doc)."""

    def __init__(self, members, mode, granularity, lumina):
        self.members, self.mode, self.granularity, self.lumina = members, mode, granularity, lumina

    def __call__(self, kwargs):
        img = kwargs["img"]
        e = img[:, :TOKENS]
        residuals = []
        for p in self.members:
            copy = img.clone()
            p(dict(kwargs, img=copy))
            d = copy[:, :TOKENS].double() - e.double()
            if bool((copy[:, TOKENS:] != img[:, TOKENS:]).any()):
                raise AssertionError("a control added outside the image tokens")
            if bool((d != 0).any()):
                residuals.append(d)
        if residuals:
            img[:, :TOKENS] = hand_balanced(e.clone(), residuals, self.mode, self.granularity, channel_dim=-1)
        if self.lumina:
            kwargs.pop("img")
            kwargs.pop("txt")
        return kwargs


class Recorder:
    """Appended to the patch lists: keeps the image tokens after each injection point."""

    def __init__(self):
        self.seen = {}

    def __call__(self, kwargs):
        site = kwargs.get("block_type", "double")
        self.seen[(site, kwargs["block_index"])] = kwargs["img"][:, :TOKENS].clone()
        return kwargs


def _is_control(p):
    """Core's control patches, and the test's hand-scaled ones standing for XCtrl's Apply nodes."""
    return hasattr(p, "model_patch") or isinstance(p, ScaledReference)


def reference_model(model, mode, granularity, lumina):
    ref = model.clone()
    patches = ref.model_options["transformer_options"]["patches"]
    members = list(dict.fromkeys(p for ps in patches.values() for p in ps if _is_control(p)))
    rp = ReferencePatch(members, mode, granularity, lumina)
    for site, ps in list(patches.items()):
        if any(_is_control(p) for p in ps):
            patches[site] = [rp] + [p for p in ps if not _is_control(p)]
    return ref


def with_recorder(model, sites):
    rec = Recorder()
    m = model.clone()
    for site in sites:
        m.set_model_patch(rec, site)
    return m, rec


def denoise_once(model, pos, neg, x, sigma):
    import comfy.sample
    import comfy.samplers

    got = {}

    def one_call(model_k, noise, sigmas, extra_args=None, callback=None, disable=None):
        with torch.no_grad():
            got["d"] = model_k(x.clone(), sigma.reshape(1).expand(x.shape[0]), **extra_args)
        return noise

    comfy.sample.sample_custom(model, torch.zeros_like(x), CFG, comfy.samplers.KSAMPLER(one_call),
                               torch.stack([sigma, torch.zeros(())]), pos, neg, torch.zeros_like(x))
    return got["d"]


def full_sample(model, pos, neg, latent, steps=3):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 7)
    return comfy.sample.sample(model, noise, steps, 2.5, "euler", "normal", pos, neg, latent, disable_pbar=True)


def balance(model, mode="paper", granularity="layer", cap=20.0):
    return node_result(pack_module("nodes.mi_nodes").MIBalancedModelPatches, model, mode, granularity, cap)[0]


def randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- setups
@pytest.fixture(scope="module", autouse=True)
def _threads_no_grad(one_thread):
    """One thread; in inference mode, as ComfyUI's executor runs nodes and sampling (its tensors have no
    version counter; 0.8.0's clone deep-copies the patches and their encoded images, which must not be
    graph tensors)."""
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def core_nodes(pack):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def zimage(core_nodes):
    if not has_zimage():
        pytest.skip("this ComfyUI has no Z-Image Fun ControlNet")
    apply = core_nodes["ZImageFunControlnet"]()
    base = mpm.zimage(0)
    vae = mpm.StubVAE(3)
    controls = [mpm.zimage_control(11, "2.1"), mpm.zimage_control(12, "2.0")]
    model = base
    for i, (cnet, s) in enumerate(zip(controls, STRENGTHS)):
        model = apply.diffsynth_controlnet(model, cnet, vae, strength=s, image=mpm.image(i + 1))[0]
    return dict(base=base, model=model, controls=controls, vae=vae, apply=apply, lumina=True,
                sites=("noise_refiner", "double_block"), x=randn(5, 2, 16, *LATENT_HW),
                pos=mpm.text_cond("z_image", seed=1), neg=mpm.text_cond("z_image", seed=2))


@pytest.fixture(scope="module")
def qwen(core_nodes):
    import sys

    apply = core_nodes["QwenImageDiffsynthControlnet"]()
    module = sys.modules[type(apply).__module__]
    base = mpm.qwen_image(0)
    vae = mpm.StubVAE(4, frames=True)
    controls = [mpm.qwen_control(21, module), mpm.qwen_control(22, module, inpaint=True)]
    model = base
    # the first image is not the latent's size: core re-encodes it at the first call
    for i, (cnet, s, size) in enumerate(zip(controls, STRENGTHS, (48, 64))):
        model = apply.diffsynth_controlnet(model, cnet, vae, mpm.image(i + 1, size), s)[0]
    return dict(base=base, model=model, controls=controls, vae=vae, apply=apply, lumina=False, module=module,
                sites=("double_block",), x=randn(5, 2, 16, 1, *LATENT_HW),
                pos=mpm.text_cond("qwen_image", seed=1), neg=mpm.text_cond("qwen_image", seed=2))


def _compare_every_point(setup, mode, granularity, reference_source=None):
    """The balanced setup's MODEL against the reference made from ``reference_source`` (default: that
    MODEL, whose control patches are then core's own)."""
    sigma = torch.tensor(0.7)
    source = setup["model"] if reference_source is None else reference_source
    got_model, got = with_recorder(balance(setup["model"], mode, granularity), setup["sites"])
    ref_model, want = with_recorder(reference_model(source, mode, granularity, setup["lumina"]), setup["sites"])
    d_got = denoise_once(got_model, setup["pos"], setup["neg"], setup["x"], sigma)
    d_ref = denoise_once(ref_model, setup["pos"], setup["neg"], setup["x"], sigma)
    assert set(got.seen) == set(want.seen) and got.seen
    for key in want.seen:
        a, b = got.seen[key], want.seen[key]
        assert a.shape[0] == 2 * setup["x"].shape[0]  # cond and uncond rows in one call
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=f"{key}")
    torch.testing.assert_close(d_got, d_ref, rtol=1e-5, atol=1e-5 * float(d_ref.abs().max()))
    return d_got


# ---------------------------------------------------------------------------- balanced == hand computation
MODES = [("paper", "layer"), ("paper", "pixel"), ("min_norm", "layer"), ("min_norm", "pixel")]


@pytest.mark.parametrize("mode,granularity", MODES)
def test_zimage_matches_hand_computation(zimage, mode, granularity):
    d = _compare_every_point(zimage, mode, granularity)
    plain = denoise_once(zimage["model"], zimage["pos"], zimage["neg"], zimage["x"], torch.tensor(0.7))
    assert (d - plain).abs().max() > 1e-3  # balancing changed something


@pytest.mark.parametrize("mode,granularity", MODES)
def test_qwen_matches_hand_computation(qwen, mode, granularity):
    d = _compare_every_point(qwen, mode, granularity)
    plain = denoise_once(qwen["model"], qwen["pos"], qwen["neg"], qwen["x"], torch.tensor(0.7))
    assert (d - plain).abs().max() > 1e-3


def test_zimage_injection_points_named(zimage):
    """Both layouts' points are reached: the refiner (2.1 only), and blocks 0, 2, 4 (2.1: every 2nd
    block) and 0, 5 (2.0: every 5th block)."""
    m = balance(zimage["model"])
    denoise_once(m, zimage["pos"], zimage["neg"], zimage["x"], torch.tensor(0.7))
    text = pack_module("runtime.mi_apply").lambda_stats_text([], m)
    for layer in ("Z-Image refiner 0", "Z-Image refiner 1", "Z-Image block 0", "Z-Image block 2", "Z-Image block 4",
                  "Z-Image block 5"):
        assert layer in text, text
    assert "Z-Image block 1 " not in text and "Z-Image block 3" not in text


# ---------------------------------------------------------------------------- sum == core
@pytest.mark.parametrize("family", ["zimage", "qwen"])
def test_sum_is_core_bit_for_bit(request, family):
    """Mode sum samples as core does, and it is the balanced patch doing so: one balanced entry of mode
    sum stands for both core patches in every patch list they were in."""
    setup = request.getfixturevalue(family)
    latent = torch.zeros_like(setup["x"][:1])
    summed = balance(setup["model"], "sum")
    core = setup["model"].model_options["transformer_options"]["patches"]
    lists = summed.model_options["transformer_options"]["patches"]
    for site in setup["sites"]:
        assert len(core[site]) == 2 and all(_is_control(p) for p in core[site])
        assert len(lists[site]) == 1 and type(lists[site][0]).__name__ == "BalancedModelPatches", site
        assert lists[site][0].members == core[site] and lists[site][0].balance.mode == "sum"
    assert lists[setup["sites"][0]][0] is lists[setup["sites"][-1]][0]  # one object at every site
    want = full_sample(setup["model"], setup["pos"], setup["neg"], latent)
    got = full_sample(summed, setup["pos"], setup["neg"], latent)
    assert torch.equal(got, want)
    assert not torch.equal(want, full_sample(setup["base"], setup["pos"], setup["neg"], latent))


def test_other_packs_patches_chained(zimage):
    """A foreign double-block patch stays in the list, after the balanced one, and runs every block."""
    calls = []

    def foreign(kwargs):
        calls.append(kwargs["block_index"])
        return kwargs

    m = zimage["model"].clone()
    m.set_model_double_block_patch(foreign)
    b = balance(m)
    lst = b.model_options["transformer_options"]["patches"]["double_block"]
    assert len(lst) == 2 and lst[1] is foreign
    denoise_once(b, zimage["pos"], zimage["neg"], zimage["x"], torch.tensor(0.7))
    assert calls == list(range(6))


def test_node_applied_twice_balances_each_control_once(zimage):
    once = balance(zimage["model"])
    twice = balance(once, "min_norm")
    lst = twice.model_options["transformer_options"]["patches"]["double_block"]
    assert len(lst) == 1 and len(lst[0].members) == 2 and lst[0].balance.mode == "min_norm"


# ---------------------------------------------------------------------------- bad input
def test_one_control_is_refused(zimage):
    one = zimage["apply"].diffsynth_controlnet(zimage["base"], zimage["controls"][0], zimage["vae"], strength=1.0,
                                               image=mpm.image(1))[0]
    with pytest.raises(ValueError, match=f"{NODE}.*one Z-Image Fun ControlNet patch.*two or more"):
        balance(one)
    with pytest.raises(ValueError, match=f"{NODE}.*no Z-Image or Qwen-Image control patch"):
        balance(zimage["base"])


def test_control_of_another_family_is_named(zimage, qwen):
    wrong = qwen["base"].clone()
    for p in zimage["model"].model_options["transformer_options"]["patches"]["double_block"]:
        wrong.set_model_double_block_patch(p)
    with pytest.raises(ValueError, match=f"{NODE}: a Z-Image Fun ControlNet patch is applied to a Qwen-Image model"):
        balance(wrong)


def test_control_of_another_width_is_named(qwen):
    import comfy.ops

    narrow = qwen["module"].QwenImageBlockWiseControlNet(num_layers=3, dim=16, operations=comfy.ops.manual_cast)
    m = qwen["apply"].diffsynth_controlnet(qwen["model"], mpm.model_patch(narrow, 5), qwen["vae"], mpm.image(3), 1.0)[0]
    with pytest.raises(ValueError, match=f"{NODE}: a Qwen-Image DiffSynth ControlNet of width 16 .* width 32"):
        balance(m)


def test_mi_balanced_control_points_to_the_model_patch_node(zimage):
    node = pack_module("nodes.mi_nodes").MIBalancedControl
    with pytest.raises(ValueError, match="model patches: use .MI Balanced Model Patches"):
        node_result(node, zimage["model"], zimage["pos"], zimage["neg"], "paper", "layer", 20.0)


# ---------------------------------------------------------------------------- Apply nodes: where and when
def xctrl_apply(setup, model, i, **ours):
    """XCtrl's Apply node of the setup's family, with the same core inputs as the setup's control i."""
    mod = pack_module("nodes.model_patch_nodes")
    if setup["lumina"]:
        return node_result(mod.ApplyZImageFunControlNet, model, setup["controls"][i], setup["vae"], STRENGTHS[i],
                           image=mpm.image(i + 1), **ours)[0]
    size = (48, 64)[i]
    return node_result(mod.ApplyQwenImageDiffsynthControlNet, model, setup["controls"][i], setup["vae"],
                       mpm.image(i + 1, size), STRENGTHS[i], **ours)[0]


def core_apply(setup, model, i):
    if setup["lumina"]:
        return setup["apply"].diffsynth_controlnet(model, setup["controls"][i], setup["vae"], strength=STRENGTHS[i],
                                                   image=mpm.image(i + 1))[0]
    return setup["apply"].diffsynth_controlnet(model, setup["controls"][i], setup["vae"],
                                               mpm.image(i + 1, (48, 64)[i]), STRENGTHS[i])[0]


class ScaledReference:
    """Core's patch with its addition (taken on a copy, float64) times a factor per row and per token:
    ``row_factor(kind, latent, sigma)`` (kind 0 cond, 1 uncond; the call's sigma), ``token_mask`` (tokens,)."""

    def __init__(self, inner, row_factor, token_mask, lumina):
        self.inner, self.row_factor, self.token_mask, self.lumina = inner, row_factor, token_mask, lumina

    def __call__(self, kwargs):
        img = kwargs["img"]
        copy = img.clone()
        self.inner(dict(kwargs, img=copy))
        options = kwargs["transformer_options"]
        kinds, sigma = options["cond_or_uncond"], float(options["sigmas"].reshape(-1)[0])
        per = img.shape[0] // len(kinds)
        rows = torch.tensor([self.row_factor(kinds[r // per], r % per, sigma) for r in range(img.shape[0])],
                            dtype=torch.float64)
        d = (copy[:, :TOKENS].double() - img[:, :TOKENS].double()) * rows.view(-1, 1, 1)
        if self.token_mask is not None:
            d = d * self.token_mask.double().view(1, -1, 1)
        img[:, :TOKENS] = (img[:, :TOKENS].double() + d).to(img.dtype)
        if self.lumina:
            kwargs.pop("img")
            kwargs.pop("txt")
        return kwargs


def scaled_reference_model(setup, scalings):
    """Core's controls 0, 1, ... on the base, in order, each patch wrapped in a ScaledReference
    with its (row_factor, token_mask) from ``scalings``."""
    m = setup["base"]
    for i, (row_factor, token_mask) in enumerate(scalings):
        m = core_apply(setup, m, i)
        patches = m.model_options["transformer_options"]["patches"]
        core = [p for p in patches["double_block"] if hasattr(p, "model_patch")][-1]  # the one just added
        ref = ScaledReference(core, row_factor, token_mask, setup["lumina"])
        for site, ps in patches.items():
            patches[site] = [ref if p is core else p for p in ps]
    return m


def hand_token_mask(mask, grid):
    """A (1, H, W) mask on the (gh, gw) token grid, (tokens,) float64, as docs/model_patch_control.md
    says it is resized: bilinear, antialiased when shrinking (PyTorch's triangle filter as wide as the
    scale s = pixels / tokens: token i weights pixel j by max(0, 1 - |j + 1/2 - (i + 1/2) s| / s),
    normalised); at the grid's own size nothing changes."""
    def weights(pixels, tokens):
        assert pixels >= tokens  # only shrinking is written out here
        s = pixels / tokens
        w = torch.tensor([[max(0.0, 1.0 - abs(j + 0.5 - (i + 0.5) * s) / s) for j in range(pixels)]
                          for i in range(tokens)], dtype=torch.float64)
        return w / w.sum(1, keepdim=True)

    m = mask[0].double()
    return (weights(m.shape[0], grid[0]) @ m @ weights(m.shape[1], grid[1]).T).flatten()


@pytest.mark.parametrize("family", ["zimage", "qwen"])
def test_apply_node_defaults_are_core_bit_for_bit(request, family):
    setup = request.getfixturevalue(family)
    latent = torch.zeros_like(setup["x"][:1])
    ours = xctrl_apply(setup, xctrl_apply(setup, setup["base"], 0), 1)
    got = full_sample(ours, setup["pos"], setup["neg"], latent)
    assert torch.equal(got, full_sample(setup["model"], setup["pos"], setup["neg"], latent))
    assert torch.equal(full_sample(balance(ours, "sum"), setup["pos"], setup["neg"], latent), got)


GRID = (LATENT_HW[0] // 2, LATENT_HW[1] // 2)  # the token grid


@pytest.mark.parametrize("mask_side", [GRID[0], LATENT_HW[0], 8 * LATENT_HW[0]], ids=["tokens", "latent", "image"])
@pytest.mark.parametrize("family", ["zimage", "qwen"])
def test_schedule_latent_strengths_uncond_and_mask_match_hand_reference(request, family, mask_side):
    """A mask at the token grid's, the latent's or the image's size, reduced to the tokens by hand."""
    setup = request.getfixturevalue(family)
    strength_nodes = pack_module("nodes.control_strength_nodes")
    schedule = node_result(strength_nodes.StepKeyframeNode, 0.0, 0.5, "hold", 1)[0]
    latents = node_result(strength_nodes.LatentStrengthsNode, "1.0, 0.25")[0]
    mask = torch.rand(1, mask_side, mask_side, generator=torch.Generator().manual_seed(9))
    ours = xctrl_apply(setup, setup["base"], 0, control_mask=mask, schedule=schedule, latent_strengths=latents,
                       uncond_multiplier=0.3)

    def row_factor(kind, latent, sigma):
        return 0.5 * (1.0, 0.25)[latent] * (0.3 if kind == 1 else 1.0)

    ref = scaled_reference_model(setup, [(row_factor, hand_token_mask(mask, GRID))])
    sigma = torch.tensor(0.7)
    got = denoise_once(ours, setup["pos"], setup["neg"], setup["x"], sigma)
    want = denoise_once(ref, setup["pos"], setup["neg"], setup["x"], sigma)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    plain = denoise_once(core_apply(setup, setup["base"], 0), setup["pos"], setup["neg"], setup["x"], sigma)
    assert (got - plain).abs().max() > 1e-3


def test_step_range_drops_the_control_outside(zimage):
    ms = zimage["base"].get_model_object("model_sampling")
    sigma = torch.tensor(float(ms.percent_to_sigma(0.2)))  # 20 % into sampling
    late = xctrl_apply(zimage, zimage["base"], 0, start_percent=0.5, end_percent=1.0)
    early = xctrl_apply(zimage, zimage["base"], 0, start_percent=0.0, end_percent=0.5)
    args = (zimage["pos"], zimage["neg"], zimage["x"], sigma)
    base = denoise_once(zimage["base"], *args)
    assert torch.equal(denoise_once(late, *args), base)
    assert torch.equal(denoise_once(early, *args), denoise_once(core_apply(zimage, zimage["base"], 0), *args))


@pytest.mark.parametrize("family", ["zimage", "qwen"])
def test_step_schedule_over_sampling_matches_hand_reference(request, family):
    """Three steps at 0 %, 25 % and 50 % of sampling under a ramp of step keyframes (1.0 at 0 %, linear to
    0.2 at 80 %): each step's control is core's times 1.0, 0.75 and 0.5, checked at every step."""
    setup = request.getfixturevalue(family)
    strength_nodes = pack_module("nodes.control_strength_nodes")
    ramp = node_result(strength_nodes.StepKeyframeNode, 0.0, 1.0, "linear", 1)[0]
    ramp = node_result(strength_nodes.StepKeyframeNode, 0.8, 0.2, "hold", 1, previous=ramp)[0]
    ours = xctrl_apply(setup, setup["base"], 0, schedule=ramp)
    ms = setup["base"].get_model_object("model_sampling")
    factors = {float(ms.percent_to_sigma(p)): f for p, f in ((0.0, 1.0), (0.25, 0.75), (0.5, 0.5))}

    def row_factor(kind, latent, sigma):
        return factors[min(factors, key=lambda s: abs(s - sigma))]

    sigmas = torch.tensor([*factors, 0.0])
    got = sample_steps(ours, setup, sigmas)
    want = sample_steps(scaled_reference_model(setup, [(row_factor, None)]), setup, sigmas)
    plain = sample_steps(core_apply(setup, setup["base"], 0), setup, sigmas)
    assert len(got) == len(want) == 3
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=f"step {step}")
    torch.testing.assert_close(got[0], plain[0], rtol=1e-5, atol=1e-5 * float(plain[0].abs().max()))  # factor 1
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(got[1:], plain[1:]))  # the ramp lowered the later steps


def sample_steps(model, setup, sigmas):
    """The denoised prediction of each step of Euler sampling over ``sigmas`` (CFG, the setup's prompts)."""
    import comfy.sample
    import comfy.samplers

    seen = []
    comfy.sample.sample_custom(model, randn(3, *setup["x"].shape), CFG, comfy.samplers.sampler_object("euler"), sigmas,
                               setup["pos"], setup["neg"], torch.zeros_like(setup["x"]),
                               callback=lambda step, x0, x, total: seen.append(x0.clone()), disable_pbar=True)
    return seen


def test_balanced_scheduled_controls_match_hand_computation(zimage):
    """A mask at the latent's size on one control, an uncond multiplier on the other, balanced; the
    reference scales core's patches by hand (the mask reduced to the tokens as above)."""
    mask = torch.ones(1, *LATENT_HW)
    mask[:, :, :2] = 0.0  # the first control acts from the third latent column on (tokens: fractions at the edge)
    model = xctrl_apply(zimage, xctrl_apply(zimage, zimage["base"], 0, control_mask=mask), 1, uncond_multiplier=0.5)
    hand = scaled_reference_model(zimage, [(lambda kind, latent, sigma: 1.0, hand_token_mask(mask, GRID)),
                                           (lambda kind, latent, sigma: 0.5 if kind == 1 else 1.0, None)])
    _compare_every_point(dict(zimage, model=model), "paper", "pixel", reference_source=hand)


def test_mask_of_another_shape_refused_before_sampling(zimage):
    model = xctrl_apply(zimage, zimage["base"], 0, control_mask=torch.rand(1, 8, 16))
    with pytest.raises(ValueError, match=re.escape("Apply Z-Image Fun ControlNet (XCtrl): the mask is 16x8")):
        full_sample(model, zimage["pos"], zimage["neg"], torch.zeros_like(zimage["x"][:1]))


def test_apply_node_names_a_control_of_another_family(zimage, qwen):
    mod = pack_module("nodes.model_patch_nodes")
    with pytest.raises(ValueError, match=re.escape("Apply Z-Image Fun ControlNet (XCtrl): the model_patch input is a "
                                                   "Qwen-Image DiffSynth ControlNet")):
        node_result(mod.ApplyZImageFunControlNet, zimage["base"], qwen["controls"][0], zimage["vae"], 1.0,
                    image=mpm.image(1))
    with pytest.raises(ValueError, match=re.escape("Apply Qwen Image DiffSynth ControlNet (XCtrl): the MODEL is not a "
                                                   "Qwen-Image model")):
        node_result(mod.ApplyQwenImageDiffsynthControlNet, zimage["base"], qwen["controls"][0], qwen["vae"],
                    mpm.image(1), 1.0)


def test_older_comfyui_says_zimage_needs_newer(pack):
    """Checked by capability: a ComfyUI without core's Z-Image control network is told to update."""
    if has_zimage():
        pytest.skip("this ComfyUI has Z-Image Fun ControlNet support")
    import comfy.model_patcher

    mod = pack_module("nodes.model_patch_nodes")
    base = comfy.model_patcher.ModelPatcher(torch.nn.Linear(1, 1), "cpu", "cpu")
    with pytest.raises(ValueError, match=re.escape("Apply Z-Image Fun ControlNet (XCtrl): Z-Image Fun ControlNets need "
                                                   "ComfyUI 0.8.0 or newer (") + ".*update ComfyUI"):
        node_result(mod.ApplyZImageFunControlNet, base, None, None, 1.0)

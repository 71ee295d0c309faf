"""Tiled upscaling: the real Ultimate SD Upscale's conditioning crop (its ``crop_cond``, which
crops each control of a cond's chain through ``copy()`` / ``cond_hint_original``) on XCtrl's
per-prompt controls and MI's balanced control.

Rule: a tile's control equals the whole image's control cropped to the tile, i.e. sampling a
tile with the tiler's conditioning equals sampling it with the per-prompt node applied to the
hint (and mask) cropped by hand. The tiler's code is not part of this project: the test loads
it from a checkout (XCTRL_USDU_DIR, or ComfyUI's custom_nodes) and skips loudly without one.
"""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from harness import tiny_models as tm
from harness import xs_reference
from harness.comfy_runtime import node_result, pack_module, pack_node_classes
from harness.controlnext_files import TINY_OUT, controlnext_sd, load, rel_err, write

pytestmark = pytest.mark.usefixtures("one_thread")
USDU_DIR = "ComfyUI_UltimateSDUpscale"


def _usdu_utils():
    """The real tiler's usdu_utils module (it imports only torch, numpy, PIL, torchvision), or None."""
    roots = [os.environ.get("XCTRL_USDU_DIR")]
    if os.environ.get("XCTRL_COMFYUI_ROOT"):
        roots.append(os.path.join(os.environ["XCTRL_COMFYUI_ROOT"], "custom_nodes", USDU_DIR))
    for folder in roots:
        path = os.path.join(folder or "", "usdu_utils.py")
        if folder and os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("xctrl_test_usdu_utils", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return None


usdu_utils = _usdu_utils()
if usdu_utils is None:
    pytest.skip("!!! ULTIMATE SD UPSCALE NOT FOUND: the tiled-upscaling tests are skipped (set XCTRL_USDU_DIR to a "
                "checkout of ssitu/ComfyUI_UltimateSDUpscale to run them with its real crop) !!!", allow_module_level=True)


@pytest.fixture(scope="module")
def usdu():
    return usdu_utils


@pytest.fixture(scope="module")
def nodes(pack):
    return pack_node_classes()


@pytest.fixture(scope="module")
def sd15(nodes, controlnet_dir):
    base = tm.sd15()
    sd = controlnext_sd("sd15", TINY_OUT["sd15"], seed=21)
    return base, load(pack_module("nodes.controlnext_nodes"), write(controlnet_dir, "tiles_sd15.safetensors", sd))


@pytest.fixture(scope="module")
def xs(nodes, controlnet_dir):
    import comfy.model_management as mm
    from safetensors.torch import save_file

    base = xs_reference.sd15_768()
    sd = xs_reference.xs_state_dict("sd15", seed=4)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(controlnet_dir, "tiles_xs.safetensors"))
    yield base, node_result(nodes["XCtrl_LoadControlNetXS"], "tiles_xs.safetensors")[0]
    mm.unload_all_models()


def sample(model, positive, negative, batch, latent_hw):
    import comfy.sample

    lat = torch.zeros(batch, 4, *latent_hw)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 0), 2, 5.0, "euler", "normal",
                               positive, negative, lat)


def text_cond(base, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 7, base.model.model_config.unet_config["context_dim"], generator=g), {}]]


def hand_crop(image, region, scale, tile_hw):
    """(B, H, W[, C]) image cropped to a canvas region ``scale`` times its size, resized to the tile
    as the tiler resizes (nearest-exact), written out here rather than taken from the tiler."""
    x1, y1, x2, y2 = (v // scale for v in region)
    crop = image[:, y1:y2, x1:x2]
    chw = crop.movedim(-1, 1) if crop.dim() == 4 else crop.unsqueeze(1)
    out = F.interpolate(chw, size=tile_hw, mode="nearest-exact")
    return out.movedim(1, -1) if crop.dim() == 4 else out.squeeze(1)


# Two 96x80 canvas regions of a 2x upscale of a 96x160 (H x W) image, each sampled as a 64x64 tile.
REGIONS = [(32, 16, 128, 96), (192, 96, 288, 176)]
IMAGE_HW, SCALE, TILE = (96, 160), 2, (64, 64)


def tiled(usdu, conditioning, tile_wh):
    canvas = (IMAGE_HW[1] * SCALE, IMAGE_HW[0] * SCALE)
    return usdu.crop_cond(conditioning, REGIONS, canvas, canvas, tile_wh)


def _per_prompt_case(usdu, node, base, control, tile_hw, strength, masked):
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, *IMAGE_HW, 3, generator=g)
    mask = torch.rand(1, *IMAGE_HW, generator=g) if masked else None
    pos, neg = (text_cond(base, seed) for seed in (1, 2))
    extra = {"mask": mask} if masked else {}
    cpos, cneg = node_result(node, pos, neg, base, control, image, strength, 0.0, 1.0, **extra)
    latent_hw = (tile_hw[0] // 8, tile_hw[1] // 8)
    got = sample(base, tiled(usdu, cpos, tile_hw[::-1]), tiled(usdu, cneg, tile_hw[::-1]), len(REGIONS), latent_hw)

    crops = torch.cat([hand_crop(image, r, SCALE, tile_hw) for r in REGIONS])
    if masked:
        extra = {"mask": torch.cat([hand_crop(mask, r, SCALE, tile_hw) for r in REGIONS])}
    rpos, rneg = node_result(node, pos, neg, base, control, crops, strength, 0.0, 1.0, **extra)
    want = sample(base, rpos, rneg, len(REGIONS), latent_hw)
    if masked:  # untiled, the whole image's mask does not fit the tile's shape: refused, as the MODEL nodes refuse it
        with pytest.raises(ValueError, match=r"the mask is 160x96 .* give the mask input a mask of the image's aspect ratio"):
            sample(base, cpos, cneg, len(REGIONS), latent_hw)
        cpos, cneg = node_result(node, pos, neg, base, control, image, strength, 0.0, 1.0)
    whole = sample(base, cpos, cneg, len(REGIONS), latent_hw)  # the whole image's hint squeezed into the tile
    plain = sample(base, pos, neg, len(REGIONS), latent_hw)
    return got, want, whole, plain


def check_follows(got, want, whole, plain):
    assert rel_err(got, want) < 1e-5
    effect = (want - plain).abs().max()  # what the control changes, to weigh the differences against
    assert (got - want).abs().max() < 1e-3 * effect
    assert (whole - want).abs().max() > 1e-2 * effect  # the rule matters: the uncropped hint gives another result


@pytest.mark.parametrize("masked", [False, True])
def test_per_prompt_controlnext_follows_the_tile(usdu, nodes, sd15, masked):
    base, cnx = sd15
    check_follows(*_per_prompt_case(usdu, nodes["XCtrl_ApplyControlNeXtConditioning"], base, cnx, TILE, 0.8, masked))


def test_per_prompt_controlnet_xs_follows_the_tile(usdu, nodes, xs):
    base, loaded = xs
    check_follows(*_per_prompt_case(usdu, nodes["XCtrl_ApplyControlNetXSConditioning"], base, loaded, (128, 128), 0.7, True))


def test_tiles_leave_the_whole_image_control_alone(usdu, nodes, sd15):
    base, cnx = sd15
    image = torch.rand(1, *IMAGE_HW, 3)
    pos, neg = node_result(nodes["XCtrl_ApplyControlNeXtConditioning"], tm.text_cond(base), tm.text_cond(base, seed=2),
                           base, cnx, image, 1.0, 0.0, 1.0)
    control = pos[0][1]["control"]
    tile_control = tiled(usdu, pos, TILE[::-1])[0][1]["control"]
    assert tile_control is not control and tile_control.runner.uid != control.runner.uid
    assert torch.equal(control.runner.hint, image.movedim(-1, 1))
    assert tuple(tile_control.runner.hint.shape) == (len(REGIONS), 3, *TILE)


def test_mi_balanced_members_are_cropped(usdu, nodes, sd15):
    """MI's balanced control holds the chain's controls as members: each member's hint is cropped
    as the tiler crops a stock ControlNet's."""
    import comfy.controlnet

    mi = pack_module("runtime.mi")
    base, cnx = sd15
    g = torch.Generator().manual_seed(9)
    hints = [torch.rand(1, 3, *IMAGE_HW, generator=g), torch.rand(1, 1, *IMAGE_HW, generator=g)]
    chain = None
    for h in hints:
        chain = comfy.controlnet.ControlNet(torch.nn.Linear(1, 1)).set_cond_hint(h, 0.5).set_previous_controlnet(chain)
    image = torch.rand(1, *IMAGE_HW, 3, generator=g)
    pos, _ = node_result(nodes["XCtrl_ApplyControlNeXtConditioning"], [[torch.zeros(1, 7, 32), {"control": chain}]],
                         [[torch.zeros(1, 7, 32), {}]], base, cnx, image, 1.0, 0.0, 1.0)
    (balanced,), n = mi.balance_conditioning([pos], mi.Balance())
    cropped = tiled(usdu, balanced, TILE[::-1])[0][1]["control"]
    members = cropped.members
    for member, h in zip(members, hints):
        want = torch.cat([hand_crop(h.movedim(1, -1), r, SCALE, TILE) for r in REGIONS]).movedim(-1, 1)
        assert torch.equal(member.cond_hint_original, want)
    want = torch.cat([hand_crop(image, r, SCALE, TILE) for r in REGIONS]).movedim(-1, 1)
    assert torch.equal(members[-1].runner.hint, want)  # the per-prompt ControlNeXt in the chain
    assert torch.equal(balanced[0][1]["control"].members[0].cond_hint_original, hints[0])  # the original is untouched


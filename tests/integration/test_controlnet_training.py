"""Train ControlNet (MIControlNet) (runtime/controlnet_training.py) on a tiny SD1.5 in a real
ComfyUI: the file round-trips through core's Load ControlNet and Apply ControlNet, one step's
loss and gradient equal a hand-written reference (plain and balanced injection), the
conservativity stage starts at its boundary, bad input is refused before the first step."""
import os

import pytest
import torch

from harness import tiny_models as tm
from harness.comfy_runtime import pack_module

LATENTS = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, pack):
    """models/controlnet's first (default) folder for this module: where training writes."""
    import folder_paths

    path = str(tmp_path_factory.mktemp("trained_controlnets"))
    folder_paths.add_model_folder_path("controlnet", path, is_default=True)
    yield path
    folder_paths.folder_names_and_paths["controlnet"][0].remove(path)


@pytest.fixture(scope="module")
def cnt(pack):
    return pack_module("runtime.controlnet_training")


@pytest.fixture(scope="module")
def setup(pack):
    g = torch.Generator().manual_seed(0)
    base = tm.sd15_loadable(seed=3)
    latents = {"samples": torch.randn(LATENTS, 4, 8, 8, generator=g)}
    images = torch.rand(LATENTS, 64, 64, 3, generator=g)
    return base, latents, images, tm.text_cond(base), tm.text_cond(base, seed=9)


def run(cnt, setup, name, steps=2, **kw):
    base, latents, images, pos, empty = setup
    kw.setdefault("empty_prompt_rate", 0.5)
    kw.setdefault("empty_conditioning", empty)
    kw.setdefault("injection", "plain")
    return cnt.train(base, latents, images, pos, steps, batch_size=2, name=name, seed=kw.pop("seed", 1), **kw)


def random_controlnet_file(folder, name, config, seed, zero_outputs=False):
    """A stock ControlNet of ``config`` with random weights, saved as ComfyUI's layout."""
    import comfy.cldm.cldm
    import comfy.ops
    from safetensors.torch import save_file

    cfg = {k: v for k, v in config.items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                                     device="cpu", **cfg)
    tm.init_weights(net, seed)
    sd = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    if zero_outputs:
        sd = {k: (torch.zeros_like(v) if k.startswith(("zero_convs.", "middle_block_out.")) else v) for k, v in sd.items()}
    save_file(sd, os.path.join(folder, name))
    return sd


def denoised(patcher, x, sigma, ctx):
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    to = dict(patcher.model_options["transformer_options"])
    to["cond_or_uncond"] = [0]
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to)


def core_controlled(base, control, image, x, sigma, ctx):
    """The denoiser's output with ``control`` applied by core's Apply ControlNet, as a sampler calls it."""
    import comfy.sampler_helpers
    import nodes

    pos, _ = nodes.ControlNetApplyAdvanced().apply_controlnet([[ctx, {}]], [[ctx, {}]], control, image, 1.0, 0.0, 1.0)
    cnet = pos[0][1]["control"]
    cnet.pre_run(base.model, lambda p: base.model.model_sampling.percent_to_sigma(p))
    comfy.model_management.load_models_gpu([base] + cnet.get_models())
    try:
        c = cnet.get_control(x, sigma, {"c_crossattn": ctx}, 1, {})
        to = {"cond_or_uncond": [0]}
        with torch.no_grad():
            return base.model.apply_model(x, sigma, c_crossattn=ctx, control=c, transformer_options=to)
    finally:
        cnet.cleanup()


def test_from_unet_copies_the_encoder_and_zeroes_the_outputs(cnt, setup):
    base = setup[0]
    net = cnt.controlnet_from_unet(base, seed=5)
    unet = base.model.diffusion_model.state_dict()
    own = net.state_dict()
    copied = [k for k in own if k.startswith(("input_blocks.", "middle_block.", "time_embed."))]
    assert copied and all(torch.equal(own[k], unet[k].float()) for k in copied)
    last = cnt.last_hint_conv(net)
    for k, v in own.items():
        if k.startswith(("zero_convs.", "middle_block_out.", last)):
            assert not v.any(), k
    assert own["input_hint_block.0.weight"].abs().sum() > 0


def test_saved_file_round_trips_through_core_load_and_apply_controlnet(cnt, setup, out_dir):
    import comfy.controlnet
    import comfy.model_management as mm
    import nodes

    base, latents, images, pos, _ = setup
    result = run(cnt, setup, "round_trip", steps=2, lr=1e-3)
    assert sorted(os.listdir(result.folder)) == ["checkpoint.pt", "controlnet.safetensors"]
    loaded = nodes.ControlNetLoader().load_controlnet("round_trip/controlnet.safetensors")[0]
    assert isinstance(loaded, comfy.controlnet.ControlNet)
    trained = {k: v.detach().float().cpu() for k, v in result.module.state_dict().items()}
    file_sd = loaded.control_model.state_dict()
    assert set(file_sd) == set(trained) and all(torch.equal(file_sd[k].float(), trained[k]) for k in trained)
    assert any(not torch.equal(trained[k], base.model.diffusion_model.state_dict()[k].float())
               for k in trained if k.startswith("input_blocks."))  # the copy was trained
    x, sigma, ctx = latents["samples"][:1], torch.tensor([2.0]), pos[0][0]
    core = core_controlled(base, loaded, images[:1], x, sigma, ctx)
    mine = trained_module_output(cnt, result.module, base, images[:1], x, sigma, ctx)
    assert (core - mine).abs().max() <= 1e-5 * mine.abs().max()
    assert (core - denoised(base, x, sigma, ctx)).abs().max() > 1e-3 * mine.abs().max()  # the control acts
    mm.unload_all_models()


def trained_module_output(cnt, module, base, image, x, sigma, ctx):
    """The training forward (plain injection) on the same call: eps -> denoised as core computes it."""
    ms = base.model.model_sampling
    t = ms.timestep(sigma)
    x_in = ms.calculate_input(sigma, x)

    class _S:
        images, image_hw, empty, conds = image, (64, 64), None, [(ctx, None)]

    fwd = cnt.controlled_forward(_S, base, module.cpu().eval(), torch.device("cpu"), 1.0, "sum", torch.float32)
    with torch.no_grad():
        eps = fwd(x_in, t, torch.tensor([0]), torch.tensor([False]))
    return ms.calculate_denoised(sigma, eps, x)

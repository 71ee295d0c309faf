"""Train ControlNet (MIControlNet) (runtime/controlnet_training.py) on a tiny SD1.5 in a real
ComfyUI: the file round-trips through core's Load ControlNet and Apply ControlNet, one step's
loss and gradient equal a hand-written reference (plain and balanced injection), the
conservativity stage starts at its boundary, bad input is refused before the first step."""
import os

import pytest
import torch

from harness import tiny_models as tm
from harness.comfy_runtime import pack_module
from harness.training_data import random_controlnet_file, run_training as run
from harness.training_data import tiny_data_fixture

LATENTS = 2
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cnt(pack):
    return pack_module("runtime.controlnet_training")


# The tiny SD1.5 whose ControlNets core's loader reads back (SD15_LOADABLE), and its data.
setup = tiny_data_fixture(lambda: tm.sd15_loadable(seed=3), LATENTS)


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
    result = run(cnt, setup, "micn_round_trip", steps=2, lr=1e-3)
    assert sorted(os.listdir(result.folder)) == ["checkpoint.pt", "controlnet.safetensors"]
    loaded = nodes.ControlNetLoader().load_controlnet("micn_round_trip/controlnet.safetensors")[0]
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


# ----------------------------------------------------------------- one step against a hand-written reference
def _reference_injection(mode, outputs, middle):
    """An output-block patch adding the residuals as ComfyUI does (plain) or with MIControlNet's
    add_inj written out: lambda* = clip((c - e).c / ||c - e||^2, 0, 1), lambda = lambda*/(1 - lambda*)
    limited to [0, 20], per sample over all its elements."""
    def inj(e, c):
        if mode == "plain":
            return e + c
        d = (c - e).flatten(1)
        ls = ((d * c.flatten(1)).sum(1) / (d * d).sum(1)).clamp(0, 1)
        lam = torch.where(ls >= 20 / 21, torch.full_like(ls, 20.0), ls / (1 - ls)).clamp(0, 20)
        return e + lam.reshape(-1, 1, 1, 1) * c

    def patch(h, hsp, to):
        j = to["block"][1]
        if j == 0:
            h = inj(h, middle[0])
        return h, inj(hsp, outputs[len(outputs) - 1 - j])

    return patch


def reference_step(base, sd, latents, images, ctx, seed, mode):
    """(loss, {name: gradient}) of one step, batch 2, no empty prompts: the draws in the trainer's order."""
    import comfy.cldm.cldm
    import comfy.ops

    cfg = {k: v for k, v in tm.SD15_LOADABLE.items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                                     device="cpu", num_heads=-1, **{k: v for k, v in cfg.items() if k != "num_heads"})
    net.load_state_dict(sd)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, LATENTS, (2,), generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn((2, 4, 8, 8), generator=g)
    a = (1.0 / (base.model.model_sampling.sigmas.float() ** 2 + 1.0))[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * latents["samples"][idx] + (1 - a).sqrt() * noise
    context = torch.cat([ctx, ctx])
    res = net(x=x_t, hint=images[idx].movedim(-1, 1), timesteps=t.float(), context=context)
    to = {"patches": {"output_block_patch": [_reference_injection(mode, res["output"], res["middle"])]}}
    pred = base.model.diffusion_model(x_t, t.float(), context=context, transformer_options=to)
    loss = ((pred - noise) ** 2).mean()
    names = [k for k, _ in net.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in net.named_parameters()])
    return float(loss.detach()), dict(zip(names, grads))


@pytest.mark.parametrize("injection, mode", [("plain", "plain"), ("balanced", "balanced")])
def test_one_step_equals_a_hand_written_reference(injection, mode, cnt, setup, out_dir):
    base, latents, images, pos, _ = setup
    sd = random_controlnet_file(out_dir, f"micn_start_{mode}.safetensors", tm.SD15_LOADABLE, seed=11)
    result = run(cnt, setup, f"micn_reference_{mode}", steps=1, start=f"micn_start_{mode}.safetensors", injection=injection,
                 empty_prompt_rate=0.0, empty_conditioning=None, seed=4)
    with torch.enable_grad():
        loss, grads = reference_step(base, sd, latents, images, pos[0][0], 4, mode)
    assert abs(result.losses[0] - loss) <= 1e-5 * loss
    mine = dict(result.module.named_parameters())
    scale = max(float(g.abs().max()) for g in grads.values())
    worst = max(float((mine[k].grad.cpu() - g).abs().max()) for k, g in grads.items())
    assert worst <= 1e-5 * scale, (worst, scale)


def test_balanced_and_plain_steps_differ(cnt, setup, out_dir):
    """The reference test above would pass for both modes if the node ignored its injection input."""
    random_controlnet_file(out_dir, "micn_start_modes.safetensors", tm.SD15_LOADABLE, seed=11)
    losses = [run(cnt, setup, f"micn_modes_{inj}", steps=1, start="micn_start_modes.safetensors", injection=inj, seed=4,
                  empty_prompt_rate=0.0, empty_conditioning=None).losses[0] for inj in ("plain", "balanced")]
    assert abs(losses[0] - losses[1]) > 1e-4 * losses[0]


# ----------------------------------------------------------------- the conservativity stage
def test_the_conservativity_stage_starts_at_its_boundary(cnt, setup, out_dir):
    random_controlnet_file(out_dir, "micn_start_stage.safetensors", tm.SD15_LOADABLE, seed=12)
    kw = dict(steps=3, start="micn_start_stage.safetensors", injection="balanced", lr=1e-3)
    plain = run(cnt, setup, "micn_stage_off", **kw)
    staged = run(cnt, setup, "micn_stage_on", conservativity_weight=0.5, conservativity_from_step=2, **kw)
    assert staged.stage_losses[:2] == [0.0, 0.0] and staged.stage_losses[2] != 0.0
    assert staged.losses == plain.losses  # the stage's probes are drawn after each step's own draws
    after = {k: v.detach() for k, v in staged.module.state_dict().items()}
    before = {k: v.detach() for k, v in plain.module.state_dict().items()}
    assert any(not torch.equal(after[k], before[k]) for k in after)  # step 3 added the stage's gradient
    assert "conservativity loss at the last step" in staged.note


def test_a_resumed_balanced_two_stage_run_equals_an_uninterrupted_one(cnt, setup, out_dir):
    random_controlnet_file(out_dir, "micn_start_resume.safetensors", tm.SD15_LOADABLE, seed=13)
    kw = dict(start="micn_start_resume.safetensors", injection="balanced", lr=1e-3, conservativity_weight=0.5,
              conservativity_from_step=1, checkpoint_every=0)
    straight = run(cnt, setup, "micn_straight", steps=3, **kw)
    run(cnt, setup, "micn_resumed", steps=2, **kw)
    resumed = run(cnt, setup, "micn_resumed", steps=3, **kw)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    assert resumed.stage_losses == pytest.approx(straight.stage_losses, rel=1e-4)
    a, b = straight.module.state_dict(), resumed.module.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    with pytest.raises(ValueError, match="injection 'balanced' -> 'plain'") as e:  # a changed setting is refused
        run(cnt, setup, "micn_resumed", steps=4, **dict(kw, injection="plain"))
    assert cnt.NODE in str(e.value)


# ----------------------------------------------------------------- bad input, before the first step
@pytest.mark.parametrize("change, says", [
    ("sdxl_file", "is a ControlNet for another model than this SD1.5 MODEL"),
    ("not_a_controlnet", "is not a stock UNet ControlNet"),
    ("missing_file", "no ControlNet file 'micn_nowhere.safetensors'"),
    ("balanced_from_unet", "injection 'balanced' cannot start from a fresh copy of the UNet"),
    ("balanced_zero_file", "its zero convolutions are all zero"),
    ("boundary", "conservativity_from_step is 3 but the run ends at step 3"),
    ("stage_lr0", "conservativity_weight is 0.01 but lr is 0"),
    ("stage_scale0", "conservativity_weight is 0.01 but scale is 0"),
    ("images", "3 condition images for 2 training latents"),
    ("model", "trains SD1.5 and SDXL ControlNets; this MODEL is SVD"),
])
def test_bad_input_is_refused_before_any_step(change, says, cnt, setup, out_dir):
    from safetensors.torch import save_file

    base, latents, images, pos, empty = setup
    kw = {"empty_conditioning": empty, "empty_prompt_rate": 0.5, "injection": "plain"}
    if change == "sdxl_file":
        random_controlnet_file(out_dir, "micn_sdxl.safetensors", tm.SDXL_TINY, seed=1)
        kw["start"] = "micn_sdxl.safetensors"
    elif change == "not_a_controlnet":
        save_file({"foo.weight": torch.zeros(2, 2)}, os.path.join(out_dir, "micn_foo.safetensors"))
        kw["start"] = "micn_foo.safetensors"
    elif change == "missing_file":
        kw["start"] = "micn_nowhere.safetensors"
    elif change == "balanced_from_unet":
        kw["injection"] = "balanced"
    elif change == "balanced_zero_file":
        random_controlnet_file(out_dir, "micn_zero.safetensors", tm.SD15_LOADABLE, seed=1, zero_outputs=True)
        kw.update(start="micn_zero.safetensors", injection="balanced")
    elif change == "boundary":
        kw.update(conservativity_weight=0.01, conservativity_from_step=3)
    elif change == "stage_lr0":
        kw.update(conservativity_weight=0.01, lr=0.0)
    elif change == "stage_scale0":
        kw.update(conservativity_weight=0.01, scale=0.0)
    elif change == "images":
        images = torch.rand(3, 64, 64, 3)
    elif change == "model":
        base = tm.svd()
    with pytest.raises(ValueError, match=says) as e:
        cnt.train(base, latents, images, pos, 3, name="micn_refused", **kw)
    assert cnt.NODE in str(e.value)
    assert not os.path.exists(os.path.join(out_dir, "micn_refused", "controlnet.safetensors"))
    assert not os.path.exists(os.path.join(out_dir, "micn_refused", "checkpoint.pt"))


# ----------------------------------------------------------------- SDXL and the node
def test_an_sdxl_controlnet_trains_and_loads(cnt, out_dir):
    import nodes

    base = tm.sdxl(seed=2)
    g = torch.Generator().manual_seed(0)
    latents = {"samples": torch.randn(1, 4, 8, 8, generator=g)}
    result = cnt.train(base, latents, torch.rand(1, 64, 64, 3, generator=g), tm.text_cond(base), 1, name="micn_sdxl_run",
                       empty_prompt_rate=0.0, lr=1e-3)
    assert torch.isfinite(torch.tensor(result.losses)).all()
    sd = result.module.state_dict()
    assert any(k.startswith("label_emb.") for k in sd)  # the SDXL ControlNet takes the pooled / size vector
    loaded = nodes.ControlNetLoader().load_controlnet("micn_sdxl_run/controlnet.safetensors")[0]
    assert set(loaded.control_model.state_dict()) == set(sd)


def test_the_node_takes_list_inputs_and_lists_the_starts(cnt, setup, out_dir):
    from harness.comfy_runtime import combo_options, node_result, pack_node_classes

    node = pack_node_classes()["XCtrl_TrainControlNetMI"]
    random_controlnet_file(out_dir, "micn_listed.safetensors", tm.SD15_LOADABLE, seed=3)
    starts = combo_options(node, "start")
    assert starts[0] == cnt.FROM_UNET and "micn_listed.safetensors" in starts
    base, latents, images, pos, empty = setup
    control, curve, saved = node_result(
        node, [base], [latents], [images], [pos], [1], start=["micn_listed.safetensors"], injection=["balanced"],
        empty_conditioning=[empty], name=["micn_node_run"], conservativity_weight=[0.1], batch_size=[2])
    assert control is not None and curve.shape[-1] == 3
    assert saved.endswith(os.path.join("micn_node_run", "controlnet.safetensors"))
    assert "conservativity loss at the last step" in saved

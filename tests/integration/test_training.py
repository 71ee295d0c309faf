"""Training a ControlNeXt (runtime/training.py) on a tiny SD1.5 in a real ComfyUI: what is
trained and what is not, the files and their round trip through the loader, resume, bad input."""
import os
import re

import pytest
import torch

from harness import tiny_models as tm
from harness.comfy_runtime import node_result, pack_module, pack_node_classes
from harness.controlnext_files import rel_err
from harness.training_data import run_training as run
from harness.training_data import tiny_data_fixture

LATENTS = 2


@pytest.fixture(scope="module")
def training(pack):
    return pack_module("runtime.training")


setup = tiny_data_fixture(lambda: tm.sd15(seed=3), LATENTS)


def unet_state(base):
    return {k: (v.detach().clone(), v.requires_grad, v.dtype) for k, v in base.model.diffusion_model.named_parameters()}


def test_training_changes_exactly_the_selected_parameters_and_gives_the_model_back(training, setup, out_dir):
    base = setup[0]
    before = unet_state(base)
    rng = torch.get_rng_state()
    result = run(training, setup, "exact", steps=2)
    assert torch.equal(torch.get_rng_state(), rng)  # the process's random state is not drawn from
    selected = {k for k in before if ".to_out." in k}
    assert set(result.trained_unet) == selected and selected
    changed = {k for k in selected if not torch.equal(result.trained_unet[k], result.base_unet[k])}
    assert changed == selected  # every selected weight moved
    after = unet_state(base)
    for k, (value, flag, dtype) in before.items():  # the MODEL is given back as it was, bit for bit
        assert torch.equal(after[k][0], value) and after[k][1] == flag and after[k][2] == dtype, k
    # the module trained from the seed's initialisation
    cnx = pack_module("models.controlnext")
    torch.manual_seed(1)
    init = cnx.ControlNeXt("sd15_training", out_channels=32).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in result.control.state_dict.items() if k in init)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_module_only_pattern_trains_no_unet_weight(training, setup, out_dir):
    result = run(training, setup, "module_only", steps=1, unet_pattern="")
    assert result.trained_unet == {} and result.control.unet_sd is None
    assert not os.path.exists(os.path.join(result.folder, training.UNET_FILE))


def _apply(nodes, model, control, image):
    return node_result(nodes["XCtrl_ApplyControlNeXt"], model, control, image, 1.0, 0.0, 1.0)[0]


def _denoised(patcher, x, sigma, ctx):
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    to = dict(patcher.model_options["transformer_options"])
    to["wrappers"] = patcher.wrappers
    to["cond_or_uncond"] = [0]
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to)


def test_saved_files_round_trip_through_the_loader(training, setup, out_dir):
    import comfy.model_management as mm

    nodes = pack_node_classes()
    base, latents, images, pos, _ = setup
    result = run(training, setup, "round_trip", steps=2)
    assert sorted(os.listdir(result.folder)) == sorted([training.MODULE_FILE, training.UNET_FILE, training.CHECKPOINT_FILE])
    loaded = node_result(nodes["XCtrl_LoadControlNeXt"], "round_trip/controlnet.safetensors",
                         "round_trip/unet_weight_increasements.safetensors")[0]
    x, sigma, ctx = latents["samples"][:1], torch.tensor([2.0]), pos[0][0]
    from_file = _denoised(_apply(nodes, base, loaded, images[:1]), x, sigma, ctx)
    in_memory = _denoised(_apply(nodes, base, result.control, images[:1]), x, sigma, ctx)
    assert (from_file - in_memory).abs().max() <= 1e-6 * in_memory.abs().max()
    assert rel_err(from_file, _denoised(base, x, sigma, ctx)) > 1e-4  # the control acts
    # the UNet difference file applied to the base gives the trained UNet weights
    patched = _apply(nodes, base, loaded, images[:1])
    mm.load_models_gpu([patched], force_patch_weights=True)
    weights = dict(patched.model.diffusion_model.named_parameters())
    for k, trained in result.trained_unet.items():
        assert torch.allclose(weights[k].detach().float().cpu(), trained, rtol=0, atol=1e-6), k
    mm.unload_all_models()


def test_resume_continues_the_same_loss_sequence(training, setup, out_dir):
    straight = run(training, setup, "straight", steps=4, checkpoint_every=0).losses
    run(training, setup, "resumed", steps=2, checkpoint_every=0)
    resumed = run(training, setup, "resumed", steps=4, checkpoint_every=0, resume=True).losses
    # the same sequence; the resumed steps' weights are new tensors (other memory alignment, other CPU
    # kernel paths): float rounding apart
    assert resumed[:2] == straight[:2] and resumed == pytest.approx(straight, rel=1e-5)
    fresh = run(training, setup, "again", steps=4, checkpoint_every=0).losses
    assert fresh == straight  # deterministic with a seed


def test_an_interrupt_keeps_a_checkpoint_and_writes_no_final_file(training, setup, out_dir, monkeypatch):
    import comfy.model_management as mm

    base = setup[0]
    before = unet_state(base)
    step = training.tr.Trainer.train_step

    def interrupted_after_two_steps(self, *args):
        if self.step == 2:  # the user presses Cancel during the third step
            raise mm.InterruptProcessingException()
        return step(self, *args)

    monkeypatch.setattr(training.tr.Trainer, "train_step", interrupted_after_two_steps)
    with pytest.raises(mm.InterruptProcessingException):
        run(training, setup, "interrupted", steps=5)
    folder = os.path.join(out_dir, "interrupted")
    assert os.listdir(folder) == [training.CHECKPOINT_FILE]
    state = torch.load(os.path.join(folder, training.CHECKPOINT_FILE), weights_only=True)
    assert state["step"] == 2
    after = unet_state(base)
    assert all(torch.equal(after[k][0], v[0]) for k, v in before.items())


@pytest.mark.parametrize("change, says", [
    ({"images": "3"}, "3 condition images for 2 training latents"),
    ({"pattern": "nothing_matches"}, "matches no UNet parameter"),
    ({"empty": None}, "no empty_conditioning is connected"),
    ({"positive": "sdxl"}, "text embeddings 2048 wide but this SD1.5 MODEL takes 32"),
    ({"model": "svd"}, "trains ControlNeXt for SD1.5 and SDXL models; this MODEL is SVD"),
])
def test_bad_input_is_refused_before_any_step(change, says, training, setup, out_dir):
    base, latents, images, pos, empty = setup
    if "images" in change:
        images = torch.rand(3, 64, 64, 3)
    if change.get("positive") == "sdxl":
        pos = [[torch.randn(1, 7, 2048), {}]]
    if "model" in change:
        base = tm.svd()
    kw = {"empty_conditioning": None if "empty" in change else empty, "empty_prompt_rate": 0.2}
    if "pattern" in change:
        kw["unet_pattern"] = change["pattern"]
    with pytest.raises(ValueError, match=says) as e:
        training.train(base, latents, images, pos, 3, name="refused", **kw)
    assert training.NODE in str(e.value)
    assert not os.path.exists(os.path.join(out_dir, "refused", training.MODULE_FILE))


# ----------------------------------------------------------------- nothing lost: runs, checkpoints, files
def _file_bytes(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


@pytest.mark.parametrize("what", ["latents", "images", "positive"])
def test_nan_training_data_is_refused_before_any_step(what, training, setup, out_dir):
    base, latents, images, pos, empty = setup
    if what == "latents":
        latents = {"samples": latents["samples"].clone().index_fill_(0, torch.tensor([1]), float("nan"))}
    elif what == "images":
        images = images.clone()
        images[0, 0, 0, 0] = float("inf")
    else:
        pos = [[pos[0][0].clone().fill_(float("nan")), pos[0][1]]]
    with pytest.raises(ValueError, match=f"{re.escape(training.NODE)}: the .* contain NaN or infinite values"):
        training.train(base, latents, images, pos, 2, name=f"nan_{what}", empty_conditioning=empty)
    assert not os.path.exists(os.path.join(out_dir, f"nan_{what}"))


@pytest.mark.parametrize("number", ["lr_module", "lr_unet", "scale", "empty_prompt_rate"])
def test_a_nan_number_is_refused_before_any_step(number, training, setup, out_dir):
    """ComfyUI's min/max check lets NaN through: the node refuses it, naming it, and writes nothing."""
    base, latents, images, pos, empty = setup
    numbers = dict(lr_module=1e-4, lr_unet=1e-5, scale=1.0, empty_prompt_rate=0.2)
    numbers[number] = float("nan")
    node = pack_node_classes()["XCtrl_TrainControlNeXt"]
    with pytest.raises(ValueError, match=f"{re.escape(training.NODE)}: {number} must be a finite number"):
        node_result(node, base, latents, images, pos, 2, batch_size=1, gradient_accumulation=1, unet_pattern="auto",
                    seed=0, gradient_checkpointing=False, training_dtype="float32", name=f"nan_{number}",
                    checkpoint_every=0, resume=False, empty_conditioning=empty, **numbers)
    assert not os.path.exists(os.path.join(out_dir, f"nan_{number}"))


def test_a_loss_turning_nan_keeps_the_last_good_run(training, setup, out_dir, monkeypatch):
    """A good run, then a resumed run whose loss turns NaN at its 4th step: the error says so and
    every file of the good run (module, UNet differences, checkpoint) is left as it was."""
    run(training, setup, "keeps_good", steps=2, checkpoint_every=0)
    folder = os.path.join(out_dir, "keeps_good")
    good = _file_bytes(folder)
    forward = training._forward

    def failing_forward(*args, **kwargs):
        inner = forward(*args, **kwargs)
        calls = []

        def f(*a):
            calls.append(1)
            out = inner(*a)
            return out * float("nan") if len(calls) >= 2 else out
        return f

    monkeypatch.setattr(training, "_forward", failing_forward)
    with pytest.raises(ValueError, match=r"the loss is nan at step 4: the run stopped and nothing of it was saved"):
        run(training, setup, "keeps_good", steps=6, checkpoint_every=1)
    state = torch.load(os.path.join(folder, training.CHECKPOINT_FILE), weights_only=True)
    assert state["step"] == 3 and all(torch.isfinite(torch.as_tensor(state["losses"])))  # the last good step
    after = _file_bytes(folder)
    assert after[training.MODULE_FILE] == good[training.MODULE_FILE] and after[training.UNET_FILE] == good[training.UNET_FILE]


def test_an_earlier_run_is_only_replaced_when_asked(training, setup, out_dir):
    run(training, setup, "earlier", steps=1, checkpoint_every=0)
    folder = os.path.join(out_dir, "earlier")
    before = _file_bytes(folder)
    with pytest.raises(ValueError, match=r"already holds an earlier run .*turn resume on to continue it, or overwrite on"):
        run(training, setup, "earlier", steps=1, resume=False)
    assert _file_bytes(folder) == before
    replaced = run(training, setup, "earlier", steps=1, resume=False, overwrite=True, seed=5, unet_pattern="")
    assert replaced.losses and sorted(os.listdir(folder)) == [training.CHECKPOINT_FILE, training.MODULE_FILE]  # no stale UNet file


def test_resuming_with_changed_settings_is_refused_and_a_finished_run_says_so(training, setup, out_dir):
    first = run(training, setup, "settings", steps=2, checkpoint_every=0)
    with pytest.raises(ValueError, match=r"trained with other settings \(lr_module 0.0001 -> 0.001; seed 1 -> 2\)"):
        run(training, setup, "settings", steps=2, lr_module=1e-3, seed=2)
    again = run(training, setup, "settings", steps=2)
    assert again.losses == first.losses and "already trained to step 2" in again.note
    base, latents, images, pos, empty = setup
    for other in ((base, latents, images.flip(1), pos, empty),  # other condition images
                  (base, {"samples": latents["samples"] + 0.01}, images, pos, empty)):  # other latents
        with pytest.raises(ValueError, match=r"trained with other settings \(data \(latents, condition images, prompts\) "):
            run(training, other, "settings", steps=2)


@pytest.mark.parametrize("name, says", [(".", "must name a folder under models/controlnet"),
                                        ("a/../b", "must name a folder"), ("a\x00b", "must name a folder"), ("a\nb", "must name a folder"),
                                        ("x" * 300, "300 characters long")])
def test_bad_run_names_are_refused(name, says, training, setup, out_dir):
    with pytest.raises(ValueError, match=says):
        run(training, setup, name, steps=1)


def test_an_unwritable_folder_is_found_before_the_first_step(training, setup, out_dir, monkeypatch):
    with open(os.path.join(out_dir, "a_file"), "w") as f:
        f.write("not a folder")
    steps = []
    monkeypatch.setattr(training.tr.Trainer, "train_step", lambda self, *a: steps.append(1))
    with pytest.raises(ValueError, match=r"cannot write into .*a_file.*nothing was trained"):
        run(training, setup, "a_file/run", steps=3)
    assert steps == []


@pytest.mark.parametrize("content, says", [(b"", "is empty"), (b"garbage bytes", "not a readable PyTorch checkpoint"),
                                           ("code", "refuses to unpickle"), ("other", "is not a checkpoint of this node")])
def test_a_broken_checkpoint_gets_the_packs_message(content, says, training, setup, out_dir):
    import pickle

    folder = os.path.join(out_dir, f"broken_{says[:6].replace(' ', '_')}")
    os.makedirs(folder)
    path = os.path.join(folder, training.CHECKPOINT_FILE)
    if content == "code":
        torch.save({"step": 1, "x": pickle.loads(pickle.dumps(os.path.join))}, path)  # a global: refused, never called
    elif content == "other":
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        with open(path, "wb") as f:
            f.write(content)
    with pytest.raises(ValueError, match=f"{re.escape(training.NODE)}: .*{says}.*turn overwrite on") as e:
        run(training, setup, os.path.basename(folder), steps=1)
    assert "weights_only" not in str(e.value)


def test_latents_of_another_model_and_file_modes(training, setup, out_dir):
    base, latents, images, pos, empty = setup
    with pytest.raises(ValueError, match="takes 4 latent channels: encode the images with this model's VAE"):
        training.train(base, {"samples": torch.randn(2, 16, 8, 8)}, images, pos, 1, name="latents16", empty_conditioning=empty)
    result = run(training, setup, "modes", steps=1, checkpoint_every=0)
    umask = os.umask(0)
    os.umask(umask)
    for f in os.listdir(result.folder):
        assert os.stat(os.path.join(result.folder, f)).st_mode & 0o777 == 0o666 & ~umask, f


# ----------------------------------------------------------------- the conservativity stage (MIControlNet's 2-stage)
STAGE = {"conservativity_weight": 0.5, "conservativity_probes": 1, "conservativity_from_step": 1}


@pytest.fixture
def _one_thread(one_thread):
    yield


def test_the_conservativity_stage_trains_the_module_only(training, setup, out_dir, _one_thread):
    """Step 2 is the stage's first: the UNet weights get the plain loss's update only (the stage's
    gradient is kept out of them), the module gets the stage's gradient too."""
    plain = run(training, setup, "stage_plain", steps=2, checkpoint_every=0)
    staged = run(training, setup, "stage_on", steps=2, checkpoint_every=0, **STAGE)
    assert plain.losses == staged.losses  # the stage adds to the gradient, not to the denoising loss
    assert staged.trained_unet.keys() == plain.trained_unet.keys()
    for k, v in plain.trained_unet.items():
        assert torch.equal(staged.trained_unet[k], v), k
    module_diff = [k for k, v in plain.control.state_dict.items() if not torch.equal(staged.control.state_dict[k], v)]
    assert module_diff and "conservativity loss at the last step" in staged.note


def test_the_conservativity_stage_trains_the_same_with_gradient_checkpointing(training, setup, out_dir, _one_thread):
    """Checkpointing recomputes the UNet's activations in the backward pass, which the stage's
    second-order gradient then runs through: the run must train what it trains without."""
    straight = run(training, setup, "stage_no_ckpt", steps=2, checkpoint_every=0, **STAGE)
    ckpt = run(training, setup, "stage_ckpt", steps=2, checkpoint_every=0, gradient_checkpointing=True, **STAGE)
    assert ckpt.losses == pytest.approx(straight.losses, rel=1e-5)
    for k, v in straight.control.state_dict.items():
        torch.testing.assert_close(ckpt.control.state_dict[k], v, rtol=1e-4, atol=1e-6)
    plain = run(training, setup, "stage_ckpt_off", steps=2, checkpoint_every=0, gradient_checkpointing=True)
    changed = [k for k, v in plain.control.state_dict.items() if not torch.equal(ckpt.control.state_dict[k], v)]
    assert changed  # the stage did act under checkpointing (the comparison above is not between two plain runs)


def test_a_resumed_two_stage_run_equals_an_uninterrupted_one(training, setup, out_dir, _one_thread):
    straight = run(training, setup, "stage_straight", steps=4, checkpoint_every=0, **STAGE)
    run(training, setup, "stage_resumed", steps=2, checkpoint_every=0, **STAGE)  # ends inside stage 2
    resumed = run(training, setup, "stage_resumed", steps=4, checkpoint_every=0, **STAGE)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    for k, v in straight.control.state_dict.items():
        torch.testing.assert_close(resumed.control.state_dict[k], v, rtol=1e-4, atol=1e-6)
    # a stage-1 run may be continued with a stage starting where it stopped, not with one that starts before
    run(training, setup, "stage_later", steps=2, checkpoint_every=0)
    run(training, setup, "stage_later", steps=3, checkpoint_every=0, **dict(STAGE, conservativity_from_step=2))
    with pytest.raises(ValueError, match=r"past the conservativity stage's first step 1"):
        run(training, setup, "stage_later", steps=4, checkpoint_every=0, **dict(STAGE, conservativity_weight=0.1))


@pytest.mark.parametrize("change, says", [
    ({"conservativity_from_step": 3}, "conservativity_from_step is 3 but the run ends at step 3: the conservativity stage "
                                      "would never run"),
    ({"lr_module": 0.0}, "conservativity_weight is 0.5 but lr_module is 0"),
    ({"conservativity_probes": 0}, "conservativity_weight is 0.5 but conservativity_probes is 0"),
    ({"scale": 0.0}, "conservativity_weight is 0.5 but scale is 0"),
    ({"conservativity_probe": "uniform"}, "conservativity_probe 'uniform' is not one of"),
])
def test_bad_conservativity_inputs_are_refused_before_any_step(change, says, training, setup, out_dir, monkeypatch):
    steps = []
    monkeypatch.setattr(training.tr.Trainer, "train_step", lambda self, *a: steps.append(1))
    with pytest.raises(ValueError, match=re.escape(says)) as e:
        run(training, setup, "stage_refused", steps=3, **dict(STAGE, **change))
    assert str(e.value).startswith(training.NODE) and steps == []
    assert not os.path.exists(os.path.join(out_dir, "stage_refused"))


def test_the_node_passes_its_list_inputs_and_the_stage_through(training, setup, out_dir, _one_thread):
    base, latents, images, pos, empty = setup
    node = pack_node_classes()["XCtrl_TrainControlNeXt"]
    inputs = {"model": base, "latents": latents, "images": images, "positive": pos, "steps": 2, "batch_size": 2,
              "gradient_accumulation": 1, "lr_module": 1e-4, "lr_unet": 1e-5, "unet_pattern": "auto", "scale": 1.0,
              "seed": 1, "empty_prompt_rate": 0.0, "gradient_checkpointing": False, "training_dtype": "float32",
              "name": "node_stage", "checkpoint_every": 0, "resume": True, **STAGE, "conservativity_probe": "gaussian"}
    control, curve, saved = node_result(node, **{k: [v] for k, v in inputs.items()})
    assert "conservativity loss at the last step" in saved and curve.shape[-1] == 3
    assert os.path.isfile(os.path.join(out_dir, "node_stage", training.MODULE_FILE))

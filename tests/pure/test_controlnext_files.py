"""Weight files around ControlNeXt: telling file kinds apart, the UNet weight files
(replacements vs deltas, key renaming, patches), and reading files through checkpoint_io."""
import glob
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from harness.layouts import LAYOUT_DIR, load_layout
from harness.random_weights import random_tensors
from xctrl.models.checkpoint_io import WeightFileError, load_state_dict
from xctrl.models.controlnext import build_controlnext
from xctrl.models.file_kinds import KINDS, describe_state_dict, kind_of
from xctrl.models.unet_weight_files import parse_unet_weight_file, to_ldm_keys, weight_patches

def layout_dir():
    return LAYOUT_DIR


def meta_state_dict(layout):
    """Exact keys and shapes at no memory cost (file-kind logic only reads names and shapes)."""
    return {k: torch.empty(s, device="meta") for k, s in layout["keys"].items()}


def random_state_dict(layout, seed=0, dtype=torch.float32):
    return random_tensors(layout["keys"], seed, dtype)


# ---------------------------------------------------------------------------- file kinds

EXPECTED_KINDS = {
    "controlnext_sd15_released": "controlnext_sd15",
    "controlnext_sd15_training": "controlnext_sdxl_family",
    "controlnext_sdxl": "controlnext_sdxl_family",
    "controlnext_svd_v2": "controlnext_sdxl_family",
    "controlnext_svd_v1": "controlnext_svd_v1",
    "controlnext_sd15_unet_subset": "controlnext_unet_weights",
    "controlnext_sd15_unet_subset_upblocks": "controlnext_unet_weights",
    "controlnext_sdxl_unet_delta": "controlnext_unet_weights",
}


def test_every_released_layout_is_named():
    files = sorted(glob.glob(os.path.join(layout_dir(), "*.json")))
    assert len(files) >= 16
    for path in files:
        name = os.path.basename(path)[: -len(".json")]
        sd = meta_state_dict(load_layout(os.path.basename(path)))
        if name.startswith("controlnet_xs_vislearn"):
            expected = "controlnet_xs_vislearn"
        elif name.startswith("controlnet_xs_diffusers"):
            expected = "controlnet_xs_diffusers"
        else:
            expected = EXPECTED_KINDS[name]
        assert kind_of(sd) == expected, name
        base = {"sd15": "SD1.5", "sd21": "SD2.x", "sdxl": "SDXL"}
        if name.startswith("controlnet_xs"):
            assert describe_state_dict(sd).endswith("for " + base[name.split("_")[3]]), name


def test_descriptions_of_controlnext_layouts():
    d = describe_state_dict(meta_state_dict(load_layout("controlnext_sdxl.json")))
    assert "SDXL, SVD v2 or SD1.5-Training" in d
    d = describe_state_dict(meta_state_dict(load_layout("controlnext_sdxl_unet_delta.json")))
    assert "SDXL attention deltas" in d and "diffusers" in d
    d = describe_state_dict(meta_state_dict(load_layout("controlnext_sd15_unet_subset.json")))
    assert "SD1.5 attention replacement" in d


def t(*shape):
    return torch.zeros(shape)


SYNTHETIC = {
    "controlnet": [
        {"input_hint_block.0.weight": t(16, 3, 3, 3), "zero_convs.0.0.weight": t(320, 320, 1, 1),
         "input_blocks.0.0.weight": t(320, 4, 3, 3)},
        {"control_model.input_hint_block.0.weight": t(16, 3, 3, 3), "control_model.zero_convs.0.0.weight": t(320, 320, 1, 1)},
        {"controlnet_cond_embedding.conv_in.weight": t(16, 3, 3, 3), "controlnet_down_blocks.0.weight": t(320, 320, 1, 1),
         "conv_in.weight": t(320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": t(320, 320, 3, 3)},
    ],
    "t2i_adapter": [
        {"conv_in.weight": t(320, 192, 3, 3), "body.0.block1.weight": t(320, 320, 3, 3)},
        {"adapter.conv_in.weight": t(320, 768, 3, 3), "adapter.body.0.resnets.0.block1.weight": t(320, 320, 3, 3)},
    ],
    "lora": [
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": t(320, 4),
         "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t(4, 320)},
        {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight": t(4, 320),
         "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight": t(320, 4)},
    ],
    "checkpoint": [
        {"model.diffusion_model.input_blocks.0.0.weight": t(320, 4, 3, 3), "first_stage_model.decoder.conv_in.weight": t(1, 1)},
    ],
    "unet": [
        {"input_blocks.0.0.weight": t(320, 4, 3, 3), "out.2.weight": t(4, 320, 3, 3)},
        {"conv_in.weight": t(320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": t(320, 320, 3, 3)},
    ],
}


@pytest.mark.parametrize("kind", sorted(SYNTHETIC))
def test_synthetic_examples_of_other_files(kind):
    for sd in SYNTHETIC[kind]:
        assert kind_of(sd) == kind, list(sd)
        assert kind in KINDS


def test_unknown_names_its_first_keys():
    sd = {"foo.weight": t(1), "bar.bias": t(1)}
    assert kind_of(sd) == "unknown"
    assert describe_state_dict(sd) == "unknown (first keys: foo.weight, bar.bias)"
    assert kind_of({}) == "unknown"


def test_wrong_file_in_controlnext_builder_is_refused():
    """The pure builder says what is missing; the loader node names the file kind (integration tests)."""
    lora = SYNTHETIC["lora"][0]
    with pytest.raises(WeightFileError, match="not a ControlNeXt control module"):
        build_controlnext(lora)
    unet_file = meta_state_dict(load_layout("controlnext_sdxl_unet_delta.json"))
    with pytest.raises(WeightFileError, match="not a ControlNeXt control module"):
        build_controlnext(unet_file, "sdxl")


# ---------------------------------------------------------------------------- UNet weight files


def fake_mapping(diffusers_keys):
    """A stand-in for comfy.utils.unet_to_diffusers: diffusers name -> LDM-like name."""
    return {k: "ldm." + k.replace("attentions", "A") for k in diffusers_keys}


def test_parse_semantics_and_naming():
    assert parse_unet_weight_file(meta_state_dict(load_layout("controlnext_sd15_unet_subset.json"))) == ("replace", "diffusers")
    assert parse_unet_weight_file(meta_state_dict(load_layout("controlnext_sd15_unet_subset_upblocks.json"))) == ("replace", "diffusers")
    assert parse_unet_weight_file(meta_state_dict(load_layout("controlnext_sdxl_unet_delta.json"))) == ("delta", "diffusers")
    for layout in ("controlnext_sd15_unet_subset.json", "controlnext_sd15_unet_subset_upblocks.json"):
        assert "replacement" in load_layout(layout)["semantics"]
    assert "delta" in load_layout("controlnext_sdxl_unet_delta.json")["semantics"]


def test_parse_ldm_names_with_prefix():
    ldm = {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_out.0.weight": t(640, 640),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_out.0.weight": t(640, 640),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_out.0.bias": t(1280),
    }
    assert parse_unet_weight_file(ldm) == ("delta", "ldm")
    assert kind_of(ldm) == "controlnext_unet_weights"


def test_parse_refuses_unclear_files():
    mixed = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": t(320, 320),
        "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0.weight": t(1280, 1280),
    }
    with pytest.raises(WeightFileError, match="mixes diffusers"):
        parse_unet_weight_file(mixed)
    with pytest.raises(WeightFileError, match="not a ControlNeXt UNet weight file: .* not attention to_out"):
        parse_unet_weight_file(SYNTHETIC["lora"][1])
    ambiguous = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight": t(320, 320)}
    with pytest.raises(WeightFileError, match="unrecognised"):
        parse_unet_weight_file(ambiguous)


def test_to_ldm_keys_maps_every_key():
    sd = meta_state_dict(load_layout("controlnext_sd15_unet_subset.json"))
    mapping = fake_mapping(sd)
    mapping["down_blocks.0.resnets.0.conv1.weight"] = "ldm.other"  # the model has more keys than the file
    out = to_ldm_keys(sd, mapping)
    assert len(out) == len(sd) == 64
    for k, v in sd.items():
        assert out[mapping[k]] is v
    # keys already in LDM naming are kept as they are
    assert to_ldm_keys(out, mapping).keys() == out.keys()


def test_to_ldm_keys_never_drops_silently():
    sd = meta_state_dict(load_layout("controlnext_sd15_unet_subset.json"))
    mapping = fake_mapping(sd)
    missing = "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.weight"
    del mapping[missing]
    with pytest.raises(WeightFileError, match=r"1 of 64 keys .*" + missing.replace(".", r"\.") + ".*another model family"):
        to_ldm_keys(sd, mapping)


def test_replace_patches_give_the_new_weights_exactly():
    layout = load_layout("controlnext_sd15_unet_subset_upblocks.json")
    new = random_state_dict(layout, seed=1, dtype=torch.float16)
    mapping = fake_mapping(new)
    file_ldm = to_ldm_keys(new, mapping)
    base = {k: v + 0.05 for k, v in random_state_dict(layout, seed=2, dtype=torch.float16).items()}
    base = {mapping[k]: v for k, v in base.items()}
    patches = weight_patches(file_ldm, base, "replace")
    assert patches.keys() == file_ldm.keys()
    for k, delta in patches.items():
        assert delta.dtype == torch.float32
        # ComfyUI adds diff patches in float32 and casts back: W_orig + delta == W_new exactly
        assert torch.equal((base[k].float() + delta).half(), file_ldm[k]), k


def test_delta_patches_are_the_file_tensors():
    sd = meta_state_dict(load_layout("controlnext_sdxl_unet_delta.json"))
    file_ldm = to_ldm_keys(sd, fake_mapping(sd))
    base = {k: torch.empty(v.shape, device="meta") for k, v in file_ldm.items()}
    patches = weight_patches(file_ldm, base, "delta")
    assert all(patches[k] is v for k, v in file_ldm.items())


def test_patch_shape_mismatch_names_key_shapes_and_family():
    file_ldm = {"ldm.a.weight": t(640, 640)}
    with pytest.raises(WeightFileError) as e:
        weight_patches(file_ldm, {"ldm.a.weight": t(320, 320)}, "delta")
    msg = str(e.value)
    assert "ldm.a.weight" in msg and "(640, 640)" in msg and "(320, 320)" in msg and "model family" in msg
    with pytest.raises(WeightFileError, match="does not exist in this model"):
        weight_patches(file_ldm, {}, "replace")
    with pytest.raises(ValueError, match="semantics"):
        weight_patches(file_ldm, {"ldm.a.weight": t(640, 640)}, "set")


# ---------------------------------------------------------------------------- reading files


def test_safetensors_round_trip(tmp_path):
    sd = random_state_dict(load_layout("controlnext_sd15_released.json"), dtype=torch.float16)
    path = str(tmp_path / "controlnet.safetensors")
    save_file(sd, path)
    loaded = load_state_dict(path)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    model = build_controlnext(loaded)
    assert torch.equal(model.mid_convs[1].weight, sd["mid_convs.1.weight"].float())


@pytest.mark.parametrize("wrap", ["flat", "state_dict", "module_prefix"])
def test_pickle_round_trip(tmp_path, wrap):
    sd = random_state_dict(load_layout("controlnext_svd_v1.json"))
    if wrap == "state_dict":
        obj = {"state_dict": sd, "epoch": 3}
    elif wrap == "module_prefix":
        obj = {"module." + k: v for k, v in sd.items()}
    else:
        obj = sd
    path = str(tmp_path / "controlnet.bin")
    torch.save(obj, path)
    model = build_controlnext(load_state_dict(path))
    assert model.variant.name == "svd_v1"
    assert torch.equal(model.scale, sd["scale"])


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class _PlainObject:
    pass


@pytest.mark.parametrize("payload", ["code", "object"])
def test_pickle_with_foreign_objects_is_refused_without_running_code(tmp_path, payload):
    marker = str(tmp_path / "code_ran")
    sd = random_state_dict(load_layout("controlnext_sd15_released.json"))
    sd["extra"] = _RunsCodeWhenUnpickled(marker) if payload == "code" else _PlainObject()
    path = str(tmp_path / "controlnet.ckpt")
    torch.save(sd, path)
    with pytest.raises(WeightFileError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert "controlnet.ckpt was not loaded" in message and "refuses to unpickle" in message
    assert ("posix.mkdir" if payload == "code" else "_PlainObject") in message  # names what was refused
    assert ".safetensors" in message and "machine you trust" in message  # and how to get a safe copy
    # PyTorch's own advice (re-run with weights_only=False, file an issue) is not passed on
    assert "weights_only" not in message and "issue" not in message
    assert not os.path.exists(marker)
    if payload == "code":  # the payload is real: an unsafe load runs it
        torch.load(path, weights_only=False)
        assert os.path.isdir(marker)


@pytest.mark.parametrize("content", [b"\x80\x02garbage" * 10, b"PK\x03\x04garbage" * 10])
def test_damaged_pickle_says_download_again(tmp_path, content):
    path = tmp_path / "controlnet.pth"
    path.write_bytes(content)
    with pytest.raises(WeightFileError, match="controlnet.pth is not a readable PyTorch checkpoint.*download it again"):
        load_state_dict(str(path))


def test_svd_modules_are_told_by_their_name():
    from xctrl.models.controlnext import named_as_svd_module

    for name in ("controlnext-svd_v2-controlnet-fp16.safetensors", "ControlNeXt-SVD/v2/controlnet.bin",
                 "ControlNeXt-SVD\\finetune\\controlnet.bin", "svd.safetensors"):
        assert named_as_svd_module(name), name
    for name in ("ControlAny-SDXL/anime_canny/controlnet.safetensors", "mysvdish_canny.safetensors", "controlnet.safetensors"):
        assert not named_as_svd_module(name), name


def test_dit_controlnets_are_named_for_what_they_are():
    import torch

    from xctrl.models.file_kinds import describe_state_dict, kind_of

    sd3 = {"pos_embed_input.proj.weight": torch.zeros(2), "controlnet_blocks.0.weight": torch.zeros(2),
           "transformer_blocks.0.attn.to_q.weight": torch.zeros(2)}
    flux = {"controlnet_blocks.0.weight": torch.zeros(2), "controlnet_x_embedder.weight": torch.zeros(2)}
    for sd in (sd3, flux):
        assert kind_of(sd) == "controlnet" and "DiT" in describe_state_dict(sd)


ONE_STYLE = re.compile(r"^(?P<name>[^ ]+) (?P<problem>.+)\. Fix: (?P<fix>.+)\.$", re.S)


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "no tensors"])
def test_both_readers_refuse_a_bad_file_in_one_style_and_the_same_words(tmp_path, case):
    """load_state_dict and load_pickle: "<file> <what is wrong>. Fix: <what to do>.", word for
    word the same for a missing, empty, damaged or tensor-less .pt file."""
    from xctrl.models.checkpoint_io import load_pickle

    path = tmp_path / "weights.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"\x80\x02garbage" * 10)
    elif case == "no tensors":
        torch.save({"step": 3}, str(path))
    messages = []
    for reader in (load_state_dict, load_pickle):
        try:
            reader(str(path))
        except WeightFileError as e:
            messages.append(str(e))
            match = ONE_STYLE.match(str(e))
            assert match and match["name"] == "weights.pt", str(e)
            assert e.problem == f"weights.pt {match['problem']}"  # callers with a fix of their own use this
    if case == "no tensors":  # a pickle of plain values is fine for load_pickle (training checkpoints)
        assert len(messages) == 1
    else:
        assert len(messages) == 2 and messages[0] == messages[1], messages


def test_a_damaged_safetensors_file_is_told_in_the_same_style(tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    with pytest.raises(WeightFileError) as err:
        load_state_dict(str(path))
    assert ONE_STYLE.match(str(err.value)) and "download it again" in str(err.value)


def test_the_umask_is_read_without_being_changed(tmp_path, monkeypatch):
    """New files get 0666 less the umask, read without os.umask (setting it races with threads)."""
    from xctrl.models import checkpoint_io

    old = os.umask(0o027)
    try:
        def refuse(*_):
            raise AssertionError("os.umask was called")

        monkeypatch.setattr(os, "umask", refuse)
        assert checkpoint_io.process_umask() == 0o027
        assert checkpoint_io.new_file_mode() == 0o640
        monkeypatch.setattr(checkpoint_io, "open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")), raising=False)
        assert checkpoint_io.process_umask() == 0o027  # the fallback: a scratch file's mode
    finally:
        monkeypatch.undo()
        os.umask(old)

"""Which node ComfyUI blames for an Apply node's bad input (docs/comfyui_hooks.md, "Where errors
appear"): prompts run through ComfyUI's own executor, whose ``execution_error`` message carries the
node the frontend marks red. What the Apply node receives is refused when it runs (the Apply node
is marked); what needs the latent can only be refused as sampling starts (the sampler is marked),
so the message begins with the Apply node's name, id and title and names the input to change."""
import pytest
import torch

from harness import tiny_models as tm
from harness.comfy_runtime import run_prompt
from harness.controlnext_files import controlnext_sd, write

SVD_IDS = {"fps": 7, "motion_bucket_id": 128, "augmentation_level": 0.02}


class TinyModel:
    """Test-only source node: a tiny random-weight MODEL and its two conditionings."""

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "make"
    CATEGORY = "tests"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["sd15", "svd"],)}}

    def make(self, family):
        if family == "sd15":
            base = tm.sd15()
            return base, tm.text_cond(base), tm.text_cond(base, seed=2)
        emb, concat = torch.randn(1, 1, 32), torch.randn(1, 4, 8, 8)
        return (tm.svd(), [[emb, dict(SVD_IDS, concat_latent_image=concat)]],
                [[torch.zeros_like(emb), dict(SVD_IDS, concat_latent_image=torch.zeros_like(concat))]])


class Sink:
    """Test-only output node, so the prompt has an output."""

    RETURN_TYPES = ()
    FUNCTION = "take"
    OUTPUT_NODE = True
    CATEGORY = "tests"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def take(self, samples):
        return {}


@pytest.fixture
def test_nodes(pack, monkeypatch):
    import nodes

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "XCtrlTest_TinyModel", TinyModel)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "XCtrlTest_Sink", Sink)


def prompt_with(family, control_file, hints, latents, model_from="1", extra=None):
    """Tiny model -> Load / Apply ControlNeXt (node 4, titled 'Pose control') -> KSampler (node 6)."""
    prompt = {
        "1": {"class_type": "XCtrlTest_TinyModel", "inputs": {"family": family}},
        "2": {"class_type": "XCtrl_LoadControlNeXt", "inputs": {"control_file": control_file, "unet_weights": "none"}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": hints, "color": 0}},
        "4": {"class_type": "XCtrl_ApplyControlNeXt", "_meta": {"title": "Pose control"}, "inputs": {
            "model": [model_from, 0], "controlnext": ["2", 0], "image": ["3", 0], "strength": 1.0,
            "start_percent": 0.0, "end_percent": 1.0}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": latents}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "XCtrlTest_Sink", "inputs": {"samples": ["6", 0]}},
    }
    prompt.update(extra or {})
    return prompt


def execution_error(prompt):
    ex = run_prompt(prompt)
    assert not ex.success
    errors = [d for kind, d in ex.status_messages if kind == "execution_error"]
    assert len(errors) == 1, ex.status_messages
    return errors[0]


def test_a_latent_batch_mismatch_names_the_apply_node_its_id_title_and_input(test_nodes, controlnet_dir):
    """3 condition images for 4 latents of an image model: only the sampler sees the latent, so
    ComfyUI marks it; the message leads to the Apply node and its image input, with no word about
    SVD's reference pose (an image model's hints hold none)."""
    name = write(controlnet_dir, "attribution_sd15.safetensors", controlnext_sd("sd15", 64))
    err = execution_error(prompt_with("sd15", name, hints=3, latents=4))
    assert err["node_id"] == "6" and err["node_type"] == "KSampler", err
    message = err["exception_message"]
    assert message.startswith("Apply ControlNeXt (XCtrl) (node #4 'Pose control'): the condition image batch has "
                              "3 images but the latent batch has 4"), message
    assert "to the image input" in message, message
    assert "reference" not in message, message
    assert not any("apply_model" in line for line in err["traceback"]), "refused before the first model call"


def test_an_svd_v1_module_after_long_video_is_blamed_on_the_apply_node(test_nodes, controlnet_dir):
    """A windowed MODEL reaches Apply ControlNeXt with a module the windows cannot run: the Apply
    node knows it when it runs, so ComfyUI marks it (not the sampler)."""
    name = write(controlnet_dir, "attribution_svd_v1.safetensors", controlnext_sd("svd_v1", 64))
    long_video = {"8": {"class_type": "XCtrl_ControlNeXtSVDLongVideo", "inputs": {
        "model": ["1", 0], "frames_per_window": 4, "overlap": 2, "cfg_ramp": "constant", "min_cfg": 1.0}}}
    err = execution_error(prompt_with("svd", name, hints=5, latents=5, model_from="8", extra=long_video))
    assert err["node_id"] == "4" and err["node_type"] == "XCtrl_ApplyControlNeXt", err
    assert err["exception_message"].startswith("Apply ControlNeXt (XCtrl) (node #4 'Pose control'): XCtrl Long "
                                               "Video runs the authors' ControlNeXt-SVD v2 window loop"), err


def test_an_untitled_node_and_a_direct_call_are_named_plainly(pack):
    from harness.comfy_runtime import pack_module

    label = pack_module("runtime.control_inputs").node_label

    class Hidden:
        unique_id = "12"
        prompt = {"12": {"class_type": "XCtrl_ApplyControlNeXt", "_meta": {"title": "Apply ControlNeXt (XCtrl)"}}}

    assert label("Apply ControlNeXt (XCtrl)", Hidden()) == "Apply ControlNeXt (XCtrl) (node #12)"
    assert label("Apply ControlNeXt (XCtrl)", None) == "Apply ControlNeXt (XCtrl)"

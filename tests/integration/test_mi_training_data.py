"""MIControlNet's training data and measurement nodes (nodes/mi_training_nodes.py) inside a real
ComfyUI: through the executor (list inputs, optional masks, text outputs), as the dataset step of
Train ControlNeXt, and the errors users see."""
import pytest
import torch

from harness import tiny_models as tm
from harness.comfy_runtime import node_result, pack_module, pack_node_classes, run_prompt

IDS = ("XCtrl_SilentSignalBalance", "XCtrl_SilentTotalVariation", "XCtrl_CycleConsistency")


@pytest.fixture(scope="module")
def nodes(pack):
    classes = pack_node_classes()
    assert all(i in classes for i in IDS)
    return classes


def test_balance_and_measures_through_the_executor(nodes):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 2, "color": 0xFF8000}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 2, "color": 0xFFFFFF}},
        "3": {"class_type": "XCtrl_SilentSignalBalance", "inputs": {
            "images": ["1", 0], "conditions": ["2", 0], "keep_rate": 0.5, "variants": 2, "seed": 4, "segmenter": "grid",
            "segments": 2, "silent_value": 0.0}},
        "4": {"class_type": "InvertMask", "inputs": {"mask": ["3", 2]}},
        "5": {"class_type": "XCtrl_SilentTotalVariation", "inputs": {
            "image": ["3", 0], "condition": ["3", 1], "threshold": 0.04, "radius": 0, "silent_mask": ["4", 0]}},
        "6": {"class_type": "XCtrl_CycleConsistency", "inputs": {
            "image": ["3", 0], "condition": ["3", 1], "threshold": 0.04, "radius": 0, "low_threshold": 100,
            "high_threshold": 200}},
    }
    ex = run_prompt(prompt)
    assert ex.success, ex.status_messages
    tv = ex.history_result["outputs"]["5"]["text"][0]
    cycle = ex.history_result["outputs"]["6"]["text"][0]
    assert tv.startswith("total variation in the silent region: 0.000000 (mean over 4 image(s))")  # one flat colour
    # a flat image has no edges: every kept (white) condition pixel differs by 1 from the extracted black
    assert cycle.startswith("cycle consistency L1 outside the silent region: ")
    assert all(line.split(": ")[1].startswith(("1.000000", "0.000000")) for line in cycle.splitlines()[1:])


def test_balanced_pairs_train_a_controlnext(nodes, tmp_path):
    """The dataset step in front of Train ControlNeXt: its images become the latents, its conditions the images."""
    import folder_paths

    folder_paths.add_model_folder_path("controlnet", str(tmp_path), is_default=True)
    try:
        g = torch.Generator().manual_seed(0)
        images, conds = torch.rand(2, 64, 64, 3, generator=g), torch.rand(2, 64, 64, 3, generator=g)
        masks = torch.zeros(2, 64, 64)
        masks[:, :, 32:] = 1.0
        out_images, out_conds, kept = node_result(nodes["XCtrl_SilentSignalBalance"], [images], [conds], [0.5], [2],
                                                  [1], ["colour_clusters"], [6], [0.0], masks=[masks])
        assert out_images.shape == (4, 64, 64, 3) and torch.equal(out_images[::2], images)
        assert kept.shape == (4, 64, 64)
        base = tm.sd15(seed=3)
        latents = {"samples": torch.randn(out_images.shape[0], 4, 8, 8, generator=g)}  # stands for VAE Encode
        result = pack_module("runtime.training").train(base, latents, out_conds, tm.text_cond(base), 1, name="balanced",
                                                           empty_prompt_rate=0.0)
        assert len(result.losses) == 1
    finally:
        folder_paths.folder_names_and_paths["controlnet"][0].remove(str(tmp_path))


def test_masks_of_another_size_fail_before_anything_runs(nodes):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 2, "color": 0}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}},
        "3": {"class_type": "XCtrl_SilentSignalBalance", "inputs": {
            "images": ["1", 0], "conditions": ["1", 0], "keep_rate": 0.5, "variants": 1, "seed": 0,
            "segmenter": "grid", "segments": 2, "silent_value": 0.0, "masks": ["2", 0]}},
        "4": {"class_type": "XCtrl_SilentTotalVariation", "inputs": {
            "image": ["3", 0], "condition": ["3", 1], "threshold": 0.04, "radius": 0}},
    }
    ex = run_prompt(prompt)
    assert not ex.success
    errors = [d for kind, d in ex.status_messages if kind == "execution_error"]
    msg = errors[0]["exception_message"]
    assert "Silent Signal Balance (XCtrl)" in msg and "masks are 32x32 px" in msg and "resize them to 64x48" in msg

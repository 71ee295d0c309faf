"""Shared by the training and Asym integration tests: where training writes, tiny training data, stock
ControlNet files."""
import contextlib
import os

import pytest
import torch

from . import tiny_models as tm


@contextlib.contextmanager
def default_controlnet_folder(path):
    """``path`` as models/controlnet's first (default) folder, where training writes, for the block."""
    import folder_paths

    folder_paths.add_model_folder_path("controlnet", path, is_default=True)
    try:
        yield path
    finally:
        folder_paths.folder_names_and_paths["controlnet"][0].remove(path)


def tiny_training_data(base, latents=2):
    """(MODEL, latents (8 x 8), condition images (64 x 64), positive, empty conditioning)."""
    g = torch.Generator().manual_seed(0)
    return (base, {"samples": torch.randn(latents, 4, 8, 8, generator=g)}, torch.rand(latents, 64, 64, 3, generator=g),
            tm.text_cond(base), tm.text_cond(base, seed=9))


def tiny_data_fixture(build_base, latents=2):
    """A module fixture ``setup``: tiny_training_data of the MODEL build_base() makes once the pack is loaded."""
    @pytest.fixture(scope="module")
    def setup(pack):
        return tiny_training_data(build_base(), latents)
    return setup


def run_training(trainer, setup, name, steps=2, **kw):
    """``trainer.train`` (a runtime module) on the tiny data, batch 2, half the prompts empty, seed 1 unless given."""
    base, latents, images, pos, empty = setup
    kw.setdefault("empty_prompt_rate", 0.5)
    kw.setdefault("empty_conditioning", empty)
    return trainer.train(base, latents, images, pos, steps, batch_size=2, name=name, seed=kw.pop("seed", 1), **kw)


def random_controlnet_file(folder, name, config, seed, zero_outputs=False, zeroed=()):
    """A stock ControlNet of ``config`` with random weights, saved as ComfyUI's layout; ``zero_outputs``:
    every output convolution zero; ``zeroed``: the layers of these name prefixes zero."""
    import comfy.cldm.cldm
    import comfy.ops
    from safetensors.torch import save_file

    cfg = {k: v for k, v in config.items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                                     device="cpu", **cfg)
    tm.init_weights(net, seed)
    sd = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    zeroed = ("zero_convs.", "middle_block_out.") if zero_outputs else tuple(zeroed)
    if zeroed:
        sd = {k: (torch.zeros_like(v) if k.startswith(zeroed) else v) for k, v in sd.items()}
    save_file(sd, os.path.join(folder, name))
    return sd

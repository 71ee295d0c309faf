"""Shared by the ControlNeXt integration tests: tiny module files and node calls."""
import os

import torch
from safetensors.torch import save_file

from .comfy_runtime import node_result
from .random_weights import random_layout

LAYOUTS = {
    "sd15": "controlnext_sd15_released.json",
    "sdxl": "controlnext_sdxl.json",
    "sd15_training": "controlnext_sd15_training.json",
    "svd_v1": "controlnext_svd_v1.json",
    "svd_v2": "controlnext_svd_v2.json",
}
# Channels at the injection point of the tiny models: SD1.5 middle block 64, SDXL conv_in 32.
TINY_OUT = {"sd15": 64, "sdxl": 32}


def controlnext_sd(variant, out_channels=None, seed=0, dtype=torch.float32):
    """Random tensors with the released layout; the last conv resized to ``out_channels``."""
    resize = {"mid_convs.1.": out_channels} if out_channels else None
    return random_layout(LAYOUTS[variant], seed, dtype, resize=resize)


def write(controlnet_dir, name, sd):
    """Saves into ``controlnet_dir`` under a "cnx_" name (other test modules register their own
    controlnet folders in the same process: folder_paths returns the first file of a name)."""
    name = "cnx_" + name
    path = os.path.join(controlnet_dir, name)
    if name.endswith(".safetensors"):
        save_file(sd, path)
    else:
        torch.save(sd, path)
    return name


def load(nodes_mod, name, unet="none"):
    return node_result(nodes_mod.LoadControlNeXt, name, unet)[0]


def apply(nodes_mod, model, cnx, image, strength=1.0, start=0.0, end=1.0, mask=None, unet_strength=1.0, sd15_layout="refuse"):
    return node_result(nodes_mod.ApplyControlNeXt, model, cnx, image, strength, start, end, mask, unet_strength, sd15_layout)[0]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()

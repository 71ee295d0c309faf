"""All node modules of the pack, in menu order. Node IDs start with ``XCtrl_`` so they never collide
with ComfyUI core, comfyui_controlnet_aux or ComfyUI-Advanced-ControlNet (a test checks it)."""
from ..runtime.comfyui_support import log_version_notice

log_version_notice()  # before any node module imports ComfyUI APIs an old release may lack

from . import (control_strength_nodes, controlnet_xs_nodes, controlnext_nodes, mi_nodes,  # noqa: E402
               mi_training_nodes, model_patch_nodes, preprocessor_nodes, training_nodes, unet_weights_nodes)

NODES = [
    *controlnext_nodes.NODES,
    *preprocessor_nodes.NODES,
    *mi_nodes.NODES,
    *controlnet_xs_nodes.NODES,
    *unet_weights_nodes.NODES,
    *control_strength_nodes.NODES,
    *training_nodes.NODES,
    *model_patch_nodes.NODES,
    *mi_training_nodes.NODES,
]

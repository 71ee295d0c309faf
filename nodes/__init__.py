"""All node modules of the pack. Node IDs start with ``XCtrl_`` so they never collide with
ComfyUI core, comfyui_controlnet_aux or ComfyUI-Advanced-ControlNet (a test checks it)."""
from ..runtime.comfyui_support import log_version_notice
from .registry import collect

log_version_notice()  # before any node module imports ComfyUI APIs an old release may lack

NODE_MODULES = (
    "controlnext_nodes",
    "preprocessor_nodes",
    "mi_nodes",
    "controlnet_xs_nodes",
    "unet_weights_nodes",
    "control_strength_nodes",
    "training_nodes",
)

NODES, DISABLED = collect(__name__, NODE_MODULES)

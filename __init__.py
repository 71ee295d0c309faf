"""XCtrl: ControlNeXt, ControlNet-XS and MIControlNet for ComfyUI.

ComfyUI imports this package from custom_nodes/ and reads NODE_CLASS_MAPPINGS.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

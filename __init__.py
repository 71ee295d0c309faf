"""XCtrl: ControlNeXt, ControlNet-XS and MIControlNet for ComfyUI.

ComfyUI imports this package from custom_nodes/ and calls ``comfy_entrypoint`` (the V3 node
API): the extension lists every node class of ``nodes/``.
"""
from comfy_api.latest import ComfyExtension

from .nodes import NODES


class XCtrlExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint():
    return XCtrlExtension()

"""A test-only ComfyUI custom node package: one route that reports ComfyUI's loaded models, so a
test can watch a real server's model management across prompts. Linked into test servers'
custom_nodes only (never shipped with the pack)."""
from aiohttp import web

import comfy.model_management as mm
import server


@server.PromptServer.instance.routes.get("/xctrl_probe/loaded_models")
async def loaded_models(request):
    models = []
    for loaded in mm.current_loaded_models:
        real = loaded.real_model() if callable(loaded.real_model) else loaded.real_model
        models.append({"model": type(real).__name__, "dead": bool(loaded.is_dead())})
    return web.json_response({"models": models})


NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

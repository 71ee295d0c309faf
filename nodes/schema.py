"""The one way an XCtrl node declares itself: its id, display name and category, its class
docstring as the description the frontend shows, and the words the node search also finds it by
(runtime/node_search.py, where ComfyUI has the field)."""
from comfy_api.latest import io

from ..runtime.node_search import search_aliases


def node_schema(node_class, node_id, display_name, category, **fields):
    if "description" not in fields:
        fields["description"] = " ".join(node_class.__doc__.split())
    return io.Schema(node_id=node_id, display_name=display_name, category=category, **search_aliases(node_id),
                     **fields)

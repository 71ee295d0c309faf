"""Other words a user types to find a node in ComfyUI's node search: the methods' paper and
repository names and their spellings. The schema field (``search_aliases``) exists from ComfyUI
0.9-ish on; an older ComfyUI's frontend searches node id and display name only, and gets
nothing here (its schema would refuse the field)."""
import dataclasses

from comfy_api.latest import io

_MI = ("MIControlNet", "MI ControlNet", "minimal impact", "minimal impact controlnet", "balance controlnets",
       "multiple controlnets", "multi controlnet")
_CONTROLNEXT = ("ControlNeXt", "Control NeXt", "controlnext", "ControlAny", "controlnet next")
_XS = ("ControlNet-XS", "ControlNet XS", "controlnetxs", "CNXS", "controlnet small")

ALIASES = {
    "XCtrl_MIBalancedControl": _MI,
    "XCtrl_MILambdaStats": _MI,
    "XCtrl_TrainControlNetMI": _MI + ("train controlnet", "controlnet training"),
    "XCtrl_ControlNetAsymmetry": _MI + ("Asym", "Jacobian asymmetry", "conservativity", "controlnet asymmetry"),
    "XCtrl_ControlNeXtAsymmetry": _CONTROLNEXT + ("Asym", "Jacobian asymmetry", "conservativity"),
    "XCtrl_LoadControlNeXt": _CONTROLNEXT + ("load controlnet",),
    "XCtrl_ApplyControlNeXt": _CONTROLNEXT + ("apply controlnet",),
    "XCtrl_ApplyControlNeXtConditioning": _CONTROLNEXT + ("apply controlnet",),
    "XCtrl_ControlNeXtSVDLongVideo": _CONTROLNEXT + ("svd long video", "context windows"),
    "XCtrl_LoadControlNetXS": _XS + ("load controlnet",),
    "XCtrl_ApplyControlNetXS": _XS + ("apply controlnet",),
    "XCtrl_ApplyControlNetXSConditioning": _XS + ("apply controlnet",),
}


def schema_has_aliases():
    return "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}


def search_aliases(node_id):
    """``{"search_aliases": [...]}`` for ``io.Schema(**...)`` where this ComfyUI has the field."""
    words = ALIASES.get(node_id)
    return {"search_aliases": list(words)} if words and schema_has_aliases() else {}

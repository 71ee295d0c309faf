"""MIControlNet from the nodes' inputs to a balanced MODEL and conditioning, and the lambda report
(glue; the formulas: models/mi_balance.py; the balanced control and its injection: mi.py; the
model-patch controls of Z-Image / Qwen-Image: model_patch_control.py; Qwen-Image's ControlNets
with them: qwen_control.py)."""
import logging

from ..models import mi_balance as mb
from . import model_patch_control as mpc
from . import qwen_control as qc
from .control_inputs import require_finite
from .mi import CHANNEL_DIM, NODE, QWEN, SUPPORTED, Balance, BalancedControl, apply_balance, architecture, format_stats
from .model_family import family_title, model_family

LOG = logging.getLogger("xctrl.mi")
MODES, GRANULARITIES, DEFAULT_CAP = mb.MODES, mb.GRANULARITIES, mb.DEFAULT_CAP  # the nodes' choices


def balance_conditioning(model, positive, negative, mode, granularity, cap, patches_node, node=NODE):
    """MI Balanced Control: (MODEL, positive, negative) with the conditionings' stock ControlNets
    balanced (on Qwen-Image together with the MODEL's DiffSynth control patches); unchanged for
    mode "sum" or without any ControlNet. ``node``: how errors name it (control_inputs.node_label)."""
    require_finite(node, cap=cap)
    if mode == "sum":
        return model, positive, negative
    arch = supported_architecture(model, patches_node)
    patches = qc.check_mix(model, node) if arch == QWEN else 0
    balance = Balance(mode, granularity, cap, CHANNEL_DIM[arch])
    balance.node = node
    patched, pos, neg, found = apply_balance(model, positive, negative, balance)
    if not found and patches:
        raise ValueError(f"{node}: no ControlNet is applied to positive or negative, and this Qwen-Image MODEL's "
                         f"controls are model patches: use '{patches_node}' on the MODEL instead (or apply a ControlNet).")
    if not found:
        LOG.warning("[XCtrl] MI Balanced Control: no ControlNet is applied to positive or negative; nothing to balance")
        return model, positive, negative
    if all(len(c.members) + patches < 2 for c in balanced_controls(pos + neg)):
        LOG.info("[XCtrl] MI Balanced Control: one ControlNet only: there is nothing to combine (that needs two); its "
                 "injection is still balanced against the model's features (the paper's add_inj, Eq. 10). Mode 'sum' "
                 "leaves it as stock ComfyUI adds it.")
    return patched, pos, neg


def supported_architecture(model, patches_node):
    """The MODEL's architecture for MI Balanced Control, or a ValueError naming the node to use instead."""
    arch = architecture(model)
    if arch is None and mpc.model_kind(model) is not None:
        raise ValueError(
            f"MI Balanced Control balances ControlNets carried by the conditioning; this "
            f"{mpc.MODEL_TITLES[mpc.model_kind(model)]} MODEL's controls are model patches: use "
            f"'{patches_node}' on the MODEL instead."
        )
    if arch is None:
        raise ValueError(
            f"MI Balanced Control supports {SUPPORTED} models; this MODEL is {family_title(model_family(model))}. "
            "Use it with one of those, or leave the ControlNets summed (no MI node)."
        )
    return arch


def balance_model_patches(model, mode, granularity, cap, node):
    """MI Balanced Model Patches: the MODEL with its Z-Image / Qwen-Image control patches balanced."""
    require_finite(node, cap=cap)
    return mpc.balance_model_patches(model, mode, granularity, cap, node)


def balanced_controls(conditioning):
    return list(dict.fromkeys(opts["control"] for _, opts in conditioning if isinstance(opts.get("control"), BalancedControl)))


def lambda_stats_text(positive, model=None):
    """MI Lambda Stats: the last step's mean weights of every balance in the conditioning (and on the MODEL)."""
    balances = [c.balance for c in balanced_controls(positive)]
    balances += [p.balance for p in mpc.balanced_patches(model)] if model is not None else []
    lines = [format_stats(balance.last_stats, balance) for balance in dict.fromkeys(balances)]
    return "\n".join(lines) or "No MI Balanced Control in this conditioning."

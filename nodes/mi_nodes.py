"""MIControlNet nodes: balanced combination and injection of the ControlNets already applied
to a conditioning by ComfyUI's own "Apply ControlNet" nodes (see mi_runtime for how)."""
import logging

from ..models import mi_balance as mb
from .mi_runtime import CHANNEL_DIM, Balance, BalancedControl, apply_balance, architecture, format_stats
from .model_family import family_title, model_family

LOG = logging.getLogger("xctrl.mi")
CATEGORY = "XCtrl/MIControlNet"

MODE_TOOLTIP = (
    "paper: the paper's formulas as printed (Eqs. 10, 12): in the combination a silent (zero) control is "
    "ignored and the larger residual favoured; at injection a control weak relative to the UNet feature is damped "
    "and a strong one amplified (up to cap). min_norm: the min-norm (MGDA) reading, weights swapped, which behaves "
    "the opposite way; 3+ controls are combined order-independently. sum: plain addition, stock ComfyUI bit for "
    "bit (the node passes everything through unchanged). The paper does not settle which of paper/min_norm its "
    "authors ran."
)


class MIBalancedControl:
    DESCRIPTION = (
        "MIControlNet (Minimal Impact ControlNet): balances stacked ControlNets. Put it after your Apply ControlNet "
        "nodes (a ControlNet applied after it is added plainly) and connect its MODEL, positive and negative to the "
        "sampler. Each ControlNet keeps its own strength and "
        "start/end (one outside its range drops out); their residuals are combined per layer in the order they were "
        "applied (add_com), and injected into the denoiser with a balanced weight (add_inj) instead of ComfyUI's plain "
        "addition. Works with SD1.5/SD2.x/SDXL ControlNets and SD3/SD3.5 ControlNets, and with other model patches "
        "such as FreeU (which then sees the features with the control injected, as usual). The mean weight per layer "
        "of the last step is logged after sampling (see also 'MI Lambda Stats')."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "positive": ("CONDITIONING", {"tooltip": "Conditioning with ControlNets applied (Apply ControlNet)."}),
                "negative": ("CONDITIONING",),
                "mode": (list(mb.MODES), {"default": "paper", "tooltip": MODE_TOOLTIP}),
                "granularity": (list(mb.GRANULARITIES), {"default": "layer", "tooltip": (
                    "layer: one weight per layer and image (the paper). pixel: one weight per spatial position "
                    "(token on SD3), so silent and active regions of a control are balanced separately.")}),
                "cap": ("FLOAT", {"default": mb.DEFAULT_CAP, "min": 0.0, "max": 1000.0, "step": 0.5, "tooltip": (
                    "Largest injection weight lambda (the paper uses 20). 1 = a control is never added more strongly than by plain addition.")}),
            }
        }

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, positive, negative, mode, granularity, cap):
        if mode == "sum":
            return (model, positive, negative)
        arch = architecture(model)
        if arch is None:
            raise ValueError(
                f"MI Balanced Control supports SD1.5 / SD2.x / SDXL (UNet) and SD3 / SD3.5 (MMDiT) models; this MODEL "
                f"is {family_title(model_family(model))}."
            )
        balance = Balance(mode, granularity, cap, CHANNEL_DIM[arch])
        patched, pos, neg, found = apply_balance(model, positive, negative, balance)
        if not found:
            LOG.warning("[XCtrl] MI Balanced Control: no ControlNet is applied to positive or negative; nothing to balance")
            return (model, positive, negative)
        return (patched, pos, neg)


class MILambdaStats:
    DESCRIPTION = (
        "Shows what MI Balanced Control did in the last sampling step: the mean injection weight lambda per layer "
        "(cond / uncond rows; 1 = plain addition, < 1 damped, > 1 amplified). Connect the positive conditioning that "
        "went to the sampler and the sampler's LATENT output (so it runs after sampling)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"positive": ("CONDITIONING",), "samples": ("LATENT",)}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("stats",)
    FUNCTION = "stats"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def stats(self, positive, samples):
        lines = []
        for balance in dict.fromkeys(opts["control"].balance for _, opts in positive
                                     if isinstance(opts.get("control"), BalancedControl)):
            lines.append(format_stats(balance.last_stats, balance))
        text = "\n".join(lines) or "No MI Balanced Control in this conditioning."
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {
    "XCtrl_MIBalancedControl": MIBalancedControl,
    "XCtrl_MILambdaStats": MILambdaStats,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "XCtrl_MIBalancedControl": "MI Balanced Control (XCtrl)",
    "XCtrl_MILambdaStats": "MI Lambda Stats (XCtrl)",
}

"""MIControlNet nodes: balanced combination and injection of the ControlNets already applied
to a conditioning by ComfyUI's own "Apply ControlNet" nodes (see mi_runtime for how)."""
from comfy_api.latest import io

from ..runtime import mi_apply
from ..runtime.control_inputs import node_label
from ..runtime.mi_apply import DEFAULT_CAP, GRANULARITIES, MODES
from .apply_inputs import NODE_REFERENCE
from .schema import node_schema

CATEGORY = "XCtrl/MIControlNet"

MODE_TOOLTIP = (
    "paper: the paper's formulas as printed (Eqs. 10, 12): in the combination a silent (zero) control is "
    "ignored and the larger residual favoured; at injection a control weak relative to the UNet feature is damped "
    "and a strong one amplified (up to cap). min_norm: the min-norm (MGDA) reading, weights swapped, which behaves "
    "the opposite way; 3+ controls are combined order-independently. sum: plain addition, stock ComfyUI bit for "
    "bit (the node passes everything through unchanged). The paper does not settle which of paper/min_norm its "
    "authors ran."
)


def balance_inputs(granularity_tip, cap_note=""):
    """mode, granularity, cap: how the MI nodes balance (the granularity's units differ per family)."""
    return [
        io.Combo.Input("mode", options=list(MODES), default="paper", tooltip=MODE_TOOLTIP),
        io.Combo.Input("granularity", options=list(GRANULARITIES), default="layer", tooltip=(
            granularity_tip + ", so silent and active regions of a control are balanced separately.")),
        io.Float.Input("cap", default=DEFAULT_CAP, min=0.0, max=1000.0, step=0.5,
                       tooltip="Largest injection weight lambda (the paper uses 20)." + cap_note),
    ]


class MIBalancedControl(io.ComfyNode):
    """MIControlNet (Minimal Impact ControlNet): balances stacked ControlNets. Put it after your Apply ControlNet
    nodes (a ControlNet applied after it is added plainly) and connect its MODEL, positive and negative to the
    sampler. Each ControlNet keeps its own strength and start/end (one outside its range drops out); their
    residuals are combined per layer in the order they were applied (add_com), and injected into the denoiser
    with a balanced weight (add_inj) instead of ComfyUI's plain addition. Works with SD1.5/SD2.x/SDXL,
    SD3/SD3.5, Flux and Qwen-Image (InstantX, 2512 Fun) ControlNets (Union ones too: each Apply ControlNet
    with its own type is one control); on Qwen-Image the MODEL's DiffSynth control patches are balanced
    together with them. It works with other model patches such as FreeU (which then sees the features with the
    control injected, as usual). The mean weight per layer of the last step is logged after sampling (see also
    'MI Lambda Stats')."""

    TITLE = "MI Balanced Control (XCtrl)"

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_MIBalancedControl", cls.TITLE, CATEGORY, hidden=NODE_REFERENCE, inputs=[
            io.Model.Input("model"),
            io.Conditioning.Input("positive", tooltip="Conditioning with ControlNets applied (Apply ControlNet)."),
            io.Conditioning.Input("negative"),
            *balance_inputs("layer: one weight per layer and image (the paper). pixel: one weight per spatial "
                            "position (token on SD3)", " 1 = a control is never added more strongly than by plain "
                            "addition."),
        ], outputs=[io.Model.Output(display_name="model"), io.Conditioning.Output(display_name="positive"),
            io.Conditioning.Output(display_name="negative")])

    @classmethod
    def execute(cls, model, positive, negative, mode, granularity, cap):
        return io.NodeOutput(*mi_apply.balance_conditioning(model, positive, negative, mode, granularity, cap,
                                                            MIBalancedModelPatches.TITLE, node_label(cls.TITLE, cls.hidden)))


class MIBalancedModelPatches(io.ComfyNode):
    """MIControlNet for the controls ComfyUI applies as model patches: Z-Image Fun ControlNet (Union) and
    Qwen-Image DiffSynth ControlNets (Apply Z-Image Fun ControlNet / Apply Qwen Image DiffSynth ControlNet, or
    XCtrl's versions of them). Put it after two or more of those on one MODEL: at each point where they
    inject, their residuals (each times its own strength) are combined (add_com) and injected with a balanced
    weight (add_inj) instead of being added one after the other. Cond and uncond rows get their own weights.
    sum: core's plain addition, bit for bit."""

    TITLE = "MI Balanced Model Patches (XCtrl)"

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_MIBalancedModelPatches", cls.TITLE, CATEGORY, inputs=[
            io.Model.Input("model", tooltip="A Z-Image or Qwen-Image MODEL with two or more control patches applied."),
            *balance_inputs("layer: one weight per injection point and image (the paper). pixel: one weight per "
                            "image token"),
        ], outputs=[io.Model.Output(display_name="model")])

    @classmethod
    def execute(cls, model, mode, granularity, cap):
        return io.NodeOutput(mi_apply.balance_model_patches(model, mode, granularity, cap, cls.TITLE))


class MILambdaStats(io.ComfyNode):
    """Shows what MI Balanced Control did in the last sampling step: the mean injection weight lambda per layer
    (cond / uncond rows; 1 = plain addition, < 1 damped, > 1 amplified). Connect the positive conditioning
    that went to the sampler and the sampler's LATENT output (so it runs after sampling)."""

    @classmethod
    def define_schema(cls):
        return node_schema(
            cls, "XCtrl_MILambdaStats", "MI Lambda Stats (XCtrl)", CATEGORY,
            inputs=[io.Conditioning.Input("positive"), io.Latent.Input("samples"),
                    io.Model.Input("model", optional=True, tooltip=(
                        "The MODEL from MI Balanced Model Patches (Z-Image / Qwen-Image controls), to show its weights too."))],
            outputs=[io.String.Output(display_name="stats")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, positive, samples, model=None):
        text = mi_apply.lambda_stats_text(positive, model)
        return io.NodeOutput(text, ui={"text": [text]})


NODES = [MIBalancedControl, MIBalancedModelPatches, MILambdaStats]

"""ControlNet-XS nodes: load a control network (both released formats), apply it to a MODEL.

The apply node patches the MODEL: the control stream must run inside the UNet forward, in
lock-step with the base encoder (see controlnet_xs_runtime), and cond and uncond both get the
control, like a stock ControlNet (uncond_multiplier changes that). Chaining several apply nodes
stacks several controls.
"""
from comfy_api.latest import io

from ..runtime import controlnet_xs_apply as apply
from ..runtime.control_inputs import ControlInputs, node_label
from ..runtime.weight_files import file_list
from .apply_inputs import NODE_REFERENCE, ApplyNode, conditioning_inputs, conditioning_outputs, ControlNetXSType, control_inputs
from .schema import node_schema

CATEGORY = "XCtrl/ControlNet-XS"

class XSApplyNode(ApplyNode):
    """The ControlNet-XS Apply nodes' validation: the step range and the connection_weights text."""

    @classmethod
    def validate_inputs(cls, start_percent, end_percent, connection_weights=None):
        return apply.check_widgets(start_percent, end_percent, connection_weights, cls.NODE)


class LoadControlNetXS(io.ComfyNode):
    """Loads a ControlNet-XS control network (SD1.5, SD2.1, SDXL) from models/controlnet: the authors' .ckpt /
    .safetensors (CVL-Heidelberg/ControlNet-XS) or a diffusers ControlNetXSAdapter file. The architecture is
    read from the file."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_LoadControlNetXS", "Load ControlNet-XS (XCtrl)", CATEGORY, inputs=[
            io.Combo.Input("control_file", options=file_list("controlnet"), tooltip="A ControlNet-XS file, e.g. sdxl_encD_canny_48m.safetensors or a diffusers diffusion_pytorch_model.safetensors (renamed)."),
        ], outputs=[ControlNetXSType.Output(display_name="controlnet_xs")])

    @classmethod
    def execute(cls, control_file):
        return io.NodeOutput(apply.load(control_file))


def _weight_inputs():
    return [
        io.Float.Input("connection_base_multiplier", optional=True, default=1.0, min=0.0, max=2.0, step=0.01,
                       tooltip="Soft weights: the middle connection gets 1, each connection one block further from it "
                               "this times the next deeper one's (encoder i: m^(n-i), decoder j: m^(j+1)). 1 = the authors'."),
        io.String.Input("connection_weights", optional=True, default="",
                        tooltip="Explicit weight per control -> base connection, comma separated, in connection order: "
                                "encoder 0..n-1 (after input block i), the middle, decoder 0..n-1 (before output block j); "
                                "2n+1 values (25 for SD1.5/SD2.1, 19 for SDXL) or 1. Overrides the base multiplier."),
    ]


class ApplyControlNetXS(XSApplyNode):
    """Applies ControlNet-XS to a MODEL: the control network runs in lock-step with the UNet encoder on every
    sampler step in [start, end], for positive and negative alike. Connect the patched MODEL to any sampler;
    chain several apply nodes to stack controls."""

    NODE = "Apply ControlNet-XS (XCtrl)"

    @classmethod
    def define_schema(cls):
        return cls.model_schema(
            "XCtrl_ApplyControlNetXS", CATEGORY, ControlNetXSType.Input("controlnet_xs"), "canny edges, depth, ...",
            "Scales every control -> base connection (the authors' conditioning scale). 0 leaves the model untouched.",
            _weight_inputs())

    @classmethod
    def execute(cls, model, controlnet_xs, image, strength, start_percent, end_percent, mask=None,
                connection_base_multiplier=1.0, connection_weights="", schedule=None, latent_strengths=None,
                uncond_multiplier=1.0, resize_mode="crop"):
        inputs = ControlInputs(node_label(cls.NODE, cls.hidden), image, strength, start_percent, end_percent, mask,
                               schedule, latent_strengths, uncond_multiplier, resize_mode,
                               connection_base_multiplier=connection_base_multiplier)
        return io.NodeOutput(apply.apply_to_model(model, controlnet_xs, inputs, connection_base_multiplier=connection_base_multiplier,
                                                  connection_weights=connection_weights))


class ApplyControlNetXSConditioning(XSApplyNode):
    """ControlNet-XS carried by conditioning, like ComfyUI's Apply ControlNet: only the prompts (and areas) that
    pass through here get the control; others get none. The MODEL input only tells which base the control
    network must fit and where it loads (it is not patched)."""

    NODE = "Apply ControlNet-XS to Conditioning (XCtrl)"

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_ApplyControlNetXSConditioning", cls.NODE, CATEGORY, hidden=NODE_REFERENCE, inputs=[
            *conditioning_inputs(),
            ControlNetXSType.Input("controlnet_xs"),
            *control_inputs("canny edges, depth, ...", "As Apply ControlNet-XS's strength.", method_inputs=_weight_inputs()),
        ], outputs=conditioning_outputs())

    @classmethod
    def execute(cls, positive, negative, model, controlnet_xs, image, strength, start_percent, end_percent, mask=None,
                connection_base_multiplier=1.0, connection_weights="", schedule=None, latent_strengths=None,
                uncond_multiplier=1.0, resize_mode="crop"):
        inputs = ControlInputs(node_label(cls.NODE, cls.hidden), image, strength, start_percent, end_percent, mask,
                               schedule, latent_strengths, uncond_multiplier, resize_mode,
                               connection_base_multiplier=connection_base_multiplier)
        return io.NodeOutput(*apply.apply_to_conditioning(positive, negative, model, controlnet_xs, inputs,
                                                          connection_base_multiplier=connection_base_multiplier,
                                                          connection_weights=connection_weights))


NODES = [LoadControlNetXS, ApplyControlNetXS, ApplyControlNetXSConditioning]

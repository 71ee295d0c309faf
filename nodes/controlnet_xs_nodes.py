"""ControlNet-XS nodes: load a control network (both released formats), apply it to a MODEL.

The apply node patches the MODEL: the control stream must run inside the UNet forward, in
lock-step with the base encoder (see controlnet_xs_runtime), and cond and uncond both get the
control, like a stock ControlNet (uncond_multiplier changes that). Chaining several apply nodes
stacks several controls.
"""
import logging

from comfy_api.latest import io

from ..models import controlnet_xs_keys as xs_keys
from ..models.control_schedule import ScheduleError, parse_strength_list
from ..models.controlnet_xs import connection_weights as weights_of_connections
from ..models.checkpoint_io import WeightFileError
from ..models.families import family_of_context_width
from ..runtime import batch_rows
from .apply_inputs import (check_step_range, image_input, mask_batch, mask_input, require_finite, require_step_range,
                           resize_mode_input, step_range_inputs)
from ..runtime.conditioning_control import ConditioningControl, with_control
from .control_strength_nodes import strength_inputs, strengths_from
from ..runtime.control_runner import control_patcher
from ..runtime.controlnet_xs import ControlNetXSRunner, build_control_net
from ..runtime.model_family import family_title, model_family, model_signature
from ..runtime.weight_files import file_list, read, wrong_file

LOG = logging.getLogger("xctrl")
CATEGORY = "XCtrl/ControlNet-XS"
CONTROLNET_XS = "XCTRL_CONTROLNET_XS"
ControlNetXSType = io.Custom(CONTROLNET_XS)

class LoadedControlNetXS:
    """A ControlNet-XS file built into a control network managed by ComfyUI."""

    def __init__(self, name, state_dict):
        self.name = name
        try:
            self.format = xs_keys.detect_format(state_dict)
        except xs_keys.ControlNetXSFormatError:
            raise wrong_file(name, state_dict, "a ControlNet-XS model", where="choose a ControlNet-XS file "
                             "(CVL-Heidelberg/ControlNet-XS, or a diffusers ControlNetXSAdapter)") from None
        try:
            config = xs_keys.read_config(state_dict)
            self.net, self.config = build_control_net(state_dict, config.num_params)
        except WeightFileError as e:  # ControlNetXSFormatError is one
            raise WeightFileError(f"{name}: {e}") from e
        self.description = xs_keys.describe(self.config)
        self._patchers = {}

    def patcher_for(self, model):
        """The control network managed on the MODEL's load/offload devices (one per device pair)."""
        key = (str(model.load_device), str(model.offload_device))
        if key not in self._patchers:
            self._patchers[key] = control_patcher(self.net, model)
        return self._patchers[key]

    def check_base(self, model):
        """Raises, naming both, unless the MODEL is a UNet this control network was made for."""
        cfg = self.config
        family = model_family(model)
        title = family_title(family)
        made_for = _made_for(cfg)
        if family not in _families(cfg):
            raise WeightFileError(
                f"{self.name} is a {self.description}, made for {made_for}, but the MODEL is {title}: "
                f"use a ControlNet-XS made for {title}, or an {made_for} model."
            )
        unet = model.model.model_config.unet_config
        widths = tuple(unet["model_channels"] * m for m in unet["channel_mult"])
        want = {
            "text context width": (cfg.context_dim, unet.get("context_dim")),
            "UNet channel widths": (cfg.base_channels, widths),
            "latent channels": (cfg.in_channels, unet.get("in_channels")),
            "timestep embedding width": (cfg.model_channels, unet["model_channels"]),
            "UNet input blocks": (cfg.num_input_blocks, len(model.model.diffusion_model.input_blocks)),
        }
        for what, (xs, base) in want.items():
            if xs != base:
                raise WeightFileError(
                    f"{self.name} ({self.description}, made for {made_for}) does not fit this {title} MODEL: "
                    f"its {what} is {xs}, the model's {base}. Use the ControlNet-XS made for this base model."
                )


def _families(cfg):
    """model_family names of the bases a control network fits."""
    if cfg.family == xs_keys.SDXL:
        return ("sdxl",)
    known = family_of_context_width(cfg.context_dim)
    return (known,) if known in ("sd15", "sd21") else ("sd15", "sd21")


def _made_for(cfg):
    return " or ".join(family_title(f) for f in _families(cfg))


class LoadControlNetXS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XCtrl_LoadControlNetXS",
            display_name="Load ControlNet-XS (XCtrl)",
            category=CATEGORY,
            description=(
                "Loads a ControlNet-XS control network (SD1.5, SD2.1, SDXL) from models/controlnet: the authors' "
                ".ckpt / .safetensors (CVL-Heidelberg/ControlNet-XS) or a diffusers ControlNetXSAdapter file. "
                "The architecture is read from the file."
            ),
            inputs=[
                io.Combo.Input("control_file", options=file_list("controlnet"), tooltip="A ControlNet-XS file, e.g. sdxl_encD_canny_48m.safetensors or a diffusers diffusion_pytorch_model.safetensors (renamed)."),
            ],
            outputs=[ControlNetXSType.Output(display_name="controlnet_xs")],
        )

    @classmethod
    def execute(cls, control_file):
        loaded = LoadedControlNetXS(control_file, read(control_file, "controlnet"))
        LOG.info("[XCtrl] %s: %s (%s format)", control_file, loaded.description, loaded.format)
        return io.NodeOutput(loaded)


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


def _runner(model, controlnet_xs, image, strength, start_percent, end_percent, mask, connection_base_multiplier,
            connection_weights, schedule, latent_strengths, uncond_multiplier, node, resize_mode="crop"):
    require_step_range(start_percent, end_percent, node)
    require_finite(node, image=image, mask=mask, strength=strength, uncond_multiplier=uncond_multiplier, connection_base_multiplier=connection_base_multiplier)
    controlnet_xs.check_base(model)
    hint = batch_rows.image_to_nchw(image)
    strengths = strengths_from(schedule, latent_strengths, uncond_multiplier, node)
    patcher = controlnet_xs.patcher_for(model)
    explicit = parse_strength_list(connection_weights, node) if connection_weights.strip() else None
    try:
        weights = weights_of_connections(patcher.model.num_input_blocks, connection_base_multiplier, explicit)
    except ValueError as e:
        raise ScheduleError(f"{node}: {e}") from None
    runner = ControlNetXSRunner(patcher, hint, strength, start_percent, end_percent, mask_batch(mask), strengths, weights)
    runner.NODE = node  # the node its errors name
    runner.fit_mode = resize_mode
    return runner


class ApplyControlNetXS(io.ComfyNode):
    NODE = "Apply ControlNet-XS (XCtrl)"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XCtrl_ApplyControlNetXS",
            display_name=cls.NODE,
            category=CATEGORY,
            description=(
                "Applies ControlNet-XS to a MODEL: the control network runs in lock-step with the UNet encoder on every "
                "sampler step in [start, end], for positive and negative alike. Connect the patched MODEL to any sampler; "
                "chain several apply nodes to stack controls."
            ),
            inputs=[
                io.Model.Input("model"),
                ControlNetXSType.Input("controlnet_xs"),
                image_input("canny edges, depth, ..."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01, tooltip="Scales every control -> base connection (the authors' conditioning scale). 0 leaves the model untouched."),
                *step_range_inputs(),
                mask_input(),
                *_weight_inputs(),
                *strength_inputs(),
                resize_mode_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent):
        return check_step_range(start_percent, end_percent)

    @classmethod
    def execute(cls, model, controlnet_xs, image, strength, start_percent, end_percent, mask=None,
                connection_base_multiplier=1.0, connection_weights="", schedule=None, latent_strengths=None,
                uncond_multiplier=1.0, resize_mode="crop"):
        runner = _runner(model, controlnet_xs, image, strength, start_percent, end_percent, mask, connection_base_multiplier,
                         connection_weights, schedule, latent_strengths, uncond_multiplier, cls.NODE, resize_mode)
        patched = model.clone()
        runner.install(patched)
        return io.NodeOutput(patched)


class ApplyControlNetXSConditioning(io.ComfyNode):
    NODE = "Apply ControlNet-XS to Conditioning (XCtrl)"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XCtrl_ApplyControlNetXSConditioning",
            display_name=cls.NODE,
            category=CATEGORY,
            description=(
                "ControlNet-XS carried by conditioning, like ComfyUI's Apply ControlNet: only the prompts (and areas) that "
                "pass through here get the control; others get none. The MODEL input only tells which base the control "
                "network must fit and where it loads (it is not patched)."
            ),
            inputs=[
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Model.Input("model", tooltip="The MODEL these conditionings will be sampled with (read only)."),
                ControlNetXSType.Input("controlnet_xs"),
                image_input("canny edges, depth, ..."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01, tooltip="As Apply ControlNet-XS's strength."),
                *step_range_inputs(),
                mask_input(),
                *_weight_inputs(),
                *strength_inputs(),
                resize_mode_input(),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent):
        return check_step_range(start_percent, end_percent)

    @classmethod
    def execute(cls, positive, negative, model, controlnet_xs, image, strength, start_percent, end_percent, mask=None,
                connection_base_multiplier=1.0, connection_weights="", schedule=None, latent_strengths=None,
                uncond_multiplier=1.0, resize_mode="crop"):
        runner = _runner(model, controlnet_xs, image, strength, start_percent, end_percent, mask, connection_base_multiplier,
                         connection_weights, schedule, latent_strengths, uncond_multiplier, cls.NODE, resize_mode)
        return io.NodeOutput(*with_control(positive, negative, ConditioningControl(runner, model_signature(model.model))))


NODES = [LoadControlNetXS, ApplyControlNetXS, ApplyControlNetXSConditioning]

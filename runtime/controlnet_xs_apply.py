"""ControlNet-XS from a file to a patched MODEL or conditioning: the loaded control network, the
bases it fits (and the messages when it does not), the connection weights, and the runner the
Apply nodes install. The control stream in sampling: controlnet_xs.py."""
import logging

from ..models import controlnet_xs_keys as xs_keys
from ..models.checkpoint_io import WeightFileError
from ..models.control_schedule import ScheduleError, parse_strength_list
from ..models.controlnet_xs import connection_weights as weights_of_connections
from ..models.families import family_of_context_width
from .conditioning_control import attach
from .control_inputs import check_latent_strength_list, check_step_range
from .control_runner import control_patcher
from .controlnet_xs import ControlNetXSRunner, build_control_net
from .model_family import family_title, model_family
from .weight_files import read, wrong_file

LOG = logging.getLogger("xctrl")


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
        bases = made_for(cfg)
        if family not in families(cfg):
            raise WeightFileError(
                f"{self.name} is a {self.description}, made for {bases}, but the MODEL is {title}: "
                f"use a ControlNet-XS made for {title}, or an {bases} model."
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
                    f"{self.name} ({self.description}, made for {bases}) does not fit this {title} MODEL: "
                    f"its {what} is {xs}, the model's {base}. Use the ControlNet-XS made for this base model."
                )


def families(cfg):
    """model_family names of the bases a control network fits."""
    if cfg.family == xs_keys.SDXL:
        return ("sdxl",)
    known = family_of_context_width(cfg.context_dim)
    return (known,) if known in ("sd15", "sd21") else ("sd15", "sd21")


def made_for(cfg):
    return " or ".join(family_title(f) for f in families(cfg))


def load(control_file):
    """Load ControlNet-XS: the file from models/controlnet, either released format."""
    loaded = LoadedControlNetXS(control_file, read(control_file, "controlnet"))
    LOG.info("[XCtrl] %s: %s (%s format)", control_file, loaded.description, loaded.format)
    return loaded


def check_widgets(start_percent, end_percent, connection_weights, node):
    """The Apply nodes' validate_inputs: the step range and whether connection_weights reads as
    numbers (its count depends on the network, checked when the node runs)."""
    checked = check_step_range(start_percent, end_percent)
    if checked is True and connection_weights is not None and connection_weights.strip():
        checked = check_latent_strength_list(connection_weights, f"{node}: connection_weights")
    return checked


def make_runner(model, controlnet_xs, inputs, connection_base_multiplier=1.0, connection_weights=""):
    """The runner of one Apply node (inputs: control_inputs.ControlInputs), checked against the MODEL."""
    controlnet_xs.check_base(model)
    patcher = controlnet_xs.patcher_for(model)
    explicit = parse_strength_list(connection_weights, inputs.node) if connection_weights.strip() else None
    try:
        weights = weights_of_connections(patcher.model.num_input_blocks, connection_base_multiplier, explicit)
    except ValueError as e:
        raise ScheduleError(f"{inputs.node}: {e}") from None
    runner = ControlNetXSRunner(patcher, inputs.hint, inputs.strength, inputs.start_percent, inputs.end_percent,
                                inputs.mask, inputs.strengths, weights)
    return inputs.configure(runner)


def apply_to_model(model, controlnet_xs, inputs, **weights):
    """Apply ControlNet-XS: a clone of the MODEL with the control stream."""
    runner = make_runner(model, controlnet_xs, inputs, **weights)
    patched = model.clone()
    runner.install(patched)
    return patched


def apply_to_conditioning(positive, negative, model, controlnet_xs, inputs, **weights):
    """Apply ControlNet-XS to Conditioning: the control carried by these conditionings only."""
    return attach(positive, negative, model, make_runner(model, controlnet_xs, inputs, **weights))

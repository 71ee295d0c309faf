"""Train ControlNeXt (XCtrl), Train ControlNet (MIControlNet) (XCtrl), ControlNeXt Jacobian Asymmetry (XCtrl)
and ControlNet Jacobian Asymmetry (XCtrl): the nodes. What they do is runtime/training.py,
runtime/controlnet_training.py (docs/training.md) and runtime/asymmetry.py (docs/conservativity.md)."""
from comfy_api.latest import io

from ..runtime import asymmetry, controlnet_training, training
from .apply_inputs import ControlNeXtType
from .schema import node_schema

CATEGORY = "XCtrl/ControlNeXt"
MI_CATEGORY = "XCtrl/MIControlNet"


def data_inputs(model_tooltip, images_tooltip, steps):
    """The training data inputs, the same on both training nodes."""
    return [
        io.Model.Input("model", tooltip=model_tooltip),
        io.Latent.Input("latents", tooltip="Training images, VAE-encoded (one latent per image)."),
        io.Image.Input("images", tooltip=images_tooltip),
        io.Conditioning.Input("positive", tooltip="The captions: one conditioning for all, or one per latent."),
        io.Int.Input("steps", default=steps, min=1, max=1000000),
    ]


def stage_inputs(optional):
    """The conservativity stage's inputs, the same on both training nodes."""
    return [
        io.Float.Input("conservativity_weight", default=0.0, min=0.0, max=100.0, step=0.001, optional=optional,
                       tooltip="MIControlNet's second stage: weight of the conservativity loss (the asymmetry of the "
                       "Jacobian the control adds; the paper: 0.01). 0: no second stage. Costs several passes per "
                       "step (docs/training.md)."),
        io.Int.Input("conservativity_probes", default=1, min=1, max=64, optional=optional,
                     tooltip="Random probes per sample for the loss's estimate (each: two vector-Jacobian products)."),
        io.Int.Input("conservativity_from_step", default=0, min=0, max=1000000, optional=optional,
                     tooltip="The stage boundary: steps after this many steps add the loss (stage 1 before)."),
        io.Combo.Input("conservativity_probe", options=list(training.PROBES), default="rademacher", optional=optional,
                       tooltip="The probes' distribution: rademacher (+-1, lower variance) or gaussian."),
    ]


def trained_outputs(control_output):
    return [control_output, io.Image.Output(display_name="loss_curve"), io.String.Output(display_name="saved")]


def trained(control, loss_curve, saved):
    return io.NodeOutput(control, loss_curve, saved, ui={"text": [saved]})


class TrainControlNeXt(io.ComfyNode):
    """Trains a ControlNeXt for a new condition with the authors' recipe: the whole control module (lr 1e-4) and
    the UNet weights matching the pattern (lr 1e-5), epsilon-prediction loss at uniform timesteps, a share of
    empty prompts. SD1.5 (the SD1.5-Training placement) and SDXL. Saves controlnet.safetensors and the UNet
    differences (unet_weight_increasements.safetensors) into models/controlnet/<name>/, plus a checkpoint to
    resume from; the output control works directly with Apply ControlNeXt. Optional second stage:
    MIControlNet's conservativity loss on the control's part of the Jacobian."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_TrainControlNeXt", training.NODE, CATEGORY, inputs=[
            *data_inputs("SD1.5 or SDXL base (not changed: what is learned leaves as the control).",
                         "The condition image of each training image, in the same order.", 500),
            io.Int.Input("batch_size", default=1, min=1, max=256),
            io.Int.Input("gradient_accumulation", default=1, min=1, max=1024),
            io.Float.Input("lr_module", default=training.LR_MODULE, min=0.0, max=1.0, step=1e-6),
            io.Float.Input("lr_unet", default=training.LR_UNET, min=0.0, max=1.0, step=1e-7),
            io.String.Input("unet_pattern", default="auto", tooltip="Regular expression of the UNet parameters to train "
                            "(ComfyUI names). auto: the authors' default (SDXL .*attn2.*to_out.*, SD1.5 .*to_out.*); "
                            "empty: the control module only."),
            io.Float.Input("scale", default=1.0, min=0.0, max=10.0, step=0.01, tooltip="The control's scale in training."),
            io.Int.Input("seed", default=0, min=0, max=2**63 - 1),
            io.Float.Input("empty_prompt_rate", default=0.2, min=0.0, max=1.0, step=0.01),
            io.Conditioning.Input("empty_conditioning", optional=True, tooltip="CLIP Text Encode of an empty text (needed "
                                  "for empty_prompt_rate > 0)."),
            io.Boolean.Input("gradient_checkpointing", default=False),
            io.Combo.Input("training_dtype", options=list(training.DTYPES), default="float32",
                           tooltip="Autocast dtype of the forward (trained weights stay float32)."),
            io.String.Input("name", default="my_controlnext", tooltip="Folder under models/controlnet for the files."),
            io.Int.Input("checkpoint_every", default=100, min=0, max=1000000, tooltip="Steps between checkpoints (0: none)."),
            io.Boolean.Input("resume", default=True, tooltip="Continue from the folder's checkpoint when there is one."),
            ControlNeXtType.Input("controlnext", optional=True, tooltip="A ControlNeXt to continue training (SDXL layout)."),
            io.Boolean.Input("overwrite", default=False, optional=True, tooltip="Replace an earlier run saved under this "
                             "name (otherwise such a run is only ever continued, with resume on and the same settings)."),
            *stage_inputs(optional=True),
        ], outputs=trained_outputs(ControlNeXtType.Output(display_name="controlnext")),
            is_output_node=True,
            is_input_list=True)

    @classmethod
    def execute(cls, model, latents, images, positive, steps, **options):
        return trained(*training.train_from_node(model, latents, images, positive, steps, **options))


def asymmetry_inputs():
    """The measurement's inputs after model and control, the same on both Asym nodes."""
    return [
        io.Image.Input("image", tooltip="The condition image (one, or one per latent)."),
        io.Latent.Input("latents", tooltip="Clean latents (e.g. VAE-encoded images); noised to the timestep here."),
        io.Conditioning.Input("positive"),
        io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01),
        io.Int.Input("timestep", default=500, min=0, max=999, tooltip="Discrete timestep (0: clean, 999: pure noise)."),
        io.Int.Input("probes", default=8, min=1, max=1024, tooltip="Probes per latent: the estimate's spread falls "
                     "as 1/sqrt(probes)."),
        io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip="Noise and probes."),
        io.Combo.Input("probe", options=list(asymmetry.PROBES), default="rademacher"),
    ]


def asymmetry_outputs():
    return [io.Float.Output(display_name="asym"), io.Float.Output(display_name="relative"),
            io.String.Output(display_name="report")]


def measured(result):
    return io.NodeOutput(result.mean, result.relative, result.report(), ui={"text": [result.report()]})


class ControlNeXtAsymmetry(io.ComfyNode):
    """MIControlNet's Asym: how far the part of the denoiser's Jacobian that this ControlNeXt adds is from
    symmetric, 1/2 ||J_c - J_c^T||_F^2, estimated with random probes (no full Jacobian) on the latents noised
    to one timestep. Lower: the control bends the score field less away from a gradient field. SD1.5 and SDXL."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_ControlNeXtAsymmetry", asymmetry.NODE, CATEGORY, inputs=[
            io.Model.Input("model"),
            ControlNeXtType.Input("controlnext"),
            *asymmetry_inputs(),
            io.Combo.Input("sd15_layout", options=["refuse", "sd15_training"], default="refuse", optional=True,
                           tooltip="As in Apply ControlNeXt: an SDXL-layout module on SD1.5 only as sd15_training."),
        ], outputs=asymmetry_outputs(),
            is_output_node=True)

    @classmethod
    def execute(cls, model, controlnext, image, latents, positive, strength, timestep, probes, seed, probe,
                sd15_layout="refuse"):
        return measured(asymmetry.measure(model, controlnext, image, latents, positive, strength, timestep, probes, seed,
                                          probe, sd15_layout))


class ControlNetAsymmetry(io.ComfyNode):
    """MIControlNet's Asym for an ordinary ControlNet (Load ControlNet Model; SD1.5 / SDXL): how far the part of
    the denoiser's Jacobian that its residuals add is from symmetric, 1/2 ||J_c - J_c^T||_F^2, estimated with random
    probes (no full Jacobian) on the latents noised to one timestep. The same measure as ControlNeXt Jacobian
    Asymmetry; compare a ControlNet before and after Train ControlNet (MIControlNet)'s conservativity stage."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_ControlNetAsymmetry", asymmetry.CONTROLNET_NODE, MI_CATEGORY, inputs=[
            io.Model.Input("model", tooltip="The SD1.5 or SDXL MODEL the ControlNet is made for."),
            io.ControlNet.Input("control_net", tooltip="A stock UNet ControlNet from Load ControlNet Model (not a "
                                "T2I-Adapter, Control-LoRA or DiT ControlNet)."),
            *asymmetry_inputs(),
        ], outputs=asymmetry_outputs(),
            is_output_node=True)

    @classmethod
    def execute(cls, model, control_net, image, latents, positive, strength, timestep, probes, seed, probe):
        return measured(asymmetry.measure_controlnet(model, control_net, image, latents, positive, strength, timestep,
                                                     probes, seed, probe))


class TrainControlNetMI(io.ComfyNode):
    """Trains an ordinary ComfyUI ControlNet (SD1.5, SDXL) the MIControlNet way: from a copy of the MODEL's UNet
    encoder or a ControlNet file, with its residuals injected balanced (the paper's add_inj) or plainly, on your
    (balanced) data, and an optional conservativity stage. The MODEL stays frozen. Saves
    models/controlnet/<name>/controlnet.safetensors, which Load ControlNet reads, plus a checkpoint to resume."""

    @classmethod
    def define_schema(cls):
        cn = controlnet_training
        return node_schema(cls, "XCtrl_TrainControlNetMI", cn.NODE, MI_CATEGORY, inputs=[
            *data_inputs("SD1.5 or SDXL base (frozen; the ControlNet is made for it).", "The condition image of each "
                         "training image, in the same order (e.g. from Silent Signal Balance).", 1000),
            io.Combo.Input("start", options=cn.start_options(), default=cn.FROM_UNET,
                           tooltip="from_unet: a new ControlNet, the MODEL's encoder copied, zero convolutions zero. "
                           "A file: fine-tune that ControlNet (it must be made for this MODEL's family)."),
            io.Combo.Input("injection", options=list(cn.INJECTIONS), default="plain",
                           tooltip="How the residuals join the UNet in training. balanced: MIControlNet's add_inj "
                           "(Eq. 10, as the paper trains; cannot start from zero convolutions: docs/training.md); "
                           "balanced_min_norm: the min-norm reading; plain: ComfyUI's addition."),
            io.Int.Input("batch_size", default=1, min=1, max=256),
            io.Int.Input("gradient_accumulation", default=1, min=1, max=1024),
            io.Float.Input("lr", default=cn.LR, min=0.0, max=1.0, step=1e-7),
            io.Float.Input("scale", default=1.0, min=0.0, max=10.0, step=0.01, tooltip="The ControlNet's strength in training."),
            io.Int.Input("seed", default=0, min=0, max=2**63 - 1),
            io.Float.Input("empty_prompt_rate", default=0.5, min=0.0, max=1.0, step=0.01,
                           tooltip="Share of steps with the empty prompt (the ControlNet authors: 0.5)."),
            io.Conditioning.Input("empty_conditioning", optional=True, tooltip="CLIP Text Encode of an empty text "
                                  "(needed for empty_prompt_rate > 0)."),
            io.Boolean.Input("gradient_checkpointing", default=False),
            io.Combo.Input("training_dtype", options=list(training.DTYPES), default="float32"),
            io.String.Input("name", default="my_controlnet", tooltip="Folder under models/controlnet for the files."),
            io.Int.Input("checkpoint_every", default=100, min=0, max=1000000, tooltip="Steps between checkpoints (0: none)."),
            io.Boolean.Input("resume", default=True, tooltip="Continue from the folder's checkpoint when there is one."),
            io.Boolean.Input("overwrite", default=False, tooltip="Replace an earlier run saved under this name."),
            *stage_inputs(optional=False),
        ], outputs=trained_outputs(io.ControlNet.Output(display_name="control_net")),
            is_output_node=True,
            is_input_list=True)

    @classmethod
    def execute(cls, model, latents, images, positive, steps, **options):
        return trained(*controlnet_training.train_from_node(model, latents, images, positive, steps, **options))


NODES = [TrainControlNeXt, TrainControlNetMI, ControlNeXtAsymmetry, ControlNetAsymmetry]

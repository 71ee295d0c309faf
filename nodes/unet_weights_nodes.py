"""Fine-tuned UNet files: as weight patches on a base model, or (diffusers-named SVD) as the model.

ControlNeXt-SVD v2 ships its fine-tuned UNet in diffusers naming
(``unet/diffusion_pytorch_model.safetensors``); a community conversion to ComfyUI names
(``controlnext-svd_v2-unet-fp16_converted.safetensors``) loads with ComfyUI's stock
"Load Diffusion Model" node. ComfyUI's own diffusers detection does not cover SVD UNets, so
the diffusers file needs XCtrl_LoadSVDUNet (as the model itself) or XCtrl_ApplyUNetWeights
(as weight patches on a loaded SVD model).
"""
from comfy_api.latest import io

from ..runtime.unet_patches import DTYPES, UNET_FOLDERS, apply_unet_file, load_svd_unet
from ..runtime.weight_files import file_list
from .schema import node_schema

CATEGORY = "XCtrl/UNet"


class ApplyUNetWeights(io.ComfyNode):
    """Applies a full or partial fine-tuned UNet file to a MODEL as weight patches (W_file - W_model), so LoRAs
    stack on top in any order and strength blends between the base (0) and the file's weights (1). Diffusers
    or ComfyUI key names; SD1.5, SD2.x, SDXL and SVD (e.g. the ControlNeXt-SVD v2 fine-tuned UNet on a base
    SVD model). Keeps float32 differences in RAM (4 bytes per changed parameter): for a full UNet, loading it
    as the model itself (XCtrl Load SVD UNet, or Load Diffusion Model for ComfyUI-key files) is lighter."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_ApplyUNetWeights", "Apply UNet Weights (XCtrl)", CATEGORY, inputs=[
            io.Model.Input("model"),
            io.Combo.Input("unet_file", options=file_list(*UNET_FOLDERS), tooltip="UNet weights from models/diffusion_models (or models/unet): .safetensors or .bin, diffusers or ComfyUI key names, complete or partial."),
            io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="1 = the file's weights, 0 = the base model's, 0.5 = halfway."),
        ], outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, unet_file, strength):
        return io.NodeOutput(apply_unet_file(model, unet_file, strength))


class LoadSVDUNet(io.ComfyNode):
    """Loads a Stable Video Diffusion UNet saved by diffusers (UNetSpatioTemporalConditionModel, e.g. the
    ControlNeXt-SVD v2 unet/diffusion_pytorch_model.safetensors or .bin), which ComfyUI's Load Diffusion Model
    node does not recognise, as a MODEL. ComfyUI-key SVD files (e.g. controlnext-svd_v2-unet-fp16_converted)
    load here too, or with the stock Load Diffusion Model node."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_LoadSVDUNet", "Load SVD UNet, diffusers or ComfyUI keys (XCtrl)", CATEGORY, inputs=[
            io.Combo.Input("unet_file", options=file_list(*UNET_FOLDERS), tooltip="A complete SVD UNet from models/diffusion_models (or models/unet), diffusers or ComfyUI key names."),
            io.Combo.Input("weight_dtype", options=list(DTYPES), default="default", tooltip="default: ComfyUI's choice for this device."),
        ], outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, unet_file, weight_dtype="default"):
        return io.NodeOutput(load_svd_unet(unet_file, weight_dtype))


NODES = [ApplyUNetWeights, LoadSVDUNet]

"""Listing and reading weight files through ComfyUI's folder_paths, with errors users can act on."""
import folder_paths

from ..models.checkpoint_io import WeightFileError, load_state_dict
from ..models.file_kinds import describe_state_dict, kind_of

NONE = "none"


def file_list(*folders):
    names = []
    for folder in folders:
        try:
            names += [n for n in folder_paths.get_filename_list(folder) if n not in names]
        except KeyError:  # folder type unknown to this ComfyUI
            pass
    return sorted(names)


def full_path(name, *folders):
    for folder in folders:
        try:
            path = folder_paths.get_full_path(folder, name)
        except KeyError:
            path = None
        if path:
            return path
    where = " or ".join(f"ComfyUI/models/{f}" for f in folders)
    raise FileNotFoundError(f"{name} was not found in {where}. Fix: download it there (see the XCtrl README), "
                            "then refresh the page.")


def read(name, *folders):
    return load_state_dict(full_path(name, *folders))


def metadata_of(name, *folders):
    """The metadata of a .safetensors file ({} for other files or none)."""
    path = full_path(name, *folders)
    if not path.lower().endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable files fail in read() with the real message
        return {}


# The node that loads each kind of file (models/file_kinds.KINDS), for errors on a wrong file.
LOADER = {
    "controlnext_sd15": "Load ControlNeXt (XCtrl)",
    "controlnext_sdxl_family": "Load ControlNeXt (XCtrl)",
    "controlnext_svd_v1": "Load ControlNeXt (XCtrl)",
    "controlnext_unet_weights": "the unet_weights input of Load ControlNeXt (XCtrl)",
    "controlnet_xs_vislearn": "Load ControlNet-XS (XCtrl)",
    "controlnet_xs_diffusers": "Load ControlNet-XS (XCtrl)",
    "controlnet": "ComfyUI's Load ControlNet Model (then Apply ControlNet)",
    "t2i_adapter": "ComfyUI's Load ControlNet Model (T2I-Adapters load there too)",
    "lora": "ComfyUI's Load LoRA",
    "checkpoint": "ComfyUI's Load Checkpoint",
    "unet": "ComfyUI's Load Diffusion Model (a diffusers-named SVD UNet: Load SVD UNet (XCtrl); as weight "
            "patches on a loaded model: Apply UNet Weights (XCtrl))",
}
_OTHER_FIX = {
    "controlnet_xs_diffusers_legacy": "save it again with diffusers 0.28 or newer, or use the authors' release "
                                      "(CVL-Heidelberg/ControlNet-XS)",
}


def wrong_file(name, sd, expected, reason=None, where=None):
    """The WeightFileError for a file of the wrong kind: what it is, and the node that loads it
    (or, for a file of no known kind, ``where`` the right files come from)."""
    kind = kind_of(sd)
    fix = f"load it with {LOADER[kind]}" if kind in LOADER else _OTHER_FIX.get(kind, where or f"choose {expected} file")
    detail = f" ({reason})" if reason else ""
    return WeightFileError(f"{name} is not {expected}: it is {describe_state_dict(sd)}{detail}. Fix: {fix}.")

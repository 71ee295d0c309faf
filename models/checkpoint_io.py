"""Reading weight files safely: safetensors, or pickle without executing code.

Pure torch; the ComfyUI glue passes paths it got from folder_paths.
"""
import os
import zipfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class WeightFileError(ValueError):
    """A weight file that cannot be read or is not what the node expects."""


def load_state_dict(path, nested_keys=("state_dict", "module", "model")):
    """Returns {name: tensor} on the CPU from a .safetensors or pickle file.

    Pickle files are read with ``weights_only=True`` (no code runs). A checkpoint that
    nests its weights under ``state_dict`` (Lightning ``.ckpt``) is unwrapped.
    """
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"{name}: file not found at {path}")
    if os.path.getsize(path) == 0:
        raise WeightFileError(f"{name} is empty (0 bytes): the download was interrupted; download it again.")
    if path.lower().endswith(".safetensors") or path.lower().endswith(".sft"):
        try:
            sd = load_file(path, device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise WeightFileError(
                f"{name} is not a readable safetensors file ({e}); it is probably truncated or corrupt: download it again."
            ) from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle_errors()) as e:
            raise WeightFileError(
                f"{name} could not be read as a PyTorch checkpoint without executing code ({type(e).__name__}: {e}). "
                "It may be truncated or corrupt (download it again), or a pickle that needs code to load, which is refused."
            ) from e
    for key in nested_keys:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict) and _tensor_dict(sd[key]):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not _tensor_dict(sd):
        raise WeightFileError(f"{name} holds no tensors: it is not a weight file.")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def pickle_errors():
    import pickle

    return (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, AttributeError, TypeError, KeyError)


def _tensor_dict(d):
    return any(isinstance(v, torch.Tensor) for v in d.values())


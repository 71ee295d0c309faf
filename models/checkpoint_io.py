"""Reading weight files safely: safetensors, or pickle without executing code.

Pure torch; the ComfyUI glue passes paths it got from folder_paths.
"""
import os
import pickle
import re
import zipfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

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
        sd = load_pickle(path)
    for key in nested_keys:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict) and _tensor_dict(sd[key]):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not _tensor_dict(sd):
        raise WeightFileError(f"{name} holds no tensors: it is not a weight file.")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_pickle(path):
    """The object in a PyTorch pickle file, read with ``weights_only=True`` (no code runs); every
    failure is a WeightFileError saying what is wrong with the file."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"{name}: file not found at {path}")
    if os.path.getsize(path) == 0:
        raise WeightFileError(f"{name} is empty (0 bytes): it was cut off while being written or downloaded.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        objects = refused_objects(str(e))
        if objects is None:
            raise WeightFileError(f"{name} is not a readable PyTorch checkpoint: it is probably truncated or "
                                  "corrupt: download it again.") from e
        raise WeightFileError(
            f"{name} was not loaded: besides tensors it contains Python objects ({objects}) that XCtrl refuses "
            "to unpickle, because unpickling them can run code from the file. Get a safe copy instead: the "
            ".safetensors release of the same weights where there is one, or convert this file on a machine you "
            "trust (load it there and save its tensors with safetensors.torch.save_file)."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, AttributeError, TypeError, KeyError) as e:
        raise WeightFileError(f"{name} is not a readable PyTorch checkpoint ({type(e).__name__}): it is probably "
                              "truncated or corrupt: download it again.") from e


# PyTorch's weights-only unpickler names each object it refuses: "Unsupported global: GLOBAL
# module.name" or "unsupported GLOBAL module.name".
_REFUSED_GLOBAL = re.compile(r"unsupported\s+global:?\s+(?:GLOBAL\s+)?([A-Za-z_][\w.]*)", re.IGNORECASE)


def refused_objects(message):
    """The Python objects a weights-only load refused (from PyTorch's message), or None when the
    load failed for another reason (a damaged file)."""
    found = sorted(set(_REFUSED_GLOBAL.findall(message)))
    return ", ".join(found) if found else None


def _tensor_dict(d):
    return any(isinstance(v, torch.Tensor) for v in d.values())


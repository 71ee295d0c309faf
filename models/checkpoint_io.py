"""Reading weight files safely: safetensors, or pickle without executing code; the mode a new
file gets.

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
    """A weight file that cannot be read or is not what the node expects. ``problem``: the message
    without its fix, for callers that name a fix of their own."""

    def __init__(self, message, problem=None):
        super().__init__(message)
        self.problem = problem or message


def file_error(name, problem, fix):
    """Every weight-file error in one style: "<file> <what is wrong>. Fix: <what to do>."."""
    return WeightFileError(f"{name} {problem}. Fix: {fix}.", problem=f"{name} {problem}")


def check_present(path):
    """A file that is missing or empty (0 bytes) is refused with the same words for every reader."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise file_error(name, f"was not found at {path}", "choose a file that exists, then refresh the page")
    if os.path.getsize(path) == 0:
        raise file_error(name, "is empty (0 bytes): it was cut off while being downloaded or written",
                         "download or save it again")


def _unreadable(name, what, detail):
    return file_error(name, f"is not a readable {what} ({detail}): it is truncated or corrupt", "download it again")


def load_state_dict(path, nested_keys=("state_dict", "module", "model")):
    """Returns {name: tensor} on the CPU from a .safetensors or pickle file.

    Pickle files are read with ``weights_only=True`` (no code runs). A checkpoint that
    nests its weights under ``state_dict`` (Lightning ``.ckpt``) is unwrapped.
    """
    name = os.path.basename(path)
    check_present(path)
    if path.lower().endswith(".safetensors") or path.lower().endswith(".sft"):
        try:
            sd = load_file(path, device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise _unreadable(name, "safetensors file", e) from e
    else:
        sd = load_pickle(path)
    for key in nested_keys:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict) and _tensor_dict(sd[key]):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not _tensor_dict(sd):
        raise file_error(name, "holds no tensors: it is not a weight file",
                         "choose a weight file (.safetensors, .pt, .pth, .bin or .ckpt)")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_pickle(path):
    """The object in a PyTorch pickle file, read with ``weights_only=True`` (no code runs); every
    failure is a WeightFileError saying what is wrong with the file."""
    name = os.path.basename(path)
    check_present(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        objects = refused_objects(str(e))
        if objects is None:
            raise _unreadable(name, "PyTorch checkpoint", "UnpicklingError") from e
        raise file_error(
            name, f"was not loaded: besides tensors it contains Python objects ({objects}) that XCtrl refuses "
            "to unpickle, because unpickling them can run code from the file",
            "get a safe copy: the .safetensors release of the same weights where there is one, or convert this "
            "file on a machine you trust (load it there and save its tensors with safetensors.torch.save_file)"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, AttributeError, TypeError, KeyError) as e:
        raise _unreadable(name, "PyTorch checkpoint", type(e).__name__) from e


# PyTorch's weights-only unpickler names each object it refuses: "Unsupported global: GLOBAL
# module.name" or "unsupported GLOBAL module.name".
_REFUSED_GLOBAL = re.compile(r"unsupported\s+global:?\s+(?:GLOBAL\s+)?([A-Za-z_][\w.]*)", re.IGNORECASE)


def refused_objects(message):
    """The Python objects a weights-only load refused (from PyTorch's message), or None when the
    load failed for another reason (a damaged file)."""
    found = sorted(set(_REFUSED_GLOBAL.findall(message)))
    return ", ".join(found) if found else None


def process_umask():
    """The process's umask, read without changing it (setting it to read it back races with other
    threads creating files): Linux's /proc/self/status, else the mode of a scratch folder created
    with 0777, else 022."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "probe")
            os.mkdir(path, 0o777)
            return 0o777 & ~os.stat(path).st_mode
    except OSError:
        return 0o022


def new_file_mode():
    """The mode a plain open() gives a new file (0666 less the umask), for files written through
    a temporary file (created 0600) and renamed."""
    return 0o666 & ~process_umask()


def _tensor_dict(d):
    return any(isinstance(v, torch.Tensor) for v in d.values())


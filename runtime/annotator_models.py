"""Preprocessor weights inside ComfyUI: the `annotators` model folder, download on first use,
and the loaded networks kept between runs.

- Folder: `annotators` = ComfyUI/models/annotators, registered in folder_paths (the key is
  added only if missing, else the default folder is appended), so `annotators:` entries of
  extra_model_paths.yaml are searched too. Downloads go to the first folder of the list.
- A missing known file is downloaded from its public URL with a ComfyUI progress bar and an
  integrity check (preprocessors/annotator_files.py); never when it is present. Set
  XCTRL_OFFLINE=1 (or HF_HUB_OFFLINE=1) to never try: the error then says where to put the
  file and where to get it.
- Torch networks are wrapped in a ModelPatcher and loaded with comfy.model_management, so
  ComfyUI moves them to its device and unloads them when it needs memory ("Unload models"
  frees them too); they stay cached here between runs (`free_models()` drops them).
"""
import logging
import os
import threading

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths

from ..models.checkpoint_io import WeightFileError, load_state_dict
from ..preprocessors import annotator_files as af

LOG = logging.getLogger("xctrl")
FOLDER = "annotators"
EXTENSIONS = {".pth", ".pt", ".bin", ".safetensors", ".onnx"}

_lock = threading.Lock()
_file_locks = {}
_torch_cache = {}  # file name -> (file key, dtype, ModelPatcher)
_onnx_cache = {}  # (file name, device kind, backend) -> (file key, model)


def register_folder():
    """Adds the `annotators` model folder (ComfyUI/models/annotators) to folder_paths."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
        return
    paths, exts = entry
    if default not in paths:
        paths.append(default)
    if isinstance(exts, set) and exts:  # an empty set means "any extension": keep it so
        exts.update(EXTENSIONS)


register_folder()


def folders():
    return list(folder_paths.get_folder_paths(FOLDER))


def offline():
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in ("XCTRL_OFFLINE", "HF_HUB_OFFLINE"))


def check_files(node_id):
    """True, or (downloads off and files missing) one message naming every missing file of the
    node, where to put it and where to get it: ComfyUI shows the messages of all nodes of a
    prompt together before anything runs, so an offline user learns every file at once."""
    if not offline():
        return True  # missing files are downloaded when the node runs
    needed = [f.name for f in af.KNOWN_FILES.values() if f.used_by == node_id]
    missing = [n for n in needed if not folder_paths.get_full_path(FOLDER, n)]
    if not missing:
        return True
    target = folders()[0]
    return (f"{len(missing)} preprocessor weight file(s) missing and downloads are disabled (XCTRL_OFFLINE / "
            f"HF_HUB_OFFLINE): " + " ".join(af.where_to_get(af.KNOWN_FILES[n], target) for n in missing))


def file_path(name):
    """Full path of a known annotator file, downloading it into the annotators folder if missing."""
    path = folder_paths.get_full_path(FOLDER, name)
    if path:
        return path
    entry = af.KNOWN_FILES[name]
    target = folders()[0]
    if offline():
        raise af.AnnotatorDownloadError(
            f"{name} was not found in the annotators folders ({', '.join(folders())}) and downloads are disabled "
            f"(XCTRL_OFFLINE / HF_HUB_OFFLINE). {af.where_to_get(entry, target)}"
        )
    with _lock:
        file_lock = _file_locks.setdefault(name, threading.Lock())
    with file_lock:
        path = folder_paths.get_full_path(FOLDER, name)
        if path:
            return path
        LOG.info("[XCtrl] downloading %s (%s) from %s to %s", name, entry.approx, entry.url, target)
        bar = comfy.utils.ProgressBar(entry.size or entry.min_size or 1)
        try:
            path = af.download(entry, target, progress=lambda done, total: bar.update_absolute(done, total or None))
        except af.AnnotatorDownloadError as e:
            raise af.AnnotatorDownloadError(f"{e}{_also_missing(name)}") from e
        LOG.info("[XCtrl] %s saved to %s", name, path)
        return path


def _also_missing(name):
    """The other preprocessor files that are missing, so that a user without a network learns them
    all from one failed run, not one failure at a time."""
    others = [f for f in af.KNOWN_FILES.values() if f.name != name and not folder_paths.get_full_path(FOLDER, f.name)]
    if not others:
        return ""
    return (" Other preprocessors' files missing too: " + "; ".join(f"{f.name} ({f.approx}, {f.url})" for f in others)
            + ". Put them in the same folder; with XCTRL_OFFLINE=1 every missing file a prompt needs is named before "
            "it runs.")


def _file_key(path):
    st = os.stat(path)
    return (path, st.st_size, st.st_mtime_ns)


def _fix_hint(name, path):
    entry = af.KNOWN_FILES.get(name)
    source = f" from {entry.url}" if entry else ""
    return f"Delete {path} and run again to download it anew{source}, or replace it by hand."


def device_and_dtype(allow_fp16=True):
    device = mm.get_torch_device()
    dtype = torch.float16 if allow_fp16 and device.type != "cpu" and mm.should_use_fp16(device, prioritize_performance=False) else torch.float32
    return device, dtype


def torch_network(name, build, allow_fp16=True):
    """The network in `name` (built by `build(state_dict)`), loaded on ComfyUI's device."""
    path = file_path(name)
    key = _file_key(path)
    device, dtype = device_and_dtype(allow_fp16)
    cached = _torch_cache.get(name)
    if cached is None or cached[0] != key or cached[1] != dtype:
        try:
            state_dict = load_state_dict(path)
        except WeightFileError as e:
            raise WeightFileError(f"{e} {_fix_hint(name, path)}") from e
        try:
            # torch.nn's default initialisation (overwritten by the file) would draw from the
            # process's random state, which other nodes may rely on: restore it afterwards.
            with torch.random.fork_rng(devices=[]):
                net = build(state_dict)
        except ValueError as e:
            raise WeightFileError(f"{path}: {e} {_fix_hint(name, path)}") from e
        net = net.to(dtype=dtype)
        patcher = comfy.model_patcher.ModelPatcher(net, load_device=device, offload_device=mm.unet_offload_device())
        _torch_cache[name] = (key, dtype, patcher)
        cached = _torch_cache[name]
    patcher = cached[2]
    mm.load_models_gpu([patcher])
    return patcher.model


def onnx_network(name, backend="auto"):
    """An ONNX network (preprocessors.dwpose.OnnxModel) for `name`, cached between runs."""
    from ..preprocessors.dwpose import OnnxModel

    path = file_path(name)
    key = _file_key(path)
    device = mm.get_torch_device()
    cache_key = (name, device.type, backend)
    cached = _onnx_cache.get(cache_key)
    if cached is None or cached[0] != key:
        _onnx_cache[cache_key] = (key, OnnxModel(path, device=str(device), backend=backend))
    return _onnx_cache[cache_key][1]


def free_models():
    """Drops every cached preprocessor network."""
    _torch_cache.clear()
    _onnx_cache.clear()
    mm.soft_empty_cache()

"""Listing and reading weight files through ComfyUI's folder_paths, with errors users can act on."""
import folder_paths

from ..models.checkpoint_io import load_state_dict

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
    raise FileNotFoundError(f"{name} was not found in {where}: download it there (see the XCtrl README) and refresh the page.")


def read(name, *folders):
    return load_state_dict(full_path(name, *folders))

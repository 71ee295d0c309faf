"""Collecting node classes from node modules, each imported on its own.

A node module whose optional third-party dependency is missing is disabled with one
logged reason; the rest of the pack keeps working. A missing module of the pack itself is
a bug and is raised.
"""
import importlib
import logging

LOG = logging.getLogger("xctrl")
NODE_ID_PREFIX = "XCtrl"


def collect(package, module_names):
    """Returns (NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, {module: reason disabled})."""
    classes, names, disabled = {}, {}, {}
    pack_root = package.split(".")[0]
    for name in module_names:
        try:
            mod = importlib.import_module(f".{name}", package)
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if not missing or missing.split(".")[0] == pack_root or missing.startswith(package):
                raise
            disabled[name] = f"optional dependency '{missing}' is not installed (pip install {missing.split('.')[0]})"
            LOG.warning("[XCtrl] %s nodes disabled: %s", name, disabled[name])
            continue
        for node_id, cls in mod.NODE_CLASS_MAPPINGS.items():
            if not node_id.startswith(NODE_ID_PREFIX):
                raise ValueError(f"node id {node_id} in {name} lacks the {NODE_ID_PREFIX} prefix")
            if node_id in classes:
                raise ValueError(f"duplicate node id {node_id} in {name}")
            classes[node_id] = cls
        names.update(getattr(mod, "NODE_DISPLAY_NAME_MAPPINGS", {}))
    return classes, names, disabled

"""Collecting the pack's V3 node classes from its node modules, each imported on its own.

A node module whose optional third-party dependency is missing is disabled with one
logged reason; the rest of the pack keeps working. A missing module of the pack itself is
a bug and is raised. Each node module lists its classes in ``NODES``.
"""
import importlib
import logging

LOG = logging.getLogger("xctrl")
NODE_ID_PREFIX = "XCtrl_"


def collect(package, module_names):
    """Returns (node classes in module order, {module: reason it is disabled})."""
    classes, disabled = [], {}
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
        classes.extend(mod.NODES)
    return classes, disabled

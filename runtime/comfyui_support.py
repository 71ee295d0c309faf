"""The ComfyUI releases the pack is tested on, and the one line an older ComfyUI gets at load.

Behaviour that differs between ComfyUI versions is decided by checking the capability (an
attribute, a hook) where it is used; the version number is read only to tell a user that their
ComfyUI is older than anything the pack was tested with.
"""
import logging
import re

LOG = logging.getLogger("xctrl")

OLDEST_TESTED = "0.3.64"
TESTED = ("0.3.64", "0.8.0", "0.33.0")
# The oldest tested release that has each of core's control kinds (their code is checked by
# capability where used; these only name the release to update to). Error messages, README.md and
# docs/ say it in the words of ``needs_comfyui``.
FIRST_TESTED_WITH = {
    "Z-Image Fun ControlNet": "0.8.0",  # comfy.ldm.lumina.controlnet: not in 0.3.64
    "Qwen-Image DiffSynth ControlNet": "0.3.64",  # in every tested release
    "Qwen-Image 2512 Fun ControlNet": "0.33.0",  # core's Load ControlNet Model of 0.8.0 and 0.3.64 refuses the file
}


def needs_comfyui(control):
    """'Z-Image Fun ControlNets need ComfyUI 0.8.0 or newer' for a key of FIRST_TESTED_WITH."""
    return f"{control}s need ComfyUI {FIRST_TESTED_WITH[control]} or newer"


def version_tuple(version):
    """'0.3.64' -> (0, 3, 64); anything unreadable -> None."""
    parts = re.findall(r"\d+", str(version or ""))[:3]
    return tuple(int(p) for p in parts) + (0,) * (3 - len(parts)) if parts else None


def installed_version():
    """ComfyUI's own version string, or None where it does not say (releases before ~0.3)."""
    try:
        import comfyui_version
    except ImportError:
        return None
    return getattr(comfyui_version, "__version__", None)


def older_than_tested_notice(version):
    """The line to log for a ComfyUI older than the oldest tested release, else None."""
    parsed = version_tuple(version)
    if parsed is not None and parsed >= version_tuple(OLDEST_TESTED):
        return None
    shown = f"ComfyUI {version}" if parsed is not None else "this ComfyUI (it does not report a version)"
    return (f"[XCtrl] {shown} is older than the releases XCtrl is tested on ({', '.join(TESTED)}): "
            "nodes that this ComfyUI can run are loaded, others may fail; update ComfyUI to "
            f"{OLDEST_TESTED} or newer.")


def log_version_notice():
    notice = older_than_tested_notice(installed_version())
    if notice:
        LOG.warning(notice)
    return notice

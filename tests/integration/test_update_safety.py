"""Update safety: loading the pack and running its controls replaces nothing of ComfyUI's.

A pack that reassigns a function or method of ComfyUI (or of torch) breaks when ComfyUI changes
that function, and breaks other packs meanwhile. The probe runs in a fresh process so that its
record of ComfyUI's modules is taken before the pack was ever imported.
"""
import json
import os
import subprocess
import sys

from harness import comfy_runtime

PROBE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "harness", "update_safety_probe.py")


def test_pack_replaces_no_attribute_of_comfyui_or_torch(comfy_root, tmp_path):
    run = subprocess.run([sys.executable, PROBE, comfy_root, str(tmp_path)], capture_output=True, text=True,
                         timeout=1800, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = [line for line in run.stdout.splitlines() if line.startswith("XCTRL_PROBE ")]
    assert run.returncode == 0 and lines, f"probe failed on ComfyUI {comfy_runtime.comfyui_version(comfy_root)}:\n{run.stderr[-4000:]}"
    report = json.loads(lines[-1].split(" ", 1)[1])
    assert report["detects_patching"], "the probe no longer sees a replaced function or method"
    assert report["watched"] > 10000, report["watched"]
    assert report["changed"] == [] and report["removed"] == [], report

"""Test set-up shared by the pure and the integration suites.

The pack is imported under the fixed package name ``xctrl`` without running its
top-level ``__init__`` (which registers ComfyUI nodes): pure tests then import
``xctrl.models...`` with torch alone. Integration tests load the real pack the way
ComfyUI does (see tests/harness/comfy_runtime.py).
"""
import os
import sys
import types

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)  # for `import harness`
SCRIPTS_DIR = os.path.join(PACK_DIR, "scripts")
if SCRIPTS_DIR not in sys.path:
    sys.path.insert(0, SCRIPTS_DIR)  # for `import example_workflows` (the workflow generator)

if "xctrl" not in sys.modules:
    _pkg = types.ModuleType("xctrl")
    _pkg.__path__ = [PACK_DIR]
    _pkg.__file__ = os.path.join(PACK_DIR, "__init__.py")
    sys.modules["xctrl"] = _pkg

"""Node registration: optional dependencies disable only their own nodes."""
import logging
import sys

import pytest

from xctrl.nodes.registry import collect


def _package(tmp_path, modules):
    pkg = tmp_path / "fakepack"
    (pkg / "nodes").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nodes" / "__init__.py").write_text("")
    for name, body in modules.items():
        (pkg / "nodes" / f"{name}.py").write_text(body)
    sys.path.insert(0, str(tmp_path))
    return "fakepack.nodes"


@pytest.fixture
def fake(tmp_path):
    yield lambda modules: _package(tmp_path, modules)
    sys.path.remove(str(tmp_path))
    for k in [k for k in sys.modules if k.startswith("fakepack")]:
        del sys.modules[k]


def test_missing_optional_dependency_disables_only_that_module(fake, caplog):
    pkg = fake({
        "good": "class A:\n    pass\nNODES = [A]\n",
        "needs_ort": "import onnxruntime_not_installed_xyz\nNODES = []\n",
    })
    with caplog.at_level(logging.WARNING, logger="xctrl"):
        classes, disabled = collect(pkg, ["good", "needs_ort"])
    assert [c.__name__ for c in classes] == ["A"]
    assert list(disabled) == ["needs_ort"]
    assert "onnxruntime_not_installed_xyz" in disabled["needs_ort"]
    reasons = [r for r in caplog.records if "disabled" in r.getMessage()]
    assert len(reasons) == 1 and "needs_ort" in reasons[0].getMessage()


def test_missing_module_of_the_pack_itself_is_raised(fake):
    pkg = fake({"broken": "from . import does_not_exist_in_pack\nNODES = []\n"})
    with pytest.raises(ImportError):
        collect(pkg, ["broken"])


def test_nodes_keep_module_order(fake):
    pkg = fake({"a": "class A:\n    pass\nNODES = [A]\n", "b": "class B:\n    pass\nclass C:\n    pass\nNODES = [B, C]\n"})
    classes, _ = collect(pkg, ["b", "a"])
    assert [c.__name__ for c in classes] == ["B", "C", "A"]

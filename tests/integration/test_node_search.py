"""The node search finds the methods under the names users know them by (the papers' and
repositories' names), where this ComfyUI's schema carries search aliases."""
import dataclasses

import pytest

from harness.comfy_runtime import pack_node_classes

WANTED = {
    "XCtrl_MIBalancedControl": ("MIControlNet", "minimal impact"),
    "XCtrl_ApplyControlNeXt": ("ControlNeXt",),
    "XCtrl_LoadControlNetXS": ("ControlNet-XS", "ControlNet XS"),
    "XCtrl_TrainControlNetMI": ("MIControlNet", "train controlnet"),
    "XCtrl_ControlNetAsymmetry": ("MIControlNet", "Asym", "Jacobian asymmetry", "conservativity"),
    "XCtrl_ControlNeXtAsymmetry": ("ControlNeXt", "Asym", "Jacobian asymmetry"),
}


def _schema_has_aliases():
    from comfy_api.latest import io

    return "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}


@pytest.mark.parametrize("node_id", sorted(WANTED))
def test_node_is_found_by_its_method_names(node_id):
    if not _schema_has_aliases():
        pytest.skip("this ComfyUI's node schema has no search aliases (its frontend searches id and display name)")
    classes = pack_node_classes()
    info = classes[node_id].GET_NODE_INFO_V1()
    aliases = [a.lower() for a in info.get("search_aliases") or []]
    missing = [w for w in WANTED[node_id] if w.lower() not in aliases]
    assert not missing, f"{node_id}: node search does not find {missing} (aliases {aliases})"


def test_every_pack_node_still_registers_where_aliases_are_unknown():
    """On a ComfyUI without the schema field the aliases are left out, not passed (the schema
    would refuse them)."""
    classes = pack_node_classes()
    for node_id, cls in classes.items():
        assert cls.GET_SCHEMA().node_id == node_id

"""The real ComfyUI server starts with the pack and lists all of its nodes."""
import re

from harness.comfy_runtime import pack_node_classes


def test_server_lists_every_pack_node(server, pack):
    info = server.get("/object_info")
    ours = {k for k in info if k.startswith("XCtrl")}
    assert ours == set(pack_node_classes()), (ours ^ set(pack_node_classes()))
    assert len(ours) > 0
    for node_id in ours:
        assert info[node_id]["category"].startswith("XCtrl"), node_id


def test_server_log_has_no_import_error_of_the_pack(server):
    log = server.log()
    assert not re.search(r"(IMPORT FAILED|Cannot import).*xctrl", log, re.I), log[-3000:]
    # ComfyUI's own optional nodes may log tracebacks (e.g. no torchaudio); none may involve the pack.
    ours = [block for block in log.split("Traceback (most recent call last):")[1:] if "xctrl" in block.split("\n\n")[0].lower()]
    assert not ours, ours[0][:3000]
    assert re.search(r"\d+\.\d+ seconds: .*xctrl-nodes", log), "pack not in ComfyUI's import-times list:\n" + log[-3000:]


def test_node_ids_are_namespaced_and_unique(pack):
    import nodes

    ids = [cls.GET_SCHEMA().node_id for cls in pack.NODES]
    assert len(ids) == len(set(ids)), f"duplicate node ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    for node_id, cls in pack_node_classes().items():
        assert node_id.startswith("XCtrl_")
        # ComfyUI's registry holds exactly our class under our id: nobody else's was replaced.
        assert nodes.NODE_CLASS_MAPPINGS[node_id] is cls

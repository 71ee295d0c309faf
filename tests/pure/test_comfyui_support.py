"""The one line a ComfyUI older than the tested releases gets at load; the release each of core's
control kinds needs, said alike in README.md, docs/ and the example workflow's title."""
import os

from example_workflows import catalogue

from xctrl.runtime.comfyui_support import (FIRST_TESTED_WITH, OLDEST_TESTED, TESTED, needs_comfyui,
                                           older_than_tested_notice, version_tuple)

PACK = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tested_releases_and_newer_get_no_notice():
    for version in (*TESTED, "0.38.1", "1.0.0", "0.33.0-rc1"):
        assert older_than_tested_notice(version) is None, version


def test_an_older_release_gets_one_line_naming_it_and_the_range():
    notice = older_than_tested_notice("0.3.40")
    assert "ComfyUI 0.3.40" in notice and "\n" not in notice
    assert all(v in notice for v in TESTED) and f"{OLDEST_TESTED} or newer" in notice


def test_no_version_reported_counts_as_older():
    assert "does not report a version" in older_than_tested_notice(None)


def test_versions_compare_as_numbers_not_text():
    assert version_tuple("0.3.64") < version_tuple("0.8.0") < version_tuple("0.33.0") < version_tuple("0.38.1")
    assert older_than_tested_notice("0.3.9") is not None  # "0.3.9" > "0.3.64" as text


def read(*path):
    with open(os.path.join(PACK, *path)) as f:
        return " ".join(f.read().split())  # line breaks as spaces


def test_each_control_kind_names_one_release_everywhere():
    assert set(FIRST_TESTED_WITH.values()) <= set(TESTED)
    assert needs_comfyui("Z-Image Fun ControlNet") == "Z-Image Fun ControlNets need ComfyUI 0.8.0 or newer"
    readme = read("README.md")
    docs = read("docs", "model_patch_control.md") + read("docs", "mi_controlnet.md")
    for control in FIRST_TESTED_WITH:
        assert needs_comfyui(control) in readme and needs_comfyui(control) in docs, control
    # the Z-Image workflow's title ("needs ComfyUI 0.8 or newer": a file name, kept) names the same release
    title_version = catalogue.MIN_COMFYUI["mi_zimage_pose_depth"]
    assert version_tuple(title_version) == version_tuple(FIRST_TESTED_WITH["Z-Image Fun ControlNet"])

"""The one line a ComfyUI older than the tested releases gets at load."""
from xctrl.runtime.comfyui_support import OLDEST_TESTED, TESTED, older_than_tested_notice, version_tuple


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

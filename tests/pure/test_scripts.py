"""The shell entry points: ComfyUI discovery and its error for a wrong COMFYUI_PATH."""
import os
import subprocess


PACK = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _find_roots(env_extra, home):
    env = dict(os.environ, HOME=str(home), **env_extra)
    env.pop("COMFYUI_PATH", None) if "COMFYUI_PATH" not in env_extra else None
    return subprocess.run(
        ["bash", "-c", f"source '{PACK}/scripts/common.sh'; find_comfyui_roots"],
        env=env, capture_output=True, text=True, timeout=30,
    )


def _fake_comfyui(path):
    (path / "comfy").mkdir(parents=True)
    (path / "main.py").write_text("")
    (path / "nodes.py").write_text("")
    return path


def test_comfyui_path_that_is_not_comfyui_gives_one_clear_line(tmp_path):
    bad = tmp_path / "not-comfy"
    bad.mkdir()
    r = _find_roots({"COMFYUI_PATH": str(bad)}, tmp_path)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert str(bad) in lines[0] and "not a ComfyUI folder" in lines[0]


def test_run_tests_reports_a_bad_comfyui_path_before_installing(tmp_path):
    bad = tmp_path / "nope"
    bad.mkdir()
    env = dict(os.environ, COMFYUI_PATH=str(bad), XCTRL_VENV=str(tmp_path / "venv-never-made"))
    r = subprocess.run([f"{PACK}/run_tests.sh"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert str(bad) in r.stderr and not (tmp_path / "venv-never-made").exists()


def test_several_roots_and_the_conventional_places(tmp_path):
    a, b = _fake_comfyui(tmp_path / "a"), _fake_comfyui(tmp_path / "b")
    r = _find_roots({"COMFYUI_PATH": f"{a}:{b}"}, tmp_path)
    assert r.returncode == 0 and r.stdout.split() == [str(a), str(b)]
    home = tmp_path / "home"
    _fake_comfyui(home / "comfy" / "ComfyUI")
    _fake_comfyui(home / "comfy" / "ComfyUI-0.3.64")
    r = _find_roots({}, home)
    assert r.stdout.split() == [str(home / "comfy" / "ComfyUI"), str(home / "comfy" / "ComfyUI-0.3.64")]


def test_no_runtime_found_prints_nothing(tmp_path):
    r = _find_roots({}, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == ""

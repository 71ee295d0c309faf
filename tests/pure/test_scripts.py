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
    (path / "comfy" / "__init__.py").write_text("")  # git keeps no empty folder
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


# ---------------------------------------------------------------- fetching ComfyUI (offline, a local repository)
def _comfyui_repository(tmp_path, versions=("0.33.0", "0.8.0", "0.3.64")):
    """A bare git repository standing in for ComfyUI's, one tag per release."""
    work, bare = tmp_path / "work", tmp_path / "ComfyUI.git"
    work.mkdir()

    def git(*args, cwd=work):
        subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                       env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                                GIT_COMMITTER_EMAIL="t@t"))

    git("init", "-q")
    _fake_comfyui(work)
    for version in versions:
        (work / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
        (work / "requirements.txt").write_text("")
        git("add", "-A")
        git("commit", "-q", "-m", version)
        git("tag", f"v{version}")
    git("clone", "-q", "--bare", str(work), str(bare), cwd=tmp_path)
    return bare


def _comfyui_roots(which, home, repo):
    env = dict(os.environ, HOME=str(home), XCTRL_COMFY_HOME=str(home / "comfy"), XCTRL_COMFYUI_REPO=f"file://{repo}")
    env.pop("COMFYUI_PATH", None)
    return subprocess.run(["bash", "-c", f"source '{PACK}/scripts/common.sh'; comfyui_roots {which}"],
                          env=env, capture_output=True, text=True, timeout=60)


def test_no_comfyui_fetches_the_tested_releases(tmp_path):
    repo = _comfyui_repository(tmp_path)
    home = tmp_path / "home"
    r = _comfyui_roots("both", home, repo)
    assert r.returncode == 0, r.stderr
    primary = home / "comfy" / "ComfyUI"
    older = [home / "comfy" / "ComfyUI-0.3.64", home / "comfy" / "ComfyUI-0.8.0"]  # found in name order
    assert r.stdout.split() == [str(primary)] + [str(o) for o in older]
    assert '"0.33.0"' in (primary / "comfyui_version.py").read_text()
    assert '"0.3.64"' in (older[0] / "comfyui_version.py").read_text()
    assert '"0.8.0"' in (older[1] / "comfyui_version.py").read_text()
    again = _comfyui_roots("both", home, tmp_path / "gone.git")  # found now: nothing is fetched
    assert again.stdout.split() == r.stdout.split() and "Fetching" not in again.stderr


def test_run_comfyui_fetches_only_the_primary_release(tmp_path):
    repo = _comfyui_repository(tmp_path)
    home = tmp_path / "home"
    r = _comfyui_roots("primary", home, repo)
    assert r.stdout.split() == [str(home / "comfy" / "ComfyUI")]
    assert not (home / "comfy" / "ComfyUI-0.3.64").exists() and not (home / "comfy" / "ComfyUI-0.8.0").exists()


def test_offline_no_comfyui_says_what_to_do_in_one_line(tmp_path):
    home = tmp_path / "home"
    r = _comfyui_roots("both", home, tmp_path / "unreachable.git")
    assert r.returncode == 0 and r.stdout.strip() == ""
    assert not (home / "comfy" / "ComfyUI").exists() and not list((home / "comfy").glob("*.partial")) if (home / "comfy").exists() else True
    env = dict(os.environ, HOME=str(home), XCTRL_COMFY_HOME=str(home / "comfy"),
               XCTRL_COMFYUI_REPO=f"file://{tmp_path / 'unreachable.git'}", XCTRL_VENV=str(tmp_path / "venv-never-made"))
    env.pop("COMFYUI_PATH", None)
    run = subprocess.run([f"{PACK}/run_comfyui.sh"], env=env, capture_output=True, text=True, timeout=60)
    lines = [l for l in run.stderr.splitlines() if l.strip() and not l.startswith("Fetching ComfyUI")]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "no ComfyUI found" in lines[0] and "COMFYUI_PATH" in lines[0] and "offline" in lines[0]
    assert not (tmp_path / "venv-never-made").exists()


def test_run_comfyui_with_a_bad_comfyui_path_says_so_once(tmp_path):
    bad = tmp_path / "nope"
    bad.mkdir()
    env = dict(os.environ, COMFYUI_PATH=str(bad), XCTRL_VENV=str(tmp_path / "venv-never-made"))
    run = subprocess.run([f"{PACK}/run_comfyui.sh"], env=env, capture_output=True, text=True, timeout=60)
    lines = [l for l in run.stderr.splitlines() if l.strip()]
    assert run.returncode == 2 and len(lines) == 1 and str(bad) in lines[0], run.stderr


# ---------------------------------------------------------------- publishing metadata
def _pyproject():
    import tomllib

    with open(os.path.join(PACK, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_registry_metadata_matches_what_we_test():
    project = _pyproject()
    comfy = project["tool"]["comfy"]
    with open(os.path.join(PACK, "scripts", "common.sh")) as f:
        script = f.read()
    oldest = script.split('COMFYUI_OLDER_RELEASES="', 1)[1].split('"', 1)[0].split()[-1].lstrip("v")
    assert comfy["requires-comfyui"] == f">={oldest}", "requires-comfyui must be the oldest ComfyUI the tests run"
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert {"Issues", "Documentation", "Repository"} <= set(project["project"]["urls"])
    assert any(c.startswith("Operating System ::") for c in project["project"]["classifiers"])
    assert any(c.startswith("Environment :: GPU ::") for c in project["project"]["classifiers"])


def test_icon_is_a_small_square_image_in_the_repository():
    from PIL import Image

    url = _pyproject()["tool"]["comfy"]["Icon"]
    repo = _pyproject()["project"]["urls"]["Repository"].replace("https://github.com/", "")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert url.startswith(prefix), url
    path = os.path.join(PACK, url[len(prefix):])
    with Image.open(path) as img:
        assert img.size[0] == img.size[1] <= 400 and img.format == "PNG"
    assert os.path.getsize(path) < 100_000


def test_publish_workflow_uses_the_registry_action_on_version_changes():
    with open(os.path.join(PACK, ".github", "workflows", "publish.yml")) as f:
        text = f.read()
    assert "Comfy-Org/publish-node-action@" in text and "REGISTRY_ACCESS_TOKEN" in text
    assert "pyproject.toml" in text and '["project"]["version"]' in text


# ---------------------------------------------------------------- one venv for every ComfyUI version
def _fake_venv(tmp_path):
    """A venv whose python only records what it is asked to install (and makes --target folders)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    python = venv / "bin" / "python"
    python.write_text(f"""#!/usr/bin/env bash
echo "$*" >> '{log}'
prev=""
for a in "$@"; do [ "$prev" = --target ] && mkdir -p "$a"; prev="$a"; done
exit 0
""")
    python.chmod(0o755)
    return venv, log


def _root_with(path, requirements):
    _fake_comfyui(path)
    (path / "requirements.txt").write_text("\n".join(requirements) + "\n")
    return path


def _setup(venv, root):
    env = dict(os.environ, XCTRL_VENV=str(venv))
    return subprocess.run(["bash", "-c", f"source '{PACK}/scripts/common.sh'; setup_venv '{root}'"],
                          env=env, capture_output=True, text=True, timeout=60)


def test_alternating_comfyui_versions_never_reinstalls(tmp_path):
    venv, log = _fake_venv(tmp_path)
    new = _root_with(tmp_path / "new", ["torch", "numpy>=1.25", "comfyui-frontend-package==1.35.9", "av>=14"])
    old = _root_with(tmp_path / "old", ["torch", "numpy>=1.25", "comfyui-frontend-package==1.27.10", "requests"])
    for root in (new, old):
        assert _setup(venv, root).returncode == 0
    installs_after_both = log.read_text().splitlines()
    assert any("comfyui-frontend-package==1.35.9" in l and "--target" in l for l in installs_after_both)
    assert any("comfyui-frontend-package==1.27.10" in l and "--target" in l for l in installs_after_both)
    assert not any("comfyui-frontend-package" in l and "--target" not in l for l in installs_after_both), \
        "a frontend pin went into the shared venv"
    for root in (new, old, new):
        r = _setup(venv, root)
        assert r.returncode == 0 and "Installing" not in r.stdout, r.stdout
    assert log.read_text().splitlines() == installs_after_both, "switching versions installed again"
    paths = [subprocess.run(["bash", "-c", f"source '{PACK}/scripts/common.sh'; root_pythonpath '{root}'"],
                            env=dict(os.environ, XCTRL_VENV=str(venv), PYTHONPATH=""), capture_output=True,
                            text=True).stdout.strip() for root in (new, old)]
    assert paths[0] != paths[1] and all(os.path.isdir(p) for p in paths)

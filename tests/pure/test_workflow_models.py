"""The model catalogue of the example workflows (scripts/example_workflows/files.py: MODELS): every
file is downloadable by ComfyUI's missing-models dialog, lands where the workflow looks, and the
README says the same."""
import json
import os

from example_workflows import catalogue, files, layout, ui_format, writer

PACK = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What the 0.8.0 frontend's dialog downloads (sources and suffixes it allows).
ALLOWED_SOURCES = ("https://huggingface.co/", "https://civitai.com/")
ALLOWED_SUFFIXES = (".safetensors", ".sft")


# Files only newer frontends' dialogs download (the pickle suffixes); their notes give the link.
PICKLE_SUFFIXES = (".ckpt",)


def test_every_model_file_can_be_downloaded_by_the_frontend():
    for (folder, name), url in files.MODELS.items():
        assert url.startswith(ALLOWED_SOURCES), url
        assert name.endswith(ALLOWED_SUFFIXES + PICKLE_SUFFIXES), name
    for name, url in files.ANNOTATORS.items():
        assert url.startswith(ALLOWED_SOURCES) and files.downloaded_name(url) == name, url


def desktop_saves_to(folder, name):
    """ComfyUI Desktop's downloader: the label's part before the first "/" is the file name."""
    return f"models/{folder}/{name.split('/')[0]}"


def browser_saves_to(folder, name, url, instructions):
    """A browser saves the URL's last part; the user moves it to models/<folder>/ (the README and
    the notes say so) and renames it only where the instructions say to."""
    saved = url.rsplit("/", 1)[1]
    if saved != name and f"the download is called {saved}: rename it to {name}" not in instructions:
        return f"models/{folder}/{saved}"
    return f"models/{folder}/{name}"


def test_downloads_land_where_the_loader_looks():
    """Both download routes put every file of every workflow where its loader looks
    (models/<folder>/<name>), and no two files of the catalogue share a path."""
    with open(os.path.join(PACK, "README.md")) as f:
        readme = f.read()
    for wf, build in catalogue.WORKFLOWS.items():
        graph = build()
        note = graph["note"][1]["text"]
        row = next(line for line in readme.splitlines() if line.startswith(f"| {catalogue.TITLES[wf]} |"))
        for folder, name, url in files.model_files(graph):
            wanted = f"models/{folder}/{name}"
            assert desktop_saves_to(folder, name) == wanted, f"{wf}: ComfyUI Desktop saves {name} elsewhere"
            assert browser_saves_to(folder, name, url, note) == wanted, f"{wf}: the notes leave {name} misnamed"
            assert browser_saves_to(folder, name, url, row) == wanted, f"{wf}: the README leaves {name} misnamed"
    paths = [f"{folder}/{name}" for folder, name in files.MODELS] + [f"annotators/{n}" for n in files.ANNOTATORS]
    assert len(set(p.lower() for p in paths)) == len(paths)


def test_preprocessor_weights_are_in_every_workflows_file_lists():
    """A workflow with DWPose / Depth Anything lists their weights (notes, dialog, README) like
    its model files: offline users learn every file before the first run."""
    with open(os.path.join(PACK, "README.md")) as f:
        readme = f.read()
    checked = 0
    for wf, build in catalogue.WORKFLOWS.items():
        graph = build()
        row = next(line for line in readme.splitlines() if line.startswith(f"| {catalogue.TITLES[wf]} |"))
        for cls, inputs, _title in graph.values():
            for name in files.NODE_ANNOTATORS.get(cls, ()):
                checked += 1
                assert f"models/annotators/{name}" in graph["note"][1]["text"], (wf, name)
                assert f"[`annotators/{name}`]({files.ANNOTATORS[name]})" in row, (wf, name)
                props = ui_format.model_properties([], cls)
                assert {"name": name, "url": files.ANNOTATORS[name], "directory": "annotators"} in props
    assert checked >= 10


def test_preprocessor_urls_are_the_ones_the_nodes_download():
    from xctrl.preprocessors import annotator_files as af

    for name, url in files.ANNOTATORS.items():
        assert af.KNOWN_FILES[name].url == url, name


def test_every_workflow_loader_value_is_in_the_catalogue():
    """A loader value that is not in MODELS would get no URL (and no stand-in in the tests)."""
    loaders = {"CheckpointLoaderSimple": ("ckpt_name",), "ImageOnlyCheckpointLoader": ("ckpt_name",),
               "UNETLoader": ("unet_name",), "ControlNetLoader": ("control_net_name",),
               "DualCLIPLoader": ("clip_name1", "clip_name2"), "XCtrl_LoadControlNetXS": ("control_file",),
               "XCtrl_LoadControlNeXt": ("control_file", "unet_weights")}
    seen = 0
    for name, build in catalogue.WORKFLOWS.items():
        for cls, inputs, _title in build().values():
            for key in loaders.get(cls, ()):
                value = inputs.get(key)
                if value in (None, "none"):
                    continue
                seen += 1
                assert value in files.MODEL_FOLDER, f"{name}: {cls}.{key} = {value} has no download URL"
    assert seen >= len(catalogue.WORKFLOWS)


def test_model_properties_are_what_the_frontend_reads():
    name = "controlnext_sdxl_anime_canny_controlnet.safetensors"
    props = ui_format.model_properties([name, "none", 1.0])
    assert props == [{"name": name, "directory": "controlnet", "url": files.MODELS["controlnet", name]}]


def test_readme_lists_every_workflow_file_with_its_url():
    with open(os.path.join(PACK, "README.md")) as f:
        text = f.read()
    assert writer.readme_with_table(text) == text, (
        "README's workflow table is out of date: regenerate with `python scripts/example_workflows <ComfyUI>`")
    for (folder, name), url in files.MODELS.items():
        assert f"[`{folder}/{name}`]({url})" in text
    used = {n for build in catalogue.WORKFLOWS.values() for cls, _i, _t in build().values()
            for n in files.NODE_ANNOTATORS.get(cls, ())}
    assert used
    for name in used:
        assert f"[`annotators/{name}`]({files.ANNOTATORS[name]})" in text


def test_titles_read_as_titles():
    for name, title in catalogue.TITLES.items():
        assert "_" not in title and "-" not in title and title[0].isupper(), title
        assert not any(c in title for c in '<>:"/\\|?*'), f"{title} is not a portable file name"
    assert len(set(catalogue.TITLES.values())) == len(catalogue.TITLES) and set(catalogue.TITLES) == set(catalogue.WORKFLOWS)


def test_a_workflow_needing_newer_nodes_says_so_in_its_title():
    """ComfyUI offers every template on every version: the title tells which ComfyUI it needs."""
    assert set(catalogue.MIN_COMFYUI) == set(catalogue.REQUIRES)
    for name, version in catalogue.MIN_COMFYUI.items():
        assert f"needs ComfyUI {version} or newer" in catalogue.TITLES[name]


# How the frontend opens a workflow, read in its code (frontend 1.35.9 of ComfyUI 0.8, 1.49.6 of
# 0.33) and measured in Chromium: a template opens fitted (1.49: always; 1.35: when the file holds
# no view in extra.ds, else at that view); the fitted view puts the nodes' bounds (title bars
# included, padded by 10) into 75 % of the canvas, centred. Nodes are drawn without text below a
# zoom of 8 / 14; the side toolbar ends at x 59, the top bar at y 90, and the minimap takes the
# window's bottom-right 257 x 258.
WINDOWS = ((1200, 800), (1600, 1000))


def _views(ui, window):
    """The views the two frontends open a workflow at in a window: (scale, offset)."""
    nodes = ui["nodes"]
    x0, x1 = min(n["pos"][0] for n in nodes) - 10, max(n["pos"][0] + n["size"][0] for n in nodes) + 10
    y0, y1 = min(n["pos"][1] - 30 for n in nodes) - 10, max(n["pos"][1] + n["size"][1] for n in nodes) + 10
    fit = min(0.75 * window[0] / (x1 - x0), 0.75 * window[1] / (y1 - y0))
    fitted = (fit, (window[0] / fit / 2 - (x0 + x1) / 2, window[1] / fit / 2 - (y0 + y1) / 2))
    ds = ui.get("extra", {}).get("ds")
    return {"1.49": fitted, "1.35": (ds["scale"], tuple(ds["offset"])) if ds else fitted}


def _unreadable_or_hidden(ui, window):
    found = []
    for frontend, (scale, (ox, oy)) in _views(ui, window).items():
        if scale < 0.6:
            found.append(f"frontend {frontend}: zoom {scale:.3f} (text drawn from {8 / 14:.3f}, 0.6 wanted)")
        for n in ui["nodes"]:
            left, top = (n["pos"][0] + ox) * scale, (n["pos"][1] - 30 + oy) * scale
            right, bottom = left + n["size"][0] * scale, top + (n["size"][1] + 30) * scale
            minimap = right > window[0] - 257 and bottom > window[1] - 258
            if left < 59 or top < 90 or right > window[0] or bottom > window[1] or minimap:
                found.append(f"frontend {frontend}: {n.get('title') or n['type']} hidden at {left:.0f},{top:.0f}-{right:.0f},{bottom:.0f}")
    return found


def test_every_workflow_opens_readable_with_every_node_in_view():
    """Checked in a browser by test_frontend.py; here on the files, in both windows."""
    found = {}
    for name in catalogue.WORKFLOWS:
        with open(writer.workflow_path(name)) as f:
            ui = json.load(f)
        for window in WINDOWS:
            found.update({(name, window): _unreadable_or_hidden(ui, window)} if _unreadable_or_hidden(ui, window) else {})
    assert not found, found


def test_the_layout_check_sees_a_graph_too_wide_and_a_node_under_the_minimap():
    wide = {"nodes": [{"pos": [i * 300, 30], "size": [272, 100], "type": "X"} for i in range(6)]}
    assert any("zoom" in p for p in _unreadable_or_hidden(wide, (1200, 800)))
    corner = {"nodes": [{"pos": [0, 30], "size": [272, 900], "type": "X"}, {"pos": [300, 30], "size": [272, 100], "type": "X"},
                        {"pos": [900, 800], "size": [272, 100], "type": "Save"}]}
    assert [p for p in _unreadable_or_hidden(corner, (1200, 800)) if "Save" in p]
    assert layout.view_problems(corner["nodes"], (1200, 800))  # the generator's own check agrees

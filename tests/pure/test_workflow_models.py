"""The model catalogue of the example workflows (scripts/example_workflows/files.py: MODELS): every
file is downloadable by ComfyUI's missing-models dialog, lands where the workflow looks, and the
README says the same."""
import os

from example_workflows import catalogue, files, layout, ui_format, writer

PACK = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What the 0.8.0 frontend's dialog downloads (sources and suffixes it allows).
ALLOWED_SOURCES = ("https://huggingface.co/", "https://civitai.com/")
ALLOWED_SUFFIXES = (".safetensors", ".sft")


def test_every_model_file_can_be_downloaded_by_the_frontend():
    for (folder, name), url in files.MODELS.items():
        assert url.startswith(ALLOWED_SOURCES), url
        assert name.endswith(ALLOWED_SUFFIXES), name
        assert url.rsplit("/", 1)[1] == os.path.basename(name), f"{name} would be saved under another name ({url})"


def test_generic_file_names_keep_their_source_folders():
    """Two files called controlnet.safetensors must not land on each other."""
    names = list(files.MODEL_FOLDER)
    assert len(names) == len(files.MODELS), "one name in two folders"
    base = {}
    for folder, name in files.MODELS:
        base.setdefault((folder, os.path.basename(name)), []).append(name)
    for (folder, file), paths in base.items():
        if len(paths) > 1:
            for path in paths:
                repo_path = files.MODELS[folder, path].split("/resolve/main/", 1)[1]
                assert repo_path.endswith(path), f"{path} is not the repository's own path {repo_path}"


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
    props = ui_format.model_properties(["ControlAny-SDXL/anime_canny/controlnet.safetensors", "none", 1.0])
    assert props == [{"name": "ControlAny-SDXL/anime_canny/controlnet.safetensors", "directory": "controlnet",
                      "url": files.MODELS["controlnet", "ControlAny-SDXL/anime_canny/controlnet.safetensors"]}]


def test_readme_lists_every_workflow_file_with_its_url():
    with open(os.path.join(PACK, "README.md")) as f:
        text = f.read()
    assert writer.readme_with_table(text) == text, (
        "README's workflow table is out of date: regenerate with `python scripts/example_workflows <ComfyUI>`")
    for (folder, name), url in files.MODELS.items():
        assert f"[`{folder}/{name}`]({url})" in text


def test_titles_read_as_titles():
    for name, title in catalogue.TITLES.items():
        assert "_" not in title and "-" not in title and title[0].isupper(), title
        assert not any(c in title for c in '<>:"/\\|?*'), f"{title} is not a portable file name"
    assert len(set(catalogue.TITLES.values())) == len(catalogue.TITLES) and set(catalogue.TITLES) == set(catalogue.WORKFLOWS)


def test_the_view_shows_the_whole_graph():
    nodes = [{"pos": [40, 40], "size": [330, 200]}, {"pos": [3000, 900], "size": [330, 500]}]
    ds = layout.view_showing(nodes)
    s, (ox, oy) = ds["scale"], ds["offset"]
    for n in nodes:
        left, top = (n["pos"][0] + ox) * s, (n["pos"][1] - layout.TITLE_HEIGHT + oy) * s
        right, bottom = (n["pos"][0] + n["size"][0] + ox) * s, (n["pos"][1] + n["size"][1] + oy) * s
        assert left >= layout.VISIBLE_ORIGIN[0] - 0.5 and top >= layout.VISIBLE_ORIGIN[1] - 0.5
        assert right <= layout.VISIBLE_ORIGIN[0] + layout.VISIBLE_SIZE[0] + 1 and bottom <= layout.VISIBLE_ORIGIN[1] + layout.VISIBLE_SIZE[1] + 1
    assert layout.view_showing([{"pos": [0, 40], "size": [100, 100]}])["scale"] == 1.0  # never zoomed in

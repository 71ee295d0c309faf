"""Writing example_workflows/ (the UI files and thumbnails), the stock node definitions they were
written from, and the README's workflow table."""
import json
import os

from .catalogue import SUMMARIES, TITLES, WORKFLOWS, files_of
from .files import rename_note
from .ui_format import VIRTUAL_NODES, to_ui

PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# ComfyUI serves a pack's example_workflows/ as templates; the 0.8.0 frontend shows each file
# name as the template's title and description, so the names are written as titles.
WORKFLOW_DIR = os.path.join(PACK_DIR, "example_workflows")
# The stock nodes' definitions the committed workflows were written from (written with them): the
# drift test rebuilds the files from these on every ComfyUI, whose own stock nodes may differ.
STOCK_DEFINITIONS = os.path.join(PACK_DIR, "tests", "data", "stock_node_definitions.json")
README = os.path.join(PACK_DIR, "README.md")


def workflow_path(name, ext=".json"):
    return os.path.join(WORKFLOW_DIR, TITLES[name] + ext)



README_BEGIN, README_END = "<!-- generated:workflows -->", "<!-- /generated:workflows -->"


def readme_table():
    """The README's table of workflows and the files each loads (between README_BEGIN/END)."""
    lines = ["| workflow (templates menu title) | what it does | files: `ComfyUI/models/<folder>/<name>` (download) |",
             "|---|---|---|"]
    for name in WORKFLOWS:
        files = "; ".join(f"[`{folder}/{file}`]({url})" + (f" ({rename_note(file, url)})" if rename_note(file, url) else "")
                          for folder, file, url in files_of(name))
        lines.append(f"| {TITLES[name]} | {SUMMARIES[name]} | {files} |")
    return "\n".join([README_BEGIN, *lines, README_END])


def readme_with_table(text):
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    return text[:start] + readme_table() + text[end:]


def write_thumbnail(ui, path):
    """A small picture of the graph: node boxes with titles, links as lines (JPEG)."""
    from PIL import Image, ImageDraw

    xs = [n["pos"][0] + n["size"][0] for n in ui["nodes"]]
    ys = [n["pos"][1] + n["size"][1] for n in ui["nodes"]]
    scale = min(1.0, 1400 / max(xs), 1000 / max(ys))
    w, h = int(max(xs) * scale) + 40, int(max(ys) * scale) + 40
    img = Image.new("RGB", (w, h), (32, 32, 36))
    d = ImageDraw.Draw(img)
    by_id = {n["id"]: n for n in ui["nodes"]}
    for l in ui["links"]:
        a, b = by_id[l[1]], by_id[l[3]]
        x0, y0 = (a["pos"][0] + a["size"][0]) * scale, (a["pos"][1] + 30 + 24 * l[2]) * scale
        x1, y1 = b["pos"][0] * scale, (b["pos"][1] + 30 + 24 * l[4]) * scale
        d.line([(x0, y0), (x1, y1)], fill=(120, 170, 230), width=2)
    for n in ui["nodes"]:
        x, y = n["pos"][0] * scale, n["pos"][1] * scale
        bw, bh = n["size"][0] * scale, n["size"][1] * scale
        ours = n["type"].startswith("XCtrl")
        d.rectangle([x, y, x + bw, y + bh], fill=(60, 52, 80) if ours else (53, 53, 58), outline=(150, 150, 160))
        d.rectangle([x, y, x + bw, y + 22 * scale + 8], fill=(110, 70, 160) if ours else (80, 80, 90))
        title = n.get("title") or n["type"]
        d.text((x + 6, y + 4), title[:40], fill=(240, 240, 240))
        if n["type"] in VIRTUAL_NODES:
            for i, line in enumerate(n["widgets_values"][0].split("\n")[:8]):
                d.text((x + 6, y + 30 + 12 * i), line[:60], fill=(200, 200, 200))
    img.save(path, "JPEG", quality=88)



def _first_option(spec):
    """An input spec with its combo list cut to the first entry (a default's only use of it)."""
    spec = list(spec)
    if isinstance(spec[0], list):
        spec[0] = spec[0][:1]
    if len(spec) > 1 and isinstance(spec[1], dict) and isinstance(spec[1].get("options"), list):
        spec[1] = dict(spec[1], options=spec[1]["options"][:1])
    return spec


def stock_definitions(object_info):
    """What the builder reads of the stock (non-pack) nodes the workflows use: inputs, their
    order, outputs."""
    types = sorted({cls for build in WORKFLOWS.values() for cls, _inputs, _title in build().values()
                    if cls not in VIRTUAL_NODES and not cls.startswith("XCtrl_")})
    defs = {}
    for cls in types:
        info = object_info[cls]
        inputs = {section: {name: _first_option(spec) for name, spec in info["input"][section].items()}
                  for section in ("required", "optional") if section in info["input"]}
        defs[cls] = {"input": inputs, "output": info["output"], "output_name": info["output_name"]}
        if info.get("input_order"):
            defs[cls]["input_order"] = info["input_order"]
    return defs


def build_definitions(object_info):
    """The definitions the committed workflows are rebuilt from: the pack's nodes from
    ``object_info``, the stock nodes as recorded when the files were written."""
    with open(STOCK_DEFINITIONS) as f:
        stock = json.load(f)
    return {**stock, **{cls: info for cls, info in object_info.items() if cls.startswith("XCtrl_")}}


def write_all(object_info, folder=WORKFLOW_DIR):
    os.makedirs(folder, exist_ok=True)
    with open(STOCK_DEFINITIONS, "w") as f:
        json.dump(stock_definitions(object_info), f, indent=1, sort_keys=True)
        f.write("\n")
    current = {TITLES[name] + ext for name in WORKFLOWS for ext in (".json", ".jpg")}
    for old in sorted(set(os.listdir(folder)) - current):  # a renamed workflow's old files
        if old.endswith((".json", ".jpg")):
            os.remove(os.path.join(folder, old))
    for name, build in WORKFLOWS.items():
        ui = to_ui(build(), object_info)
        with open(os.path.join(folder, TITLES[name] + ".json"), "w") as f:
            json.dump(ui, f, indent=2)
            f.write("\n")
        write_thumbnail(ui, os.path.join(folder, TITLES[name] + ".jpg"))
    return sorted(WORKFLOWS)


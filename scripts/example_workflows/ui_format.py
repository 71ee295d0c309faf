"""API-format graph <-> the frontend's "Workflow JSON 0.4", using the server's ``/object_info``.

``to_ui`` writes widgets_values in input order (the hidden "control_after_generate" value after
seed widgets, the upload widget's value after LoadImage's file), a left-to-right layout by
dependency depth (the notes first, ``layout.place``), the links array, each loader's ``models``
property from ``MODELS`` so the frontend's missing-models dialog offers the downloads, and no
view (the frontend fits one to the graph);
``to_api`` is the inverse, the conversion the frontend makes when it queues a prompt (virtual
nodes such as Note are dropped)."""
from .files import ANNOTATORS, ANNOTATORS_FOLDER, MODEL_FOLDER, MODELS, NODE_ANNOTATORS
from .layout import IMAGE_ROOM, LOADED_IMAGE_ROOM, NODE_WIDTH, NOTE_HEIGHT, node_size, place

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL_NODES = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
SEED_NAMES = ("seed", "noise_seed")
# Nodes that show an image or a video, and the room they get for it.
SHOWN_IMAGE_ROOM = {"LoadImage": LOADED_IMAGE_ROOM, "PreviewImage": IMAGE_ROOM, "SaveImage": IMAGE_ROOM,
                    "SaveAnimatedWEBP": IMAGE_ROOM, "LoadVideo": IMAGE_ROOM}


def _is_link(v):
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) and isinstance(v[1], int)


def _input_specs(info):
    """[(name, type, options, optional)] in the order the frontend creates slots/widgets."""
    out = []
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, "COMBO" if isinstance(typ, list) else typ, opts, section == "optional"))
    return out


def _is_widget(typ, opts):
    return typ in WIDGET_TYPES and not opts.get("forceInput")


def _default(typ, opts, info_spec):
    if "default" in opts:
        return opts["default"]
    if typ == "COMBO":
        options = info_spec[0] if isinstance(info_spec[0], list) else opts.get("options", [])
        return options[0] if options else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[typ]


def _has_seed_control(name, typ, opts):
    return typ == "INT" and (opts.get("control_after_generate") or name in SEED_NAMES)


def widget_values(class_type, inputs, info):
    values = []
    for name, typ, opts, optional in _input_specs(info):
        if not _is_widget(typ, opts):
            continue
        section = "optional" if optional else "required"
        v = inputs.get(name, _default(typ, opts, info["input"][section][name]))
        if _is_link(v):  # fed by a link: the widget keeps its default value slot
            v = _default(typ, opts, info["input"][section][name])
        values.append(v)
        if _has_seed_control(name, typ, opts):
            values.append("fixed")
        if opts.get("image_upload"):
            values.append("image")
    return values


def _depths(graph):
    memo = {}

    def depth(nid):
        if nid not in memo:
            memo[nid] = 0
            ups = [v[0] for v in graph[nid][1].values() if _is_link(v)]
            memo[nid] = 1 + max((depth(u) for u in ups), default=-1)
        return memo[nid]

    return {nid: depth(nid) for nid in graph}


def to_ui(graph, object_info):
    """API-style description -> UI workflow JSON (version 0.4)."""
    ids = {key: i + 1 for i, key in enumerate(graph)}
    links, out_links, node_inputs = _links(graph, object_info, ids)
    depths = _depths(graph)
    order = sorted(graph, key=lambda k: (graph[k][0] not in VIRTUAL_NODES, depths[k], list(graph).index(k)))
    nodes = []
    for rank, key in enumerate(order):
        node = _ui_node(key, graph[key], ids[key], rank, object_info, node_inputs, out_links)
        if graph[key][2]:
            node["title"] = graph[key][2]
        nodes.append(node)
    place(nodes)
    nodes.sort(key=lambda n: n["id"])
    return {
        "last_node_id": len(graph), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
        "config": {}, "extra": {}, "version": 0.4,
    }


def _links(graph, object_info, ids):
    """The links (numbered from 1 in node order), the links leaving each output, and each node's
    input slots (links first, so that outputs can list them)."""
    links, out_links, node_inputs = [], {}, {}
    for key, (cls, inputs, _title) in graph.items():
        if cls in VIRTUAL_NODES:
            node_inputs[key] = []
            continue
        info = object_info[cls]
        slots = []
        for name, typ, opts, optional in _input_specs(info):
            v = inputs.get(name)
            widget = _is_widget(typ, opts)
            if widget and not _is_link(v):
                continue
            link_id = None
            if v is not None:
                if not _is_link(v):
                    raise ValueError(f"{key}.{name}: {cls} takes a link here, got {v!r}")
                src, slot = v
                link_id = len(links) + 1
                links.append([link_id, ids[src], slot, ids[key], len(slots), info_type(object_info, graph, src, slot)])
                out_links.setdefault((src, slot), []).append(link_id)
            elif not optional:
                raise ValueError(f"{key}.{name}: required input of {cls} not connected")
            slot = {"name": name, "type": typ, "link": link_id}
            if widget:  # a widget fed by a link: an input slot that names its widget
                slot["widget"] = {"name": name}
            slots.append(slot)
        unknown = set(inputs) - {s[0] for s in _input_specs(info)}
        if unknown:
            raise ValueError(f"{key}: {cls} has no inputs {sorted(unknown)}")
        node_inputs[key] = slots
    return links, out_links, node_inputs


def _ui_node(key, entry, node_id, rank, object_info, node_inputs, out_links):
    """One node of the UI file (its position is set by the caller)."""
    cls, inputs, _title = entry
    if cls in VIRTUAL_NODES:
        return {"id": node_id, "type": cls, "pos": None, "size": [NODE_WIDTH, NOTE_HEIGHT], "flags": {}, "order": rank, "mode": 0,
                "inputs": [], "outputs": [], "properties": {}, "widgets_values": [inputs["text"]]}
    info = object_info[cls]
    outputs = []
    for slot, (otype, oname) in enumerate(zip(info["output"], info["output_name"])):
        outputs.append({"name": oname, "type": otype, "links": out_links.get((key, slot), []), "slot_index": slot})
    wv = widget_values(cls, inputs, info)
    specs = [(typ, opts) for _name, typ, opts, _optional in _input_specs(info) if _is_widget(typ, opts)]
    # A value input fed by a link is a widget row in releases that have no forceInput for it.
    slots = [slot for slot in node_inputs[key] if "widget" not in slot]
    forced = sum(slot["type"] in WIDGET_TYPES for slot in slots)
    size = node_size(slots=len(slots) - forced, outputs=len(outputs),
                     widgets=len(wv) + forced + sum(bool(opts.get("video_upload")) for _typ, opts in specs),
                     multiline=any(typ == "STRING" and opts.get("multiline") for typ, opts in specs),
                     image_room=SHOWN_IMAGE_ROOM.get(cls, 0))
    properties = {"Node name for S&R": cls}
    models = model_properties(wv, cls)
    if models:
        properties["models"] = models
    return {"id": node_id, "type": cls, "pos": None, "size": size, "flags": {}, "order": rank, "mode": 0,
            "inputs": node_inputs[key], "outputs": outputs, "properties": properties, "widgets_values": wv}


def model_properties(widget_values, cls=None):
    """The frontend's per-node ``models`` list (name, url, directory) for the files a node's
    widgets select and a preprocessor's weights: what its missing-models list offers to download."""
    return ([{"name": v, "url": MODELS[MODEL_FOLDER[v], v], "directory": MODEL_FOLDER[v]}
             for v in widget_values if isinstance(v, str) and v in MODEL_FOLDER] +
            [{"name": n, "url": ANNOTATORS[n], "directory": ANNOTATORS_FOLDER} for n in NODE_ANNOTATORS.get(cls, ())])



def info_type(object_info, graph, src, slot):
    return object_info[graph[src][0]]["output"][slot]


def to_api(ui, object_info):
    """UI workflow JSON -> API prompt {id: {class_type, inputs}}, as the frontend converts it."""
    links = {l[0]: l for l in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise KeyError(f"node {node['id']}: unknown node type {node['type']}")
        inputs = {}
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: i.get("link") for i in node.get("inputs", [])}
        for name, typ, opts, optional in _input_specs(info):
            if name in linked and linked[name] is not None:
                l = links[linked[name]]
                inputs[name] = [str(l[1]), l[2]]
                if _is_widget(typ, opts) and values:  # a widget converted to an input keeps its value slot
                    values.pop(0)
                continue
            if not _is_widget(typ, opts):
                continue
            if not values:  # a widget added after the file was saved: the frontend keeps its default
                section = "optional" if optional else "required"
                inputs[name] = _default(typ, opts, info["input"][section][name])
                continue
            inputs[name] = values.pop(0)
            if _has_seed_control(name, typ, opts) and values and values[0] in ("fixed", "increment", "decrement", "randomize"):
                values.pop(0)
            if opts.get("image_upload") and values and values[0] == "image":
                values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


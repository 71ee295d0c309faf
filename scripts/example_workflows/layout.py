"""Where the nodes of a workflow go, so that it opens readable with every node in view.

How the frontend opens a workflow (read in its bundled code): frontend 1.49
(ComfyUI 0.33) fits the view to the graph whenever a template opens, whatever view the file
holds; 1.35 (ComfyUI 0.8) and a file dropped on the canvas fit it when the file holds no view
(extra.ds). So the files hold none, and the layout is what decides the zoom: the fitted view
puts the graph's bounds (node boxes with title bars, plus 10 units) into 75 % of the canvas,
centred. Below a zoom of 8 / 14 (the default minimum font size of 8 px over the 14 px node
text, at a device pixel ratio of 1) the frontend draws nodes as bare boxes, without titles,
widgets or text. The layout is compact enough to open at READABLE_SCALE or more in every
window of WINDOWS, with no node under the side toolbar, the top bar or the minimap."""

from itertools import combinations

TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos
NODE_WIDTH = 272  # the widest minimum width of a node in the frontend (MI Balanced Model Patches: 271)
GAP_X, GAP_Y = 22, 10  # between columns (room for the links), between nodes of a column
IMAGE_ROOM = 90  # below the widgets of a node that shows an image or a video
LOADED_IMAGE_ROOM = 230  # what the frontend adds to Load Image's minimum once the image is loaded (224)
TEXT_ROOM = 42  # a multiline text widget's box beyond one widget row
NOTE_HEIGHT = 200  # the notes node (its text scrolls)

# The frontend's rules (frontend 1.35 and 1.49).
FIT_FILL, FIT_PADDING = 0.75, 10  # fitToBounds: the bounds (padded) fill 75 % of the canvas
LOW_QUALITY_BELOW = 8 / 14  # the zoom under which nodes are drawn without text
READABLE_SCALE = 0.6  # what the layout opens at, at least: one wheel step above LOW_QUALITY_BELOW
WINDOWS = ((1200, 800), (1600, 1000))
SIDE_BAR_RIGHT, TOP_BAR_BOTTOM = 59, 90  # the side toolbar's right edge, the top bar's bottom
# The minimap's extent from the window's bottom-right corner (shown in windows >= 1024 wide):
# 257 x 258 in frontends 1.35 and 1.49, 294 x 265 in 1.27 (ComfyUI 0.3); the larger is kept clear.
MINIMAP = (294, 266)


def node_size(slots, outputs, widgets, multiline=False, image_room=0):
    """A node's size: the frontend's minimum (20 per slot row, 24 per widget, 14 of margins), a
    text box for a multiline widget, image_room for a shown image."""
    height = 20 * max(slots, outputs) + 24 * widgets + (14 if widgets else 6)
    return [NODE_WIDTH, height + (TEXT_ROOM if multiline else 0) + image_room]


def _splits(nodes, most):
    """Every split of the nodes, in order, into 1 to ``most`` non-empty columns."""
    for count in range(1, most + 1):
        for cuts in combinations(range(1, len(nodes)), count - 1):
            ends = (0, *cuts, len(nodes))
            yield [nodes[a:b] for a, b in zip(ends, ends[1:])]


def _height(column):
    return sum(TITLE_HEIGHT + node["size"][1] + GAP_Y for node in column) - GAP_Y


def _put(columns):
    for i, column in enumerate(columns):
        y = 0
        for node in column:
            node["pos"] = [i * (NODE_WIDTH + GAP_X), y + TITLE_HEIGHT]
            y += TITLE_HEIGHT + node["size"][1] + GAP_Y


def _zoom(columns):
    """The smallest zoom the fitted view of these columns opens at in WINDOWS."""
    width = len(columns) * (NODE_WIDTH + GAP_X) - GAP_X + 2 * FIT_PADDING
    height = max(map(_height, columns)) + 2 * FIT_PADDING
    return min(FIT_FILL * min(w / max(width, 300), h / max(height, 300)) for w, h in WINDOWS)


def place(nodes, most_columns=5):
    """Sets every node's pos: the nodes, in the given order (the notes first, then by dependency
    depth), fill columns top down, left to right; of all the ways to cut them into columns, the
    one that opens at the largest zoom (the shortest columns among equals) with no node hidden
    in any window of WINDOWS, or at the largest zoom if none does."""
    splits = sorted(_splits(nodes, most_columns), key=lambda cols: (-_zoom(cols), max(map(_height, cols))))
    for columns in splits:
        _put(columns)
        if not any(view_problems(nodes, window) for window in WINDOWS):
            return
    _put(splits[0])


def bounds(nodes):
    """The frontend's bounds of the graph: node boxes with their title bars, padded."""
    x0 = min(n["pos"][0] for n in nodes) - FIT_PADDING
    y0 = min(n["pos"][1] - TITLE_HEIGHT for n in nodes) - FIT_PADDING
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes) + FIT_PADDING
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes) + FIT_PADDING
    return x0, y0, x1 - x0, y1 - y0


def opened_view(nodes, window):
    """(scale, offset) of the view the frontend fits to the graph in a window (screen = (pos +
    offset) * scale)."""
    x, y, w, h = bounds(nodes)
    scale = min(FIT_FILL * window[0] / max(w, 300), FIT_FILL * window[1] / max(h, 300), 10.0)
    return scale, (window[0] / scale / 2 - x - w / 2, window[1] / scale / 2 - y - h / 2)


def screen_box(node, view):
    scale, (ox, oy) = view
    x, y = (node["pos"][0] + ox) * scale, (node["pos"][1] - TITLE_HEIGHT + oy) * scale
    return x, y, node["size"][0] * scale, (node["size"][1] + TITLE_HEIGHT) * scale


def hidden_by(box, window):
    """What of the page covers a screen box in a window: the side toolbar, the top bar, the
    minimap, or the window's edge."""
    x, y, w, h = box
    covers = []
    if x < SIDE_BAR_RIGHT:
        covers.append("side toolbar")
    if y < TOP_BAR_BOTTOM:
        covers.append("top bar")
    if x + w > window[0] or y + h > window[1]:
        covers.append("window edge")
    if x + w > window[0] - MINIMAP[0] and y + h > window[1] - MINIMAP[1]:
        covers.append("minimap")
    return covers


def view_problems(nodes, window):
    """Why the workflow would not open readable with every node in view in a window ([] if it does)."""
    view = opened_view(nodes, window)
    problems = [] if view[0] >= READABLE_SCALE else [f"opens at zoom {view[0]:.3f} < {READABLE_SCALE}"]
    for node in nodes:
        covers = hidden_by(screen_box(node, view), window)
        if covers:
            problems.append(f"{node.get('title') or node['type']} under the {', '.join(covers)}")
    return problems

"""Where a workflow opens: the canvas view (zoom and offset) that shows the whole graph."""

# The view a workflow opens with shows the whole graph inside the part of the canvas that the top
# bar (tabs, breadcrumb, run button) and the side toolbar leave free in a 1600 x 1000 browser
# window (from x 59 and y 90 in the 0.8.0 frontend), or any larger one.
VISIBLE_ORIGIN = (75, 105)
VISIBLE_SIZE = (1480, 800)

TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos


def view_showing(nodes):
    """extra.ds (canvas offset and scale; screen = (pos + offset) * scale) that fits every node,
    title bars included, into VISIBLE_SIZE at VISIBLE_ORIGIN, never zooming in past 1."""
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes) - TITLE_HEIGHT
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    scale = round(min(1.0, VISIBLE_SIZE[0] / (x1 - x0), VISIBLE_SIZE[1] / (y1 - y0)), 3)
    return {"scale": scale, "offset": [round(VISIBLE_ORIGIN[0] / scale - x0, 1), round(VISIBLE_ORIGIN[1] / scale - y0, 1)]}


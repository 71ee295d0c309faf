"""Drawing 18-keypoint poses (plus hands and face) on black, as the control models saw them.

Two styles:
- `draw_openpose`: the ControlNet 1.1 annotator (annotator/openpose/util.py), RGB. Limbs are
  filled ellipses (half-width 4) drawn at full colour on a black canvas that is then scaled by
  0.6 (uint8 truncation), joints are radius-4 circles at full colour; later limbs and joints
  cover earlier ones. Hands: 20 edges coloured hsv(i / 20, 1, 1), thickness 2, points radius 4
  in (0, 0, 255); face: white dots radius 3.
- `draw_svd_v2`: ControlNeXt-SVD-v2 (ControlNeXt-SVD-v2/dwpose/util.py). Drawn on a canvas
  whose shorter side is 2160 px, colours scaled by confidence: limbs `int(c * conf_a * conf_b)`
  and only when both confidences >= 0.3, joints `int(c * conf)` when conf > 0.3; hand edges
  hsv * int(conf_a * conf_b * 255), hand points (0, 0, int(conf * 255)), face dots grey
  int(conf * 255), hands and face drawn whatever their confidence. The canvas is resized to the
  output size (bilinear) and its channels swapped (BGR -> RGB), so colours are mirrored
  relative to `draw_openpose` (the first limb is blue, not red).
Pixel coordinates are `int(x * width)`, `int(y * height)` as in both references.
"""
import colorsys
import math

import cv2
import numpy as np

from .pose_format import PoseFrame

LIMBS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
         [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18]]  # 1-based keypoint pairs, drawn in this order
COLORS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
          [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
          [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
HAND_EDGES = [[0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [5, 6], [6, 7], [7, 8], [0, 9], [9, 10], [10, 11], [11, 12],
              [0, 13], [13, 14], [14, 15], [15, 16], [0, 17], [17, 18], [18, 19], [19, 20]]
HAND_EDGE_COLORS = [colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0) for i in range(len(HAND_EDGES))]
STICK_WIDTH = 4
SVD_V2_SHORT_SIDE = 2160
SVD_V2_THRESHOLD = 0.3
_EPS = 0.01  # the references skip hand/face points whose pixel x or y is 0


def draw_openpose(frame, width=None, height=None, body=True, hands=True, face=True, threshold=0.0):
    """PoseFrame -> (H, W, 3) uint8 RGB, annotator style. Keypoints with confidence <= threshold
    are not drawn. The size defaults to the frame's canvas size."""
    width, height = _size(frame, width, height)
    canvas = np.zeros((height, width, 3), np.uint8)
    people = frame.people
    if body:
        for i, (a, b) in enumerate(LIMBS):
            for person in people:
                pa, pb = person.body[a - 1], person.body[b - 1]
                if pa[2] > threshold and pb[2] > threshold:
                    _fill_limb(canvas, pa, pb, COLORS[i])
        canvas = (canvas * 0.6).astype(np.uint8)
        for i in range(len(COLORS)):
            for person in people:
                x, y, c = person.body[i]
                if c > threshold:
                    cv2.circle(canvas, (int(x * width), int(y * height)), 4, COLORS[i], thickness=-1)
    if hands:
        for person in people:
            for hand in (person.left_hand, person.right_hand):
                if hand is not None:
                    _draw_hand(canvas, hand, lambda ca, cb: 255.0, lambda c: (0, 0, 255), threshold)
    if face:
        for person in people:
            if person.face is not None:
                _draw_face(canvas, person.face, lambda c: (255, 255, 255), threshold)
    return canvas


def draw_svd_v2(frame, width=None, height=None):
    """PoseFrame -> (H, W, 3) uint8 RGB in the ControlNeXt-SVD-v2 style (see module docstring)."""
    width, height = _size(frame, width, height)
    short = min(height, width)
    sr = SVD_V2_SHORT_SIDE / short if short != SVD_V2_SHORT_SIDE else 1
    canvas = np.zeros((int(height * sr), int(width * sr), 3), np.uint8)
    people = frame.people
    for i, (a, b) in enumerate(LIMBS):
        for person in people:
            pa, pb = person.body[a - 1], person.body[b - 1]
            if pa[2] >= SVD_V2_THRESHOLD and pb[2] >= SVD_V2_THRESHOLD:
                _fill_limb(canvas, pa, pb, [int(c * pa[2] * pb[2]) for c in COLORS[i]])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(len(COLORS)):
        for person in people:
            x, y, c = person.body[i]
            if c > SVD_V2_THRESHOLD:
                cv2.circle(canvas, (int(x * canvas.shape[1]), int(y * canvas.shape[0])), 4,
                           [int(v * c) for v in COLORS[i]], thickness=-1)
    # DWPose lists every person's first (left) hand, then every person's right hand.
    for hand in [p.left_hand for p in people] + [p.right_hand for p in people]:
        if hand is not None:
            _draw_hand(canvas, hand, lambda ca, cb: int(ca * cb * 255), lambda c: (0, 0, int(c * 255)), None)
    for person in people:
        if person.face is not None:
            _draw_face(canvas, person.face, lambda c: (int(c * 255),) * 3, None)
    if canvas.shape[:2] != (height, width):
        canvas = cv2.resize(canvas, (width, height))
    return cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)


def _fill_limb(canvas, pa, pb, color):
    h, w = canvas.shape[:2]
    xs = np.array([pa[0], pb[0]]) * float(w)
    ys = np.array([pa[1], pb[1]]) * float(h)
    length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5  # the references' formula, bit for bit
    angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
    polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
    cv2.fillConvexPoly(canvas, polygon, color)


def _draw_hand(canvas, hand, edge_scale, point_color, threshold):
    """threshold None: draw every point (SVD v2); else skip points with confidence <= threshold."""
    h, w = canvas.shape[:2]
    hand = np.asarray(hand, dtype=np.float64)
    shown = np.ones(len(hand), bool) if threshold is None else hand[:, 2] > threshold
    pts = [(int(x * w), int(y * h)) for x, y in hand[:, :2]]
    for ie, (a, b) in enumerate(HAND_EDGES):
        (x1, y1), (x2, y2) = pts[a], pts[b]
        if shown[a] and shown[b] and min(x1, y1, x2, y2) > _EPS:
            scale = edge_scale(hand[a, 2], hand[b, 2])
            cv2.line(canvas, (x1, y1), (x2, y2), [v * scale for v in HAND_EDGE_COLORS[ie]], thickness=2)
    for (x, y), c, show in zip(pts, hand[:, 2], shown):
        if show and x > _EPS and y > _EPS:
            cv2.circle(canvas, (x, y), 4, point_color(c), thickness=-1)


def _draw_face(canvas, face, color, threshold):
    h, w = canvas.shape[:2]
    for x, y, c in np.asarray(face, dtype=np.float64):
        x, y = int(x * w), int(y * h)
        if (threshold is None or c > threshold) and x > _EPS and y > _EPS:
            cv2.circle(canvas, (x, y), 3, color(c), thickness=-1)


def _size(frame, width, height):
    if not isinstance(frame, PoseFrame):
        raise TypeError(f"Expected a PoseFrame, got {type(frame).__name__}.")
    width = int(frame.width if width is None else width)
    height = int(frame.height if height is None else height)
    if width <= 0 or height <= 0:
        raise ValueError(f"Cannot draw a pose on a {width} x {height} canvas.")
    return width, height

"""Pose keypoints: the in-memory form shared by decoders, drawing and alignment, and the
OpenPose JSON form.

In memory, coordinates are normalised to the canvas (x / width, y / height), as the ControlNet
annotators keep them, so a pose can be drawn at any size. Each keypoint is a row
(x, y, confidence); confidence 0 means "not detected".

Body: the 18 OpenPose/COCO keypoints: 0 nose, 1 neck, 2-4 right shoulder/elbow/wrist,
5-7 left shoulder/elbow/wrist, 8-10 right hip/knee/ankle, 11-13 left hip/knee/ankle,
14/15 right/left eye, 16/17 right/left ear. Hands: 21 keypoints. Face: 68 (DWPose) or
70 (OpenPose) keypoints.

JSON (OpenPose output format): `{"people": [{"pose_keypoints_2d": [x, y, c, ...],
"hand_left_keypoints_2d": ..., "hand_right_keypoints_2d": ..., "face_keypoints_2d": ...}],
"canvas_width": W, "canvas_height": H}`, coordinates in pixels, missing keypoints (0, 0, 0),
absent parts `null`. When reading, a file whose coordinates all lie in [0, 1] is taken as
normalised (some ComfyUI packs write those).
"""
from dataclasses import dataclass, field

import numpy as np

BODY_POINTS = 18
HAND_POINTS = 21


@dataclass
class Person:
    body: np.ndarray  # (18, 3) float: x, y normalised, confidence
    left_hand: np.ndarray = None  # (21, 3) or None
    right_hand: np.ndarray = None
    face: np.ndarray = None  # (68 or 70, 3) or None


@dataclass
class PoseFrame:
    width: int
    height: int
    people: list = field(default_factory=list)


def to_openpose_json(frame):
    """PoseFrame -> OpenPose JSON dict (pixel coordinates)."""
    scale = np.array([frame.width, frame.height, 1.0])

    def flat(points):
        if points is None:
            return None
        p = np.asarray(points, dtype=np.float64) * scale
        p[p[:, 2] <= 0] = 0.0  # missing -> (0, 0, 0)
        return [float(v) for v in p.reshape(-1)]

    return {
        "people": [
            {
                "pose_keypoints_2d": flat(person.body),
                "hand_left_keypoints_2d": flat(person.left_hand),
                "hand_right_keypoints_2d": flat(person.right_hand),
                "face_keypoints_2d": flat(person.face),
            }
            for person in frame.people
        ],
        "canvas_width": int(frame.width),
        "canvas_height": int(frame.height),
    }


def from_openpose_json(data):
    """OpenPose JSON dict -> PoseFrame. Raises ValueError for malformed data."""
    try:
        width, height = int(data["canvas_width"]), int(data["canvas_height"])
        people = data.get("people", [])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"Not an OpenPose JSON pose: needs canvas_width, canvas_height and people ({e}).") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"OpenPose JSON canvas size must be positive, got {width} x {height}.")

    parts = []
    for i, person in enumerate(people):
        body = _points(person.get("pose_keypoints_2d"), f"people[{i}].pose_keypoints_2d", BODY_POINTS)
        if body is None:
            body = np.zeros((BODY_POINTS, 3))
        hands = [_points(person.get(k), f"people[{i}].{k}", HAND_POINTS) for k in ("hand_left_keypoints_2d", "hand_right_keypoints_2d")]
        face = _points(person.get("face_keypoints_2d"), f"people[{i}].face_keypoints_2d", None)
        parts.append([body, hands[0], hands[1], face])

    present = [p[p[:, 2] > 0, :2] for person in parts for p in person if p is not None]
    coords = np.concatenate(present) if present else np.zeros((0, 2))
    normalised = coords.size > 0 and coords.min() >= 0.0 and coords.max() <= 1.0
    scale = np.array([1.0, 1.0, 1.0]) if normalised else np.array([1.0 / width, 1.0 / height, 1.0])
    frame = PoseFrame(width, height)
    for body, left, right, face in parts:
        frame.people.append(Person(*[None if p is None else p * scale for p in (body, left, right, face)]))
    return frame


def _points(values, name, count):
    if values is None or len(values) == 0:
        return None
    p = np.asarray(values, dtype=np.float64)
    if p.ndim != 1 or p.size % 3:
        raise ValueError(f"{name} must be a flat list of x, y, c triples, got {p.size} numbers.")
    p = p.reshape(-1, 3)
    if count is not None and len(p) != count:
        raise ValueError(f"{name} has {len(p)} keypoints, expected {count} (the 18-keypoint COCO body and 21-keypoint hands are supported).")
    return p

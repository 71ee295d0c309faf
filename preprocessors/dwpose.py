"""DWPose whole-body estimation (Apache-2.0): YOLOX-L person detector (`yolox_l.onnx`) and the
RTMPose SimCC whole-body model (`dw-ll_ucoco_384.onnx`, 133 COCO-WholeBody keypoints), both
from the `yzd-v/DWPose` model repository.

Pre- and post-processing are pure numpy/OpenCV functions (tested on synthetic arrays); the
networks run through `OnnxModel`, a thin adapter over onnxruntime when it is importable, else
OpenCV's DNN module (`cv2.dnn.readNetFromONNX`). As the DWPose ControlNet annotator
(IDEA-Research/DWPose, ControlNet-v1-1-nightly/annotator/dwpose: onnxdet.py, onnxpose.py,
wholebody.py, __init__.py):

- Detector input: the RGB image letterboxed into 640 x 640 (scale r = min(640 / H, 640 / W),
  bilinear resize to (int(W r), int(H r)), top-left, the rest filled with 114), raw 0..255
  floats, CHW. Output (1, 8400, 85): per anchor cx, cy, w, h (grid offsets / log sizes at
  strides 8, 16, 32), objectness, 80 class scores. Decoding: (xy + grid) * stride,
  exp(wh) * stride, boxes to x1y1x2y2 / r, score = objectness * class score; per-class NMS
  (IoU 0.45, "+1" pixel areas) over candidates above 0.1, then people (class 0) above 0.3.
- Pose input, per person box: center and scale from the box with padding 1.25, the scale
  widened to the 288 / 384 aspect, an affine warp (bilinear) of that region to 288 x 384,
  (RGB - mean [123.675, 116.28, 103.53]) / std [58.395, 57.12, 57.375], CHW. No person found:
  the whole image is used as the box (as the reference).
- Outputs simcc_x (1, 133, 576), simcc_y (1, 133, 768): argmax per keypoint / split ratio 2,
  score = min of the two maxima (a location whose score is <= 0 becomes -1), then mapped back
  with the box's center and scale.
- To OpenPose order: neck = mean of keypoints 5 and 6 (score 1 when both scores > 0.3, else 0)
  inserted at index 17, then mmpose [17,6,8,10,7,9,12,14,16,13,15,2,1,4,3] -> openpose
  [1,2,3,4,6,7,8,9,10,12,13,14,15,16,17]. 134 points: body 0-17, feet 18-23 (dropped), face
  24-91 (68), left hand 92-112, right hand 113-133.
- In `PoseFrame` form (normalised coordinates): body keypoints keep their scores (drawing applies
  the 0.3 threshold; alignment uses the raw body points as ControlNeXt-SVD-v2 does), hand and
  face keypoints with score < 0.3 are marked missing (0, 0, 0), as the references set them to -1.
"""
import logging

import cv2
import numpy as np

from .pose_format import Person, PoseFrame

LOG = logging.getLogger("xctrl")

DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
DET_SIZE = (640, 640)  # (H, W)
PAD_VALUE = 114
STRIDES = (8, 16, 32)
NMS_IOU = 0.45
CANDIDATE_SCORE = 0.1
PERSON_SCORE = 0.3
POSE_SIZE = (288, 384)  # (W, H) of the pose model's input
BOX_PADDING = 1.25
POSE_MEAN = np.array([123.675, 116.28, 103.53])
POSE_STD = np.array([58.395, 57.12, 57.375])
SIMCC_SPLIT_RATIO = 2.0
KEYPOINTS = 133
KEYPOINT_THRESHOLD = 0.3
MMPOSE_IDX = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
OPENPOSE_IDX = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
BACKENDS = ("auto", "onnxruntime", "opencv")
# Working-size limit: the detector letterboxes to 640 x 640 and the pose model crops 288 x 384, so
# the working image only costs its own pixels (3 bytes each).
MAX_PIXELS = 4096 * 4096


# ---------------------------------------------------------------------------------------------
# Detector


def letterbox(image, size=DET_SIZE, pad_value=PAD_VALUE):
    """(H, W, 3) uint8 -> ((3, size_h, size_w) float32, ratio r)."""
    _check_image(image)
    h, w = image.shape[:2]
    r = min(size[0] / h, size[1] / w)
    nh, nw = int(h * r), int(w * r)
    if nh < 1 or nw < 1:
        raise ValueError(f"The image ({h} x {w}) is too thin to detect people in.")
    canvas = np.full((size[0], size[1], 3), pad_value, np.uint8)
    canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32), r


def anchor_grid(size=DET_SIZE, strides=STRIDES):
    """((A, 2) grid x, y; (A, 1) strides) of YOLOX's anchors, strides 8, 16, 32 in order."""
    grids, steps = [], []
    for s in strides:
        hs, ws = size[0] // s, size[1] // s
        xv, yv = np.meshgrid(np.arange(ws), np.arange(hs))
        grids.append(np.stack([xv, yv], axis=2).reshape(-1, 2))
        steps.append(np.full((hs * ws, 1), s))
    return np.concatenate(grids).astype(np.float64), np.concatenate(steps).astype(np.float64)


def decode_yolox(raw, size=DET_SIZE):
    """Raw detector output (1, A, 5 + C) or (A, 5 + C) -> (A, 5 + C) with boxes as cx, cy, w, h
    in letterbox pixels (a copy; the input is not modified)."""
    pred = np.array(raw, dtype=np.float64)
    if pred.ndim == 3:
        pred = pred[0]
    grid, stride = anchor_grid(size)
    if pred.ndim != 2 or pred.shape[0] != len(grid) or pred.shape[1] < 6:
        raise ValueError(f"YOLOX output must be (1, {len(grid)}, 85), got {np.shape(raw)}: is {DETECTOR_FILE} the right file?")
    pred[:, :2] = (pred[:, :2] + grid) * stride
    pred[:, 2:4] = np.exp(pred[:, 2:4]) * stride
    return pred


def nms(boxes, scores, iou_threshold=NMS_IOU):
    """Greedy NMS (the reference's, areas with +1 pixel); returns kept indices, best first."""
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return keep


def person_boxes(raw, ratio, size=DET_SIZE):
    """Raw detector output -> (K, 4) person boxes x1, y1, x2, y2 in image pixels, best first."""
    pred = decode_yolox(raw, size)
    cx, cy, bw, bh = pred[:, 0], pred[:, 1], pred[:, 2], pred[:, 3]
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1) / ratio
    scores = pred[:, 4:5] * pred[:, 5:]
    person = scores[:, 0]  # class-aware NMS: only class 0 matters for the result
    valid = person > CANDIDATE_SCORE
    if not valid.any():
        return np.zeros((0, 4))
    boxes, person = boxes[valid], person[valid]
    keep = [i for i in nms(boxes, person, NMS_IOU) if person[i] > PERSON_SCORE]
    return boxes[keep].reshape(-1, 4)


# ---------------------------------------------------------------------------------------------
# Top-down pose


def box_center_scale(box, padding=BOX_PADDING):
    """x1, y1, x2, y2 -> (center (2,), scale (2,) = padded w, h)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([x1 + x2, y1 + y2]) * 0.5, np.array([x2 - x1, y2 - y1]) * padding


def fix_aspect_ratio(scale, aspect):
    """Widen (w, h) to the aspect w / h = `aspect`, keeping the larger extent."""
    w, h = float(scale[0]), float(scale[1])
    return np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])


def warp_matrix(center, scale, output_size):
    """2x3 affine matrix mapping the box (center, scale w, h) onto an output_size (W, H) image
    (rotation 0; from three point pairs in float32 as the reference)."""
    dst_w, dst_h = output_size
    src_dir = np.array([0.0, scale[0] * -0.5])
    dst_dir = np.array([0.0, dst_w * -0.5])
    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0] = center
    src[1] = center + src_dir
    src[2] = _third_point(src[0], src[1])
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = dst[0] + dst_dir
    dst[2] = _third_point(dst[0], dst[1])
    return cv2.getAffineTransform(src, dst)


def _third_point(a, b):
    d = a - b
    return b + np.array([-d[1], d[0]], np.float32)


def crop_person(image, box, input_size=POSE_SIZE):
    """The pose model's input for one box: ((3, H, W) float32, center, scale (w, h))."""
    center, scale = box_center_scale(box)
    scale = fix_aspect_ratio(scale, input_size[0] / input_size[1])
    crop = cv2.warpAffine(image, warp_matrix(center, scale, input_size), (int(input_size[0]), int(input_size[1])), flags=cv2.INTER_LINEAR)
    x = (crop - POSE_MEAN) / POSE_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32), center, scale


def simcc_decode(simcc_x, simcc_y, split_ratio=SIMCC_SPLIT_RATIO):
    """(N, K, Wx), (N, K, Wy) -> (locations (N, K, 2) in model-input pixels, scores (N, K)).

    Argmax per axis / split ratio; score = min of the two maxima; score <= 0 -> location -1
    (before the division, as the reference: -0.5 after it)."""
    simcc_x, simcc_y = np.asarray(simcc_x), np.asarray(simcc_y)
    if simcc_x.ndim != 3 or simcc_y.ndim != 3 or simcc_x.shape[:2] != simcc_y.shape[:2]:
        raise ValueError(f"SimCC outputs must be (N, K, Wx) and (N, K, Wy), got {simcc_x.shape} and {simcc_y.shape}.")
    n, k = simcc_x.shape[:2]
    fx, fy = simcc_x.reshape(n * k, -1), simcc_y.reshape(n * k, -1)
    locs = np.stack([np.argmax(fx, axis=1), np.argmax(fy, axis=1)], axis=-1).astype(np.float32)
    scores = np.minimum(np.amax(fx, axis=1), np.amax(fy, axis=1))
    locs[scores <= 0.0] = -1
    return locs.reshape(n, k, 2) / split_ratio, scores.reshape(n, k)


def to_image_coords(locs, center, scale, input_size=POSE_SIZE):
    """Model-input pixel locations (K, 2) -> image pixels, given the crop's center and scale."""
    return locs / np.asarray(input_size, np.float64) * scale + center - scale / 2


def wholebody_to_openpose(keypoints, scores):
    """(N, 133, 2), (N, 133) -> (N, 134, 2), (N, 134): neck inserted at 17, body reordered."""
    keypoints, scores = np.asarray(keypoints, np.float64), np.asarray(scores, np.float64)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (KEYPOINTS, 2) or scores.shape != keypoints.shape[:2]:
        raise ValueError(f"Expected whole-body keypoints (N, 133, 2) and scores (N, 133), got {keypoints.shape} and {scores.shape}.")
    info = np.concatenate([keypoints, scores[..., None]], axis=-1)
    neck = info[:, [5, 6]].mean(axis=1)
    neck[:, 2] = np.logical_and(info[:, 5, 2] > KEYPOINT_THRESHOLD, info[:, 6, 2] > KEYPOINT_THRESHOLD).astype(float)
    info = np.insert(info, 17, neck, axis=1)
    info[:, OPENPOSE_IDX] = info[:, MMPOSE_IDX]
    return info[..., :2], info[..., 2]


def to_pose_frame(keypoints, scores, width, height, threshold=KEYPOINT_THRESHOLD):
    """OpenPose-ordered (N, 134, 2) pixels and (N, 134) scores -> PoseFrame (see module doc)."""
    scale = np.array([1.0 / width, 1.0 / height])
    frame = PoseFrame(int(width), int(height))
    for kp, sc in zip(np.asarray(keypoints, np.float64), np.asarray(scores, np.float64)):
        pts = np.concatenate([kp * scale, sc[:, None]], axis=1)

        def part(a, b):
            p = pts[a:b].copy()
            p[p[:, 2] < threshold] = 0.0
            return p

        frame.people.append(Person(body=pts[:18].copy(), left_hand=part(92, 113), right_hand=part(113, 134), face=part(24, 92)))
    return frame


# ---------------------------------------------------------------------------------------------
# Running the two networks


class OnnxModel:
    """One ONNX network: onnxruntime when importable (CUDA provider for a CUDA device when
    available, CPU otherwise), else OpenCV's DNN module. `run(x)` -> {output name: array}."""

    def __init__(self, path, device="cpu", backend="auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        self.path = path
        self.backend = None
        if backend in ("auto", "onnxruntime"):
            try:
                import onnxruntime  # noqa: F401  (optional dependency)
            except ImportError:
                if backend == "onnxruntime":
                    raise RuntimeError("onnxruntime is not installed (pip install onnxruntime).") from None
                LOG.info("[XCtrl] DWPose: onnxruntime is not installed; using OpenCV's DNN module (slower on CPU).")
            else:
                self._open_onnxruntime(path, device)
        if self.backend is None:
            self._open_opencv(path)

    def _open_onnxruntime(self, path, device):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(path, providers=providers)
        except Exception as e:  # noqa: BLE001 (onnxruntime raises its own exception types)
            if len(providers) > 1:
                LOG.warning("[XCtrl] DWPose: onnxruntime's CUDA provider failed (%s); running on the CPU.", e)
                try:
                    self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                except Exception as e2:  # noqa: BLE001
                    raise OnnxLoadError(path, e2) from e2
            else:
                raise OnnxLoadError(path, e) from e
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.backend = "onnxruntime"

    def _open_opencv(self, path):
        try:
            self.net = cv2.dnn.readNetFromONNX(path)
        except cv2.error as e:
            raise OnnxLoadError(path, e) from e
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self.output_names = list(self.net.getUnconnectedOutLayersNames())
        self.backend = "opencv"

    def run(self, x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.backend == "onnxruntime":
            outs = self.session.run(None, {self.input_name: x})
        else:
            self.net.setInput(x)
            outs = self.net.forward(self.output_names)
        return {name: np.asarray(o) for name, o in zip(self.output_names, outs)}


class OnnxLoadError(ValueError):
    def __init__(self, path, cause):
        import os

        name = os.path.basename(path)
        super().__init__(
            f"{name} could not be loaded as an ONNX model ({type(cause).__name__}: {' '.join(str(cause).split())[:300]}). It is probably "
            f"truncated or corrupt: delete {path} and run again to download it anew, or replace it by hand."
        )


class DWPose:
    """Detector + pose model. `__call__(image)` -> PoseFrame (normalised coordinates)."""

    def __init__(self, detector, pose):
        self.detector = detector
        self.pose = pose

    def detect(self, image):
        """(H, W, 3) uint8 RGB -> (K, 4) person boxes in pixels."""
        x, ratio = letterbox(image)
        out = self.detector.run(x[None])
        if len(out) != 1:
            raise ValueError(f"{DETECTOR_FILE} should have one output, this file has {len(out)}: is it the right file?")
        return person_boxes(next(iter(out.values())), ratio)

    def estimate(self, image, boxes, check=None):
        """Keypoints (N, 133, 2) image pixels and scores (N, 133) for each box (whole image if none);
        `check()`, when given, is called before each box's network call (the caller's cancel check)."""
        if len(boxes) == 0:
            boxes = np.array([[0, 0, image.shape[1], image.shape[0]]], np.float64)
        keypoints, scores = [], []
        for box in boxes:
            if check is not None:
                check()
            x, center, scale = crop_person(image, box)
            simcc_x, simcc_y = self._simcc(self.pose.run(x[None]))
            locs, sc = simcc_decode(simcc_x, simcc_y)
            keypoints.append(to_image_coords(locs[0], center, scale))
            scores.append(sc[0])
        return np.stack(keypoints), np.stack(scores)

    def __call__(self, image, check=None):
        _check_image(image)
        keypoints, scores = self.estimate(image, self.detect(image), check)
        keypoints, scores = wholebody_to_openpose(keypoints, scores)
        return to_pose_frame(keypoints, scores, image.shape[1], image.shape[0])

    @staticmethod
    def _simcc(outputs):
        """simcc_x and simcc_y by name, or by width (x: 2 x 288 = 576 < y: 2 x 384 = 768)."""
        if "simcc_x" in outputs and "simcc_y" in outputs:
            return outputs["simcc_x"], outputs["simcc_y"]
        arrays = sorted(outputs.values(), key=lambda a: a.shape[-1])
        if len(arrays) != 2 or arrays[0].ndim != 3 or arrays[0].shape[1] != KEYPOINTS:
            raise ValueError(f"{POSE_FILE} should output simcc_x (1, 133, 576) and simcc_y (1, 133, 768), got "
                             f"{[a.shape for a in outputs.values()]}: is it the right file?")
        return arrays[0], arrays[1]


def _check_image(image):
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"DWPose expects a uint8 RGB image (H, W, 3), got {desc}.")
    if 0 in image.shape[:2]:
        raise ValueError(f"The image has zero size ({image.shape[0]} x {image.shape[1]} pixels).")

"""DWPose: letterbox, YOLOX decoding + NMS, the top-down crop, SimCC decoding, whole-body ->
OpenPose conversion on synthetic inputs with known answers; the ONNX adapter (onnxruntime and
OpenCV DNN) on tiny ONNX files with the real files' input/output names and shapes."""
import math

import cv2
import numpy as np
import pytest

from xctrl.preprocessors.pose_sequence import most_confident_person
from xctrl.preprocessors import dwpose as dwp
from xctrl.preprocessors.pose_format import PoseFrame, Person


# --------------------------------------------------------------------------------- detector


def test_letterbox_scales_top_left_and_pads_with_114():
    img = np.zeros((320, 480, 3), np.uint8)
    img[:, :, 0] = 200
    x, r = dwp.letterbox(img)
    assert x.shape == (3, 640, 640) and x.dtype == np.float32
    assert r == pytest.approx(640 / 480)
    assert (x[0, :426, :] == 200).all()  # int(320 * 4/3) = 426 rows of image, raw values (no /255)
    assert (x[:, 426:, :] == 114).all() and (x[1, :426] == 0).all()


def test_anchor_grid_order_is_strides_8_16_32():
    grid, stride = dwp.anchor_grid()
    assert len(grid) == 80 * 80 + 40 * 40 + 20 * 20 == 8400
    assert tuple(grid[1]) == (1, 0) and tuple(grid[80]) == (0, 1) and stride[0, 0] == 8
    assert tuple(grid[6400]) == (0, 0) and stride[6400, 0] == 16 and stride[-1, 0] == 32 and tuple(grid[-1]) == (19, 19)


def _anchor(level, gx, gy):
    offsets = {8: 0, 16: 6400, 32: 8000}
    return offsets[level] + gy * (640 // level) + gx


def _raw_detection(entries):
    """entries: (stride, gx, gy, cx, cy, w, h, objectness, class_scores {class: score})."""
    raw = np.zeros((1, 8400, 85), np.float32)
    raw[0, :, 2:4] = 0.0
    for stride, gx, gy, cx, cy, w, h, obj, classes in entries:
        a = _anchor(stride, gx, gy)
        raw[0, a, 0] = cx / stride - gx
        raw[0, a, 1] = cy / stride - gy
        raw[0, a, 2] = math.log(w / stride)
        raw[0, a, 3] = math.log(h / stride)
        raw[0, a, 4] = obj
        for c, s in classes.items():
            raw[0, a, 5 + c] = s
    return raw


def test_person_boxes_decode_nms_and_filters():
    ratio = 2.0
    raw = _raw_detection([
        (8, 10, 20, 84.0, 164.0, 40.0, 100.0, 0.9, {0: 0.9}),  # person, score 0.81
        (8, 11, 20, 90.0, 166.0, 40.0, 100.0, 0.9, {0: 0.8}),  # overlaps it (IoU > 0.45), lower: suppressed
        (16, 30, 10, 500.0, 170.0, 60.0, 120.0, 0.8, {0: 0.7}),  # second person, 0.56
        (32, 5, 5, 170.0, 170.0, 50.0, 50.0, 0.95, {16: 0.95}),  # a dog: not a person
        (32, 15, 15, 490.0, 490.0, 50.0, 50.0, 0.5, {0: 0.5}),  # person score 0.25 < 0.3: dropped
    ])
    boxes = dwp.person_boxes(raw, ratio)
    expected = np.array([[64, 114, 104, 214], [470, 110, 530, 230]], np.float64) / ratio
    np.testing.assert_allclose(boxes, expected, atol=1e-4)


def test_person_boxes_none_found():
    assert dwp.person_boxes(np.zeros((1, 8400, 85), np.float32), 1.0).shape == (0, 4)
    with pytest.raises(ValueError, match="8400"):
        dwp.person_boxes(np.zeros((1, 100, 85), np.float32), 1.0)


def test_nms_known_answer():
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [0, 0, 9, 4]], np.float64)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # IoU(0,1) = 81/119 = 0.68 > 0.45; IoU(3,0) = 50/100 = 0.5 > 0.45
    assert dwp.nms(boxes, scores, 0.45) == [3, 1, 2]


# --------------------------------------------------------------------------------- pose crop


def test_center_scale_and_aspect():
    center, scale = dwp.box_center_scale([10, 20, 110, 220])
    np.testing.assert_allclose(center, [60, 120])
    np.testing.assert_allclose(scale, [125, 250])
    np.testing.assert_allclose(dwp.fix_aspect_ratio(scale, 288 / 384), [187.5, 250])  # tall box: widened
    np.testing.assert_allclose(dwp.fix_aspect_ratio(np.array([400.0, 100.0]), 0.75), [400, 400 / 0.75])


def test_crop_maps_the_box_onto_the_model_input_and_back():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    box = [100, 50, 220, 250]
    x, center, scale = dwp.crop_person(image, box)
    assert x.shape == (3, 384, 288) and x.dtype == np.float32
    m = dwp.warp_matrix(center, scale, dwp.POSE_SIZE)
    points = np.array([[160.0, 150.0], [100.0, 50.0], [210.0, 240.0]])
    in_crop = cv2.transform(points[None], m)[0]
    np.testing.assert_allclose(in_crop[0], [144, 192], atol=1e-3)  # box center -> crop center
    np.testing.assert_allclose(dwp.to_image_coords(in_crop, center, scale), points, atol=1e-2)
    # the crop holds the normalised pixels of the image at those places
    px = np.round(in_crop[0]).astype(int)
    expected = (image[150, 160] - dwp.POSE_MEAN) / dwp.POSE_STD
    np.testing.assert_allclose(x[:, px[1], px[0]], expected, atol=0.05)


def test_simcc_decode_known_answer():
    sx = np.zeros((1, 3, 576), np.float32)
    sy = np.zeros((1, 3, 768), np.float32)
    sx[0, 0, 100], sy[0, 0, 300] = 0.9, 0.6  # -> (50, 150), score min = 0.6
    sx[0, 1, 7], sy[0, 1, 9] = 0.2, 0.8  # -> (3.5, 4.5), 0.2
    sx[0, 2] -= 1.0  # max -1 <= 0: location -1 -> -0.5 after the split ratio
    locs, scores = dwp.simcc_decode(sx, sy)
    np.testing.assert_allclose(locs[0], [[50, 150], [3.5, 4.5], [-0.5, -0.5]])
    np.testing.assert_allclose(scores[0], [0.6, 0.2, -1.0])


def test_wholebody_to_openpose_order_and_neck():
    kp = np.stack([np.arange(133.0), 10 * np.arange(133.0)], axis=1)[None]
    sc = np.full((1, 133), 0.9)
    sc[0, 6] = 0.2  # right shoulder weak -> neck score 0
    out, scores = dwp.wholebody_to_openpose(kp, sc)
    assert out.shape == (1, 134, 2) and scores.shape == (1, 134)
    np.testing.assert_allclose(out[0, 1], [5.5, 55])  # neck = mean of 5 and 6
    assert scores[0, 1] == 0.0
    coco_for_openpose = {0: 0, 2: 6, 3: 8, 4: 10, 5: 5, 6: 7, 7: 9, 8: 12, 9: 14, 10: 16, 11: 11, 12: 13, 13: 15,
                         14: 2, 15: 1, 16: 4, 17: 3}
    for op, coco in coco_for_openpose.items():
        assert out[0, op, 0] == coco, op
    np.testing.assert_allclose(out[0, 18:, 0], np.arange(17, 133))  # feet, face, hands shifted by one
    sc[0, 6] = 0.9
    assert dwp.wholebody_to_openpose(kp, sc)[1][0, 1] == 1.0


def test_to_pose_frame_normalises_and_marks_weak_hand_and_face_points_missing():
    kp = np.zeros((1, 134, 2))
    kp[0, :, 0], kp[0, :, 1] = 100.0, 50.0
    sc = np.full((1, 134), 0.8)
    sc[0, 3] = 0.1  # weak body point: kept with its score
    sc[0, 95] = 0.2  # weak left-hand point: missing
    sc[0, 30] = 0.29  # weak face point: missing
    frame = dwp.to_pose_frame(kp, sc, width=200, height=100)
    (p,) = frame.people
    assert (frame.width, frame.height) == (200, 100)
    np.testing.assert_allclose(p.body[0], [0.5, 0.5, 0.8])
    np.testing.assert_allclose(p.body[3], [0.5, 0.5, 0.1])
    assert p.left_hand.shape == (21, 3) and p.right_hand.shape == (21, 3) and p.face.shape == (68, 3)
    np.testing.assert_allclose(p.left_hand[3], [0, 0, 0])
    np.testing.assert_allclose(p.face[6], [0, 0, 0])
    np.testing.assert_allclose(p.right_hand[0], [0.5, 0.5, 0.8])


def test_most_confident_person():
    a = Person(body=np.full((18, 3), 0.4))
    b = Person(body=np.full((18, 3), 0.7))
    frame = most_confident_person(PoseFrame(10, 10, [a, b]))
    assert frame.people == [b]


# --------------------------------------------------------------------------------- ONNX adapter

DET_BOX = (120.0, 60.0, 200.0, 260.0)  # in the 400 x 300 test image


def _constant_model(path, input_name, input_shape, outputs):
    """An ONNX file: input_name (input_shape) -> each output = constant + 0 * mean(input)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", [input_name], ["m"], keepdims=1)]
    inits, outs = [], []
    for name, value in outputs.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), name + "_const"))
        inits.append(numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), name + "_zero"))
        nodes.append(helper.make_node("Reshape", ["m", name + "_shape"], [name + "_m"]))
        inits.append(numpy_helper.from_array(np.array([1, 1, 1], np.int64), name + "_shape"))
        nodes.append(helper.make_node("Mul", [name + "_m", name + "_zero"], [name + "_z"]))
        nodes.append(helper.make_node("Add", [name + "_const", name + "_z"], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dwpose")
    ratio = 640 / 400
    x1, y1, x2, y2 = (v * ratio for v in DET_BOX)
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    det = _raw_detection([(16, int(cx // 16), int(cy // 16), cx, cy, w, h, 0.95, {0: 0.95})])
    sx = np.full((1, 133, 576), -0.1, np.float32)
    sy = np.full((1, 133, 768), -0.1, np.float32)
    for k in range(133):  # keypoint k at crop (k + 10, 2k + 20) with score 0.5 + k/400
        sx[0, k, 2 * (k + 10)] = 0.5 + k / 400
        sy[0, k, 2 * (2 * k + 20)] = 0.9
    detector = _constant_model(d / dwp.DETECTOR_FILE, "images", (1, 3, 640, 640), {"output": det})
    pose = _constant_model(d / dwp.POSE_FILE, "input", (1, 3, 384, 288), {"simcc_x": sx, "simcc_y": sy})
    return detector, pose


def _expected_keypoints():
    center, scale = dwp.box_center_scale(DET_BOX)
    scale = dwp.fix_aspect_ratio(scale, 288 / 384)
    k = np.arange(133.0)
    crop = np.stack([k + 10, 2 * k + 20], axis=1)
    return dwp.to_image_coords(crop, center, scale), np.minimum(0.5 + k / 400, 0.9)


@pytest.mark.parametrize("backend", ["onnxruntime", "opencv"])
def test_end_to_end_on_tiny_onnx_files(tiny_files, backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    detector, pose = tiny_files
    model = dwp.DWPose(dwp.OnnxModel(detector, backend=backend), dwp.OnnxModel(pose, backend=backend))
    assert model.detector.backend == backend
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    np.testing.assert_allclose(model.detect(image), [DET_BOX], atol=0.05)
    frame = model(image)
    assert (frame.width, frame.height) == (400, 300) and len(frame.people) == 1
    pts, scores = _expected_keypoints()
    op, op_scores = dwp.wholebody_to_openpose(pts[None], scores[None])
    body = frame.people[0].body
    np.testing.assert_allclose(body[:, 0] * 400, op[0, :18, 0], atol=0.05)
    np.testing.assert_allclose(body[:, 1] * 300, op[0, :18, 1], atol=0.05)
    np.testing.assert_allclose(body[:, 2], op_scores[0, :18], atol=1e-6)
    np.testing.assert_allclose(frame.people[0].right_hand[:, 0] * 400, op[0, 113:, 0], atol=0.05)


def test_no_person_uses_the_whole_image(tiny_files, tmp_path):
    _, pose = tiny_files
    empty = _constant_model(tmp_path / "none.onnx", "images", (1, 3, 640, 640), {"output": np.zeros((1, 8400, 85), np.float32)})
    model = dwp.DWPose(dwp.OnnxModel(empty, backend="opencv"), dwp.OnnxModel(pose, backend="opencv"))
    image = np.zeros((300, 400, 3), np.uint8)
    assert len(model.detect(image)) == 0
    kp, _ = model.estimate(image, np.zeros((0, 4)))
    center, scale = dwp.box_center_scale([0, 0, 400, 300])
    scale = dwp.fix_aspect_ratio(scale, 0.75)
    np.testing.assert_allclose(kp[0, 0], dwp.to_image_coords(np.array([10.0, 20.0]), center, scale), atol=1e-3)


def test_corrupt_onnx_file_gives_a_clear_error(tmp_path):
    bad = tmp_path / dwp.POSE_FILE
    bad.write_bytes(b"\x08\x07garbage" * 10)
    for backend in ("opencv", "onnxruntime"):
        if backend == "onnxruntime":
            pytest.importorskip("onnxruntime")
        with pytest.raises(ValueError, match="dw-ll_ucoco_384.onnx could not be loaded.*delete"):
            dwp.OnnxModel(str(bad), backend=backend)


def test_wrong_model_outputs_are_refused(tiny_files, tmp_path):
    detector, _ = tiny_files
    model = dwp.DWPose(dwp.OnnxModel(detector, backend="opencv"), dwp.OnnxModel(detector, backend="opencv"))
    with pytest.raises(ValueError, match="dw-ll_ucoco_384.onnx"):
        model.estimate(np.zeros((50, 50, 3), np.uint8), np.zeros((0, 4)))


def test_workflow_standin_detects_exactly_one_person(tmp_path):
    """The end-to-end workflows' DWPose stand-in (tests/harness/standins.py) must report one
    person, as a real photo of one person does: its detector scores are probabilities, so
    logits left in them would read as thousands of people and slow every pose path down."""
    pytest.importorskip("onnx")
    from harness import standins

    standins._dwpose_onnx(str(tmp_path))
    model = dwp.DWPose(dwp.OnnxModel(str(tmp_path / dwp.DETECTOR_FILE)), dwp.OnnxModel(str(tmp_path / dwp.POSE_FILE)))
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert len(model.detect(image)) == 1
    frame = model(image)
    assert len(frame.people) == 1
    assert (frame.people[0].body[:, 2] > 0.3).all()  # a whole figure: every body point drawn

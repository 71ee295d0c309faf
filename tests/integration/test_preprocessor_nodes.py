"""Preprocessor nodes inside ComfyUI: random-weight files with the real key layouts in a temp
annotators folder, real photographs for canny, and the errors users see for missing (offline)
and corrupt weight files."""
import dataclasses
import os
import re
import socket

import cv2
import numpy as np
import pytest
import torch

from harness.comfy_runtime import node_result, pack_module, run_prompt


class _Node:
    """A V3 node class called like the classic nodes' run method."""

    def __init__(self, cls):
        self.cls = cls

    def run(self, *args, **kwargs):
        return node_result(self.cls, *args, **kwargs)


HED_FILE, BODY_FILE, DEPTH_FILE = "ControlNetHED.pth", "body_pose_model.pth", "depth_anything_v2_vits.pth"
DET_FILE, POSE_FILE = "yolox_l.onnx", "dw-ll_ucoco_384.onnx"


@pytest.fixture(scope="module")
def pn(pack):
    return pack_module("nodes.preprocessor_nodes")


@pytest.fixture(scope="module")
def am(pack):
    return pack_module("runtime.annotator_models")


@pytest.fixture(scope="module")
def annotators(tmp_path_factory, pack, am):
    """A temp annotators folder, first in the list (downloads would go there), with random
    weights of the real layouts."""
    import folder_paths

    d = tmp_path_factory.mktemp("annotators")
    folder_paths.add_model_folder_path("annotators", str(d), is_default=True)
    hed = pack_module("preprocessors.hed")
    body = pack_module("preprocessors.openpose_body")
    dav2 = pack_module("preprocessors.depth_anything_v2")
    torch.manual_seed(0)
    net = hed.ControlNetHED_Apache2()
    net.norm.data.uniform_(100, 150)
    torch.save({k: v.half() for k, v in net.state_dict().items()}, d / HED_FILE)
    net = body.BodyPoseNet()  # the real file has flat caffe names: conv1_1.weight, ...
    torch.save({k.split(".", 1)[1]: v.half() for k, v in net.state_dict().items()}, d / BODY_FILE)
    net = dav2.DepthAnythingV2Small()
    with torch.no_grad():
        net.pretrained.pos_embed.normal_(0, 0.02)
        net.depth_head.scratch.output_conv2[2].bias.fill_(0.5)
    torch.save(net.state_dict(), d / DEPTH_FILE)
    yield d
    am.free_models()


def photographs():
    """Real photographs: ComfyUI's example image and scikit-image's sample photos when installed."""
    import folder_paths

    images = []
    path = os.path.join(folder_paths.get_input_directory(), "example.png")
    if os.path.isfile(path):
        images.append(cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB))
    try:
        from skimage import data

        images += [data.astronaut(), data.coffee(), data.chelsea()]
    except ImportError:
        pass
    if not images:
        pytest.skip("no photograph available")
    return images


def to_image(arr):
    return torch.from_numpy(np.ascontiguousarray(arr)).float().div(255.0)[None] if arr.ndim == 3 else torch.from_numpy(arr).float().div(255.0)


def to_uint8(image):
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


# --------------------------------------------------------------------------------- canny


def test_canny_equals_opencv_on_photographs(pn):
    node = _Node(pn.Canny)
    for photo in photographs():
        (out,) = node.run(to_image(photo), "fixed", 100, 200, 0.33, 512, "input")
        expected = cv2.Canny(photo, 100, 200)
        got = to_uint8(out[0])
        assert got.shape == photo.shape
        np.testing.assert_array_equal(got[..., 0], expected)
        np.testing.assert_array_equal(got[..., 2], expected)
        grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
        v = float(np.median(grey))
        lo, hi = int(max(0, 0.67 * v)), int(min(255, 1.33 * v))
        (out,) = node.run(to_image(photo), "median", 0, 0, 0.33, 512, "input")
        np.testing.assert_array_equal(to_uint8(out[0])[..., 1], cv2.Canny(grey, lo, hi))


def test_canny_sizes_channels_and_batch(pn):
    node = _Node(pn.Canny)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 61, 89, 3), dtype=np.uint8)
    (out,) = node.run(to_image(frames), "fixed", 50, 150, 0.33, 32, "resolution")
    assert out.shape == (3, 32, 47, 3)
    (grey,) = node.run(to_image(frames[..., :1]), "fixed", 100, 200, 0.33, 512, "input")  # greyscale IMAGE
    np.testing.assert_array_equal(to_uint8(grey[0])[..., 0], cv2.Canny(np.repeat(frames[0, :, :, :1], 3, axis=2), 100, 200))
    rgba = np.concatenate([frames, np.full(frames.shape[:3] + (1,), 7, np.uint8)], axis=3)
    (out4,) = node.run(to_image(rgba), "fixed", 100, 200, 0.33, 512, "input")
    (out3,) = node.run(to_image(frames), "fixed", 100, 200, 0.33, 512, "input")
    assert torch.equal(out4, out3)
    with pytest.raises(ValueError, match="empty"):
        node.run(torch.zeros(0, 8, 8, 3), "fixed", 100, 200, 0.33, 512, "input")


def test_canny_through_comfyui_executor(pack):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 2, "color": 0xFF8000}},
        "2": {"class_type": "XCtrl_Canny", "inputs": {"image": ["1", 0], "mode": "median", "low_threshold": 100,
                                                      "high_threshold": 200, "sigma": 0.33, "resolution": 32, "output_size": "resolution"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    ex = run_prompt(prompt)
    assert ex.success, ex.status_messages
    import folder_paths
    from PIL import Image

    shown = ex.history_result["outputs"]["3"]["images"]
    assert len(shown) == 2  # one uniform colour: no edge anywhere
    for item in shown:
        path = os.path.join(folder_paths.get_directory_by_type(item["type"]), item["subfolder"], item["filename"])
        assert np.asarray(Image.open(path)).shape == (32, 43, 3) and not np.asarray(Image.open(path)).any()  # 64x48 -> 43x32


# --------------------------------------------------------------------------------- networks


def test_hed_modes_sizes_and_batch(pn, annotators):
    node = _Node(pn.HED)
    rng = np.random.default_rng(1)
    frames = to_image(rng.integers(0, 256, (2, 45, 67, 3), dtype=np.uint8))
    (soft,) = node.run(frames, "soft", 64, "input")
    assert soft.shape == (2, 45, 67, 3) and 0 <= soft.min() and soft.max() <= 1
    (again,) = node.run(frames, "soft", 64, "input")
    assert torch.equal(soft, again)
    (single,) = node.run(frames[1:], "soft", 64, "input")
    assert (single[0] - soft[1]).abs().max() <= 1 / 255 + 1e-6
    (safe,) = node.run(frames, "safe", 64, "resolution")
    assert safe.shape == (2, 64, 95, 3)
    assert set(np.unique(to_uint8(safe))) <= {0, 127, 255}
    (scribble,) = node.run(frames, "scribble", 64, "input")
    assert set(np.unique(to_uint8(scribble))) <= {0, 255}


def test_depth_renders_and_batch(pn, annotators):
    node = _Node(pn.DepthAnythingV2)
    rng = np.random.default_rng(2)
    frames = to_image(rng.integers(0, 256, (2, 33, 47, 3), dtype=np.uint8))
    (grey,) = node.run(frames, "grey", 42, "input")
    assert grey.shape == (2, 33, 47, 3)
    g = to_uint8(grey)
    assert (g[..., 0] == g[..., 1]).all() and g[0].min() == 0 and g[0].max() == 255
    (vir,) = node.run(frames, "viridis", 42, "resolution")
    assert vir.shape == (2, 42, 60, 3)
    (single,) = node.run(frames[:1], "grey", 42, "input")
    assert np.abs(to_uint8(single[0]).astype(int) - g[0].astype(int)).max() <= 1


def test_openpose_outputs_image_and_keypoints(pn, annotators):
    node = _Node(pn.OpenPose)
    # one narrow frame: the body network always sees a 184 px high image, which takes seconds on a CPU
    frames = to_image(np.random.default_rng(3).integers(0, 256, (1, 60, 40, 3), dtype=np.uint8))
    image, poses = node.run(frames, 32, "resolution")
    assert image.shape == (1, 48, 32, 3)
    assert len(poses) == 1 and all(p["canvas_width"] == 32 and p["canvas_height"] == 48 for p in poses)
    assert all(isinstance(p["people"], list) for p in poses)


def test_network_is_cached_between_runs_and_freeable(pn, am, annotators):
    frames = to_image(np.zeros((1, 16, 16, 3), np.uint8))
    node_result(pn.HED, frames, "soft", 16, "input")
    first = am._torch_cache[HED_FILE][2]
    node_result(pn.HED, frames, "soft", 16, "input")
    assert am._torch_cache[HED_FILE][2] is first
    am.free_models()
    assert HED_FILE not in am._torch_cache


def test_loading_a_network_leaves_the_random_state_alone(pn, am, annotators):
    """The networks are built with torch.nn's random initialisation before the file's weights
    replace it; that must not advance the process's random state (other nodes and packs draw
    from it, e.g. a seeded run after a preprocessor's first load)."""
    frames = to_image(np.zeros((1, 16, 16, 3), np.uint8))
    am.free_models()
    rng = torch.get_rng_state()
    node_result(pn.HED, frames, "soft", 16, "input")
    node_result(pn.DepthAnythingV2, frames, "grey", 16, "input")
    assert HED_FILE in am._torch_cache and DEPTH_FILE in am._torch_cache  # both were built here
    assert torch.equal(torch.get_rng_state(), rng)


# --------------------------------------------------------------------------------- DWPose


def _constant_onnx(path, input_name, input_shape, outputs):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", [input_name], ["m"], keepdims=1)]
    inits = [numpy_helper.from_array(np.array([1, 1, 1], np.int64), "shape3"), numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero")]
    nodes += [helper.make_node("Reshape", ["m", "shape3"], ["m3"]), helper.make_node("Mul", ["m3", "zero"], ["z"])]
    outs = []
    for name, value in outputs.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), name + "_const"))
        nodes.append(helper.make_node("Add", [name + "_const", "z"], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def dwpose_files(annotators):
    """yolox_l.onnx finding one person at (100, 50)-(180, 250) of a 400 x 300 image, and a pose
    model putting keypoint k at crop pixel (k + 10, 2k + 20) with score 0.9."""
    ratio = 640 / 400
    x1, y1, x2, y2 = (v * ratio for v in (100.0, 50.0, 180.0, 250.0))
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    gx, gy = int(cx // 16), int(cy // 16)
    raw = np.zeros((1, 8400, 85), np.float32)
    a = 6400 + gy * 40 + gx
    raw[0, a, :5] = [cx / 16 - gx, cy / 16 - gy, np.log(w / 16), np.log(h / 16), 0.95]
    raw[0, a, 5] = 0.95
    sx = np.full((1, 133, 576), -0.1, np.float32)
    sy = np.full((1, 133, 768), -0.1, np.float32)
    for k in range(133):
        sx[0, k, 2 * (k + 10)] = 0.9
        sy[0, k, 2 * (2 * k + 20)] = 0.9
    _constant_onnx(annotators / DET_FILE, "images", (1, 3, 640, 640), {"output": raw})
    _constant_onnx(annotators / POSE_FILE, "input", (1, 3, 384, 288), {"simcc_x": sx, "simcc_y": sy})
    return annotators


@pytest.mark.parametrize("backend", ["auto", "opencv"])
def test_dwpose_keypoints_known_answer(pn, dwpose_files, backend):
    dwp = pack_module("preprocessors.dwpose")
    frames = to_image(np.random.default_rng(4).integers(0, 256, (2, 300, 400, 3), dtype=np.uint8))
    image, poses = node_result(pn.DWPose, frames, 300, "input", True, True, backend)
    assert image.shape == (2, 300, 400, 3) and len(poses) == 2
    (person,) = poses[0]["people"]
    center, scale = dwp.box_center_scale([100, 50, 180, 250])
    scale = dwp.fix_aspect_ratio(scale, 0.75)
    nose = dwp.to_image_coords(np.array([10.0, 20.0]), center, scale)  # COCO 0 = OpenPose 0
    np.testing.assert_allclose(person["pose_keypoints_2d"][:3], [nose[0], nose[1], 0.9], atol=0.2)
    assert len(person["hand_left_keypoints_2d"]) == 63 and len(person["face_keypoints_2d"]) == 204
    assert to_uint8(image).max() > 0  # something was drawn


def test_render_pose_styles_and_alignment(pn):
    body = np.zeros((18, 3))
    body[:, 0] = np.linspace(0.3, 0.7, 18)
    body[:, 1] = np.linspace(0.2, 0.8, 18)
    body[:, 2] = 0.9
    pose = {"people": [{"pose_keypoint_2d": None, "pose_keypoints_2d": (body * [200, 100, 1]).ravel().tolist()}],
            "canvas_width": 200, "canvas_height": 100}
    node = _Node(pn.RenderPose)
    image, out = node.run([pose, pose], "openpose", 0, 0, True, True, True, 0.3)
    assert image.shape == (2, 100, 200, 3) and to_uint8(image).max() == 255
    image, _ = node.run(pose, "controlnext_svd_v2", 64, 48, True, True, True, 0.3)
    assert image.shape == (1, 48, 64, 3)
    # the reference is the same pose scaled by 0.5 around the top-left and shifted
    ref_body = body.copy()
    ref_body[:, :2] = body[:, :2] * 0.5 + [0.1, 0.2]
    reference = {"people": [{"pose_keypoints_2d": (ref_body * [200, 100, 1]).ravel().tolist()}], "canvas_width": 200, "canvas_height": 100}
    _, aligned = node.run([pose], "openpose", 0, 0, True, False, False, 0.3, reference_pose=[reference])
    got = np.array(aligned[0]["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    np.testing.assert_allclose(got[:, :2], ref_body[:, :2] * [200, 100], atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        node.run([], "openpose", 0, 0, True, True, True, 0.3)


# --------------------------------------------------------------------------------- errors


def test_missing_file_offline_error(pn, am, annotators, monkeypatch):
    monkeypatch.setenv("XCTRL_OFFLINE", "1")
    os.replace(annotators / HED_FILE, annotators / "hed.hidden")
    try:
        with pytest.raises(Exception) as e:
            node_result(pn.HED, to_image(np.zeros((1, 16, 16, 3), np.uint8)), "soft", 16, "input")
    finally:
        os.replace(annotators / "hed.hidden", annotators / HED_FILE)
    msg = str(e.value)
    assert "ControlNetHED.pth" in msg and str(annotators) in msg
    assert "https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth" in msg


def test_missing_file_connection_refused_error(pn, am, annotators, monkeypatch):
    monkeypatch.delenv("XCTRL_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    entry = am.af.KNOWN_FILES[DEPTH_FILE]
    monkeypatch.setitem(am.af.KNOWN_FILES, DEPTH_FILE, dataclasses.replace(entry, url=f"http://127.0.0.1:{port}/{DEPTH_FILE}"))
    # another known file that no annotators folder holds (other tests may have put every real one somewhere)
    monkeypatch.setitem(am.af.KNOWN_FILES, "xctrl_absent.pth", dataclasses.replace(
        entry, name="xctrl_absent.pth", url="https://example.invalid/xctrl_absent.pth", approx="1 MB"))
    os.replace(annotators / DEPTH_FILE, annotators / "depth.hidden")
    try:
        with pytest.raises(am.af.AnnotatorDownloadError) as e:
            node_result(pn.DepthAnythingV2, to_image(np.zeros((1, 16, 16, 3), np.uint8)), "grey", 28, "input")
        assert sorted(p.name for p in annotators.iterdir() if "partial" in p.name) == []
    finally:
        os.replace(annotators / "depth.hidden", annotators / DEPTH_FILE)
    msg = str(e.value)
    assert "depth_anything_v2_vits.pth is missing" in msg and "offline" in msg and str(annotators) in msg
    # the other missing files are named too, so that one failure names them all; files present are not
    also = msg.split("Other preprocessors' files missing too:")[1]
    assert "xctrl_absent.pth (1 MB, https://example.invalid/xctrl_absent.pth)" in also and "XCTRL_OFFLINE=1" in also
    assert "ControlNetHED.pth" not in also and "body_pose_model.pth" not in also and DEPTH_FILE not in also


def test_corrupt_weight_file_error_and_server_side_recovery(pack, am, annotators):
    path = annotators / HED_FILE
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])  # truncated download
    try:
        prompt = {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
            "2": {"class_type": "XCtrl_HED", "inputs": {"image": ["1", 0], "mode": "soft", "resolution": 32, "output_size": "input"}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
        }
        ex = run_prompt(prompt)  # the executor reports the error; nothing escapes
        assert not ex.success
        errors = [d for kind, d in ex.status_messages if kind == "execution_error"]
        assert errors and "ControlNetHED.pth" in errors[0]["exception_message"]
        assert "Delete" in errors[0]["exception_message"] and "download" in errors[0]["exception_message"]
    finally:
        path.write_bytes(good)
    am.free_models()
    assert run_prompt(prompt).success  # the repaired file works on the next run


def test_interrupt_stops_between_frames(pn):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node_result(pn.Canny, to_image(np.zeros((3, 16, 16, 3), np.uint8)), "fixed", 100, 200, 0.33, 512, "input")
    finally:
        mm.interrupt_current_processing(False)


# --------------------------------------------------------------------------------- known answers
@pytest.fixture
def constant_network(annotators, am):
    """Swaps a network file for one whose output is known, restores the random one after."""
    import shutil

    saved = []

    def install(name, state_dict):
        path = annotators / name
        backup = annotators / (name + ".random")
        shutil.copy(path, backup)
        saved.append((path, backup))
        torch.save(state_dict, path)

    yield install
    for path, backup in saved:
        shutil.move(backup, path)
    am.free_models()


def zeroed(net, **biases):
    """The network's state dict with every tensor 0, but the named biases set to a value."""
    sd = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    for key, value in biases.items():
        sd[key.replace("__", ".")] = torch.full_like(sd[key.replace("__", ".")], value)
    return sd


@pytest.mark.parametrize("bias, soft, safe, scribble", [(1.0, 186, 255, 255), (-1.0, 68, 0, 0)])
def test_hed_modes_on_a_constant_network(bias, soft, safe, scribble, pn, constant_network):
    """Zero weights: every side output is its projection bias, so the soft map is sigmoid(bias)
    everywhere: 255 * sigmoid(1) = 186.4 -> 186; safe floor(3 * 0.731) / 2 = 1 -> 255;
    scribble: 186 > 127 survives thinning -> 255 (and all 0 for the negative bias)."""
    hed = pack_module("preprocessors.hed")
    net = hed.ControlNetHED_Apache2()
    biases = {f"block{i}__projection__bias": bias for i in range(1, 6)}
    constant_network(HED_FILE, zeroed(net, **biases))
    frames = to_image(np.random.default_rng(4).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8))
    for mode, value in (("soft", soft), ("safe", safe), ("scribble", scribble)):
        (out,) = node_result(pn.HED, frames, mode, 32, "input")
        assert out.shape == (2, 40, 56, 3)
        assert set(np.unique(to_uint8(out)).tolist()) == {value}, mode


def test_depth_of_a_constant_network_is_flat(pn, constant_network):
    """A network that predicts the same depth everywhere renders as a flat map: grey 0 (a constant
    map normalises to 0), viridis near = dark the colormap's 255 end, near = bright its 0 end."""
    import cv2

    dav2 = pack_module("preprocessors.depth_anything_v2")
    net = dav2.DepthAnythingV2Small()
    constant_network(DEPTH_FILE, zeroed(net, depth_head__scratch__output_conv2__2__bias=0.7))
    frames = to_image(np.random.default_rng(5).integers(0, 256, (1, 30, 44, 3), dtype=np.uint8))
    (grey,) = node_result(pn.DepthAnythingV2, frames, "grey", 28, "input")
    assert set(np.unique(to_uint8(grey)).tolist()) == {0}
    viridis = cv2.applyColorMap(np.array([[0, 255]], np.uint8), cv2.COLORMAP_VIRIDIS)[0, :, ::-1]
    (dark,) = node_result(pn.DepthAnythingV2, frames, "viridis", 28, "input")
    (bright,) = node_result(pn.DepthAnythingV2, frames, "viridis_near_bright", 28, "input")
    assert (to_uint8(dark) == viridis[1]).all() and (to_uint8(bright) == viridis[0]).all()


def test_openpose_on_a_constant_network_finds_nobody(pn, constant_network):
    """Zero weights: flat heatmaps have no peaks, so no person and a black drawing."""
    body = pack_module("preprocessors.openpose_body")
    sd = {k.split(".", 1)[1]: v for k, v in zeroed(body.BodyPoseNet()).items()}
    constant_network(BODY_FILE, sd)
    frames = to_image(np.random.default_rng(6).integers(0, 256, (2, 48, 32, 3), dtype=np.uint8))
    image, poses = node_result(pn.OpenPose, frames, 32, "input")
    assert image.shape == (2, 48, 32, 3) and not image.any()
    assert [p["people"] for p in poses] == [[], []]
    image, poses = node_result(pn.OpenPose, frames, 32, "input", 2)  # frame_stride 2: every 2nd frame
    assert image.shape[0] == 1 and len(poses) == 1


# --------------------------------------------------------------------------------- sizes, memory, cancel


class PeakRss:
    """Peak increase of this process's resident memory over a block (a thread samples
    /proc/self/statm every few ms; VmHWM would be the whole process's lifetime high-water mark)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        import threading

        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.003):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.increase = self.peak - self.base


EXTREME_SHAPES = [(1, 4096), (4096, 1), (1, 64), (64, 1), (8, 4096)]
IMAGE_NODES = {
    "Canny": lambda pn, img: node_result(pn.Canny, img, "fixed", 100, 200, 0.33, 512, "resolution"),
    "Canny at input size": lambda pn, img: node_result(pn.Canny, img, "fixed", 100, 200, 0.33, 512, "input"),
    "HED": lambda pn, img: node_result(pn.HED, img, "soft", 512, "resolution"),
    "DepthAnythingV2": lambda pn, img: node_result(pn.DepthAnythingV2, img, "grey", 518, "resolution"),
    "OpenPose": lambda pn, img: node_result(pn.OpenPose, img, 512, "resolution"),
    "DWPose": lambda pn, img: node_result(pn.DWPose, img, 512, "resolution", True, True),
}


@pytest.mark.parametrize("node", list(IMAGE_NODES))
def test_extreme_aspect_ratios_are_refused_before_any_work(pn, node):
    """Scaling the shorter side of a 1 x 4096 image to the resolution made multi-GB working images
    (and Depth Anything's 1 x 64 ran for a quarter of an hour): beyond 16:1 the node refuses at
    once, naming itself, the shape and the fix."""
    cls = getattr(pn, node.split()[0])
    for h, w in EXTREME_SHAPES:
        with PeakRss() as mem, pytest.raises(ValueError) as e:
            IMAGE_NODES[node](pn, torch.rand(1, h, w, 3))
        msg = str(e.value)
        assert cls.NAME in msg and f"{w} x {h}" in msg and "16:1" in msg and "Crop or pad" in msg, msg
        assert mem.increase < 64 << 20


@pytest.mark.parametrize("node", list(IMAGE_NODES))
def test_a_nan_image_is_refused_naming_the_node(pn, node):
    """NaN pixels turned into arbitrary uint8 values (a silent wrong map): refused before any work."""
    cls = getattr(pn, node.split()[0])
    image = torch.rand(1, 64, 64, 3)
    image[0, 5, 7, 1] = float("nan")
    with pytest.raises(ValueError, match=re.escape(cls.NAME) + ": the image input contains NaN or infinite values"):
        IMAGE_NODES[node](pn, image)


class _ShapeSpy(torch.nn.Module):
    """Stands in for a network: records each input's shape and answers zeros of the shapes the
    real one gives (the real networks at their size limits take minutes per frame on two CPU
    cores; their memory per pixel is in the limits' comments)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.shapes = []

    def forward(self, x, check=None):
        self.shapes.append(tuple(x.shape))
        b, _, h, w = x.shape
        if self.kind == "hed":
            return [torch.zeros(b, 1, h >> i, w >> i) for i in range(5)]
        if self.kind == "depth":
            return torch.zeros(b, h, w)
        return torch.zeros(b, 38, h // 8, w // 8), torch.zeros(b, 19, h // 8, w // 8)  # openpose


@pytest.fixture(scope="module")
def huge_image():
    """8192 x 8192, one channel (268 MB; greyscale IMAGEs are valid and keep this test small)."""
    return torch.rand(1, 8192, 8192, 1)


@pytest.mark.parametrize("node, kind, module", [
    ("HED", "hed", "preprocessors.hed"),
    ("DepthAnythingV2", "depth", "preprocessors.depth_anything_v2"),
    ("OpenPose", "openpose", "preprocessors.openpose_body"),
])
def test_huge_image_at_max_resolution_is_processed_within_limits(pn, am, huge_image, monkeypatch, caplog, node, kind, module):
    """8192 x 8192 at resolution 16384: the working size is cut to the network's limit and the
    output to 16.8 MP, with a warning saying so; peak memory stays within the uint8 copy of the
    input, the output and a fixed margin (before: a 16384 x 16384 working image and output)."""
    mod = pack_module(module)
    limit = mod.MAX_PIXELS
    spy = _ShapeSpy(kind)
    monkeypatch.setattr(am, "torch_network", lambda name, build, allow_fp16=True: spy)
    if kind == "openpose":  # the network always sees 184 px high: the working size is the image it searches
        detect = mod.detect_body
        monkeypatch.setattr(mod, "detect_body", lambda net, image, check=None: spy.shapes.append((1, 3) + image.shape[:2]) or detect(net, image, check))
    cls = getattr(pn, node)
    args = {"HED": ("soft", 16384, "resolution"), "DepthAnythingV2": ("grey", 16380, "resolution"),
            "OpenPose": (16384, "resolution")}[node]
    with caplog.at_level("WARNING", logger="xctrl"), PeakRss() as mem:
        out = node_result(cls, huge_image, *args)[0]
    assert out.shape == (1, 4096, 4096, 3)
    shape = spy.shapes[0]
    assert limit * 0.8 <= shape[2] * shape[3] <= limit * 1.03  # cut to the limit (Depth Anything rounds to 14)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert cls.NAME in warned and "working size" in warned and "output size" in warned and "8192 x 8192 image" in warned, warned
    budget = 8192 * 8192 * 3 + out.numel() * 4 + (768 << 20)
    if kind == "depth":  # the reference's bicubic resize works on a float copy of the input frame
        budget += 8192 * 8192 * 3 * 4
    assert mem.increase < budget, f"peak RSS +{mem.increase >> 20} MB, budget {budget >> 20} MB"


def test_huge_image_canny_and_dwpose_memory(pn, dwpose_files, huge_image, caplog):
    """The real Canny and DWPose (stand-in networks) on 8192 x 8192: at input size the output is
    the input's size and the peak stays within the uint8 copy, the output and a margin; at
    resolution 16384 the output is capped at 16.8 MP."""
    for output_size, side in (("input", 8192), ("resolution", 4096)):
        with PeakRss() as mem:
            (out,) = node_result(pn.Canny, huge_image, "fixed", 100, 200, 0.33, 16384, output_size)
        assert out.shape == (1, side, side, 3)
        budget = 8192 * 8192 * 3 + out.numel() * 4 + (1 << 30)  # cv2.Canny's gradients: ~12 bytes per pixel
        assert mem.increase < budget, f"Canny {output_size}: peak RSS +{mem.increase >> 20} MB, budget {budget >> 20} MB"
        del out
    with caplog.at_level("WARNING", logger="xctrl"), PeakRss() as mem:
        image, poses = node_result(pn.DWPose, huge_image, 16384, "resolution", True, True)
    assert image.shape == (1, 4096, 4096, 3) and len(poses[0]["people"]) == 1
    assert "DWPose Whole Body (XCtrl)" in caplog.text and "working size" in caplog.text
    budget = 8192 * 8192 * 3 + image.numel() * 4 + (768 << 20)
    assert mem.increase < budget, f"DWPose: peak RSS +{mem.increase >> 20} MB, budget {budget >> 20} MB"


def _units(pn, node, annotators_dir):
    """(run the node on a batch, the modules whose calls are the units of work) for a real
    (random-weight) network."""
    frames = to_image(np.random.default_rng(7).integers(0, 256, (4, 96, 128, 3), dtype=np.uint8))
    if node == "HED":
        return lambda: node_result(pn.HED, frames, "soft", 512, "input"), lambda net: [getattr(net, f"block{i}") for i in range(1, 6)]
    if node == "DepthAnythingV2":
        return lambda: node_result(pn.DepthAnythingV2, frames, "grey", 518, "input"), lambda net: list(net.pretrained.blocks)
    return lambda: node_result(pn.OpenPose, frames, 512, "input"), lambda net: [getattr(net, f"model{s}_1") for s in range(1, 7)]


@pytest.mark.parametrize("node", ["HED", "DepthAnythingV2", "OpenPose"])
def test_cancel_stops_inside_a_network_call(pn, am, annotators, monkeypatch, node):
    """Cancel (ComfyUI's interrupt flag) raised while a network call runs stops at the next unit of
    work (a block or stage), not at the end of the frames in hand. The flag is set from a hook of
    the second unit, so the test does not depend on the machine's speed; the delay to the
    exception is compared to the time one unit takes."""
    import time

    import comfy.model_management as mm

    run, units_of = _units(pn, node, annotators)
    real = am.torch_network
    calls, flagged = [], []

    def hook(module, args, output):
        calls.append(time.perf_counter())
        if len(calls) == 2:
            mm.interrupt_current_processing(True)
            flagged.append(calls[-1])

    def network(name, build, allow_fp16=True):
        net = real(name, build, allow_fp16)
        for unit in units_of(net):
            handles.append(unit.register_forward_hook(hook))
        return net

    handles = []
    monkeypatch.setattr(am, "torch_network", network)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run()
        stopped = time.perf_counter()
    finally:
        mm.interrupt_current_processing(False)
        for h in handles:
            h.remove()
    assert len(calls) <= 3, f"{len(calls) - 2} units of work ran after Cancel"
    unit_time = calls[1] - calls[0]
    assert stopped - flagged[0] <= 2 * unit_time + 1.0, (stopped - flagged[0], unit_time)


def test_cancel_stops_dwpose_between_people(pn, dwpose_files, monkeypatch):
    """DWPose checks Cancel before each person's pose network call (and between frames)."""
    import comfy.model_management as mm

    dwp = pack_module("preprocessors.dwpose")
    runs = []
    real_run = dwp.OnnxModel.run

    def run(self, x):
        runs.append(self.path)
        if len(runs) == 1:
            mm.interrupt_current_processing(True)  # during the first frame's detector call
        return real_run(self, x)

    monkeypatch.setattr(dwp.OnnxModel, "run", run)
    frames = to_image(np.random.default_rng(8).integers(0, 256, (3, 300, 400, 3), dtype=np.uint8))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node_result(pn.DWPose, frames, 300, "input", True, True)
    finally:
        mm.interrupt_current_processing(False)
    assert len(runs) == 1  # the pose model never ran


def test_offline_validation_names_every_missing_file_at_once(pack, am, tmp_path, monkeypatch):
    """Offline, a preprocessor's validation (which ComfyUI runs for every node of a prompt before
    anything executes, and reports together) names all of its missing files, not the first."""
    import folder_paths

    from harness.comfy_runtime import pack_node_classes

    monkeypatch.setenv("XCTRL_OFFLINE", "1")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "annotators", ([str(tmp_path)], set(am.EXTENSIONS)))
    classes = pack_node_classes()
    msg = classes["XCtrl_DWPose"].validate_inputs(image=None)
    assert isinstance(msg, str), msg
    for name in (DET_FILE, POSE_FILE):
        assert name in msg and am.af.KNOWN_FILES[name].url in msg, msg
    assert str(tmp_path) in msg
    depth = classes["XCtrl_DepthAnythingV2"].validate_inputs(image=None)
    assert isinstance(depth, str) and DEPTH_FILE in depth
    (tmp_path / DET_FILE).write_bytes(b"x")
    (tmp_path / POSE_FILE).write_bytes(b"x")
    assert classes["XCtrl_DWPose"].validate_inputs(image=None) is True
    monkeypatch.delenv("XCTRL_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert classes["XCtrl_DepthAnythingV2"].validate_inputs(image=None) is True  # online: downloaded when it runs

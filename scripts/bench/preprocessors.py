"""Time per frame of the preprocessor nodes (random-weight networks, offline)."""
import os
import time


from .runner import run_node
from .stats import median


def run_preprocessors(bench):
    """Adds one row per preprocessor node to bench.pre."""
    import numpy as np
    import torch

    a = bench.args
    from harness.comfy_runtime import pack_module

    import folder_paths

    folder_paths.add_model_folder_path("annotators", bench.annotator_dir, is_default=True)
    os.environ["XCTRL_OFFLINE"] = "1"  # never download: every file is a local random-weight one
    pn = pack_module("nodes.preprocessor_nodes")
    am = pack_module("runtime.annotator_models")
    _write_random_annotators(bench.annotator_dir, pack_module)

    px = a.pre_size
    rng = np.random.default_rng(0)
    # A smooth random picture (blurred noise): canny has edges to find, not pure noise.
    base = rng.random((a.pre_frames, px // 16, px // 16, 3)).astype(np.float32)
    image = torch.nn.functional.interpolate(torch.from_numpy(base).movedim(-1, 1), size=(px, px), mode="bicubic",
                                            align_corners=False).clamp(0, 1).movedim(1, -1).contiguous()
    jobs = [
        ("Canny (fixed 100/200)", "cv2.Canny", lambda: run_node(pn.Canny, image, "fixed", 100, 200, 0.33, px, "input")),
        ("HED (soft)", f"ControlNetHED_Apache2 random weights, resolution {px}", lambda: run_node(pn.HED, image, "soft", px, "input")),
        ("Depth Anything V2 Small", "random weights, network input 518 (default)", lambda: run_node(pn.DepthAnythingV2, image, "grey", 518, "input")),
        ("OpenPose body", f"random weights, resolution {px}", lambda: run_node(pn.OpenPose, image, px, "input")),
    ]
    dw = dwpose_job(bench, pn, image, px)
    jobs.append(dw)
    for label, what, fn in jobs:
        bench.pre.append(_time_job(bench, label, what, fn))
    am.free_models()


def _write_random_annotators(folder, pack_module):
    """Random-weight HED, OpenPose body and Depth Anything V2 files in the annotators folder."""
    import torch

    hed = pack_module("preprocessors.hed")
    body = pack_module("preprocessors.openpose_body")
    dav2 = pack_module("preprocessors.depth_anything_v2")
    torch.manual_seed(0)
    net = hed.ControlNetHED_Apache2()
    with torch.no_grad():
        net.norm.uniform_(100, 150)
    torch.save(net.state_dict(), os.path.join(folder, hed.WEIGHT_FILE))
    net = body.BodyPoseNet()
    torch.save({k.split(".", 1)[1]: v for k, v in net.state_dict().items()}, os.path.join(folder, body.WEIGHT_FILE))
    net = dav2.DepthAnythingV2Small()
    with torch.no_grad():
        net.pretrained.pos_embed.normal_(0, 0.02)
    torch.save(net.state_dict(), os.path.join(folder, dav2.WEIGHT_FILE))
    del net


def _time_job(bench, label, what, fn):
    """One preprocessor's row: warm-up (loads the network), then the median time per frame."""
    import torch

    a = bench.args
    if fn is None:
        return {"label": label, "what": what, "per_frame": None}
    try:
        with torch.inference_mode():
            fn()
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) / a.pre_frames)
        bench.log(f"  [pre] {label}: {median(times):.3f} s/frame")
        return {"label": label, "what": what, "per_frame": median(times), "times": times}
    except Exception as e:
        import traceback

        traceback.print_exc()
        return {"label": label, "what": f"{what}; failed: {type(e).__name__}: {e}", "per_frame": None}


def dwpose_job(bench, pn, image, px):
    """DWPose's networks are ONNX graphs (YOLOX-L, RTMPose-L); the pack has no torch definition
    to build random-weight ones from. With onnx installed, constant-output stand-ins of the real
    input/output shapes time everything else (letterbox, decoding, NMS, affine crops, SimCC
    decoding, drawing) through cv2.dnn / onnxruntime."""
    label = "DWPose (networks excluded)"
    try:
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return (label, "skipped: needs the onnx package to write stand-in networks; the real YOLOX-L/RTMPose "
                       "graphs cannot be built here (no weights can be downloaded)", None)
    from harness.comfy_runtime import pack_module

    dwp = pack_module("preprocessors.dwpose")

    def constant_graph(path, input_name, input_shape, outputs):
        # output = constant + 0 * mean(input): the input is consumed, the answer is fixed
        inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
        nodes = [helper.make_node("ReduceMean", [input_name], ["avg"], keepdims=0),
                 helper.make_node("Mul", ["avg", "zero"], ["nil"])]
        outs = []
        for name, value in outputs.items():
            inits.append(numpy_helper.from_array(value, name + "_value"))
            nodes.append(helper.make_node("Add", [name + "_value", "nil"], [name]))
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
        graph = helper.make_graph(nodes, "standin", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))], outs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.save(model, path)

    # one person box in the middle of the 640x640 letterbox; every keypoint confident
    raw = np.zeros((1, 8400, 85), np.float32)
    gx = gy = 20  # stride-16 grid cell (320, 320)
    raw[0, 6400 + gy * 40 + gx, :6] = [0.5, 0.5, np.log(200 / 16), np.log(400 / 16), 0.95, 0.95]
    g = np.random.default_rng(1)
    simcc_x = g.random((1, 133, 576), dtype=np.float32)
    simcc_y = g.random((1, 133, 768), dtype=np.float32)
    constant_graph(os.path.join(bench.annotator_dir, dwp.DETECTOR_FILE), "images", (1, 3, 640, 640), {"output": raw})
    constant_graph(os.path.join(bench.annotator_dir, dwp.POSE_FILE), "input", (1, 3, 384, 288), {"simcc_x": simcc_x, "simcc_y": simcc_y})
    try:
        import onnxruntime  # noqa: F401

        backend = "onnxruntime"
    except ImportError:
        backend = "OpenCV DNN"
    what = (f"{backend}; YOLOX-L / RTMPose-L replaced by constant-output ONNX graphs of the real shapes "
            "(no torch definition to build random-weight networks from): pre/post-processing and drawing only")
    return (label, what, lambda: run_node(pn.DWPose, image, px, "input", True, True, "auto"))



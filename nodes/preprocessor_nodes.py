"""Preprocessor nodes: canny, HED, Depth Anything V2, OpenPose body, DWPose, pose rendering.

Every image node takes an IMAGE batch (video frames are a batch), returns an IMAGE batch of the
same length, shows a progress bar over frames and stops between frames when the queue is
interrupted. Greyscale input is replicated to RGB, RGBA loses its alpha (as ComfyUI's LoadImage).

Output size (`output_size` input): "input" = the input's H x W; "resolution" = shorter side
equal to `resolution`, aspect kept. What `resolution` changes besides is in each tooltip.
Weights: ComfyUI/models/annotators (see nodes/annotator_models.py), downloaded on first use.
"""
import numpy as np

import comfy.model_management as mm
import comfy.utils

from ..preprocessors import canny as canny_mod
from ..preprocessors import depth_anything_v2 as dav2
from ..preprocessors import depth_render
from ..preprocessors import dwpose as dwp
from ..preprocessors import hed as hed_mod
from ..preprocessors import openpose_body
from ..preprocessors.frames import OUTPUT_SIZES, batched_at_resolution, chunks, output_hw, resize
from ..preprocessors.image_io import image_to_uint8, scaled_size, uint8_to_image
from ..preprocessors.pose_align import align_poses
from ..preprocessors.pose_draw import draw_openpose, draw_svd_v2
from ..preprocessors.pose_format import PoseFrame, from_openpose_json, to_openpose_json
from . import annotator_models as am

CATEGORY = "XCtrl/Preprocessors"
POSE_KEYPOINT = "POSE_KEYPOINT"  # list of OpenPose JSON dicts, one per frame (as comfyui_controlnet_aux)
NET_CHUNK = 4  # frames per network call

OUTPUT_SIZE_TIP = (
    "Size of the output. input: the input image's width x height (the map lines up with the image). "
    "resolution: shorter side = resolution, aspect ratio kept (e.g. 1280x720 at 512 -> 910x512)."
)


def _output_size_input():
    return (list(OUTPUT_SIZES), {"default": "input", "tooltip": OUTPUT_SIZE_TIP})


def _resolution_input(default, tip, step=8):
    return ("INT", {"default": default, "min": 0, "max": 16384, "step": step, "tooltip": tip})


def _for_frames(count, chunk, work):
    """Calls work(start, stop) over the batch with a progress bar and interrupt checks."""
    bar = comfy.utils.ProgressBar(count)
    for start, stop in chunks(count, chunk):
        mm.throw_exception_if_processing_interrupted()
        work(start, stop)
        bar.update(stop - start)


def _to_image(maps):
    """(B, H, W) or (B, H, W, 3) uint8 -> IMAGE on ComfyUI's intermediate device."""
    if maps.ndim == 3:
        maps = np.repeat(maps[..., None], 3, axis=3)
    return uint8_to_image(maps, device=mm.intermediate_device())


# ---------------------------------------------------------------------------------------------


class Canny:
    DESCRIPTION = (
        "Canny edges (white on black, RGB) as the control models were trained with. fixed: cv2.Canny(RGB, low, high) "
        "as lllyasviel's annotator. median: the thresholds ControlNeXt-SDXL's canny models were trained with, "
        "low = (1 - sigma) * median, high = (1 + sigma) * median of the grey image, Canny on the grey image."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "mode": (["fixed", "median"], {"default": "fixed", "tooltip": "fixed: low/high thresholds. median: ControlNeXt SDXL's automatic thresholds from the grey median and sigma."}),
                "low_threshold": ("INT", {"default": 100, "min": 0, "max": 1000, "tooltip": "fixed mode: lower hysteresis threshold."}),
                "high_threshold": ("INT", {"default": 200, "min": 0, "max": 1000, "tooltip": "fixed mode: upper hysteresis threshold."}),
                "sigma": ("FLOAT", {"default": 0.33, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "median mode: thresholds (1 -/+ sigma) x median. ControlNeXt SDXL used 0.33."}),
                "resolution": _resolution_input(512, "Used only with output_size = resolution: the edges are computed on the image scaled so its shorter side is this many pixels, and that is the output size. With output_size = input, edges are computed at the input size (identical to cv2.Canny)."),
                "output_size": _output_size_input(),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, image, mode, low_threshold, high_threshold, sigma, resolution, output_size):
        frames = image_to_uint8(image)
        oh, ow = output_hw(frames.shape[1], frames.shape[2], resolution, output_size)
        out = np.empty((len(frames), oh, ow, 3), np.uint8)

        def work(start, stop):
            for i in range(start, stop):
                f = resize(frames[i], oh, ow)
                out[i] = canny_mod.canny(f, low_threshold, high_threshold) if mode == "fixed" else canny_mod.canny_median(f, sigma)

        _for_frames(len(frames), 1, work)
        return (_to_image(out),)


class HED:
    DESCRIPTION = (
        "HED soft edges with lllyasviel's Apache-2.0 network (ControlNetHED.pth, 29 MB, downloaded to models/annotators "
        "on first use). soft: the edge probability; safe: three levels (0, 127, 255); scribble: thinned, blurred and "
        "thresholded to binary strokes (ControlNet scribble/sketch style)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "mode": (list(hed_mod.MODES), {"default": "soft"}),
                "resolution": _resolution_input(512, "The network runs on the image scaled so its shorter side is this many pixels (padded to a multiple of 64, padding cropped); edge thickness follows this scale. 0 = input size."),
                "output_size": _output_size_input(),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, image, mode, resolution, output_size):
        if mode not in hed_mod.MODES:
            raise ValueError(f"HED mode must be one of {hed_mod.MODES}, got {mode!r}.")
        frames = image_to_uint8(image)
        net = am.torch_network(hed_mod.WEIGHT_FILE, hed_mod.build_hed)
        oh, ow = output_hw(frames.shape[1], frames.shape[2], resolution, output_size)
        out = np.empty((len(frames), oh, ow), np.uint8)

        def work(start, stop):
            soft = batched_at_resolution(frames[start:stop], resolution, lambda b: hed_mod.hed_soft_edges(net, b), (oh, ow))
            for j, edge in enumerate(soft, start=start):
                # the mode is applied at the output size: no grey pixels from resizing a binary map
                if mode == "safe":
                    edge = hed_mod.safe_step(edge)
                edge = (edge * 255.0).clip(0, 255).astype(np.uint8)
                out[j] = hed_mod.scribble(edge) if mode == "scribble" else edge

        _for_frames(len(frames), NET_CHUNK, work)
        return (_to_image(out),)


class DepthAnythingV2:
    RENDERS = ("grey", "viridis", "viridis_near_bright")
    DESCRIPTION = (
        "Relative depth with Depth Anything V2 Small (depth_anything_v2_vits.pth, Apache-2.0, 99 MB, downloaded to "
        "models/annotators on first use). grey: white = near (ControlNet depth models). viridis: the colormap the "
        "ControlNeXt depth models were trained on (near = dark purple, far = yellow); viridis_near_bright: reversed."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "render": (list(cls.RENDERS), {"default": "grey", "tooltip": "grey for ControlNet depth models; viridis for ControlNeXt depth models."}),
                "resolution": _resolution_input(518, "Network input: the image is scaled (bicubic) so its shorter side is this many pixels, rounded to a multiple of 14 (518 = the size the model was trained at; larger = finer detail, slower). The depth map is then resized bilinearly to the output size.", step=14),
                "output_size": _output_size_input(),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, image, render, resolution, output_size):
        if render not in self.RENDERS:
            raise ValueError(f"render must be one of {self.RENDERS}, got {render!r}.")
        frames = image_to_uint8(image)
        net = am.torch_network(dav2.WEIGHT_FILE, dav2.build_depth_anything_v2)
        input_size = max(dav2.PATCH, int(round(resolution / dav2.PATCH)) * dav2.PATCH) if resolution > 0 else dav2.INPUT_SIZE
        oh, ow = output_hw(frames.shape[1], frames.shape[2], resolution, output_size)
        out = np.empty((len(frames), oh, ow, 3), np.uint8)

        def work(start, stop):
            depth = dav2.estimate_depth(net, frames[start:stop], input_size, (oh, ow))
            for j, d in enumerate(depth, start=start):
                if render == "grey":
                    out[j] = depth_render.render_grey(d)
                else:
                    out[j] = depth_render.render_viridis(d, near="dark" if render == "viridis" else "bright")

        _for_frames(len(frames), NET_CHUNK, work)
        return (_to_image(out),)


class OpenPose:
    DESCRIPTION = (
        "OpenPose body keypoints (18 points; CMU model body_pose_model.pth, 209 MB, NON-COMMERCIAL licence, downloaded "
        "to models/annotators on first use). Outputs the skeleton drawn as lllyasviel's annotator draws it and the "
        "keypoints as OpenPose JSON (one dict per frame; canvas = output size)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "resolution": _resolution_input(512, "Detection runs on the image scaled so its shorter side is this many pixels. The skeleton is drawn at the output size from the detected (normalised) keypoints."),
                "output_size": _output_size_input(),
            }
        }

    RETURN_TYPES = ("IMAGE", POSE_KEYPOINT)
    RETURN_NAMES = ("image", "pose_keypoint")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, image, resolution, output_size):
        frames = image_to_uint8(image)
        net = am.torch_network(openpose_body.WEIGHT_FILE, openpose_body.build_body_pose)
        return _pose_outputs(frames, resolution, output_size, lambda f: openpose_body.detect_body(net, f), hands=False, face=False, threshold=0.0)


class DWPose:
    DESCRIPTION = (
        "DWPose whole-body keypoints (body, hands, face; Apache-2.0; yolox_l.onnx 217 MB + dw-ll_ucoco_384.onnx 134 MB, "
        "downloaded to models/annotators on first use). Runs with onnxruntime when installed (CUDA provider on a CUDA "
        "device when available), else OpenCV's DNN module. Outputs the OpenPose-style drawing and the keypoints as "
        "OpenPose JSON (one dict per frame; canvas = output size); XCtrl Render Pose draws them in other styles."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "resolution": _resolution_input(512, "Detection runs on the image scaled so its shorter side is this many pixels (the person detector then letterboxes it to 640x640). The skeleton is drawn at the output size from the normalised keypoints."),
                "output_size": _output_size_input(),
                "draw_hands": ("BOOLEAN", {"default": True}),
                "draw_face": ("BOOLEAN", {"default": True}),
            },
            "optional": {
                "backend": (list(dwp.BACKENDS), {"default": "auto", "tooltip": "auto: onnxruntime if installed, else OpenCV DNN."}),
            },
        }

    RETURN_TYPES = ("IMAGE", POSE_KEYPOINT)
    RETURN_NAMES = ("image", "pose_keypoint")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, image, resolution, output_size, draw_hands, draw_face, backend="auto"):
        frames = image_to_uint8(image)
        model = dwp.DWPose(am.onnx_network(dwp.DETECTOR_FILE, backend), am.onnx_network(dwp.POSE_FILE, backend))
        return _pose_outputs(frames, resolution, output_size, model, hands=draw_hands, face=draw_face, threshold=dwp.KEYPOINT_THRESHOLD)


def _pose_outputs(frames, resolution, output_size, detect, hands, face, threshold):
    h, w = frames.shape[1:3]
    sh, sw = scaled_size(h, w, resolution)
    oh, ow = output_hw(h, w, resolution, output_size)
    out = np.empty((len(frames), oh, ow, 3), np.uint8)
    poses = [None] * len(frames)

    def work(start, stop):
        for i in range(start, stop):
            found = detect(resize(frames[i], sh, sw))
            pose = PoseFrame(ow, oh, found.people)  # normalised coordinates: any canvas size
            out[i] = draw_openpose(pose, ow, oh, body=True, hands=hands, face=face, threshold=threshold)
            poses[i] = to_openpose_json(pose)

    _for_frames(len(frames), 1, work)
    return (_to_image(out), poses)


class RenderPose:
    STYLES = ("openpose", "controlnext_svd_v2")
    DESCRIPTION = (
        "Draws pose keypoints (OpenPose JSON from XCtrl OpenPose / DWPose or other packs) as a control image. "
        "openpose: lllyasviel's annotator style (ControlNet, ControlNeXt SD1.5 pose). controlnext_svd_v2: the style "
        "ControlNeXt-SVD-v2 was trained on (one person per frame, confidence-scaled colours, BGR order). With a "
        "reference_pose, the sequence is first aligned to it (one linear fit over the sequence, as ControlNeXt-SVD-v2)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pose_keypoint": (POSE_KEYPOINT,),
                "style": (list(cls.STYLES), {"default": "openpose"}),
                "width": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8, "tooltip": "Output width; 0 = the canvas width of the keypoints (of the reference pose when aligning; of the first frame otherwise)."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8, "tooltip": "Output height; 0 = the canvas height, as for width."}),
                "draw_body": ("BOOLEAN", {"default": True}),
                "draw_hands": ("BOOLEAN", {"default": True}),
                "draw_face": ("BOOLEAN", {"default": True}),
                "threshold": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "openpose style: keypoints with confidence <= threshold are not drawn (DWPose uses 0.3; use 0 for XCtrl OpenPose keypoints). The svd_v2 style has its own fixed rule."}),
            },
            "optional": {
                "reference_pose": (POSE_KEYPOINT, {"tooltip": "Pose of the reference image (its first frame is used): the sequence is scaled and shifted onto it, as ControlNeXt-SVD-v2 prepares its poses."}),
            },
        }

    RETURN_TYPES = ("IMAGE", POSE_KEYPOINT)
    RETURN_NAMES = ("image", "pose_keypoint")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, pose_keypoint, style, width, height, draw_body, draw_hands, draw_face, threshold, reference_pose=None):
        if style not in self.STYLES:
            raise ValueError(f"style must be one of {self.STYLES}, got {style!r}.")
        frames = [from_openpose_json(d) for d in _pose_list(pose_keypoint, "pose_keypoint")]
        if style == "controlnext_svd_v2" or reference_pose is not None:
            frames = [dwp.most_confident_person(f) for f in frames]
        if reference_pose is not None:
            reference = dwp.most_confident_person(from_openpose_json(_pose_list(reference_pose, "reference_pose")[0]))
            frames = align_poses(frames, reference)
        ow, oh = int(width or frames[0].width), int(height or frames[0].height)
        out = np.empty((len(frames), oh, ow, 3), np.uint8)

        def work(start, stop):
            for i in range(start, stop):
                if style == "openpose":
                    out[i] = draw_openpose(frames[i], ow, oh, body=draw_body, hands=draw_hands, face=draw_face, threshold=threshold)
                else:
                    f = frames[i] if (draw_body and draw_hands and draw_face) else _without_parts(frames[i], draw_body, draw_hands, draw_face)
                    out[i] = draw_svd_v2(f, ow, oh)

        _for_frames(len(frames), 1, work)
        return (_to_image(out), [to_openpose_json(PoseFrame(ow, oh, f.people)) for f in frames])


def _pose_list(value, name):
    items = [value] if isinstance(value, dict) else list(value or [])
    if not items:
        raise ValueError(f"{name} is empty: no pose to draw (connect the keypoints output of XCtrl OpenPose or DWPose).")
    return items


def _without_parts(frame, body, hands, face):
    from ..preprocessors.pose_format import Person

    people = []
    for p in frame.people:
        people.append(Person(p.body if body else np.zeros_like(p.body), p.left_hand if hands else None,
                             p.right_hand if hands else None, p.face if face else None))
    return PoseFrame(frame.width, frame.height, people)


NODE_CLASS_MAPPINGS = {
    "XCtrl_Canny": Canny,
    "XCtrl_HED": HED,
    "XCtrl_DepthAnythingV2": DepthAnythingV2,
    "XCtrl_OpenPose": OpenPose,
    "XCtrl_DWPose": DWPose,
    "XCtrl_RenderPose": RenderPose,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "XCtrl_Canny": "Canny Edges (XCtrl)",
    "XCtrl_HED": "HED Soft Edges / Scribble (XCtrl)",
    "XCtrl_DepthAnythingV2": "Depth Anything V2 Small (XCtrl)",
    "XCtrl_OpenPose": "OpenPose Body (XCtrl)",
    "XCtrl_DWPose": "DWPose Whole Body (XCtrl)",
    "XCtrl_RenderPose": "Render Pose (XCtrl)",
}

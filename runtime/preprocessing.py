"""Running the preprocessors inside ComfyUI (glue): IMAGE batches in and out, the size rule
(preprocessors/frames.plan_sizes) applied before any conversion, networks from the annotators
folder (annotator_models.py), a progress bar over frames and Cancel checked between frames and,
through the ``check`` callback the pure code takes, inside each network call."""
import numpy as np

import comfy.model_management as mm
import comfy.utils

from ..preprocessors import canny as canny_mod
from ..preprocessors import depth_anything_v2 as dav2
from ..preprocessors import depth_render
from ..preprocessors import dwpose as dwp
from ..preprocessors import hed as hed_mod
from ..preprocessors import openpose_body
from ..preprocessors.frames import OUTPUT_SIZES, batched_at_size, chunks, frames_per_call, plan_sizes, resize
from ..preprocessors.image_io import ImageBatch, image_to_uint8
from ..preprocessors.pose_draw import draw_openpose, draw_svd_v2
from ..preprocessors.pose_format import PoseFrame, from_openpose_json, to_openpose_json
from ..preprocessors.pose_sequence import every_nth, prepare_sequence, without_parts
from . import annotator_models as am
from .control_inputs import require_finite

NET_CHUNK = 4  # frames per network call at most (fewer for large frames: frames.frames_per_call)
DEPTH_RENDERS = ("grey", "viridis", "viridis_near_bright")
POSE_STYLES = ("openpose", "controlnext_svd_v2")
# the choices the nodes offer, named here so node files need not import the pure modules
HED_MODES, DWPOSE_BACKENDS, OUTPUT_SIZE_CHOICES = hed_mod.MODES, dwp.BACKENDS, OUTPUT_SIZES


def canny_edges(node, image, mode, low_threshold, high_threshold, sigma, resolution, output_size):
    frames, _, out_hw = _frames_and_sizes(node, image, resolution, output_size, None)

    def edges(frames):
        f = resize(frames[0], *out_hw)
        return (canny_mod.canny(f, low_threshold, high_threshold) if mode == "fixed" else canny_mod.canny_median(f, sigma))[None]

    return _map_frames(frames, out_hw, 1, edges)


def hed_edges(node, image, mode, resolution, output_size):
    frames, work_hw, out_hw = _frames_and_sizes(node, image, resolution, output_size, hed_mod.MAX_PIXELS)
    net = am.torch_network(hed_mod.WEIGHT_FILE, hed_mod.build_hed)

    def edges(frames):
        soft = batched_at_size(frames, work_hw, lambda b: hed_mod.hed_soft_edges(net, b, _check), out_hw)
        return hed_mod.edges_from_soft(soft, mode)  # at the output size: binary maps stay binary

    return _map_frames(frames, out_hw, frames_per_call(work_hw, NET_CHUNK), edges)


def depth_maps(node, image, render, resolution, output_size):
    frames, work_hw, out_hw = _frames_and_sizes(node, image, resolution, output_size, dav2.MAX_PIXELS,
                                                work_resolution=resolution if resolution > 0 else dav2.INPUT_SIZE)
    input_size = dav2.input_size_for(min(work_hw))
    net = am.torch_network(dav2.WEIGHT_FILE, dav2.build_depth_anything_v2)

    def draw(d):
        if render == "grey":
            return depth_render.render_grey(d)
        return depth_render.render_viridis(d, near="dark" if render == "viridis" else "bright")

    def depth(frames):
        return np.stack([draw(d) for d in dav2.estimate_depth(net, frames, input_size, out_hw, _check)])

    return _map_frames(frames, out_hw, frames_per_call(work_hw, NET_CHUNK), depth)


def openpose_poses(node, image, resolution, output_size, frame_stride=1):
    """(drawn skeletons, OpenPose JSON per frame)."""
    every_nth(image.shape[0], frame_stride)  # checks the stride
    frames, work_hw, out_hw = _frames_and_sizes(node, image[::frame_stride], resolution, output_size, openpose_body.MAX_PIXELS)
    net = am.torch_network(openpose_body.WEIGHT_FILE, openpose_body.build_body_pose)
    return _pose_outputs(frames, work_hw, out_hw, lambda f: openpose_body.detect_body(net, f, _check),
                         hands=False, face=False, threshold=0.0)


def dwpose_poses(node, image, resolution, output_size, draw_hands, draw_face, backend="auto", frame_stride=1):
    """(drawn skeletons, OpenPose JSON per frame)."""
    every_nth(image.shape[0], frame_stride)  # checks the stride
    frames, work_hw, out_hw = _frames_and_sizes(node, image[::frame_stride], resolution, output_size, dwp.MAX_PIXELS)
    model = dwp.DWPose(am.onnx_network(dwp.DETECTOR_FILE, backend), am.onnx_network(dwp.POSE_FILE, backend))
    return _pose_outputs(frames, work_hw, out_hw, lambda f: model(f, _check), hands=draw_hands, face=draw_face,
                         threshold=dwp.KEYPOINT_THRESHOLD)


def render_poses(pose_keypoint, style, width, height, draw_body, draw_hands, draw_face, threshold, reference_pose=None,
                 prepend_reference=False):
    """(drawn poses, their OpenPose JSON on the output canvas)."""
    frames = [from_openpose_json(d) for d in _pose_list(pose_keypoint, "pose_keypoint")]
    reference = None if reference_pose is None else from_openpose_json(_pose_list(reference_pose, "reference_pose")[0])
    frames = prepare_sequence(frames, reference, one_person=style == "controlnext_svd_v2", prepend_reference=prepend_reference)
    ow, oh = int(width or frames[0].width), int(height or frames[0].height)
    out = ImageBatch(len(frames), oh, ow)

    def work(start, stop):
        for i in range(start, stop):
            if style == "openpose":
                drawn = draw_openpose(frames[i], ow, oh, body=draw_body, hands=draw_hands, face=draw_face, threshold=threshold)
            else:
                drawn = draw_svd_v2(without_parts(frames[i], draw_body, draw_hands, draw_face), ow, oh)
            out.put(i, drawn[None])

    _for_frames(len(frames), 1, work)
    return out.image.to(mm.intermediate_device()), [to_openpose_json(PoseFrame(ow, oh, f.people)) for f in frames]


def _for_frames(count, chunk, work):
    """Calls work(start, stop) over the batch with a progress bar and interrupt checks."""
    bar = comfy.utils.ProgressBar(count)
    for start, stop in chunks(count, chunk):
        mm.throw_exception_if_processing_interrupted()
        work(start, stop)
        bar.update(stop - start)


def _map_frames(frames, out_hw, chunk, fn):
    """uint8 frames -> IMAGE of ``fn(uint8 frames)`` (uint8 maps of out_hw) over the batch, ``chunk``
    frames per call, written into the output as they come, with a progress bar and interrupt checks."""
    out = ImageBatch(len(frames), *out_hw)
    _for_frames(len(frames), chunk, lambda start, stop: out.put(start, fn(frames[start:stop])))
    return out.image.to(mm.intermediate_device())


def _frames_and_sizes(who, image, resolution, output_size, max_pixels, work_resolution=None):
    """uint8 frames and their (working, output) sizes by the size rule, checked before converting."""
    h, w = image.shape[1:3]
    work, out = plan_sizes(h, w, resolution, output_size, max_pixels, who, work_resolution)
    require_finite(who, image=image)  # NaN would become arbitrary pixel values, not an error
    return image_to_uint8(image), work, out


def _check():
    """The cancel check handed to the pure code (it imports no ComfyUI)."""
    mm.throw_exception_if_processing_interrupted()


def _pose_outputs(frames, work_hw, out_hw, detect, hands, face, threshold):
    oh, ow = out_hw
    out = ImageBatch(len(frames), oh, ow)
    poses = [None] * len(frames)

    def work(start, stop):
        for i in range(start, stop):
            found = detect(resize(frames[i], *work_hw))
            pose = PoseFrame(ow, oh, found.people)  # normalised coordinates: any canvas size
            out.put(i, draw_openpose(pose, ow, oh, body=True, hands=hands, face=face, threshold=threshold)[None])
            poses[i] = to_openpose_json(pose)

    _for_frames(len(frames), 1, work)
    return out.image.to(mm.intermediate_device()), poses


def _pose_list(value, name):
    items = [value] if isinstance(value, dict) else list(value or [])
    if not items:
        raise ValueError(f"{name} is empty: no pose to draw (connect the keypoints output of XCtrl OpenPose or DWPose).")
    return items

"""Preprocessor nodes: canny, HED, Depth Anything V2, OpenPose body, DWPose, pose rendering.

Every image node takes an IMAGE batch (video frames are a batch), returns an IMAGE batch of the
same length and shows a progress bar over frames. Cancel is checked between frames and, through
the `check` callback the pure code takes, inside each network call (between blocks / stages /
people), so a run stops within about a second of work. Greyscale input is replicated to RGB,
RGBA loses its alpha (as ComfyUI's LoadImage).

Sizes (`preprocessors/frames.plan_sizes`, the one rule): images beyond 16:1 are refused; the
working size (shorter side = `resolution`) and the output size (`output_size`: "input" = the
input's H x W, "resolution" = shorter side equal to `resolution`) are capped by pixel limits, with
a warning saying what was done. What `resolution` changes besides is in each tooltip.
Weights: ComfyUI/models/annotators (see runtime/annotator_models.py), downloaded on first use.
"""
from comfy_api.latest import io

from ..runtime import preprocessing as run
from ..runtime.annotator_models import check_files
from ..runtime.preprocessing import DEPTH_RENDERS, DWPOSE_BACKENDS, HED_MODES, OUTPUT_SIZE_CHOICES, POSE_STYLES
from .schema import node_schema

CATEGORY = "XCtrl/Preprocessors"
POSE_KEYPOINT = "POSE_KEYPOINT"  # list of OpenPose JSON dicts, one per frame (as comfyui_controlnet_aux)
PoseKeypoint = io.Custom(POSE_KEYPOINT)

OUTPUT_SIZE_TIP = (
    "Size of the output. input: the input image's width x height (the map lines up with the image). "
    "resolution: shorter side = resolution, aspect ratio kept (e.g. 1280x720 at 512 -> 910x512)."
)
STRIDE_TIP = (
    "Use every n-th input frame (1 = all). ControlNeXt-SVD v2's reference run takes every 2nd frame of the "
    "driving video (sample_stride 2); the outputs then hold only those frames."
)


def image_inputs(options, resolution, resolution_tip, step=8):
    """An image node's inputs: the image, its own options, the working resolution and the output size."""
    return [
        io.Image.Input("image"),
        *options,
        io.Int.Input("resolution", default=resolution, min=0, max=16384, step=step, tooltip=resolution_tip),
        io.Combo.Input("output_size", options=list(OUTPUT_SIZE_CHOICES), default="input", tooltip=OUTPUT_SIZE_TIP),
    ]


class ImageNode(io.ComfyNode):
    """An image preprocessor: its schema from its own options, and the validation that names every weight
    file it reads that is missing while downloads are off."""

    NODE_ID = NAME = None

    @classmethod
    def image_schema(cls, options, resolution, resolution_tip, step=8, extra=(), outputs=None):
        return node_schema(cls, cls.NODE_ID, cls.NAME, CATEGORY,
                           inputs=[*image_inputs(options, resolution, resolution_tip, step), *extra],
                           outputs=outputs or [io.Image.Output()])

    @classmethod
    def validate_inputs(cls, image):  # linked: None here; the files are checked
        return check_files(cls.NODE_ID)


def pose_outputs():
    return [io.Image.Output(display_name="image"), PoseKeypoint.Output(display_name="pose_keypoint")]

# ---------------------------------------------------------------------------------------------


class Canny(ImageNode):
    """Canny edges (white on black, RGB) as the control models were trained with. fixed: cv2.Canny(RGB, low,
    high) as lllyasviel's annotator. median: the thresholds ControlNeXt-SDXL's canny models were trained with,
    low = (1 - sigma) * median, high = (1 + sigma) * median of the grey image, Canny on the grey image."""

    NODE_ID, NAME = "XCtrl_Canny", "Canny Edges (XCtrl)"

    @classmethod
    def define_schema(cls):
        return cls.image_schema([
            io.Combo.Input("mode", options=["fixed", "median"], default="fixed", tooltip="fixed: low/high thresholds. median: ControlNeXt SDXL's automatic thresholds from the grey median and sigma."),
            io.Int.Input("low_threshold", default=100, min=0, max=1000, tooltip="fixed mode: lower hysteresis threshold."),
            io.Int.Input("high_threshold", default=200, min=0, max=1000, tooltip="fixed mode: upper hysteresis threshold."),
            io.Float.Input("sigma", default=0.33, min=0.0, max=1.0, step=0.01, tooltip="median mode: thresholds (1 -/+ sigma) x median. ControlNeXt SDXL used 0.33."),
        ], 512, "Used only with output_size = resolution: the edges are computed on the image scaled so its shorter side is this many pixels, and that is the output size. With output_size = input, edges are computed at the input size (identical to cv2.Canny).")

    @classmethod
    def execute(cls, image, mode, low_threshold, high_threshold, sigma, resolution, output_size):
        return io.NodeOutput(run.canny_edges(cls.NAME, image, mode, low_threshold, high_threshold, sigma, resolution,
                                             output_size))


class HED(ImageNode):
    """HED soft edges with lllyasviel's Apache-2.0 network (ControlNetHED.pth, 29 MB, downloaded to
    models/annotators on first use). soft: the edge probability; safe: three levels (0, 127, 255); scribble:
    thinned, blurred and thresholded to binary strokes (ControlNet scribble/sketch style)."""

    NODE_ID, NAME = "XCtrl_HED", "HED Soft Edges / Scribble (XCtrl)"

    @classmethod
    def define_schema(cls):
        return cls.image_schema([
            io.Combo.Input("mode", options=list(HED_MODES), default="soft"),
        ], 512, "The network runs on the image scaled so its shorter side is this many pixels (padded to a multiple of 64, padding cropped); edge thickness follows this scale. 0 = input size.")

    @classmethod
    def execute(cls, image, mode, resolution, output_size):
        return io.NodeOutput(run.hed_edges(cls.NAME, image, mode, resolution, output_size))


class DepthAnythingV2(ImageNode):
    """Relative depth with Depth Anything V2 Small (depth_anything_v2_vits.pth, Apache-2.0, 99 MB, downloaded to
    models/annotators on first use). grey: white = near (ControlNet depth models). viridis: the colormap the
    ControlNeXt depth models were trained on (near = dark purple, far = yellow); viridis_near_bright:
    reversed."""

    NODE_ID, NAME = "XCtrl_DepthAnythingV2", "Depth Anything V2 Small (XCtrl)"

    @classmethod
    def define_schema(cls):
        return cls.image_schema([
            io.Combo.Input("render", options=list(DEPTH_RENDERS), default="grey", tooltip="grey for ControlNet depth models; viridis for ControlNeXt depth models."),
        ], 518, "Network input: the image is scaled (bicubic) so its shorter side is this many pixels, rounded to a multiple of 14 (518 = the size the model was trained at; larger = finer detail, slower). The depth map is then resized bilinearly to the output size.", step=14)

    @classmethod
    def execute(cls, image, render, resolution, output_size):
        return io.NodeOutput(run.depth_maps(cls.NAME, image, render, resolution, output_size))


class OpenPose(ImageNode):
    """OpenPose body keypoints (18 points; CMU model body_pose_model.pth, 209 MB, NON-COMMERCIAL licence,
    downloaded to models/annotators on first use). Outputs the skeleton drawn as lllyasviel's annotator draws
    it and the keypoints as OpenPose JSON (one dict per frame; canvas = output size)."""

    NODE_ID, NAME = "XCtrl_OpenPose", "OpenPose Body (XCtrl)"

    @classmethod
    def define_schema(cls):
        return cls.image_schema([], 512, "Detection runs on the image scaled so its shorter side is this many pixels. The skeleton is drawn at the output size from the detected (normalised) keypoints.", extra=[
            io.Int.Input("frame_stride", optional=True, default=1, min=1, max=1024, tooltip=STRIDE_TIP),
        ], outputs=pose_outputs())

    @classmethod
    def execute(cls, image, resolution, output_size, frame_stride=1):
        return io.NodeOutput(*run.openpose_poses(cls.NAME, image, resolution, output_size, frame_stride))


class DWPose(ImageNode):
    """DWPose whole-body keypoints (body, hands, face; Apache-2.0; yolox_l.onnx 217 MB + dw-ll_ucoco_384.onnx 134
    MB, downloaded to models/annotators on first use). Runs with onnxruntime when installed (CUDA provider on
    a CUDA device when available), else OpenCV's DNN module. Outputs the OpenPose-style drawing and the
    keypoints as OpenPose JSON (one dict per frame; canvas = output size); XCtrl Render Pose draws them in
    other styles."""

    NODE_ID, NAME = "XCtrl_DWPose", "DWPose Whole Body (XCtrl)"

    @classmethod
    def define_schema(cls):
        return cls.image_schema([], 512, "Detection runs on the image scaled so its shorter side is this many pixels (the person detector then letterboxes it to 640x640). The skeleton is drawn at the output size from the normalised keypoints.", extra=[
            io.Boolean.Input("draw_hands", default=True),
            io.Boolean.Input("draw_face", default=True),
            io.Combo.Input("backend", optional=True, options=list(DWPOSE_BACKENDS), default="auto", tooltip="auto: onnxruntime if installed, else OpenCV DNN."),
            io.Int.Input("frame_stride", optional=True, default=1, min=1, max=1024, tooltip=STRIDE_TIP),
        ], outputs=pose_outputs())

    @classmethod
    def execute(cls, image, resolution, output_size, draw_hands, draw_face, backend="auto", frame_stride=1):
        return io.NodeOutput(*run.dwpose_poses(cls.NAME, image, resolution, output_size, draw_hands, draw_face, backend,
                                               frame_stride))


class RenderPose(io.ComfyNode):
    """Draws pose keypoints (OpenPose JSON from XCtrl OpenPose / DWPose or other packs) as a control image.
    openpose: lllyasviel's annotator style (ControlNet, ControlNeXt SD1.5 pose). controlnext_svd_v2: the style
    ControlNeXt-SVD-v2 was trained on (one person per frame, confidence-scaled colours, BGR order). With a
    reference_pose, the sequence is first aligned to it (one linear fit over the sequence, as
    ControlNeXt-SVD-v2); prepend_reference then puts the reference pose itself first, as the ControlNeXt-SVD
    v2 condition sequence."""

    @classmethod
    def define_schema(cls):
        return node_schema(cls, "XCtrl_RenderPose", "Render Pose (XCtrl)", CATEGORY, inputs=[
            PoseKeypoint.Input("pose_keypoint"),
            io.Combo.Input("style", options=list(POSE_STYLES), default="openpose"),
            io.Int.Input("width", default=0, min=0, max=16384, step=8, tooltip="Output width; 0 = the canvas width of the keypoints (of the reference pose when aligning; of the first frame otherwise)."),
            io.Int.Input("height", default=0, min=0, max=16384, step=8, tooltip="Output height; 0 = the canvas height, as for width."),
            io.Boolean.Input("draw_body", default=True),
            io.Boolean.Input("draw_hands", default=True),
            io.Boolean.Input("draw_face", default=True),
            io.Float.Input("threshold", default=0.3, min=0.0, max=1.0, step=0.01, tooltip="openpose style: keypoints with confidence <= threshold are not drawn (DWPose uses 0.3; use 0 for XCtrl OpenPose keypoints). The svd_v2 style has its own fixed rule."),
            PoseKeypoint.Input("reference_pose", optional=True, tooltip="Pose of the reference image (its first frame is used): the sequence is scaled and shifted onto it, as ControlNeXt-SVD-v2 prepares its poses."),
            io.Boolean.Input("prepend_reference", optional=True, default=False, tooltip="With a reference_pose: output frame 0 is the reference pose itself, then the aligned sequence (ControlNeXt-SVD v2's condition sequence: video frames = pose frames, frame 0 reconstructs the reference image)."),
        ], outputs=pose_outputs())

    @classmethod
    def execute(cls, pose_keypoint, style, width, height, draw_body, draw_hands, draw_face, threshold,
                reference_pose=None, prepend_reference=False):
        return io.NodeOutput(*run.render_poses(pose_keypoint, style, width, height, draw_body, draw_hands, draw_face,
                                               threshold, reference_pose, prepend_reference))


NODES = [Canny, HED, DepthAnythingV2, OpenPose, DWPose, RenderPose]

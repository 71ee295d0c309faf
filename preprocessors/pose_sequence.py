"""A pose sequence made ready for drawing: person selection, alignment to a reference pose and
the ControlNeXt-SVD v2 condition sequence (the reference pose first).

ControlNeXt-SVD v2 draws one person per frame and builds its condition sequence as
``[pose of the reference image] + aligned poses of every n-th driving frame`` (docs/long_video.md,
"The condition sequence"), so that generated frame 0 reconstructs the reference image.
"""
import numpy as np

from .pose_align import align_poses
from .pose_format import Person, PoseFrame


def most_confident_person(frame):
    """The frame with only its person of highest mean body score (ControlNeXt-SVD-v2 keeps one)."""
    if len(frame.people) <= 1:
        return frame
    best = max(frame.people, key=lambda p: float(np.mean(p.body[:, 2])))
    return PoseFrame(frame.width, frame.height, [best])


def without_parts(frame, body=True, hands=True, face=True):
    """The frame with the parts not drawn removed (body keypoints zeroed: 'not detected')."""
    if body and hands and face:
        return frame
    people = [Person(p.body if body else np.zeros_like(p.body), p.left_hand if hands else None,
                     p.right_hand if hands else None, p.face if face else None) for p in frame.people]
    return PoseFrame(frame.width, frame.height, people)


def prepare_sequence(frames, reference=None, one_person=False, prepend_reference=False):
    """The frames to draw, in order.

    ``one_person``: keep each frame's most confident person (the SVD v2 style). With a
    ``reference`` pose the sequence is aligned to it (its most confident person;
    pose_align.py) and, with ``prepend_reference``, the reference pose itself becomes frame 0.
    """
    frames = list(frames)
    if one_person or reference is not None:
        frames = [most_confident_person(f) for f in frames]
    if reference is None:
        if prepend_reference:
            raise ValueError("prepend_reference needs a reference_pose (the pose of the reference image).")
        return frames
    reference = most_confident_person(reference)
    aligned = align_poses(frames, reference) if frames else []
    return ([reference] if prepend_reference else []) + aligned


def every_nth(count, stride):
    """Indices 0, stride, 2 * stride, ... below count (the reference's sample_stride)."""
    if stride < 1:
        raise ValueError(f"frame_stride must be at least 1, got {stride}.")
    return list(range(0, count, stride))

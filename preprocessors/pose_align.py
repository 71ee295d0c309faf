"""Aligning a pose sequence to a reference pose, as ControlNeXt-SVD-v2 prepares its poses
(ControlNeXt-SVD-v2/dwpose/preprocess.py, `get_video_pose`).

In normalised coordinates, one linear map for the whole sequence:
- Keypoints used: nose, neck, both shoulders, hips, knees, ankles, eyes, ears (body indices
  0, 1, 2, 5, 8-17), restricted to those the reference's first person has with confidence
  > 0.3. Frames with exactly one person take part in the fit (all their chosen keypoints,
  whatever their confidence, as the reference does).
- y: least-squares line y_ref = ay * y + by over all those keypoints (np.polyfit degree 1).
- x: the scale that keeps pixel proportions, ax = ay * (frame_w / frame_h) * (ref_h / ref_w),
  and the offset bx = mean(x_ref - ax * x).
Every keypoint of every frame (body, hands, face) becomes (ax * x + bx, ay * y + by); the
frames take the reference's canvas size. Confidences are unchanged; keypoints with confidence 0
(missing, e.g. from a JSON file) stay at (0, 0).
"""
import numpy as np

from .pose_format import Person, PoseFrame

ALIGN_KEYPOINTS = [0, 1, 2, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
REFERENCE_THRESHOLD = 0.3


def fit_alignment(sequence, reference):
    """((ax, ay), (bx, by)) mapping the sequence's normalised coordinates onto the reference's."""
    if not reference.people:
        raise ValueError("Pose alignment needs a person in the reference pose; none was found.")
    ref_body = reference.people[0].body
    ids = [i for i in ALIGN_KEYPOINTS if ref_body[i, 2] > REFERENCE_THRESHOLD]
    if len(ids) < 2:
        raise ValueError(f"Pose alignment needs at least 2 reference keypoints among {ALIGN_KEYPOINTS}, found {len(ids)}.")
    single = [f for f in sequence if len(f.people) == 1]
    if not single:
        raise ValueError("Pose alignment needs at least one frame with exactly one person.")
    det = np.stack([f.people[0].body[ids, :2] for f in single])  # (frames, keypoints, 2)
    ref = np.broadcast_to(ref_body[ids, :2], det.shape)
    ay, by = np.polyfit(det[:, :, 1].ravel(), ref[:, :, 1].ravel(), 1)
    frame_h, frame_w = single[0].height, single[0].width
    ax = ay / (frame_h / frame_w / reference.height * reference.width)
    bx = np.mean(ref[:, :, 0].ravel() - det[:, :, 0].ravel() * ax)
    return (float(ax), float(ay)), (float(bx), float(by))


def align_poses(sequence, reference):
    """The sequence (list of PoseFrame) mapped onto the reference PoseFrame; see module docstring."""
    sequence = list(sequence)
    (ax, ay), (bx, by) = fit_alignment(sequence, reference)
    scale, offset = np.array([ax, ay, 1.0]), np.array([bx, by, 0.0])

    def move(points):
        if points is None:
            return None
        points = np.asarray(points, dtype=np.float64)
        # keypoints marked missing (confidence 0) stay at (0, 0, 0), where drawing skips them
        return np.where(points[:, 2:] > 0, points * scale + offset, 0.0)

    return [
        PoseFrame(reference.width, reference.height,
                  [Person(move(p.body), move(p.left_hand), move(p.right_hand), move(p.face)) for p in frame.people])
        for frame in sequence
    ]

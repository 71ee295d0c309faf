"""Pose drawing (annotator and ControlNeXt-SVD-v2 styles), OpenPose JSON, pose alignment."""
import numpy as np
import pytest

from xctrl.preprocessors.pose_align import align_poses, fit_alignment
from xctrl.preprocessors.pose_draw import draw_openpose, draw_svd_v2
from xctrl.preprocessors.pose_format import Person, PoseFrame, from_openpose_json, to_openpose_json

NECK, R_SHOULDER, R_HIP, L_SHOULDER = 1, 2, 8, 5


def person(points, size=18):
    """Person from {index: (x, y, conf)} in normalised coordinates."""
    body = np.zeros((size, 3))
    for i, p in points.items():
        body[i] = p
    return Person(body=body)


def test_openpose_limb_and_joint_colours():
    frame = PoseFrame(128, 128, [person({NECK: (0.5, 0.3, 1), R_SHOULDER: (0.25, 0.3, 1)})])
    img = draw_openpose(frame)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert img[38, 48].tolist() == [153, 0, 0]  # limb 1 (neck - R shoulder), red at 0.6
    assert img[38, 64].tolist() == [255, 85, 0]  # neck joint, full colour
    assert img[38, 32].tolist() == [255, 170, 0]  # R shoulder joint
    assert img[38, 68].tolist() == [255, 85, 0] and img[38, 69].tolist() == [0, 0, 0]  # radius 4
    assert img[34, 48].tolist() == [153, 0, 0] and img[33, 48].tolist() == [0, 0, 0]  # half-width 4
    assert img[42, 48].tolist() == [153, 0, 0] and img[43, 48].tolist() == [0, 0, 0]
    assert not img[:20].any() and not img[60:].any()  # black elsewhere


def test_openpose_later_limbs_cover_earlier_ones():
    # person A: neck -> R hip (limb 7, vertical); person B: neck -> R shoulder (limb 1, horizontal)
    a = person({NECK: (0.5, 0.2, 1), R_HIP: (0.5, 0.8, 1)})
    b = person({NECK: (0.75, 0.5, 1), R_SHOULDER: (0.25, 0.5, 1)})
    img = draw_openpose(PoseFrame(100, 100, [b, a]))
    assert img[50, 50].tolist() == [0, 153, 0]  # limb 7 colour [0, 255, 0] wins over limb 1's red
    assert img[50, 35].tolist() == [153, 0, 0]


def test_openpose_threshold_and_missing_points():
    frame = PoseFrame(64, 64, [person({NECK: (0.5, 0.5, 0.2), R_SHOULDER: (0.25, 0.5, 1)})])
    assert draw_openpose(frame)[32, 24].tolist() == [153, 0, 0]
    thresholded = draw_openpose(frame, threshold=0.3)
    assert not thresholded[32, 24].any() and not thresholded[32, 32].any()
    assert thresholded[32, 16].tolist() == [255, 170, 0]  # the confident joint stays


def test_hands_and_face():
    hand = np.zeros((21, 3))  # confidence 0: not drawn
    hand[[0, 1, 5, 6]] = [(0.1, 0.2, 1), (0.1, 0.6, 1), (0.4, 0.2, 1), (0.4, 0.6, 1)]
    face = np.array([[0.8, 0.8, 1.0], [0.0, 0.9, 1.0]])  # x = 0 is skipped, as in the references
    p = person({})
    p.left_hand, p.face = hand, face
    img = draw_openpose(PoseFrame(100, 100, [p]))
    assert img[40, 10].tolist() == [255, 0, 0]  # edge 0 (0 -> 1): hsv(0) = red
    assert img[20, 25].tolist() == [204, 255, 0]  # edge 4 (0 -> 5): hsv(0.2) = (0.8, 1, 0)
    assert img[40, 40].tolist() == [128, 255, 0]  # edge 5 (5 -> 6): hsv(0.25) -> 127.5, rounded by OpenCV
    assert img[20, 10].tolist() == [0, 0, 255] and img[60, 44].tolist() == [0, 0, 255]  # points, radius 4
    assert not img[40, 25].any() and not img[80, 10].any()  # no edges to the missing points
    assert img[80, 80].tolist() == [255, 255, 255] and img[80, 83].tolist() == [255, 255, 255]
    assert img[80, 84].tolist() == [0, 0, 0]  # face dots radius 3
    assert not img[90, :5].any()
    assert not draw_openpose(PoseFrame(100, 100, [p]), hands=False, face=False).any()


def test_svd_v2_confidence_scaled_and_channel_swapped():
    frame = PoseFrame(2160, 2160, [person({NECK: (0.5, 0.5, 1.0), R_SHOULDER: (0.25, 0.5, 0.5)})])
    img = draw_svd_v2(frame)
    assert img.shape == (2160, 2160, 3)
    # limb 1: [255, 0, 0] * (1.0 * 0.5) -> 127, * 0.6 -> 76, drawn as BGR then swapped
    assert img[1080, 800].tolist() == [0, 0, 76]
    assert img[1080, 1080].tolist() == [0, 85, 255]  # neck joint [255, 85, 0], confidence 1
    assert img[1080, 540].tolist() == [0, 85, 127]  # R shoulder joint at confidence 0.5
    assert not img[:1000].any()


def test_svd_v2_thresholds():
    # confidence 0.3: the limb is drawn (>= 0.3) but the joint is not (> 0.3 needed)
    frame = PoseFrame(2160, 2160, [person({NECK: (0.5, 0.5, 1.0), R_SHOULDER: (0.25, 0.5, 0.3)})])
    img = draw_svd_v2(frame)
    assert img[1080, 800].tolist() == [0, 0, int(int(255 * 0.3) * 0.6)]
    assert img[1080, 540].tolist() == [0, 0, 45]  # limb end, not the joint colour
    frame.people[0].body[R_SHOULDER, 2] = 0.29
    assert not draw_svd_v2(frame)[1080, 800].any()


def test_svd_v2_draws_at_2160_then_resizes():
    frame = PoseFrame(1024, 576, [person({NECK: (0.5, 0.3, 1.0), R_SHOULDER: (0.25, 0.3, 1.0)})])
    img = draw_svd_v2(frame)
    assert img.shape == (576, 1024, 3)
    # drawn 3.75x larger, so the radius-4 neck joint is about 2 px here, in (0, 85, 255)
    near_neck = img[170:176, 509:515].reshape(-1, 3)
    assert (near_neck[:, 2] == 255).any() and (near_neck[:, 0] == 0).all()
    assert not img[:150].any()


def test_json_round_trip_and_formats():
    body = np.zeros((18, 3))
    body[NECK] = (0.5, 0.25, 0.9)
    body[R_SHOULDER] = (0.25, 0.25, 1.0)
    hand = np.tile([0.1, 0.2, 0.7], (21, 1))
    frame = PoseFrame(200, 100, [Person(body=body, right_hand=hand)])
    data = to_openpose_json(frame)
    assert data["canvas_width"] == 200 and data["canvas_height"] == 100
    kp = data["people"][0]["pose_keypoints_2d"]
    assert len(kp) == 54 and kp[3:6] == [100.0, 25.0, 0.9] and kp[0:3] == [0.0, 0.0, 0.0]
    assert data["people"][0]["hand_left_keypoints_2d"] is None
    back = from_openpose_json(data)
    assert np.allclose(back.people[0].body, body) and np.allclose(back.people[0].right_hand, hand)
    assert back.people[0].left_hand is None
    normalised = {"canvas_width": 200, "canvas_height": 100, "people": [{"pose_keypoints_2d": (body.ravel()).tolist()}]}
    assert np.allclose(from_openpose_json(normalised).people[0].body, body)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"people": []}, "canvas_width"),
        ({"canvas_width": 0, "canvas_height": 10, "people": []}, "positive"),
        ({"canvas_width": 10, "canvas_height": 10, "people": [{"pose_keypoints_2d": [1, 2]}]}, "triples"),
        ({"canvas_width": 10, "canvas_height": 10, "people": [{"pose_keypoints_2d": [1, 2, 1] * 25}]}, "25 keypoints"),
    ],
)
def test_bad_json(data, message):
    with pytest.raises(ValueError, match=message):
        from_openpose_json(data)


def reference_pose():
    rng = np.random.default_rng(0)
    body = np.column_stack([rng.uniform(0.2, 0.8, 18), rng.uniform(0.1, 0.9, 18), np.ones(18)])
    body[3, 2] = 0.0  # not in the fit anyway (elbows are not alignment keypoints)
    return PoseFrame(50, 100, [Person(body=body)])


def test_alignment_recovers_a_known_linear_map():
    ref = reference_pose()
    ay, by = 0.8, 0.1
    ax = ay / (200 / 200 / 100 * 50)  # frames 200 x 200, reference 50 wide x 100 high: pixel aspect kept
    bx = 0.05
    moved = ref.people[0].body.copy()
    moved[:, 0] = (moved[:, 0] - bx) / ax
    moved[:, 1] = (moved[:, 1] - by) / ay
    hand = np.tile([0.4, 0.5, 1.0], (21, 1))
    frames = [PoseFrame(200, 200, [Person(body=moved.copy(), left_hand=hand)]) for _ in range(3)]
    frames.append(PoseFrame(200, 200, [Person(body=moved * 0.5), Person(body=moved)]))  # two people: not fitted
    (fax, fay), (fbx, fby) = fit_alignment(frames, ref)
    assert (fax, fay, fbx, fby) == pytest.approx((ax, ay, bx, by))
    assert ax == pytest.approx(1.6)
    aligned = align_poses(frames, ref)
    assert (aligned[0].width, aligned[0].height) == (50, 100)
    present = ref.people[0].body[:, 2] > 0
    assert np.allclose(aligned[0].people[0].body[present], ref.people[0].body[present])
    assert np.allclose(aligned[0].people[0].left_hand[0], [0.4 * ax + bx, 0.5 * ay + by, 1.0])
    assert (aligned[0].people[0].body[3] == 0).all()  # a missing keypoint stays missing
    assert len(aligned[3].people) == 2


def test_alignment_errors():
    ref = reference_pose()
    with pytest.raises(ValueError, match="exactly one person"):
        align_poses([PoseFrame(10, 10, [])], ref)
    with pytest.raises(ValueError, match="reference"):
        align_poses([PoseFrame(10, 10, [])], PoseFrame(10, 10, []))

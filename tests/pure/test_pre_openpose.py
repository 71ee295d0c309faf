"""OpenPose body: the body_pose_model.pth layout, the network wrapper, and decoding."""
import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from xctrl.models.checkpoint_io import load_state_dict
from xctrl.preprocessors.openpose_body import BodyPoseNet, build_body_pose, decode, run_network, smooth_part_map

# Facts from the annotator (annotator/openpose/body.py): limbs (1-based) and PAF channels (mapIdx - 19).
LIMBS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13], [13, 14],
         [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
MAP_IDX = [[31, 32], [39, 40], [33, 34], [35, 36], [41, 42], [43, 44], [19, 20], [21, 22], [23, 24], [25, 26],
           [27, 28], [29, 30], [47, 48], [49, 50], [53, 54], [51, 52], [55, 56], [37, 38], [45, 46]]

# One person, (x, y) per keypoint: nose, neck, R shoulder/elbow/wrist, L shoulder/elbow/wrist,
# R hip/knee/ankle, L hip/knee/ankle, R/L eye, R/L ear.
SKELETON = np.array([
    [30, 20], [30, 32], [22, 32], [18, 44], [16, 56], [38, 32], [42, 44], [44, 56],
    [25, 60], [24, 76], [24, 92], [35, 60], [36, 76], [36, 92], [27, 17], [33, 17], [24, 19], [36, 19],
], dtype=float)
H, W = 112, 128


def render_maps(people, present=None):
    """Heatmaps (Gaussian blobs, sigma 2.5) and PAFs (unit vectors within 2 px of each limb)."""
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    heat = np.zeros((H, W, 19))
    paf = np.zeros((H, W, 38))
    for person in people:
        has = np.ones(18, bool) if present is None else present
        for p, (x, y) in enumerate(person):
            if has[p]:
                heat[:, :, p] = np.maximum(heat[:, :, p], np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.5 ** 2)))
        for (a, b), (cx, cy) in zip(LIMBS, MAP_IDX):
            if not (has[a - 1] and has[b - 1]):
                continue
            pa, pb = person[a - 1], person[b - 1]
            d = pb - pa
            length = np.hypot(*d)
            u = d / length
            t = (xx - pa[0]) * u[0] + (yy - pa[1]) * u[1]
            dist = np.abs((xx - pa[0]) * u[1] - (yy - pa[1]) * u[0])
            on = (t >= -1) & (t <= length + 1) & (dist <= 2)
            paf[on, cx - 19] = u[0]
            paf[on, cy - 19] = u[1]
    heat[:, :, 18] = 1 - heat[:, :, :18].max(axis=2)
    return heat, paf


def expected_body(person):
    return np.column_stack([person[:, 0] / W, person[:, 1] / H])


def test_decode_one_person():
    frame = decode(*render_maps([SKELETON]))
    assert (frame.width, frame.height) == (W, H)
    assert len(frame.people) == 1
    body = frame.people[0].body
    assert np.allclose(body[:, :2], expected_body(SKELETON))
    assert np.allclose(body[:, 2], 1.0)  # peak score = unsmoothed heatmap value at the peak


def test_decode_two_people_grouped():
    second = SKELETON + [66, 4]
    frame = decode(*render_maps([SKELETON, second]))
    assert len(frame.people) == 2
    got = sorted((p.body for p in frame.people), key=lambda b: b[1, 0])
    assert np.allclose(got[0][:, :2], expected_body(SKELETON))
    assert np.allclose(got[1][:, :2], expected_body(second))


def test_decode_missing_parts_and_small_fragments():
    present = np.ones(18, bool)
    present[[10, 13]] = False  # no ankles
    frame = decode(*render_maps([SKELETON], present))
    body = frame.people[0].body
    assert (body[[10, 13], 2] == 0).all() and (body[~present, :2] == 0).all()
    assert np.allclose(body[present, :2], expected_body(SKELETON)[present])
    fragment = np.zeros(18, bool)
    fragment[[1, 2, 3]] = True  # neck, shoulder, elbow: 3 parts < 4, dropped
    assert decode(*render_maps([SKELETON], fragment)).people == []


def test_reversed_paf_rejects_the_limb():
    heat, paf = render_maps([SKELETON])
    paf[:, :, [MAP_IDX[2][0] - 19, MAP_IDX[2][1] - 19]] *= -1  # right shoulder -> elbow points backwards
    body = decode(heat, paf).people[0].body
    assert body[3, 2] == 0 and body[4, 2] == 0  # elbow and wrist (reached only through it) are lost
    assert body[2, 2] > 0


def test_smoothing_equals_scipy_gaussian_filter():
    x = np.random.default_rng(0).random((40, 50))
    assert np.allclose(smooth_part_map(x), scipy.ndimage.gaussian_filter(x, sigma=3), atol=1e-12)


def test_decode_rejects_bad_shapes():
    with pytest.raises(ValueError, match="heatmaps"):
        decode(np.zeros((8, 8, 19)), np.zeros((8, 8, 19)))


REAL_SHAPES = {  # a few entries of body_pose_model.pth (flat keys, float32, 209 MB)
    "conv1_1.weight": (64, 3, 3, 3),
    "conv4_4_CPM.weight": (128, 256, 3, 3),
    "conv5_4_CPM_L1.weight": (512, 128, 1, 1),
    "conv5_5_CPM_L1.weight": (38, 512, 1, 1),
    "conv5_5_CPM_L2.weight": (19, 512, 1, 1),
    "Mconv1_stage2_L1.weight": (128, 185, 7, 7),
    "Mconv6_stage4_L2.bias": (128,),
    "Mconv7_stage6_L2.weight": (19, 128, 1, 1),
}


@pytest.fixture(scope="module")
def body_net(tmp_path_factory):
    torch.manual_seed(0)
    flat = {k.split(".", 1)[1]: v for k, v in BodyPoseNet().state_dict().items()}
    path = tmp_path_factory.mktemp("pose") / "body_pose_model.pth"
    torch.save(flat, path)
    return build_body_pose(load_state_dict(str(path)))


def test_layout_of_the_real_file(body_net):
    flat = {k.split(".", 1)[1]: tuple(v.shape) for k, v in body_net.state_dict().items()}
    assert len(flat) == 184
    for key, shape in REAL_SHAPES.items():
        assert flat[key] == shape
    assert sum(math.prod(s) for s in flat.values()) * 4 == pytest.approx(209.2e6, rel=0.002)
    grouped = build_body_pose(body_net.state_dict())  # the grouped spelling loads too
    assert torch.equal(grouped.model0.conv1_1.weight, body_net.model0.conv1_1.weight)
    with pytest.raises(ValueError, match="body_pose_model.pth"):
        build_body_pose({"conv1_1.weight": torch.zeros(64, 3, 3, 3)})


def test_run_network(body_net):
    # A pure-red RGB image; the network must see BGR as x / 256 - 0.5, scaled to 0.5 * 368 / H.
    image = np.zeros((46, 10, 3), np.uint8)
    image[..., 0] = 255
    seen = []
    hook = body_net.model0.conv1_1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        heat, paf = run_network(body_net, image)
    finally:
        hook.remove()
    x = seen[0]
    assert x.shape == (1, 3, 184, 40)  # 4x -> 184 x 40, both multiples of 8 already
    assert torch.allclose(x[0, :, 5, 5], torch.tensor([-0.5, -0.5, 255 / 256 - 0.5]))
    assert heat.shape == (46, 10, 19) and paf.shape == (46, 10, 38)
    assert heat.dtype == np.float32 and np.isfinite(heat).all() and np.isfinite(paf).all()
    assert isinstance(decode(heat, paf).people, list)


def test_run_network_pads_to_the_stride(body_net):
    seen = []
    hook = body_net.model0.conv1_1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        heat, _ = run_network(body_net, np.zeros((92, 11, 3), np.uint8))
    finally:
        hook.remove()
    # 2x -> 184 x 22, padded on the right to 24 with the value 128 (128 / 256 - 0.5 = 0)
    assert seen[0].shape == (1, 3, 184, 24)
    assert (seen[0][0, :, :, 22:] == 0).all() and (seen[0][0, :, :, :22] == -0.5).all()
    assert heat.shape == (92, 11, 19)

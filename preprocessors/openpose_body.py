"""OpenPose body estimation (CMU's 18-keypoint COCO model, `body_pose_model.pth`).

The CMU licence is non-commercial. `body_pose_model.pth` (lllyasviel/Annotators) stores flat
layer names (`conv1_1.weight`, `conv5_1_CPM_L1.weight`, `Mconv7_stage6_L2.bias`, ...); the
network here groups them as the annotator's `bodypose_model` does (`model0`, `model1_1` ...
`model6_2`) and `build_body_pose` accepts both spellings.

Inference as the ControlNet 1.1 annotator (annotator/openpose/body.py, util.py):
`run_network` gives heatmaps (19 = 18 parts + background) and part affinity fields
(38 = x, y for 19 limbs) at the image size; `decode` turns them into people.
"""
from collections import OrderedDict

import cv2
import numpy as np
import torch
from torch import nn

from .pose_format import BODY_POINTS, Person, PoseFrame
from .weights import load_exact

WEIGHT_FILE = "body_pose_model.pth"
BOXSIZE = 368
STRIDE = 8
PAD_VALUE = 128
# Working-size limit: the network always sees 184 px high (0.5 x 368); the working image only sets
# where its heatmaps are upsampled to and searched (about 700 bytes per pixel in the decoding).
MAX_PIXELS = 1024 * 1024
SCALE_SEARCH = (0.5,)  # the annotator runs one scale (CMU's original: 0.5, 1.0, 1.5, 2.0)

# Limbs as 1-based keypoint pairs; the last two (shoulder-ear) only add parts to people.
LIMBS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
         [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
# PAF channel pair (x, y) of each limb, as in the annotator's mapIdx minus 19.
PAF_CHANNELS = [[12, 13], [20, 21], [14, 15], [16, 17], [22, 23], [24, 25], [0, 1], [2, 3], [4, 5], [6, 7],
                [8, 9], [10, 11], [28, 29], [30, 31], [34, 35], [32, 33], [36, 37], [18, 19], [26, 27]]


def _layers(spec, no_relu):
    """nn.Sequential with the caffe layer names: (name, in, out, kernel) or (name,) for a 2x2 pool."""
    layers = []
    for name, *conv in spec:
        if not conv:
            layers.append((name, nn.MaxPool2d(2, 2)))
            continue
        c_in, c_out, k = conv
        layers.append((name, nn.Conv2d(c_in, c_out, k, padding=k // 2)))
        if name not in no_relu:
            layers.append(("relu_" + name, nn.ReLU(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


class BodyPoseNet(nn.Module):
    """VGG-19 front end (to conv4_2) + two CPM convs, then 6 two-branch stages
    (L1: PAFs, 38 channels; L2: heatmaps, 19 channels)."""

    def __init__(self):
        super().__init__()
        self.model0 = _layers([
            ("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), ("pool1_stage1",),
            ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), ("pool2_stage1",),
            ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
            ("pool3_stage1",),
            ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3), ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3),
        ], no_relu=())
        # The annotator's no-ReLU list names Mconv7_stage6_L1 twice and forgets Mconv7_stage6_L2:
        # its final heatmaps pass through a ReLU. Kept, so outputs equal the annotator's.
        no_relu = {"conv5_5_CPM_L1", "conv5_5_CPM_L2", "Mconv7_stage6_L1"}
        no_relu |= {f"Mconv7_stage{s}_L{b}" for s in range(2, 6) for b in (1, 2)}
        for branch, out in ((1, 38), (2, 19)):
            setattr(self, f"model1_{branch}", _layers([
                (f"conv5_1_CPM_L{branch}", 128, 128, 3), (f"conv5_2_CPM_L{branch}", 128, 128, 3),
                (f"conv5_3_CPM_L{branch}", 128, 128, 3), (f"conv5_4_CPM_L{branch}", 128, 512, 1),
                (f"conv5_5_CPM_L{branch}", 512, out, 1),
            ], no_relu))
            for s in range(2, 7):
                spec = [(f"Mconv1_stage{s}_L{branch}", 185, 128, 7)]
                spec += [(f"Mconv{i}_stage{s}_L{branch}", 128, 128, 7) for i in range(2, 6)]
                spec += [(f"Mconv6_stage{s}_L{branch}", 128, 128, 1), (f"Mconv7_stage{s}_L{branch}", 128, out, 1)]
                setattr(self, f"model{s}_{branch}", _layers(spec, no_relu))

    def forward(self, x, check=None):
        """x: (B, 3, H, W) BGR as im / 256 - 0.5. Returns (pafs (B, 38, H/8, W/8), heatmaps (B, 19, ...)).
        `check()`, when given, is called after each stage (the caller's cancel check raises there)."""
        features = self.model0(x)
        h = features
        for s in range(1, 7):
            if check is not None:
                check()
            pafs = getattr(self, f"model{s}_1")(h)
            heat = getattr(self, f"model{s}_2")(h)
            h = torch.cat([pafs, heat, features], dim=1)
        return pafs, heat


def build_body_pose(state_dict):
    """BodyPoseNet in eval mode from body_pose_model.pth's flat keys (or the grouped ones)."""
    net = BodyPoseNet()
    owner = {key.split(".", 1)[1]: key for key in net.state_dict()}  # "conv1_1.weight" -> "model0.conv1_1.weight"
    state_dict = {owner.get(k, k): v for k, v in state_dict.items()}
    return load_exact(net, state_dict, WEIGHT_FILE)


@torch.no_grad()
def run_network(net, image, check=None):
    """(H, W, 3) uint8 RGB -> (heatmaps (H, W, 19), pafs (H, W, 38)) float32 at the image size."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"OpenPose expects a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}.")
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    h, w = bgr.shape[:2]
    param = next(net.parameters())
    heat_sum = np.zeros((h, w, 19), np.float32)
    paf_sum = np.zeros((h, w, 38), np.float32)
    for scale_factor in SCALE_SEARCH:
        scale = scale_factor * BOXSIZE / h
        scaled = _resize(bgr, int(h * scale), int(w * scale))
        sh, sw = scaled.shape[:2]
        padded = np.pad(scaled, [(0, -sh % STRIDE), (0, -sw % STRIDE), (0, 0)], constant_values=PAD_VALUE)
        x = torch.from_numpy(padded.astype(np.float32) / 256.0 - 0.5).permute(2, 0, 1)[None]
        pafs, heat = net(x.to(device=param.device, dtype=param.dtype), check)
        for out, total in ((heat, heat_sum), (pafs, paf_sum)):
            m = out[0].float().permute(1, 2, 0).cpu().numpy()
            m = _resize(m, m.shape[0] * STRIDE, m.shape[1] * STRIDE)[:sh, :sw]
            total += _resize(m, h, w) / len(SCALE_SEARCH)
    return heat_sum, paf_sum


def decode(heatmaps, pafs, peak_threshold=0.1, paf_threshold=0.05, check=None):
    """Heatmaps (H, W, >=18) and PAFs (H, W, 38) -> PoseFrame of the people found.

    Peaks: maxima of each part map smoothed by a Gaussian (sigma 3), above `peak_threshold`,
    scored by the unsmoothed map. A limb candidate is sampled at 10 points along it; accepted
    when more than 80% of the PAF projections exceed `paf_threshold` and the mean (minus a
    penalty for limbs longer than half the image height) is positive. Limbs are assembled
    greedily; people with fewer than 4 parts or a mean score below 0.4 are dropped. `check()` is
    called per limb candidate (the caller's cancel check).
    """
    heatmaps = np.asarray(heatmaps, dtype=np.float64)
    pafs = np.asarray(pafs, dtype=np.float64)
    if heatmaps.ndim != 3 or heatmaps.shape[2] < BODY_POINTS or pafs.shape != heatmaps.shape[:2] + (38,):
        raise ValueError(f"decode expects heatmaps (H, W, 18+) and pafs (H, W, 38), got {heatmaps.shape} and {pafs.shape}.")
    h, w = heatmaps.shape[:2]
    peaks = [_find_peaks(heatmaps[:, :, part], peak_threshold) for part in range(BODY_POINTS)]
    candidates = np.array([p for part in peaks for p in part], dtype=np.float64).reshape(-1, 3)  # x, y, score; row = id
    connections = [_connect_limb(pafs, peaks, k, paf_threshold, h, check=check) for k in range(len(LIMBS))]
    frame = PoseFrame(width=w, height=h)
    for row in _assemble(connections, candidates):
        body = np.zeros((BODY_POINTS, 3))
        for part in range(BODY_POINTS):
            if row[part] >= 0:
                x, y, score = candidates[int(row[part]), :3]
                body[part] = (x / w, y / h, score)
        frame.people.append(Person(body=body))
    return frame


def detect_body(net, image, check=None):
    """Runs the network and decodes: (H, W, 3) uint8 RGB -> PoseFrame. `check`: the caller's cancel
    check, called between stages and limb candidates."""
    return decode(*run_network(net, image, check), check=check)


def _resize(x, height, width):
    """The annotator's resize: INTER_AREA when shrinking, INTER_LANCZOS4 when enlarging; maps with
    more than 4 channels one channel at a time (OpenCV's limit)."""
    if x.ndim == 3 and x.shape[2] > 4:
        return np.stack([_resize(x[:, :, c], height, width) for c in range(x.shape[2])], axis=2)
    k = (height + width) / (x.shape[0] + x.shape[1])
    return cv2.resize(x, (width, height), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LANCZOS4)


def smooth_part_map(part_map):
    """The annotator's scipy.ndimage.gaussian_filter(sigma=3): radius 4 sigma, 'reflect' border."""
    return cv2.GaussianBlur(part_map, (25, 25), 3.0, sigmaY=3.0, borderType=cv2.BORDER_REFLECT)


def _find_peaks(part_map, threshold):
    smooth = smooth_part_map(part_map)
    padded = np.pad(smooth, 1)  # neighbours outside the map count as 0
    is_peak = (
        (smooth >= padded[:-2, 1:-1]) & (smooth >= padded[2:, 1:-1])
        & (smooth >= padded[1:-1, :-2]) & (smooth >= padded[1:-1, 2:]) & (smooth > threshold)
    )
    ys, xs = np.nonzero(is_peak)
    return [(x, y, part_map[y, x]) for x, y in zip(xs, ys)]


def _connect_limb(pafs, peaks, k, threshold, height, samples=10, check=None):
    """Accepted connections of limb k: rows (id_a, id_b, score, i, j)."""
    a, b = LIMBS[k][0] - 1, LIMBS[k][1] - 1
    first_id = [0]
    for part in peaks:
        first_id.append(first_id[-1] + len(part))
    cand_a, cand_b = peaks[a], peaks[b]
    if not cand_a or not cand_b:
        return None
    paf_x, paf_y = pafs[:, :, PAF_CHANNELS[k][0]], pafs[:, :, PAF_CHANNELS[k][1]]
    scored = []
    for i, (xa, ya, score_a) in enumerate(cand_a):
        if check is not None:
            check()
        for j, (xb, yb, score_b) in enumerate(cand_b):
            vec = np.array([xb - xa, yb - ya], dtype=np.float64)
            norm = max(0.001, float(np.hypot(*vec)))
            vec /= norm
            xs = np.rint(np.linspace(xa, xb, num=samples)).astype(int)  # round half to even, as Python round
            ys = np.rint(np.linspace(ya, yb, num=samples)).astype(int)
            proj = paf_x[ys, xs] * vec[0] + paf_y[ys, xs] * vec[1]
            score = proj.sum() / samples + min(0.5 * height / norm - 1, 0)
            if np.count_nonzero(proj > threshold) > 0.8 * samples and score > 0:
                scored.append((i, j, score))
    scored.sort(key=lambda c: c[2], reverse=True)  # stable, like sorted()
    rows, used_a, used_b = [], set(), set()
    for i, j, score in scored:
        if i not in used_a and j not in used_b:
            rows.append((first_id[a] + i, first_id[b] + j, score, i, j))
            used_a.add(i)
            used_b.add(j)
            if len(rows) >= min(len(cand_a), len(cand_b)):
                break
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def _assemble(connections, candidates):
    """Greedy grouping of connections into people. Rows: 18 candidate ids (-1 = none),
    total score, part count."""
    people = np.full((0, BODY_POINTS + 2), -1.0)
    for k, conn in enumerate(connections):
        if conn is None:
            continue
        a, b = LIMBS[k][0] - 1, LIMBS[k][1] - 1
        for id_a, id_b, score, _, _ in conn:
            # (the annotator indexes a 2-slot list here and would fail on a third match)
            found = [n for n in range(len(people)) if people[n][a] == id_a or people[n][b] == id_b][:2]
            if len(found) == 1:
                row = people[found[0]]
                if row[b] != id_b:
                    row[b] = id_b
                    row[-1] += 1
                    row[-2] += candidates[int(id_b), 2] + score
            elif len(found) == 2 and not _overlap(people[found[0]], people[found[1]]):
                # two disjoint partial people joined by this limb: merge (ids: -1 + id + 1 = id)
                r1, r2 = found
                people[r1][:-2] += people[r2][:-2] + 1
                people[r1][-2:] += people[r2][-2:]
                people[r1][-2] += score
                people = np.delete(people, r2, axis=0)
            elif len(found) == 2:  # overlapping: as one match, but without the "already set" check
                row = people[found[0]]
                row[b] = id_b
                row[-1] += 1
                row[-2] += candidates[int(id_b), 2] + score
            elif not found and k < 17:
                row = np.full(BODY_POINTS + 2, -1.0)
                row[a], row[b] = id_a, id_b
                row[-1] = 2
                row[-2] = candidates[int(id_a), 2] + candidates[int(id_b), 2] + score
                people = np.vstack([people, row])
    keep = [(row[-1] >= 4 and row[-2] / row[-1] >= 0.4) for row in people]
    return people[np.array(keep, dtype=bool)] if len(people) else people


def _overlap(row1, row2):
    """True when two partial people share a part (then they are not merged)."""
    return bool(np.any((row1[:-2] >= 0) & (row2[:-2] >= 0)))

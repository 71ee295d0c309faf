"""HED: the ControlNetHED.pth layout, the soft/safe/scribble post-processing."""
import math

import cv2
import numpy as np
import pytest
import torch

from xctrl.models.checkpoint_io import load_state_dict
from xctrl.preprocessors.hed import ControlNetHED_Apache2, build_hed, edges_from_soft, hed_soft_edges, nms, safe_step, scribble


def hed_edges(net, images, mode="soft"):
    """The node's two steps on one image (H, W, 3) or a batch: soft edges, then the mode."""
    out = edges_from_soft(hed_soft_edges(net, images), mode)
    return out[0] if isinstance(images, np.ndarray) and images.ndim == 3 else out


def real_layout():
    """Key -> shape of lllyasviel/Annotators ControlNetHED.pth (stored in fp16, 29.4 MB)."""
    layout = {"norm": (1, 3, 1, 1)}
    blocks = [(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)]
    for n, (c_in, c_out, layers) in enumerate(blocks, start=1):
        for i in range(layers):
            layout[f"block{n}.convs.{i}.weight"] = (c_out, c_in if i == 0 else c_out, 3, 3)
            layout[f"block{n}.convs.{i}.bias"] = (c_out,)
        layout[f"block{n}.projection.weight"] = (1, c_out, 1, 1)
        layout[f"block{n}.projection.bias"] = (1,)
    return layout


def random_file(tmp_path):
    torch.manual_seed(0)
    net = ControlNetHED_Apache2()  # PyTorch's default init keeps the activations moderate
    net.norm.data.uniform_(100, 150)
    sd = {k: v.half() for k, v in net.state_dict().items()}  # the real file is fp16
    path = tmp_path / "ControlNetHED.pth"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return build_hed(load_state_dict(str(random_file(tmp_path_factory.mktemp("hed")))))


def test_layout_equals_the_real_file():
    layout = real_layout()
    model = {k: tuple(v.shape) for k, v in ControlNetHED_Apache2().state_dict().items()}
    assert model == layout
    assert sum(math.prod(s) for s in layout.values()) * 2 == pytest.approx(29.4e6, rel=0.01)


def test_wrong_file_is_refused():
    sd = ControlNetHED_Apache2().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="ControlNetHED.pth"):
        build_hed(sd)
    sd = ControlNetHED_Apache2().state_dict()
    sd["norm"] = torch.zeros(1, 4, 1, 1)
    with pytest.raises(ValueError, match="norm"):
        build_hed(sd)


def test_output_shape_range_determinism_and_batch(net):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(2, 40, 56, 3), dtype=np.uint8)
    out = hed_edges(net, images)
    assert out.shape == (2, 40, 56) and out.dtype == np.uint8
    assert np.array_equal(out, hed_edges(net, images))
    soft = hed_soft_edges(net, images[1])  # one image alone, as a (1, H, W) batch
    assert soft.shape == (1, 40, 56) and soft.min() > 0 and soft.max() < 1
    assert np.abs((soft[0] * 255).astype(int) - out[1]).max() <= 1  # batched == one at a time


def constant_net(bias):
    net = ControlNetHED_Apache2()
    for p in net.parameters():
        torch.nn.init.zeros_(p)
    for n in range(1, 6):
        getattr(net, f"block{n}").projection.bias.data.fill_(bias)
    return net.eval()


def test_known_answer_soft_and_safe():
    image = np.zeros((16, 24, 3), np.uint8)
    net = constant_net(math.log(0.45 / 0.55))  # every side output = logit(0.45)
    assert (hed_edges(net, image, "soft") == 114).all()  # 0.45 * 255 = 114.75, truncated
    assert (hed_edges(net, image, "safe") == 127).all()  # floor(1.35) / 2 = 0.5 -> 127
    net = constant_net(math.log(0.7 / 0.3))
    assert (hed_edges(net, image, "safe") == 255).all()  # floor(2.1) / 2 = 1.0


def test_norm_is_subtracted_from_raw_0_255():
    net = constant_net(0.0)
    net.norm.data[:] = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1)
    net.block1.convs[0].weight.data[0, :, 1, 1] = 1.0  # channel 0 = sum of the three inputs
    net.block1.convs[1].weight.data[0, 0, 1, 1] = 1.0  # passed through
    net.block1.projection.weight.data[0, 0] = 0.01
    image = np.empty((16, 16, 3), np.uint8)
    image[:] = (110, 120, 130)
    # side 1 = 0.01 * (100 + 100 + 100) = 3 (away from the zero-padded border), sides 2-5 = 0
    soft = hed_soft_edges(net, image)[0]
    assert soft[8, 8] == pytest.approx(1 / (1 + math.exp(-0.6)))
    assert hed_edges(net, image)[8, 8] == 164


def test_side_outputs_resized_like_cv2_bilinear():
    # The reference resizes with cv2.INTER_LINEAR; torch's bilinear (align_corners=False) is the same.
    x = np.random.default_rng(2).standard_normal((5, 7)).astype(np.float32)
    expected = cv2.resize(x, (28, 20), interpolation=cv2.INTER_LINEAR)
    got = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=(20, 28), mode="bilinear", align_corners=False)
    assert np.allclose(got[0, 0].numpy(), expected, atol=1e-5)


def test_safe_step_levels():
    x = np.array([0.0, 0.3, 0.34, 0.5, 0.67, 0.9, 1.0])
    assert safe_step(x).tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.5]


def reference_nms(x, threshold, sigma):
    """Independent directional non-maximum suppression: shifts with -inf outside."""
    b = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)
    p = np.pad(b, 1, constant_values=-np.inf)
    h, w = b.shape

    def at(dy, dx):
        return p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    keep = np.zeros(b.shape, bool)
    for (dy1, dx1), (dy2, dx2) in [((0, -1), (0, 1)), ((-1, 0), (1, 0)), ((-1, -1), (1, 1)), ((-1, 1), (1, -1))]:
        keep |= (b >= at(dy1, dx1)) & (b >= at(dy2, dx2))
    return np.where(keep & (b > threshold), 255, 0).astype(np.uint8)


def test_nms_matches_independent_implementation():
    rng = np.random.default_rng(3)
    x = cv2.GaussianBlur(rng.integers(0, 256, (40, 60)).astype(np.uint8), (0, 0), 2) * 2
    assert np.array_equal(nms(x, 127, 3.0), reference_nms(x, 127, 3.0))


def test_scribble_known_answers():
    assert not scribble(np.zeros((32, 32), np.uint8)).any()
    assert (scribble(np.full((32, 32), 200, np.uint8)) == 255).all()  # flat and above 127: all kept
    assert not scribble(np.full((32, 32), 100, np.uint8)).any()  # below the 127 threshold
    blob = np.zeros((64, 64), np.uint8)
    cv2.circle(blob, (32, 32), 8, 255, -1)
    out = scribble(blob)
    assert set(np.unique(out)) == {0, 255}
    assert out[32, 32] == 255 and not out[:10].any() and not out[:, :10].any()
    centred = out[1:, 1:]  # the disc is symmetric about pixel 32
    assert np.array_equal(centred, centred[::-1, :])


def test_nms_of_a_disc_is_a_star():
    # A radially symmetric peak is a maximum across the centre row, column and both diagonals:
    # what survives lies on those four lines (give or take one pixel of floating-point ties).
    disc = np.zeros((64, 64), np.uint8)
    cv2.circle(disc, (32, 32), 8, 255, -1)
    ys, xs = np.nonzero(nms(disc, 127, 3.0))
    dy, dx = ys - 32, xs - 32
    assert (np.minimum.reduce([abs(dy), abs(dx), abs(dy - dx), abs(dy + dx)]) <= 1).all()
    assert ((dy == 0) & (abs(dx) <= 6)).sum() == 13 and ((dx == 0) & (abs(dy) <= 6)).sum() == 13


def test_hed_scribble_mode_is_binary(net):
    image = np.random.default_rng(4).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = hed_edges(net, image, "scribble")
    assert out.shape == (32, 32) and set(np.unique(out)) <= {0, 255}
    assert np.array_equal(out, scribble(hed_edges(net, image, "soft")))


def test_bad_input(net):
    with pytest.raises(ValueError, match="mode"):
        edges_from_soft(np.zeros((1, 8, 8)), "hard")
    with pytest.raises(ValueError, match="uint8 RGB"):
        hed_edges(net, np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="empty"):
        hed_edges(net, np.zeros((0, 8, 8, 3), np.uint8))

"""Depth rendering: min-max normalisation, greyscale (white = near), viridis in RGB."""
import numpy as np
import pytest
import torch

from xctrl.preprocessors.depth_render import normalize_depth, render_grey, render_viridis

VIRIDIS_LOW = [68, 1, 84]  # viridis(0) in RGB; also the sky of ControlNeXt's vidit_depth condition_0.png
VIRIDIS_HIGH = [253, 231, 37]  # viridis(1) in RGB


def test_normalize_known_values():
    d = np.array([[2.0, 4.0], [3.0, 6.0]])
    assert normalize_depth(d).tolist() == [[0, 127], [63, 255]]  # 0.5 * 255 = 127.5 truncated
    assert (normalize_depth(np.full((3, 3), 7.0)) == 0).all()
    nearly = np.full((3, 3), 0.7, np.float32) + np.float32(1e-7) * np.eye(3, dtype=np.float32)  # float32 rounding
    assert (normalize_depth(nearly) == 0).all()
    assert normalize_depth(np.array([[0.7, 0.7001]])).tolist() == [[0, 255]]  # a real (small) relief stays
    assert normalize_depth(torch.tensor([[0.0, 1.0]])).tolist() == [[0, 255]]


def test_grey_white_is_near():
    img = render_grey(np.array([[0.0, 10.0]]))
    assert img.shape == (1, 2, 3)
    assert img[0, 0].tolist() == [0, 0, 0] and img[0, 1].tolist() == [255, 255, 255]


def test_viridis_rgb_and_near_direction():
    d = np.array([[0.0, 1.0]])  # disparity: the second pixel is nearer
    dark_near = render_viridis(d)
    assert dark_near[0, 1].tolist() == VIRIDIS_LOW and dark_near[0, 0].tolist() == VIRIDIS_HIGH
    bright_near = render_viridis(d, near="bright")
    assert bright_near[0, 1].tolist() == VIRIDIS_HIGH and bright_near[0, 0].tolist() == VIRIDIS_LOW


def test_viridis_is_monotonic_in_lightness():
    ramp = np.linspace(0, 1, 256)[None]
    rgb = render_viridis(ramp, near="bright").astype(float)[0]
    luma = rgb @ [0.299, 0.587, 0.114]
    assert (np.diff(luma) >= -0.5).all() and luma[-1] - luma[0] > 150


@pytest.mark.parametrize(
    "bad, error",
    [(np.zeros((2, 2, 2)), "2-D"), (np.zeros((0, 4)), "zero size"), (np.array([[0.0, np.nan]]), "NaN")],
)
def test_bad_depth(bad, error):
    with pytest.raises(ValueError, match=error):
        render_grey(bad)


def test_bad_near_option():
    with pytest.raises(ValueError, match="near"):
        render_viridis(np.zeros((2, 2)), near="up")

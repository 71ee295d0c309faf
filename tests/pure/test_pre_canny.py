"""Canny: lllyasviel's RGB variant and ControlNeXt-SDXL's median-threshold grey variant."""
import cv2
import numpy as np
import pytest
import skimage.data

from xctrl.preprocessors.canny import canny, canny_median, median_thresholds

PHOTOS = {"astronaut": skimage.data.astronaut, "coffee": skimage.data.coffee, "chelsea": skimage.data.chelsea}


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("low, high", [(100, 200), (50, 150), (200, 100)])
def test_canny_equals_opencv_on_rgb(name, low, high):
    rgb = np.ascontiguousarray(PHOTOS[name]())
    out = canny(rgb, low, high)
    expected = cv2.Canny(rgb, low, high)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(out[:, :, c], expected)
    assert set(np.unique(out)) <= {0, 255}


def test_canny_known_answer_square():
    image = np.zeros((64, 64, 3), np.uint8)
    image[20:40, 20:40] = 255
    edges = canny(image)[:, :, 0] > 0
    ys, xs = np.nonzero(edges)
    # every edge pixel is within one pixel of the square's border ...
    inside_ring = (ys >= 19) & (ys <= 40) & (xs >= 19) & (xs <= 40)
    near_border = (np.minimum(abs(ys - 19.5), abs(ys - 39.5)) <= 1) | (np.minimum(abs(xs - 19.5), abs(xs - 39.5)) <= 1)
    assert inside_ring.all() and near_border.all()
    # ... and every side is covered along its length
    assert edges[19:41, 18:22].any(axis=1)[2:-2].all() and edges[19:41, 38:42].any(axis=1)[2:-2].all()
    assert edges[18:22, 19:41].any(axis=0)[2:-2].all() and edges[38:42, 19:41].any(axis=0)[2:-2].all()


def test_rgb_canny_sees_isoluminant_colour_edges_grey_does_not():
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = (255, 0, 0)
    grey_red = cv2.cvtColor(image[:1, :1], cv2.COLOR_RGB2GRAY)[0, 0]
    image[:, 16:] = (grey_red, grey_red, grey_red)  # same grey value as the red half
    assert canny(image).any()
    assert not canny_median(image).any()


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_median_thresholds_follow_the_controlnext_formula(name):
    grey = cv2.cvtColor(PHOTOS[name](), cv2.COLOR_RGB2GRAY)
    v = np.median(grey)
    low, high = median_thresholds(PHOTOS[name]())
    assert (low, high) == (int(max(0, (1.0 - 0.33) * v)), int(min(255, (1.0 + 0.33) * v)))
    assert np.array_equal(canny_median(PHOTOS[name]())[:, :, 1], cv2.Canny(grey, low, high))


def test_median_thresholds_known_values():
    flat = np.full((4, 4, 3), 100, np.uint8)
    assert median_thresholds(flat) == (67, 133)
    bright = np.full((4, 4, 3), 250, np.uint8)
    assert median_thresholds(bright) == (167, 255)  # high clipped to 255
    two = np.zeros((1, 2, 3), np.uint8)
    two[0, 1] = 101  # median 50.5 -> low int(33.835) = 33, high int(67.165) = 67
    assert median_thresholds(two) == (33, 67)
    assert median_thresholds(np.zeros((2, 2, 3), np.uint8)) == (0, 0)


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.float32), np.zeros((8, 8, 4), np.uint8), np.zeros((0, 8, 3), np.uint8)])
def test_bad_input(bad):
    with pytest.raises(ValueError):
        canny(bad)


def test_negative_threshold():
    with pytest.raises(ValueError, match=">= 0"):
        canny(np.zeros((8, 8, 3), np.uint8), -1, 10)

"""MIControlNet's measurements (models/mi_metrics.py, runtime/mi_training_data.py;
docs/mi_training.md) against hand computations on small images."""
import cv2
import numpy as np
import pytest
import torch

from xctrl.models import mi_metrics as mt
from xctrl.runtime import mi_training_data as md


def hwc(rows):
    """A 1-channel (1, H, W, 1) image from nested lists."""
    return torch.tensor(rows, dtype=torch.float32)[None, :, :, None]


def test_total_variation_by_hand():
    img = hwc([[0.0, 0.5, 1.0],
               [0.2, 0.2, 0.9],
               [0.0, 0.0, 0.0]])
    region = torch.tensor([[[True, True, False],
                            [True, True, False],
                            [False, False, False]]])
    # Pairs inside the 2x2 top-left block only:
    # horizontal |0.5-0| + |0.2-0.2| = 0.5; vertical |0.2-0| + |0.2-0.5| = 0.5; 4 pairs, 1 channel.
    total, pairs, mean = mt.total_variation(img, region)
    assert float(total) == pytest.approx(1.0, abs=1e-6)
    assert int(pairs) == 4
    assert float(mean) == pytest.approx(0.25, abs=1e-6)


def test_total_variation_channels_and_empty_region():
    img = torch.zeros(2, 2, 2, 3)
    img[0, 0, 1] = torch.tensor([1.0, 0.5, 0.0])  # one pixel differs from its two neighbours
    region = torch.ones(2, 2, 2, dtype=torch.bool)
    region[1] = False
    total, pairs, mean = mt.total_variation(img, region)
    assert float(total[0]) == pytest.approx(3.0)  # (1 + 0.5 + 0) for each of its 2 pairs
    assert int(pairs[0]) == 4 and float(mean[0]) == pytest.approx(3.0 / 12)
    assert float(total[1]) == 0 and int(pairs[1]) == 0 and float(mean[1]) == 0


def test_silent_region_threshold_and_radius():
    cond = torch.zeros(1, 5, 5, 3)
    cond[0, 2, 2, 1] = 1.0  # one active pixel (green channel)
    cond[0, 0, 4] = 0.03  # below the threshold
    silent0 = mt.silent_region(cond, 0.04, 0)
    assert int((~silent0).sum()) == 1 and not bool(silent0[0, 2, 2])
    silent1 = mt.silent_region(cond, 0.04, 1)
    expect = torch.ones(5, 5, dtype=torch.bool)
    expect[1:4, 1:4] = False
    assert torch.equal(silent1[0], expect)


def test_cycle_l1_by_hand():
    cond = hwc([[0.0, 1.0],
                [0.0, 1.0]])
    extracted = hwc([[0.5, 0.25],
                     [1.0, 1.0]])
    # Active (not silent) pixels: the right column. |1 - 0.25| + |1 - 1| = 0.75 over 2 pixels.
    total, pixels, mean = mt.cycle_consistency(cond, extracted, 0.04, 0)
    assert float(total) == pytest.approx(0.75) and int(pixels) == 2 and float(mean) == pytest.approx(0.375)


def test_node_total_variation_reads_the_condition():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 6, 6, 3, generator=g)
    cond = torch.zeros(1, 6, 6, 3)
    cond[0, :, :2] = 1.0  # active left third; radius 1 widens it to column 2
    value, rows, silent = md.total_variation(image, cond, 0.04, 1)
    region = torch.zeros(6, 6, dtype=torch.bool)
    region[:, 3:] = True
    expect = [float(mt.total_variation(image[i:i + 1], region[None])[2]) for i in range(2)]
    assert [r[0] for r in rows] == pytest.approx(expect)
    assert value == pytest.approx(sum(expect) / 2)
    assert torch.equal(silent, region.expand(2, 6, 6))


def test_node_cycle_runs_the_packs_canny():
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 255
    edges = cv2.Canny(img, 100, 200)
    cond = torch.from_numpy(np.repeat(edges[:, :, None], 3, 2)).float()[None] / 255
    image = torch.from_numpy(img).float()[None] / 255
    value, rows, extracted = md.cycle_consistency(image, cond, 0.04, 0, 100, 200)
    assert value == 0.0 and rows[0][2] == int((edges > 0).sum())
    assert torch.equal(extracted, cond)
    blank = torch.zeros_like(image)  # nothing generated: every active condition pixel differs by 1
    value, _, _ = md.cycle_consistency(blank, cond, 0.04, 0, 100, 200)
    assert value == pytest.approx(1.0)


def test_metric_errors_name_the_node_and_the_fix():
    image = torch.zeros(2, 8, 8, 3)
    with pytest.raises(md.MIDataError, match=r"Silent Total Variation \(XCtrl\): the condition is 4x8 px .*resize"):
        md.total_variation(image, torch.zeros(1, 8, 4, 3), 0.04, 0)
    with pytest.raises(md.MIDataError, match=r"Cycle Consistency \(XCtrl\): 3 conditions for 2 generated images"):
        md.cycle_consistency(image, torch.zeros(3, 8, 8, 3), 0.04, 0, 100, 200)
    with pytest.raises(md.MIDataError, match=r"Silent Total Variation \(XCtrl\): the silent_mask batch"):
        md.total_variation(image, torch.zeros(1, 8, 8, 3), 0.04, 0, silent_mask=torch.zeros(1, 4, 4))

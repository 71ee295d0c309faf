"""Silent-signal data balancing (models/silent_signal.py, runtime/mi_training_data.py;
docs/mi_training.md): targets untouched, exactly the unselected segments emptied, seeded, and
the errors for masks that do not fit the images."""
import pytest
import torch

from xctrl.models import silent_signal as ss
from xctrl.runtime import mi_training_data as md


def data(n=2, h=8, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, h, w, 3, generator=g)
    conditions = torch.rand(n, h, w, 3, generator=g) * 0.9 + 0.1  # never equal to the silent value 0
    return images, conditions


def quadrant_masks(n, h, w):
    """One label map per image: four quadrants with the values 0, 1/3, 2/3, 1."""
    m = torch.zeros(n, h, w)
    m[:, : h // 2, w // 2:] = 1 / 3
    m[:, h // 2:, : w // 2] = 2 / 3
    m[:, h // 2:, w // 2:] = 1.0
    return m


def test_targets_unchanged_and_only_unselected_segments_emptied():
    images, conditions = data()
    masks = quadrant_masks(2, 8, 12)
    out_images, out_conds, kept = md.balance(images, conditions, masks, 0.5, 3, 11, "grid", 2, 0.0)
    assert torch.equal(out_images, images.repeat_interleave(3, 0))
    # The draw, written out: per pair and variant one U[0,1) per segment in label order, kept when < 0.5.
    g = torch.Generator().manual_seed(11)
    quadrants = [(slice(0, 4), slice(0, 6)), (slice(0, 4), slice(6, 12)), (slice(4, 8), slice(0, 6)), (slice(4, 8), slice(6, 12))]
    seen = set()
    for i in range(2):
        for j in range(3):
            row = i * 3 + j
            u = torch.rand(4, generator=g)
            for q, (ys, xs) in enumerate(quadrants):
                got = out_conds[row, ys, xs]
                if u[q] < 0.5:
                    assert torch.equal(got, conditions[i, ys, xs])
                    assert bool(kept[row, ys, xs].eq(1).all())
                else:
                    assert bool((got == 0).all())
                    assert bool(kept[row, ys, xs].eq(0).all())
                seen.add(bool(u[q] < 0.5))
    assert seen == {True, False}  # the seed exercises both branches


def test_same_seed_same_result_other_seed_other_result():
    images, conditions = data(n=3)
    runs = [md.balance(images, conditions, None, 0.5, 2, s, "colour_clusters", 4, 0.0) for s in (5, 5, 6)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][1], runs[2][1])


def test_k_masks_per_image_and_uncovered_segment():
    n, h, w = 2, 4, 4
    masks = torch.zeros(n * 2, h, w)
    masks[0, :2] = 1  # image 0, mask 0: top half
    masks[1, :, :1] = 1  # image 0, mask 1: left column (wins where it overlaps mask 0)
    masks[3, 3:] = 1  # image 1, mask 1: bottom row
    labels = ss.labels_from_masks(masks, n)
    expect0 = torch.tensor([[2, 1, 1, 1], [2, 1, 1, 1], [2, 0, 0, 0], [2, 0, 0, 0]])
    expect1 = torch.tensor([[0] * 4, [0] * 4, [0] * 4, [2] * 4])
    assert torch.equal(labels[0], expect0) and torch.equal(labels[1], expect1)


def test_label_map_values_are_segments():
    masks = quadrant_masks(1, 4, 4)
    labels = ss.labels_from_masks(masks, 1)
    assert sorted(torch.unique(labels).tolist()) == [0, 85, 170, 255]


def test_grid_cells():
    labels = ss.grid_segments(1, 5, 7, 2)
    assert torch.unique(labels).tolist() == [0, 1, 2, 3]
    assert labels[0, 0, 0] == 0 and labels[0, 0, 6] == 1 and labels[0, 4, 0] == 2 and labels[0, 4, 6] == 3
    assert labels[0, 2, 3] == 0  # rows 0-2 and columns 0-3 are the first cell: y * 2 // 5, x * 2 // 7


def test_colour_segments_follow_regions():
    img = torch.zeros(32, 32, 3)
    img[:, 16:] = torch.tensor([1.0, 0.2, 0.2])  # red right half
    img[6:16, 3:11] = torch.tensor([0.2, 0.2, 1.0])  # a blue square inside the black half
    labels = ss.colour_segments(img, 3)
    assert len(torch.unique(labels)) == 3
    assert len(torch.unique(labels[:, 20:])) == 1 and labels[0, 31] != labels[0, 0]
    assert labels[10, 6] != labels[0, 0] and labels[10, 6] != labels[0, 31]


def test_keep_rate_bounds():
    images, conditions = data()
    _, all_kept, _ = md.balance(images, conditions, None, 1.0, 1, 0, "grid", 3, 0.0)
    _, none_kept, kept = md.balance(images, conditions, None, 0.0, 1, 0, "grid", 3, 0.25)
    assert torch.equal(all_kept, conditions)
    assert bool((none_kept == 0.25).all()) and bool((kept == 0).all())


def test_list_inputs_joined():
    images, conditions = data(n=2)
    a = md.balance([images[:1], images[1:]], [conditions[:1], conditions[1:]], [None], 0.5, 1, 3, "grid", 2, 0.0)
    b = md.balance(images, conditions, None, 0.5, 1, 3, "grid", 2, 0.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("masks, words", [
    (torch.zeros(2, 8, 10), ["masks are 10x8 px", "images 12x8", "resize them to 12x8"]),
    (torch.zeros(3, 8, 12), ["3 masks for 2 images", "one label map per image", "disconnect masks"]),
])
def test_masks_that_do_not_fit_are_refused(masks, words):
    images, conditions = data()
    with pytest.raises(md.MIDataError) as e:
        md.balance(images, conditions, masks, 0.5, 1, 0, "grid", 2, 0.0)
    msg = str(e.value)
    assert msg.startswith("Silent Signal Balance (XCtrl):")
    for w in words:
        assert w in msg


def test_conditions_that_do_not_fit_are_refused():
    images, conditions = data()
    with pytest.raises(md.MIDataError, match="Silent Signal Balance.*1 condition images for 2 images"):
        md.balance(images, conditions[:1], None, 0.5, 1, 0, "grid", 2, 0.0)
    with pytest.raises(md.MIDataError, match="Silent Signal Balance.*conditions are 6x8 px.*resize them to 12x8"):
        md.balance(images, conditions[:, :, :6], None, 0.5, 1, 0, "grid", 2, 0.0)

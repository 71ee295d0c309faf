"""Frame batches: output-size rule, batched resolution processing, chunks."""
import cv2
import numpy as np
import pytest

from xctrl.preprocessors import frames as fr


def at_resolution_by_hand(image, resolution, fn, out_hw):
    """One frame, written out: shorter side to `resolution` (area down, cubic up), edge padding to
    a multiple of 64 at the bottom/right, fn, crop, resize to out_hw (area down, linear up)."""
    h, w = image.shape[:2]
    if resolution > 0:
        k = resolution / min(h, w)
        th, tw = max(1, int(round(h * k))), max(1, int(round(w * k)))
    else:
        th, tw = h, w
    if (th, tw) != (h, w):
        image = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA if th * tw < h * w else cv2.INTER_CUBIC)
    padded = np.pad(image, ((0, -th % 64), (0, -tw % 64), (0, 0)), mode="edge")
    m = np.ascontiguousarray(fn(padded[None])[0][:th, :tw])
    oh, ow = out_hw or (th, tw)
    if (oh, ow) != (th, tw):
        m = cv2.resize(m, (ow, oh), interpolation=cv2.INTER_AREA if oh * ow < th * tw else cv2.INTER_LINEAR)
    return m


def test_output_hw_rule():
    assert fr.output_hw(720, 1280, 512, "input") == (720, 1280)
    assert fr.output_hw(720, 1280, 512, "resolution") == (512, 910)
    assert fr.output_hw(1280, 720, 512, "resolution") == (910, 512)
    assert fr.output_hw(33, 47, 0, "resolution") == (33, 47)
    with pytest.raises(ValueError, match="output_size"):
        fr.output_hw(10, 10, 512, "processed")


def test_batched_equals_the_convention_per_frame():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 37, 53, 3), dtype=np.uint8)

    def fn(x):  # a position-dependent map so that padding/cropping errors would show
        return x[..., 0].astype(np.float32) * 0.5 + np.arange(x.shape[-2])[None, None, :]

    for resolution, out_hw in ((64, None), (64, (37, 53)), (0, (37, 53)), (100, (37, 53)), (100, (20, 30))):
        got = fr.batched_at_resolution(batch, resolution, fn, out_hw)
        for i in range(3):
            np.testing.assert_allclose(got[i], at_resolution_by_hand(batch[i], resolution, fn, out_hw), rtol=1e-6)


def test_batched_sizes_and_padding():
    image = np.zeros((1, 100, 150, 3), np.uint8)
    image[:, :, 75:] = 200
    seen = []

    def fn(x):
        seen.append(x.shape)
        return x[..., 0].copy()

    out = fr.batched_at_resolution(image, 128, fn)
    assert seen[-1] == (1, 128, 192, 3) and out.shape == (1, 128, 192)  # already a multiple of 64
    out = fr.batched_at_resolution(image, 100, fn)
    assert seen[-1] == (1, 128, 192, 3)  # 100 x 150 padded to multiples of 64
    assert np.array_equal(out[0], image[0, :, :, 0])  # processed at native size: the crop gives the input back
    out = fr.batched_at_resolution(image, 64, fn, (100, 150))
    assert out.shape == (1, 100, 150) and out[0, 50, 10] == 0 and out[0, 50, 140] == 200


def test_batched_checks_the_map_size():
    with pytest.raises(ValueError, match="returned shape"):
        fr.batched_at_resolution(np.zeros((1, 10, 10, 3), np.uint8), 0, lambda x: x[:, :5])


def test_chunks():
    assert fr.chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert fr.chunks(0, 4) == []
    assert fr.chunks(3, 0) == [(0, 1), (1, 2), (2, 3)]

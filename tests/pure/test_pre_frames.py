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


def test_aspect_ratios_beyond_16_to_1_are_refused_with_the_fix():
    fr.check_aspect(64, 1024, "Node X")  # 16:1 exactly is allowed
    fr.check_aspect(1024, 64, "Node X")
    for h, w in ((64, 1025), (1, 4096), (4096, 1), (1, 64)):
        with pytest.raises(ValueError, match=rf"Node X: the image is {w} x {h} pixels .*16:1.*Crop or pad"):
            fr.check_aspect(h, w, "Node X")


def test_working_and_output_sizes_are_capped_with_a_warning(caplog):
    # within the limits: shorter side = resolution, as before
    assert fr.plan_sizes(720, 1280, 512, "resolution", 10**6, "N") == ((512, 910), (512, 910))
    assert not caplog.records
    # 4096 x 4096 at 4094 with a 1 MP network: the working size is cut to 1000 x 1000 (aspect kept)
    with caplog.at_level("WARNING", logger="xctrl"):
        work, out = fr.plan_sizes(4096, 4096, 4094, "input", 10**6, "Node X")
    assert work == (1000, 1000) and out == (4096, 4096)  # output_size input: the input's size, never cut
    assert "Node X: working size 4094 x 4094" in caplog.text and "using 1000 x 1000" in caplog.text
    assert "resolution to at most 1000" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="xctrl"):
        work, out = fr.plan_sizes(1000, 2000, 16384, "resolution", None, "Node X")
    h, w = out
    assert h * w <= fr.MAX_OUTPUT_PIXELS and abs(w / h - 2) < 1e-3 and w > 5700
    assert work == (16384, 32768)  # no network limit (Canny computes at the output size)
    assert "output size 32768 x 16384" in caplog.text and "using 5792 x 2896" in caplog.text
    # a network's own default resolution for the working size, the node's resolution for the output
    assert fr.plan_sizes(100, 200, 0, "resolution", None, "N", work_resolution=518) == ((518, 1036), (100, 200))


def test_capped_keeps_aspect_and_stays_within():
    for h, w, limit in ((16384, 16384, 1036 * 1036), (300, 4800, 10**5), (7, 5, 1)):
        ch, cw = fr.capped(h, w, limit)
        assert ch * cw <= limit and abs(ch / cw - h / w) <= max(1 / ch, 1 / cw) * h / w + 1e-9
    assert fr.capped(100, 100, None) == (100, 100) and fr.capped(100, 100, 10**4) == (100, 100)


def test_frames_per_call_keeps_calls_within_the_pixel_budget():
    assert fr.frames_per_call((512, 512), 4) == 4
    assert fr.frames_per_call((518, 690), 4) == 2
    assert fr.frames_per_call((2048, 2048), 4) == 1

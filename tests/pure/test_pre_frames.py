"""Frame batches: output-size rule, batched resolution processing, chunks, timing helper."""
import numpy as np
import pytest

from xctrl.preprocessors import frames as fr
from xctrl.preprocessors.image_io import process_at_resolution


def test_output_hw_rule():
    assert fr.output_hw(720, 1280, 512, "input") == (720, 1280)
    assert fr.output_hw(720, 1280, 512, "resolution") == (512, 910)
    assert fr.output_hw(1280, 720, 512, "resolution") == (910, 512)
    assert fr.output_hw(33, 47, 0, "resolution") == (33, 47)
    with pytest.raises(ValueError, match="output_size"):
        fr.output_hw(10, 10, 512, "processed")


def test_batched_equals_per_frame_process_at_resolution():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 37, 53, 3), dtype=np.uint8)

    def fn(x):  # a position-dependent map so that padding/cropping errors would show
        return x[..., 0].astype(np.float32) * 0.5 + np.arange(x.shape[-2])[None, None, :]

    for resolution, size in ((64, "processed"), (64, "input"), (0, "input"), (100, "input")):
        out_hw = None if size == "processed" else (37, 53)
        got = fr.batched_at_resolution(batch, resolution, fn, out_hw)
        for i in range(3):
            expected = process_at_resolution(batch[i], resolution, lambda p: fn(p[None])[0], output_size=size)
            np.testing.assert_allclose(got[i], expected, rtol=1e-6)


def test_batched_checks_the_map_size():
    with pytest.raises(ValueError, match="returned shape"):
        fr.batched_at_resolution(np.zeros((1, 10, 10, 3), np.uint8), 0, lambda x: x[:, :5])


def test_chunks():
    assert fr.chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert fr.chunks(0, 4) == []
    assert fr.chunks(3, 0) == [(0, 1), (1, 2), (2, 3)]


def test_per_frame_seconds():
    calls = []
    t = fr.per_frame_seconds(lambda x: calls.append(len(x)), np.zeros((4, 8, 8, 3)), warmup=1, repeats=2)
    assert calls == [4, 4, 4] and t >= 0
    with pytest.raises(ValueError):
        fr.per_frame_seconds(lambda x: None, [])

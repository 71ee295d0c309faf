"""IMAGE <-> uint8 conversions and the `resolution` convention."""
import numpy as np
import pytest
import torch

from xctrl.preprocessors.image_io import (
    image_to_uint8,
    pad_to_multiple,
    scaled_size,
    uint8_to_image,
)


def test_uint8_round_trip_is_exact():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    image = uint8_to_image(a)
    assert image.shape == (2, 5, 7, 3) and image.dtype == torch.float32
    assert np.array_equal(image_to_uint8(image), a)


def test_rounding_not_truncation():
    image = torch.tensor([0.2, 0.5, 1.2, -0.1]).reshape(1, 1, 4, 1)
    out = image_to_uint8(image)
    assert out[0, 0, :, 0].tolist() == [51, 128, 255, 0]  # 0.2 * 255 = 51 (truncation would give 50)


def test_greyscale_replicated_and_alpha_dropped():
    grey = torch.full((1, 2, 2, 1), 100 / 255)
    assert (image_to_uint8(grey) == 100).all()
    rgba = torch.zeros((1, 2, 2, 4))
    rgba[..., 0] = 1.0
    rgba[..., 3] = 0.0  # fully transparent: colour kept as stored
    assert image_to_uint8(rgba)[0, 0, 0].tolist() == [255, 0, 0]


def test_uint8_to_image_accepts_maps_and_lists():
    m = np.arange(6, dtype=np.uint8).reshape(2, 3)
    image = uint8_to_image([m, m])
    assert image.shape == (2, 2, 3, 3)
    assert torch.equal(image[1, :, :, 2], torch.from_numpy(m).float() / 255)


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.zeros(0, 8, 8, 3), "empty"),
        (torch.zeros(1, 0, 8, 3), "zero size"),
        (torch.zeros(1, 8, 8, 2), "1, 3 or 4 channels"),
        (torch.zeros(8, 8, 3), "shape"),
        (np.zeros((1, 8, 8, 3)), "IMAGE tensor"),
    ],
)
def test_bad_images_raise_clear_errors(image, message):
    with pytest.raises((ValueError, TypeError), match=message):
        image_to_uint8(image)


def test_empty_list_raises():
    with pytest.raises(ValueError, match="no images"):
        uint8_to_image([])


def test_scaled_size_and_padding():
    assert scaled_size(300, 451, 512) == (512, 770)  # 451 * 512 / 300 = 769.7
    assert scaled_size(300, 451, 0) == (300, 451)
    padded = pad_to_multiple(np.arange(6, dtype=np.uint8).reshape(2, 3, 1), 4)
    assert padded.shape == (4, 4, 1)
    assert padded[:, :, 0].tolist() == [[0, 1, 2, 2], [3, 4, 5, 5], [3, 4, 5, 5], [3, 4, 5, 5]]


def test_image_to_uint8_in_bands_equals_one_piece():
    image = torch.rand(2, 37, 23, 4)
    whole = (image[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(image_to_uint8(image, band_pixels=50), whole)  # 2-row bands
    grey = torch.rand(1, 5, 7, 1)
    np.testing.assert_array_equal(image_to_uint8(grey, band_pixels=1)[..., 2], (grey[..., 0] * 255).round().to(torch.uint8).numpy())


def test_image_batch_equals_uint8_to_image():
    from xctrl.preprocessors.image_io import ImageBatch

    rng = np.random.default_rng(0)
    grey, rgb = rng.integers(0, 256, (2, 6, 9), dtype=np.uint8), rng.integers(0, 256, (1, 6, 9, 3), dtype=np.uint8)
    out = ImageBatch(3, 6, 9)
    out.put(0, grey)
    out.put(2, rgb)
    assert torch.equal(out.image, torch.cat([uint8_to_image(list(grey)), uint8_to_image(rgb)]))
    with pytest.raises(ValueError, match="uint8 maps"):
        out.put(0, np.zeros((1, 5, 9), np.uint8))

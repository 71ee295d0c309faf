"""Canny edges, as the control models were trained with.

- `canny`: lllyasviel's annotator, `cv2.Canny` on the uint8 RGB image (OpenCV takes the
  strongest gradient over the three channels), white edges on black, as 3 channels.
- `canny_median`: ControlNeXt-SDXL's `canny_extractor` (ControlNeXt-SDXL/utils/preprocess.py):
  thresholds from the median of the grey image and `cv2.Canny` on that grey image.
"""
import cv2
import numpy as np

from .image_io import uint8_rgb_batch


def canny(image, low=100, high=200):
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 edge map (255 on edges, 0 elsewhere).

    Exactly `cv2.Canny(image, low, high)` (OpenCV swaps the thresholds when low > high).
    """
    _check_rgb(image)
    _check_thresholds(low, high)
    return _to_rgb(cv2.Canny(image, low, high))


def median_thresholds(image, sigma=0.33):
    """(low, high) Canny thresholds from the median of the grey image.

    As the ControlNeXt-SDXL reference: v = np.median(grey) (a float, x.5 for even pixel counts),
    low = int(max(0, (1 - sigma) * v)), high = int(min(255, (1 + sigma) * v)); `int` truncates.
    """
    grey = _grey(image)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}.")
    v = float(np.median(grey))
    return int(max(0.0, (1.0 - sigma) * v)), int(min(255.0, (1.0 + sigma) * v))


def canny_median(image, sigma=0.33):
    """ControlNeXt SDXL canny: median thresholds, `cv2.Canny` on the grey image, 3 channels.

    The reference passes `threshold or auto`, so a computed threshold of 0 is what it uses too.
    """
    grey = _grey(image)
    low, high = median_thresholds(grey, sigma)
    return _to_rgb(cv2.Canny(grey, low, high))


def _grey(image):
    """RGB uint8 -> grey uint8 (OpenCV's RGB2GRAY weights); 2-D uint8 passes through."""
    if isinstance(image, np.ndarray) and image.ndim == 2 and image.dtype == np.uint8 and image.size:
        return image
    _check_rgb(image)
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _to_rgb(edges):
    return np.repeat(edges[:, :, None], 3, axis=2)


def _check_thresholds(low, high):
    if low < 0 or high < 0:
        raise ValueError(f"Canny thresholds must be >= 0, got low={low}, high={high}.")


def _check_rgb(image):
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"Canny expects one uint8 RGB image (H, W, 3), got {desc}.")
    uint8_rgb_batch(image, "Canny")

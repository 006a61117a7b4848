"""Boundary metrics: mBA (mean boundary accuracy) and the boundary-IoU curve (BIoU).

Both exactly as the official BiRefNet evaluation (``evaluation/metrics.py`` at commit 25cb930,
``MBAMeasure`` and ``BIoUMeasure``) computes them, with the same OpenCV calls:

* **mBA** thresholds the *raw* uint8 maps (``> 128``, no min-max stretch). For 5 radii
  ``r_i = 1 + int(((H + W) / 300 - 1) / 5 * i)``, the boundary band is where the morphological
  gradient of the GT with an elliptic ``(2r+1)``-kernel is non-zero; the accuracy is the share
  of band pixels where the prediction equals the GT. mBA is the mean of the 5 accuracies.
  A GT without boundary (empty or full) gives 0/0: the official code returns NaN; we return
  None (the data-set value is the mean over the images that have a boundary).
* **BIoU** works on the min-max stretched, truncated prediction ``q = uint8(p * 255)`` (as the
  F-measure curve). ``boundary(m) = m - erode(m)`` with a 3x3 square kernel applied
  ``d = max(1, round(0.02 * diagonal))`` times on the map padded by one zero pixel (so that the
  image border counts as boundary). On the grayscale ``q`` this is a grey "boundary strength".
  For t = 255..0: ``IoU(t) = TP(t) / (max(|G_b|, 1) + FP(t))`` where ``G_b`` is the GT's
  boundary band and TP / FP count the pixels with strength >= t on / off it. Index i of the
  curve <-> threshold 255 - i, as the F and E curves.
"""

import cv2
import numpy as np

MBA_STEPS = 5
BIOU_DILATION_RATIO = 0.02
_EXACT_FLOAT32_COUNT = 2 ** 24


def mba_radii(height: int, width: int) -> list:
  """The official radii: ``1 + int((max_radius - 1) / 5 * i)``, ``max_radius = (w + h) / 300``."""
  max_radius = (width + height) / 300
  return [1 + int((max_radius - 1) / MBA_STEPS * i) for i in range(MBA_STEPS)]


def _disk(radius):
  return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def boundary_accuracy(pred_u8: np.ndarray, gt_u8: np.ndarray):
  """mBA of one pair of (H, W) uint8 maps of the same size; None when the GT has no boundary.

  Equal to the official ``MBAMeasure`` (bit for bit: the same integer counts, divided and
  summed in the same order).
  """
  gt = (gt_u8 > 128).view(np.uint8)
  if not gt.any() or gt.all():
    return None   # no boundary pixel at any radius: the official 0/0 = NaN
  # 255 where the prediction is wrong: (pred_u8 > 128) != (gt_u8 > 128).
  wrong = cv2.compare(pred_u8, 128, cv2.CMP_GT)
  wrong = cv2.bitwise_xor(wrong, cv2.multiply(gt, 255))
  h, w = gt.shape
  accuracies = []
  for radius in mba_radii(h, w):
    band = cv2.morphologyEx(gt, cv2.MORPH_GRADIENT, _disk(radius))
    edge_pixels = cv2.countNonZero(band)
    wrong_pixels = cv2.countNonZero(cv2.bitwise_and(wrong, wrong, mask=band))
    accuracies.append(np.uint64(edge_pixels - wrong_pixels) / np.int64(edge_pixels))
  return float(sum(accuracies) / MBA_STEPS)


def biou_dilation(height: int, width: int) -> int:
  """Erosion steps of the boundary band: ``max(1, round(0.02 * diagonal))`` (half to even)."""
  return max(1, int(round(BIOU_DILATION_RATIO * np.sqrt(height ** 2 + width ** 2))))


def mask_boundary(mask_u8: np.ndarray, dilation: int) -> np.ndarray:
  """``mask - erode(mask)``: the official ``mask_to_boundary`` (grey or binary uint8 maps)."""
  h, w = mask_u8.shape
  padded = cv2.copyMakeBorder(mask_u8, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
  # cv2 turns `dilation` iterations of a full 3x3 kernel into one (2d+1)^2 rectangle (the same
  # values): pass the rectangle directly.
  eroded = cv2.erode(padded, np.ones((2 * dilation + 1,) * 2, np.uint8))[1:h + 1, 1:w + 1]
  return cv2.subtract(mask_u8, eroded)


def boundary_iou_curve(pred_u8: np.ndarray, gt: np.ndarray, values: np.ndarray) -> np.ndarray:
  """(256,) boundary-IoU curve of one pair (index i <-> threshold 255 - i).

  ``gt`` is the binarised GT (``gt_u8 > 128``); ``values`` the normalised value of each uint8
  level (``sod.value_table(pred_u8)``): ``uint8(values * 255)[pred_u8]`` is the official
  ``(p * 255).astype(uint8)``, bit for bit.
  """
  h, w = gt.shape
  dilation = biou_dilation(h, w)
  quantised = (values * 255).astype(np.uint8)
  strength = mask_boundary(cv2.LUT(pred_u8, quantised), dilation)
  gt_band = mask_boundary(gt.view(np.uint8), dilation)
  on_band, everywhere = _histogram(strength, gt_band), _histogram(strength, None)
  tp = np.cumsum(on_band[::-1])
  fp = np.cumsum((everywhere - on_band)[::-1])
  band_pixels = max(int(on_band.sum()), 1)
  return tp / (band_pixels + fp)


def _histogram(image_u8, mask_u8):
  """(256,) int64 pixel counts of a uint8 map (where ``mask_u8`` is non-zero, if given)."""
  if image_u8.size < _EXACT_FLOAT32_COUNT:   # cv2.calcHist's float32 counts are exact here
    hist = cv2.calcHist([image_u8], [0], mask_u8, [256], [0, 256])
    return hist.reshape(-1).astype(np.int64)
  values = image_u8 if mask_u8 is None else image_u8[mask_u8.view(bool)]
  return np.bincount(values.reshape(-1), minlength=256).astype(np.int64)

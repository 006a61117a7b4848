"""Per-image S-measure, MAE, F-measure and E-measure curves, adaptive F/E, weighted F-measure.

Conventions are the field's (pysodmetrics / BiRefNet ``evaluation/metrics.py``, see
``shared/reference/metrics/README.md``): GT is ``gt_u8 > 128``; the prediction is
``pred_u8 / 255`` min-max stretched in float64 unless constant; the 256-threshold curves
binarise ``q = uint8(p * 255)`` (truncation) with ``q >= t`` for t = 255..0.

Because a uint8 prediction takes at most 256 values, almost everything is computed from one
joint histogram (prediction value x GT bit) and a 256-entry table of the normalised values:
the table is built with the same float64 operations as the per-pixel reference, so ``q`` and
every count are bit-identical; means and variances come from the histogram (they differ from
the per-pixel sums only by float rounding, ~1e-16). The full float map is used only where an
exact comparison depends on a per-pixel mean (the adaptive threshold ``p >= 2 mean(p)``, the
S-measure's degenerate-quadrant test) and by the weighted F-measure.

Curves are returned in the library's native order: index i <-> threshold 255 - i.
"""

import cv2
import numpy as np

EPS = np.spacing(1)     # MATLAB's eps, as every reference implementation uses
F_BETA2 = 0.3           # beta^2 of the F-measure
S_ALPHA = 0.5           # object / region balance of the S-measure
WFM_BETA = 1.0          # "beta" of the weighted F-measure (plays the role of beta^2)


def binarize_gt(gt_u8: np.ndarray) -> np.ndarray:
  """Strict ``> 128``: a GT pixel of exactly 128 is background."""
  return gt_u8 > 128


def value_table(pred_u8: np.ndarray) -> np.ndarray:
  """Normalised value of each uint8 level, with the reference's float64 operation order."""
  levels = np.arange(256, dtype=np.float64) / 255
  lo, hi = int(pred_u8.min()), int(pred_u8.max())
  if lo != hi:
    # (p - min) / (max - min) where min and max are themselves level / 255.
    levels = (levels - levels[lo]) / (levels[hi] - levels[lo])
  return levels


def normalize_prediction(pred_u8: np.ndarray) -> np.ndarray:
  """The float64 map every metric except HCE sees."""
  return value_table(pred_u8)[pred_u8]


def joint_histogram(pred_u8: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """(2, 256) pixel counts: row 0 = GT background, row 1 = GT foreground."""
  codes = pred_u8.astype(np.int32) + (gt.astype(np.int32) << 8)
  return np.bincount(codes.reshape(-1), minlength=512).reshape(2, 256)


def _level_stats(counts: np.ndarray, values: np.ndarray):
  """Mean and unbiased std of a population given as value counts (std 0 for one pixel)."""
  n = counts.sum()
  mean = (counts * values).sum() / n
  std = np.sqrt((counts * (values - mean) ** 2).sum() / (n - 1)) if n > 1 else 0.0
  return mean, std


def _object_similarity(mean: float, std: float) -> float:
  return 2 * mean / (mean ** 2 + 1 + std + EPS)


def _region_ssim(hist: np.ndarray, values: np.ndarray, x: float) -> float:
  """SSIM-like score of one quadrant from its joint histogram and its mean prediction ``x``.

  ``x`` must be the quadrant's ``np.mean`` as the reference takes it: where the GT and the
  prediction are both constant in a quadrant, the score jumps between 1 (no variance at all)
  and 0 (a variance of ~1e-34 from the float rounding of that mean).
  """
  n = hist.sum()
  counts = hist.sum(axis=0)
  y = hist[1].sum() / n
  dx = values - x
  denom = n - 1 + EPS
  sigma_x = (counts * dx ** 2).sum() / denom
  sigma_y = (hist[0].sum() * y ** 2 + hist[1].sum() * (1 - y) ** 2) / denom
  sigma_xy = ((hist[0] * dx).sum() * (0 - y) + (hist[1] * dx).sum() * (1 - y)) / denom
  alpha = 4 * x * y * sigma_xy
  beta = (x ** 2 + y ** 2) * (sigma_x + sigma_y)
  if alpha != 0:
    return alpha / (beta + EPS)
  return 1.0 if beta == 0 else 0.0


def s_measure(pred_u8, pred, gt, values, hist) -> float:
  """Structure measure (Fan et al. 2017), alpha = 0.5.

  ``pred`` is the normalised float map (``values[pred_u8]``). Degenerate splits (the rounded
  GT centroid on the last row or column leaves a quadrant empty) give NaN in the references;
  like the official BiRefNet code (``max(0, nan)``) we then return 0.
  """
  h, w = gt.shape
  area = h * w
  fg = int(hist[1].sum())
  if fg == 0:
    return 1 - (hist.sum(axis=0) * values).sum() / area
  if fg == area:
    return (hist[1] * values).sum() / area
  y = fg / area
  fg_mean, fg_std = _level_stats(hist[1], values)
  bg_mean, bg_std = _level_stats(hist[0], 1 - values)
  object_score = (y * _object_similarity(fg_mean, fg_std)
                  + (1 - y) * _object_similarity(bg_mean, bg_std))

  # Centroid of the GT pixels: exact integer sums, then np.round (half to even), then +1.
  rows = np.arange(h, dtype=np.int64) @ gt.sum(axis=1, dtype=np.int64)
  cols = np.arange(w, dtype=np.int64) @ gt.sum(axis=0, dtype=np.int64)
  cy = int(np.round(rows / fg)) + 1
  cx = int(np.round(cols / fg)) + 1
  w_lt = cx * cy / area
  w_rt = cy * (w - cx) / area
  w_lb = (h - cy) * cx / area
  w_rb = 1 - w_lt - w_rt - w_lb
  quadrants = (((0, cy), (0, cx), w_lt), ((0, cy), (cx, w), w_rt),
               ((cy, h), (0, cx), w_lb), ((cy, h), (cx, w), w_rb))
  region_score = 0.0
  for (r0, r1), (c0, c1), weight in quadrants:
    quad = joint_histogram(pred_u8[r0:r1, c0:c1], gt[r0:r1, c0:c1])
    region_score += _region_ssim(quad, values, pred[r0:r1, c0:c1].mean()) * weight
  score = S_ALPHA * object_score + (1 - S_ALPHA) * region_score
  return 0.0 if np.isnan(score) else max(0.0, score)


def mean_absolute_error(values, hist) -> float:
  return ((hist[0] * values).sum() + (hist[1] * (1 - values)).sum()) / hist.sum()


def _f_measure(tp, positives, fg):
  """Precision, recall and F (beta^2 = 0.3) for arrays of counts, 0 where undefined."""
  precision = tp / np.where(positives == 0, 1, positives)
  recall = tp / max(fg, 1)
  numerator = (1 + F_BETA2) * precision * recall
  denominator = np.where(numerator == 0, 1, F_BETA2 * precision + recall)
  return precision, recall, numerator / denominator


def _e_measure(tp, positives, fg, area):
  """Enhanced-alignment measure of binary maps given by counts (arrays or scalars)."""
  if fg == 0:
    total = area - positives
  elif fg == area:
    total = positives
  else:
    fp = positives - tp
    fn = fg - tp
    tn = area - positives - fn
    mean_pred = positives / area
    mean_gt = fg / area
    total = 0
    for count, pred_value, gt_value in ((tp, 1, 1), (fp, 1, 0), (fn, 0, 1), (tn, 0, 0)):
      a = pred_value - mean_pred
      b = gt_value - mean_gt
      align = 2 * (a * b) / (a ** 2 + b ** 2 + EPS)
      total = total + (align + 1) ** 2 / 4 * count
  return total / (area - 1 + EPS)


def threshold_curves(values, hist):
  """256-threshold precision, recall, F and E curves (index i <-> q >= 255 - i)."""
  quantised = (values * 255).astype(np.uint8)     # truncation, float64 as the references
  fg_q = np.bincount(quantised, weights=hist[1], minlength=256).astype(np.int64)
  bg_q = np.bincount(quantised, weights=hist[0], minlength=256).astype(np.int64)
  tp = np.cumsum(fg_q[::-1])
  positives = tp + np.cumsum(bg_q[::-1])
  fg = int(hist[1].sum())
  area = int(hist.sum())
  precision, recall, fm = _f_measure(tp, positives, fg)
  em = _e_measure(tp, positives, fg, area)
  return dict(precision=precision, recall=recall, fm=fm, em=em.astype(np.float64))


def adaptive_measures(pred, values, hist):
  """adpFm and adpEm: binarise at min(2 mean(p), 1) with ``p >= thr``."""
  threshold = min(2 * pred.mean(), 1)
  positive_levels = values >= threshold
  tp = int(hist[1][positive_levels].sum())
  positives = int(hist[:, positive_levels].sum())
  fg = int(hist[1].sum())
  area = int(hist.sum())
  if tp == 0:
    adp_fm = 0.0
  else:
    precision, recall = tp / positives, tp / fg
    adp_fm = (1 + F_BETA2) * precision * recall / (F_BETA2 * precision + recall)
  return adp_fm, float(_e_measure(tp, positives, fg, area))


def _matlab_gaussian(size=7, sigma=5.0):
  """``fspecial('gaussian', size, sigma)``: tiny values zeroed, normalised to sum 1."""
  half = (size - 1) / 2
  y, x = np.ogrid[-half:half + 1, -half:half + 1]
  kernel = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
  kernel[kernel < np.finfo(kernel.dtype).eps * kernel.max()] = 0
  return kernel / kernel.sum()


_GAUSSIAN = _matlab_gaussian()
# Nothing is zeroed at 7x7, sigma 5, so the kernel is the outer product of this 1-D one (to
# ~1e-17, which moves wFm by ~1e-16): a separable blur is 3x faster.
_GAUSSIAN_1D = _GAUSSIAN.sum(axis=0)
_RADIUS = _GAUSSIAN.shape[0] // 2
_PAD = 4
# For each squared distance d a background pixel near the GT can have (<= 2 * 3^2), the
# offsets (dy, dx) at that distance in the order that picks scipy's ``distance_transform_edt``
# feature among equidistant GT pixels: leftmost first, then topmost (its column-wise then
# row-wise Voronoi passes keep the first site they meet).
_OFFSETS_AT = {}
for _dx in range(-_PAD, _PAD + 1):
  for _dy in range(-_PAD, _PAD + 1):
    if 0 < _dx * _dx + _dy * _dy <= 2 * _RADIUS ** 2:
      _OFFSETS_AT.setdefault(_dx * _dx + _dy * _dy, []).append((_dy, _dx))


def _background_weights(max_squared_distance=(5 * 54) ** 2):
  """``2 - exp(log(0.5) / 5 * sqrt(k))`` for each integer squared distance k.

  Index 0 (GT pixels) holds 0 so that a dot product sums background pixels only. From
  distance 5 * 54 on the weight rounds to exactly 2.0 in float64 (the last entry).
  """
  dist = np.sqrt(np.arange(max_squared_distance + 1, dtype=np.float64))
  weights = 2 - np.exp(np.log(0.5) / 5 * dist)
  weights[0] = 0.0
  return weights


_BG_WEIGHTS = _background_weights()


def _nearest_gt_errors(gt, squared_distance, gt_errors_flat):
  """Error copied to background pixels near the GT from their nearest GT pixel.

  Returns (flat indices, errors). Only background pixels inside some GT pixel's 7x7 window
  matter (the blur is read on GT pixels only). Their exact squared distance d is known, so
  we look only at the offsets at distance d, in scipy's tie order, and take the first GT one.
  """
  h, w = gt.shape
  near = cv2.dilate(gt.view(np.uint8), np.ones((2 * _RADIUS + 1,) * 2, np.uint8),
                    borderType=cv2.BORDER_CONSTANT, borderValue=0)
  near[gt] = 0
  at_image = np.flatnonzero(near)
  ys, xs = np.divmod(at_image, w)
  padded_w = w + 2 * _PAD
  padded = np.zeros((h + 2 * _PAD, padded_w), bool)
  padded[_PAD:-_PAD, _PAD:-_PAD] = gt
  padded = padded.reshape(-1)
  at_padded = (ys + _PAD) * padded_w + (xs + _PAD)
  distance = squared_distance[at_image]
  copied = np.empty(at_image.size, np.float64)
  for d, offsets in _OFFSETS_AT.items():
    group = np.flatnonzero(distance == d)
    if group.size == 0:
      continue
    dy, dx = np.array(offsets).T
    is_gt = padded[at_padded[group, None] + (dy * padded_w + dx)[None, :]]
    first = is_gt.argmax(axis=1)     # exact d guarantees at least one GT pixel there
    copied[group] = gt_errors_flat[at_image[group] + (dy * w + dx)[first]]
  return at_image, copied


def weighted_f_measure(pred, gt) -> float:
  """Weighted F-measure (Margolin et al. 2014), beta = 1, as pysodmetrics computes it.

  The reference copies to each background pixel the error of its nearest GT pixel (scipy's
  exact feature transform), blurs with a 7x7 Gaussian, keeps min(error, blurred) on the GT,
  and weights background errors by ``2 - 0.5 ** (dist / 5)``. Only GT pixels read the blurred
  map, and their 7x7 window only reaches background pixels within 3 pixels, so the copy is
  needed only there (``_nearest_gt_errors``). The exact distance comes from OpenCV's exact
  (Felzenszwalb) transform: its float32 result squared and rounded is the exact integer
  squared distance wherever the weight is not already exactly 2.
  """
  if not gt.any():
    return 0.0
  h, w = gt.shape
  dist = cv2.distanceTransform((~gt).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
  # float32 squares are within 0.02 of the integer below the cap: rounding recovers it.
  squared = cv2.multiply(dist, dist)
  np.minimum(squared, _BG_WEIGHTS.size - 1, out=squared)
  squared = np.rint(squared).astype(np.int32).reshape(-1)

  pred_flat = pred.reshape(-1)
  gt_index = np.flatnonzero(gt)
  gt_error = 1 - pred_flat[gt_index]           # |p - 1| on the GT
  spread = np.zeros(h * w, np.float64)
  spread[gt_index] = gt_error
  near_index, near_error = _nearest_gt_errors(gt, squared, spread)
  spread[near_index] = near_error
  blurred = cv2.sepFilter2D(spread.reshape(h, w), cv2.CV_64F, _GAUSSIAN_1D, _GAUSSIAN_1D,
                            borderType=cv2.BORDER_CONSTANT).reshape(-1)[gt_index]
  fg_error = np.where(blurred < gt_error, blurred, gt_error).sum()
  fp_w = np.dot(pred_flat, _BG_WEIGHTS[squared])   # sum over background of |p - 0| * B

  fg = gt_index.size
  tp_w = fg - fg_error
  recall = 1 - fg_error / fg
  precision = tp_w / (tp_w + fp_w + EPS)
  return (1 + WFM_BETA) * recall * precision / (recall + WFM_BETA * precision + EPS)

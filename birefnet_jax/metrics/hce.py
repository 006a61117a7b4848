"""Relaxed human correction effort (HCE_gamma, gamma = 5) of the DIS5K paper.

This is the number BiRefNet and DIS report (``HCEMeasure.cal_hce`` / ``relax_HCE``), not
pysodmetrics' variant: predictions are binarised with ``pred_u8 > 128`` on the raw values, and
a mask covering the whole image counts no independent region. The count is an integer built
from OpenCV contours and ``approxPolyDP``, so we make the same OpenCV calls; what the reference
does point by point in Python (walking contours, cutting them into polylines, marking the
regions they touch) is done here on whole arrays.
"""

import cv2
import numpy as np

from birefnet_jax.metrics.skeleton import skeletonize

RELAX = 5          # gamma: erosion / dilation steps of the relaxation
EPSILON = 2.0      # approxPolyDP tolerance
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))   # skimage disk(1)


def _relaxed_errors(gt, pred, gt_skeleton):
  """False positives / negatives that are far enough from the true border to need fixing."""
  tp = gt & pred
  fp = pred & ~gt
  fn = gt & ~pred
  # cv2's default border: outside counts as foreground for erode, background for dilate.
  union_eroded = cv2.erode((gt | pred).astype(np.uint8), _CROSS, iterations=RELAX).astype(bool)

  fp_relaxed = fp & union_eroded
  for _ in range(RELAX):
    fp_relaxed = cv2.dilate(fp_relaxed.astype(np.uint8), _CROSS).astype(bool) & ~gt
  fp_relaxed &= fp

  fn_relaxed = fn & union_eroded
  for _ in range(RELAX):
    fn_relaxed = cv2.dilate(fn_relaxed.astype(np.uint8), _CROSS).astype(bool) & ~pred
  fn_relaxed &= fn
  # Thin structures must be restored even when close to TP: missed skeleton pixels count.
  fn_relaxed |= gt_skeleton & ~tp
  return tp, fp_relaxed, fn_relaxed


def _polylines_and_independent(mask, condition):
  """Boundary polylines of ``mask`` next to ``condition``, and the regions touching none.

  Contour points are kept where the dilated condition holds and the point was not kept
  before (by any contour of this mask); runs of kept points form polylines. When a contour
  yields several polylines and its first and last ones meet (8-adjacent ends), the first is
  reversed and appended to the last.
  """
  condition = cv2.dilate(condition.astype(np.uint8), _CROSS).astype(bool)
  mask_u8 = mask.astype(np.uint8)
  contours, _ = cv2.findContours(mask_u8, cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
  n_labels, labels = cv2.connectedComponents(mask_u8, connectivity=8)
  if not contours:
    return [], 0
  lengths = np.array([len(c) for c in contours])
  points = np.concatenate(contours).reshape(-1, 2)          # (x, y)
  contour_id = np.repeat(np.arange(len(contours)), lengths)
  x, y = points[:, 0], points[:, 1]
  flat = y.astype(np.int64) * mask.shape[1] + x
  first_visit = np.zeros(len(flat), bool)
  first_visit[np.unique(flat, return_index=True)[1]] = True
  kept = condition[y, x] & first_visit

  touched = np.unique(labels[y[kept], x[kept]])
  if mask.all():
    independent = 0   # the reference sizes its region table without a background label
  else:
    independent = (n_labels - 1) - touched.size

  # Runs of kept points that do not cross a contour boundary.
  same_contour_as_prev = np.r_[False, contour_id[1:] == contour_id[:-1]]
  kept_prev = np.r_[False, kept[:-1]] & same_contour_as_prev
  kept_next = np.r_[kept[1:], False] & np.r_[same_contour_as_prev[1:], False]
  starts = np.flatnonzero(kept & ~kept_prev)
  ends = np.flatnonzero(kept & ~kept_next) + 1
  run_contour = contour_id[starts]

  polylines = []
  for c in np.unique(run_contour):
    runs = np.flatnonzero(run_contour == c)
    pieces = [points[starts[r]:ends[r]] for r in runs]
    if len(pieces) > 1:
      first_start, last_end = pieces[0][0], pieces[-1][-1]
      if np.abs(first_start - last_end).max() == 1:
        pieces[-1] = np.concatenate([pieces[-1], pieces[0][::-1]])
        pieces = pieces[1:]
    polylines.extend(pieces)
  return polylines, independent


def _control_points(polylines) -> int:
  """Vertices of the Douglas-Peucker simplification of each open polyline."""
  total = 0
  for line in polylines:
    if len(line) <= 2:
      total += len(line)   # nothing to simplify: approxPolyDP keeps 1 or 2 distinct points
    else:
      total += len(cv2.approxPolyDP(line.reshape(-1, 1, 2), EPSILON, False))
  return total


def hce_components(pred_u8: np.ndarray, gt_u8: np.ndarray, gt_skeleton=None) -> dict:
  """FP_points, FP_indep, FN_points, FN_indep (their sum is HCE) of one pair.

  ``gt_skeleton``: optional precomputed ``skeletonize(gt_u8 > 128)`` (bool); computed if None.
  """
  if pred_u8.shape != gt_u8.shape:
    raise ValueError(f'HCE needs pred and GT of one shape, got {pred_u8.shape} vs {gt_u8.shape}')
  gt = gt_u8 > 128
  pred = pred_u8 > 128
  if gt_skeleton is None:
    gt_skeleton = skeletonize(gt)
  tp, fp_relaxed, fn_relaxed = _relaxed_errors(gt, pred, np.asarray(gt_skeleton, bool))
  fp_lines, fp_indep = _polylines_and_independent(fp_relaxed, tp | fn_relaxed)
  fn_lines, fn_indep = _polylines_and_independent(fn_relaxed, ~(tp | fp_relaxed | fn_relaxed))
  return dict(FP_points=_control_points(fp_lines), FP_indep=int(fp_indep),
              FN_points=_control_points(fn_lines), FN_indep=int(fn_indep))


def human_correction_effort(pred_u8: np.ndarray, gt_u8: np.ndarray, gt_skeleton=None) -> int:
  return sum(hce_components(pred_u8, gt_u8, gt_skeleton).values())

"""Per-image evaluation, dataset aggregation as the field reports it, and a parallel driver.

Dataset values (``shared/reference/metrics/README.md`` section 12): maxFm / meanFm / maxEm /
meanEm / maxBIoU / meanBIoU are the max / mean of the *mean curve over images*; adpFm, adpEm,
Sm, wFm, MAE and HCE are means of the per-image values (BiRefNet prints HCE rounded to an
integer; we return the mean). mBA is the mean over the images whose GT has a boundary (the
official mean is NaN as soon as one GT is empty or full; None here when no GT has one).
Per-image values are accumulated in the order given; ``evaluate_pairs`` keeps the input order
whatever the number of workers, so results do not depend on ``workers``.
"""

import multiprocessing
import os
import sys

import cv2
import numpy as np

from birefnet_jax.errors import UserError
from birefnet_jax.metrics import boundary
from birefnet_jax.metrics import hce as hce_lib
from birefnet_jax.metrics import sod

METRIC_KEYS = ('Sm', 'MAE', 'maxFm', 'meanFm', 'adpFm', 'wFm', 'maxEm', 'meanEm', 'adpEm',
               'HCE', 'mBA', 'maxBIoU', 'meanBIoU', 'n_images')
CURVE_KEYS = ('fm', 'em', 'precision', 'recall', 'biou')
_MEAN_KEYS = ('Sm', 'MAE', 'adpFm', 'wFm', 'adpEm', 'HCE')
# Below this many pixels the E-measure's H*W - 1 denominator (pysodmetrics) inflates it by more
# than 1 % (a 1x1 image: divided by eps, ~4.5e15): such images get a warning.
TINY_IMAGE_PIXELS = 100


class UnreadableImageError(UserError, ValueError):
  """A prediction or GT file that is not a readable image (picklable: raised in workers)."""


def read_gray(path, role: str = 'image') -> np.ndarray:
  """8-bit grayscale as ``cv2.imread(path, IMREAD_GRAYSCALE)``; clear error if unreadable."""
  image = cv2.imread(os.fspath(path), cv2.IMREAD_GRAYSCALE)
  if image is None:
    hint = ('write it again, or remove it and pass --skip_missing to leave that image out'
            if role == 'prediction' else 'replace or remove that file')
    raise UnreadableImageError(f'{role} {path}: cannot be read as an image (missing, empty, '
                               'truncated or not an image file)', hint)
  return image


def tiny_image_note(result: dict, name) -> str | None:
  """A warning naming the image when it is so small that its E-measure is inflated (kept as
  computed, faithful to pysodmetrics), else None."""
  height, width = result['size']
  if height * width >= TINY_IMAGE_PIXELS:
    return None
  return (f'{name}: a {width}x{height} image; its E-measure (max {result["maxEm"]:.4g}) is '
          'divided by H*W-1 as in pysodmetrics and kept as computed, so it can dominate the '
          "data set's maxEm / meanEm")


def match_prediction(pred_u8: np.ndarray, gt_u8: np.ndarray) -> np.ndarray:
  """Prediction at GT resolution: cv2 INTER_LINEAR when (and only when) shapes differ."""
  if pred_u8.shape != gt_u8.shape:
    pred_u8 = cv2.resize(pred_u8, (gt_u8.shape[1], gt_u8.shape[0]),
                         interpolation=cv2.INTER_LINEAR)
  return pred_u8


def _as_gray_u8(array, what):
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim != 2 or array.dtype != np.uint8:
    raise ValueError(f'{what}: expected a (H, W) uint8 map, got {array.shape} {array.dtype}')
  return array


def image_metrics(pred_u8, gt_u8, gt_skeleton=None, with_hce=True) -> dict:
  """Every metric of one pair; the pred is resized to the GT first when needed.

  Returns the scalars (``Sm, MAE, wFm, adpFm, adpEm, HCE, mBA`` and the per-image ``maxFm,
  meanFm, maxEm, meanEm, maxBIoU, meanBIoU``), ``HCE_components`` and the 256-point ``curves``
  (index i <-> q >= 255-i). ``mBA`` is None when the GT has no boundary (empty or full).
  """
  gt_u8 = _as_gray_u8(gt_u8, 'gt')
  pred_u8 = match_prediction(_as_gray_u8(pred_u8, 'pred'), gt_u8)
  gt = sod.binarize_gt(gt_u8)
  values = sod.value_table(pred_u8)
  pred = values[pred_u8]
  hist = sod.joint_histogram(pred_u8, gt)
  curves = sod.threshold_curves(values, hist)
  adp_fm, adp_em = sod.adaptive_measures(pred, values, hist)
  with np.errstate(invalid='ignore', divide='ignore'):   # degenerate S-measure quadrants
    sm = sod.s_measure(pred_u8, pred, gt, values, hist)
  curves['biou'] = boundary.boundary_iou_curve(pred_u8, gt, values)
  result = dict(
      Sm=float(sm), MAE=float(sod.mean_absolute_error(values, hist)),
      wFm=float(sod.weighted_f_measure(pred, gt)),
      maxFm=float(curves['fm'].max()), meanFm=float(curves['fm'].mean()), adpFm=float(adp_fm),
      maxEm=float(curves['em'].max()), meanEm=float(curves['em'].mean()), adpEm=float(adp_em),
      mBA=boundary.boundary_accuracy(pred_u8, gt_u8),
      maxBIoU=float(curves['biou'].max()), meanBIoU=float(curves['biou'].mean()),
      curves=curves, size=gt_u8.shape)
  if with_hce:
    components = hce_lib.hce_components(pred_u8, gt_u8, gt_skeleton)
    result['HCE'] = sum(components.values())
    result['HCE_components'] = components
  return result


class MetricAccumulator:
  """Collects per-image results and reports the dataset values.

  >>> acc = MetricAccumulator()
  >>> acc.update(pred_u8, gt_u8, name='a')      # or acc.add(image_metrics(...), name='a')
  >>> acc.result()   # {'Sm': ..., 'maxFm': ..., 'HCE': ..., 'n_images': 1}
  """

  def __init__(self, with_hce=True):
    self.with_hce = with_hce
    self.names = []
    self.per_image = []

  def update(self, pred_u8, gt_u8, name=None, gt_skeleton=None):
    self.add(image_metrics(pred_u8, gt_u8, gt_skeleton, self.with_hce), name)

  def add(self, image_result, name=None):
    self.names.append(name)
    self.per_image.append(image_result)

  def curves(self) -> dict:
    """Dataset curves: the mean over images at each of the 256 thresholds."""
    return {k: np.mean(np.array([r['curves'][k] for r in self.per_image], np.float64), axis=0)
            for k in CURVE_KEYS}

  def result(self) -> dict:
    if not self.per_image:
      raise ValueError('MetricAccumulator.result(): no image was added')
    curves = self.curves()
    out = dict(maxFm=float(curves['fm'].max()), meanFm=float(curves['fm'].mean()),
               maxEm=float(curves['em'].max()), meanEm=float(curves['em'].mean()),
               maxBIoU=float(curves['biou'].max()), meanBIoU=float(curves['biou'].mean()))
    accuracies = [r['mBA'] for r in self.per_image if r['mBA'] is not None]
    out['mBA'] = float(np.mean(np.array(accuracies, np.float64))) if accuracies else None
    for key in _MEAN_KEYS:
      if key == 'HCE' and not self.with_hce:
        out[key] = None
        continue
      out[key] = float(np.mean(np.array([r[key] for r in self.per_image], np.float64)))
    out['n_images'] = len(self.per_image)
    return {k: out[k] for k in METRIC_KEYS}

  def without_boundary(self) -> list:
    """Names of the images whose GT has no boundary (empty or full): left out of mBA."""
    return [n for n, r in zip(self.names, self.per_image) if r['mBA'] is None]


def _load_and_measure(job):
  pred, gt, with_hce = job
  gt_u8 = read_gray(gt, 'GT') if isinstance(gt, (str, os.PathLike)) else gt
  pred_u8 = read_gray(pred, 'prediction') if isinstance(pred, (str, os.PathLike)) else pred
  try:
    return image_metrics(pred_u8, gt_u8, with_hce=with_hce)
  except ValueError as e:
    raise ValueError(f'pair ({pred}, {gt}): {e}') from None


def iter_image_metrics(preds, gts, workers=None, with_hce=True):
  """Yields per-image results in input order; ``workers`` processes (default: all cores)."""
  preds, gts = list(preds), list(gts)
  if len(preds) != len(gts):
    raise ValueError(f'{len(preds)} predictions for {len(gts)} ground truths')
  jobs = [(p, g, with_hce) for p, g in zip(preds, gts)]
  workers = os.cpu_count() if workers is None else workers
  workers = max(1, min(workers, len(jobs)))
  if workers == 1:
    yield from map(_load_and_measure, jobs)
    return
  # fork is cheapest, but not safe once JAX (threads, accelerator handles) is initialised in
  # this process: then spawn fresh workers, which import only numpy and cv2. Workers use one
  # OpenCV thread each (one process per core already). A forked child must not call
  # cv2.setNumThreads itself (it would wait on the parent's pool threads, which it does not
  # have), so the parent switches to one thread while forking and switches back after.
  fork_ok = 'fork' in multiprocessing.get_all_start_methods() and 'jax' not in sys.modules
  if fork_ok:
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
      pool = multiprocessing.get_context('fork').Pool(workers)
    finally:
      cv2.setNumThreads(threads)
  else:
    pool = multiprocessing.get_context('spawn').Pool(workers, initializer=_single_thread_cv2)
  with pool:
    yield from pool.imap(_load_and_measure, jobs, chunksize=1)


def _single_thread_cv2():
  cv2.setNumThreads(1)


def evaluate_pairs(preds, gts, workers=None, with_hce=True, names=None) -> dict:
  """Dataset metrics of (pred, gt) pairs: paths or uint8 arrays, evaluated in given order."""
  preds, gts = list(preds), list(gts)
  acc = MetricAccumulator(with_hce=with_hce)
  names = names if names is not None else [None] * len(gts)
  for name, result in zip(names, iter_image_metrics(preds, gts, workers, with_hce)):
    acc.add(result, name)
  return acc.result()

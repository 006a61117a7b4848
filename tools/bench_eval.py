r"""ms per image of birefnet_jax.metrics vs the reference implementations, side by side.

  python tools/bench_eval.py [--synthetic 8] [--size 1024] [--workers N] [--repeats R]
                             [--cv2_threads T] [--birefnet_repo PATH_TO_OFFICIAL_CHECKOUT]

Measures, in one run and on the same in-memory uint8 pairs (image decoding excluded):

* baseline, one process: pysodmetrics Smeasure + MAE + Fmeasure + Emeasure + WeightedFmeasure
  + HCE. HCE is the official BiRefNet ``HCEMeasure.cal_hce`` with ``skimage`` skeletonize
  when ``--birefnet_repo`` points at a checkout of github.com/ZhengPeng7/BiRefNet (its
  ``evaluation/metrics.py`` is imported from there, never copied), else pysodmetrics'
  ``HumanCorrectionEffortMeasure`` (the same point-by-point algorithm; skeleton included).
  With ``--birefnet_repo`` the baseline also counts the official ``MBAMeasure`` and
  ``BIoUMeasure`` (without it, it has no mBA / BIoU, and says so);
* ours on one core (``image_metrics``), with a per-part breakdown (the median of ``--repeats``
  interleaved runs per pair; mBA and BIoU on their own lines);
* ours over all cores (``evaluate_pairs(workers=N)``, wall time / images).

Pairs: the fixture's ~1024 px ``dis_large_*`` pairs (../shared/reference/metrics) and seeded
synthetic DIS-like pairs of ``--size``^2 (blobs with holes and thin branches; the prediction a
blurred, noisy, slightly shifted copy). Reference figure (timing_reference.json): the full
standard set costs about 0.55 s per 1024^2 image on one core of the reference machine.
"""

import argparse
import importlib.util
import os
import pathlib
import statistics
import sys
import time
import warnings

import cv2
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from birefnet_jax import metrics  # pylint: disable=g-import-not-at-top
from birefnet_jax.metrics import boundary  # pylint: disable=g-import-not-at-top
from birefnet_jax.metrics import hce as hce_lib  # pylint: disable=g-import-not-at-top
from birefnet_jax.metrics import sod  # pylint: disable=g-import-not-at-top

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / '..' / 'shared' / 'reference' / 'metrics'


def synthetic_pair(rng, size):
  """A DIS-like GT (blobs, holes, thin branches) and a plausible soft prediction."""
  field = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), size / 40)
  gt = (field > np.quantile(field, rng.uniform(0.55, 0.8))).astype(np.uint8)
  for _ in range(rng.integers(10, 30)):   # thin structures, the hard part of DIS
    p0, p1 = rng.integers(0, size, 2), rng.integers(0, size, 2)
    cv2.line(gt, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 1,
             int(rng.integers(1, 4)))
  shift = np.float32([[1, 0, rng.uniform(-2, 2)], [0, 1, rng.uniform(-2, 2)]])
  soft = cv2.warpAffine(gt.astype(np.float32), shift, (size, size))
  soft = cv2.GaussianBlur(soft, (0, 0), rng.uniform(1, 3))
  noise = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 4) - 0.5
  pred = np.clip(soft + 0.6 * noise, 0, 1)
  return (pred * 255).astype(np.uint8), gt * 255


def fixture_pairs(directory):
  pairs = []
  for gt_path in sorted((directory / 'gt').glob('dis_large_*.png')):
    gt = metrics.read_gray(gt_path)
    pred = metrics.match_prediction(metrics.read_gray(directory / 'pred' / gt_path.name), gt)
    pairs.append((gt_path.stem, pred, gt))
  return pairs


def official_module(repo):
  """``evaluation/metrics.py`` of an official BiRefNet checkout (imported, not copied)."""
  path = pathlib.Path(repo) / 'evaluation' / 'metrics.py'
  spec = importlib.util.spec_from_file_location('birefnet_official_metrics', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def official_hce(module):
  """``cal_hce`` + skimage skeleton from the official module."""
  from skimage.morphology import skeletonize  # pylint: disable=g-import-not-at-top
  measure = module.HCEMeasure()
  return lambda pred, gt: measure.cal_hce(pred, gt, skeletonize(gt > 128))


def official_boundary_times(module, pairs):
  """ms per image of the official MBAMeasure and BIoUMeasure ``step`` (one process)."""
  times = {'official MBAMeasure': [], 'official BIoUMeasure': []}
  for _, pred, gt in pairs:
    for label, measure in (('official MBAMeasure', module.MBAMeasure()),
                           ('official BIoUMeasure', module.BIoUMeasure())):
      tic = time.perf_counter()
      measure.step(pred=pred, gt=gt)
      times[label].append(time.perf_counter() - tic)
  return {k: 1000 * statistics.mean(v) for k, v in times.items()}


def baseline_time(pred, gt, hce_fn):
  """Seconds for the full reference set on one pair, one process."""
  import py_sod_metrics as psm  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  for measure in (psm.Smeasure(), psm.MAE(), psm.Fmeasure(), psm.Emeasure(),
                  psm.WeightedFmeasure()):
    measure.step(pred, gt)
  if hce_fn is None:
    psm.HumanCorrectionEffortMeasure().step(pred, gt)
  else:
    hce_fn(pred, gt)
  return time.perf_counter() - start


def ours_breakdown(pred, gt):
  """Seconds of each part of image_metrics on one pair, one process."""
  times = {}
  tic = time.perf_counter()
  gt_bool = sod.binarize_gt(gt)
  values = sod.value_table(pred)
  pred_f = values[pred]
  hist = sod.joint_histogram(pred, gt_bool)
  sod.threshold_curves(values, hist)
  sod.adaptive_measures(pred_f, values, hist)
  sod.mean_absolute_error(values, hist)
  sod.s_measure(pred, pred_f, gt_bool, values, hist)
  times['Sm+MAE+F+E'] = time.perf_counter() - tic
  tic = time.perf_counter()
  sod.weighted_f_measure(pred_f, gt_bool)
  times['wFm'] = time.perf_counter() - tic
  tic = time.perf_counter()
  skeleton = metrics.skeletonize(gt_bool)
  times['skeleton'] = time.perf_counter() - tic
  tic = time.perf_counter()
  hce_lib.hce_components(pred, gt, skeleton)
  times['HCE (skeleton given)'] = time.perf_counter() - tic
  tic = time.perf_counter()
  boundary.boundary_accuracy(pred, gt)
  times['mBA'] = time.perf_counter() - tic
  tic = time.perf_counter()
  boundary.boundary_iou_curve(pred, gt_bool, values)
  times['BIoU'] = time.perf_counter() - tic
  return times


def bench(label, pairs, workers, hce_fn, hce_label, module=None, repeats=1):
  print(f'\n== {label}: {len(pairs)} pairs, sizes '
        f'{sorted({p[2].shape for p in pairs})} ==')
  base = [baseline_time(pred, gt, hce_fn) for _, pred, gt in pairs]
  official_boundary = official_boundary_times(module, pairs) if module is not None else {}
  boundary_ms = sum(official_boundary.values())
  try:
    from skimage.morphology import skeletonize as skimage_skeletonize  # pylint: disable=g-import-not-at-top
  except ImportError:
    skimage_skeletonize = None
  skimage_times = []
  if skimage_skeletonize is not None:
    for _, _, gt in pairs:
      tic = time.perf_counter()
      skimage_skeletonize(gt > 128)
      skimage_times.append(time.perf_counter() - tic)
  ours_one = []
  parts = {}
  for _, pred, gt in pairs:
    tic = time.perf_counter()
    metrics.image_metrics(pred, gt)
    ours_one.append(time.perf_counter() - tic)
  for _ in range(repeats):   # the parts interleaved, so that a busy machine slows all alike
    for _, pred, gt in pairs:
      for k, v in ours_breakdown(pred, gt).items():
        parts.setdefault(k, []).append(v)
  tic = time.perf_counter()
  metrics.evaluate_pairs([p for _, p, _ in pairs], [g for _, _, g in pairs], workers=workers)
  ours_all = (time.perf_counter() - tic) / len(pairs)
  base_ms = 1000 * statistics.mean(base) + boundary_ms
  one_ms = 1000 * statistics.mean(ours_one)
  if module is not None:
    hce_label += ' + official MBA, BIoU'
  else:
    print('(no --birefnet_repo: the baseline lacks mBA and BIoU, which ours includes)')
  print(f'baseline (pysodmetrics + {hce_label}), 1 process: {base_ms:8.1f} ms/image')
  print(f'ours, 1 process:                              {one_ms:8.1f} ms/image   '
        f'x{base_ms / one_ms:.2f} faster')
  print(f'    parts, median of {repeats} x {len(pairs)} runs:')
  for k, v in parts.items():
    print(f'    {k:<24} {1000 * statistics.median(v):8.1f} ms')
  if skimage_times:
    print(f'    (skimage skeletonize alone: {1000 * statistics.mean(skimage_times):.1f} ms)')
  for k, v in official_boundary.items():
    print(f'    ({k}: {v:.1f} ms)')
  print(f'ours, {workers} processes (wall / images):          {1000 * ours_all:8.1f} ms/image   '
        f'x{base_ms / (1000 * ours_all):.2f} faster than the 1-process baseline')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--synthetic', type=int, default=8, help='synthetic pairs')
  parser.add_argument('--size', type=int, default=1024, help='synthetic side length')
  parser.add_argument('--workers', type=int, default=os.cpu_count())
  parser.add_argument('--fixture_dir', default=str(FIXTURE))
  parser.add_argument('--birefnet_repo', default=None,
                      help='official BiRefNet checkout, for its HCE (else pysodmetrics HCE)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--repeats', type=int, default=1, help='runs of each part per pair')
  parser.add_argument('--cv2_threads', type=int, default=None,
                      help="OpenCV threads (evaluate's worker processes use 1)")
  args = parser.parse_args(argv)
  warnings.filterwarnings('ignore', message='This class will be removed')

  if args.cv2_threads is not None:
    cv2.setNumThreads(args.cv2_threads)
  module = official_module(args.birefnet_repo) if args.birefnet_repo else None
  hce_fn = official_hce(module) if module else None
  hce_label = 'official cal_hce + skimage skeleton' if hce_fn else 'pysodmetrics HCE'
  print(f'cpu cores: {os.cpu_count()}, workers for ours: {args.workers}, '
        f'cv2 threads: {cv2.getNumThreads()}')
  fixture = pathlib.Path(args.fixture_dir)
  if (fixture / 'gt').is_dir():
    bench('fixture dis_large pairs', fixture_pairs(fixture), args.workers, hce_fn, hce_label,
          module, args.repeats)
  rng = np.random.default_rng(args.seed)
  synthetic = [(f'syn{i}',) + synthetic_pair(rng, args.size) for i in range(args.synthetic)]
  bench(f'synthetic {args.size}^2 pairs', synthetic, args.workers, hce_fn, hce_label, module,
        args.repeats)


if __name__ == '__main__':
  main()

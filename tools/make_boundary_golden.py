r"""Golden mBA / BIoU values from the official BiRefNet evaluation code (tests/data).

  python tools/make_boundary_golden.py --birefnet_repo PATH_TO_OFFICIAL_CHECKOUT \
      [--out tests/data/boundary_metrics_golden.npz]

Imports ``evaluation/metrics.py`` from an official checkout (github.com/ZhengPeng7/BiRefNet,
commit 25cb930; it needs scipy, scikit-image, pillow and tqdm) and only *calls* it: the
official code is never copied here. It scores

* every pair of the metric fixtures (../shared/reference/metrics) with ``MBAMeasure`` and
  ``BIoUMeasure``, one image at a time and through the official ``evaluator()`` end to end
  (file paths in, dataset values out), on all pairs and on the pairs whose GT has a boundary;
* our own boundary cases (``boundary_cases`` below: thin structures, empty and full masks,
  single pixels, images of one row, the 2 %-of-the-diagonal rounding, sizes where mBA's five
  radii differ), whose uint8 arrays are stored with the values (as PNG bytes).

Output: one ``.npz`` (see ``tests/data/README.md``). NaN is the official value where it is
0/0 (mBA of a GT without boundary).
"""

import argparse
import json
import pathlib
import platform
import sys

import cv2
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_eval import official_module  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / '..' / 'shared' / 'reference' / 'metrics'
OUT = ROOT / 'tests' / 'data' / 'boundary_metrics_golden.npz'


def _soft(mask, rng, blur, shift=(0.0, 0.0), noise=0.0, noise_blur=0.0):
  h, w = mask.shape
  m = np.float32([[1, 0, shift[1]], [0, 1, shift[0]]])
  soft = cv2.warpAffine(mask.astype(np.float32), m, (w, h))
  if blur:
    soft = cv2.GaussianBlur(soft, (0, 0), blur)
  if noise:
    grain = rng.random((h, w)).astype(np.float32)
    if noise_blur:   # smooth noise: compresses well in the .npz
      grain = cv2.GaussianBlur(grain, (0, 0), noise_blur)
      grain = (grain - grain.min()) / (grain.max() - grain.min())
    soft = soft + noise * (grain - 0.5)
  return (np.clip(soft, 0, 1) * 255).astype(np.uint8)


def _blobs(rng, h, w, sigma, quantile):
  field = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), sigma)
  return field > np.quantile(field, quantile)


def boundary_cases(seed=0):
  """[(name, pred_u8, gt_u8)]: the edge cases of mBA and BIoU, deterministic from ``seed``."""
  rng = np.random.default_rng(seed)
  cases = []

  def add(name, pred, gt):
    cases.append((name, np.ascontiguousarray(pred, np.uint8),
                  np.ascontiguousarray(gt, np.uint8)))

  # Thin structures (1-2 px lines), the hard case of DIS.
  gt = np.zeros((200, 260), np.uint8)
  for _ in range(12):
    p0, p1 = rng.integers(0, 200, 2), rng.integers(0, 260, 2)
    cv2.line(gt, (int(p1[0]), int(p0[0])), (int(p1[1]), int(p0[1])), 255,
             int(rng.integers(1, 3)))
  add('thin_lines_shifted_soft', _soft(gt > 128, rng, 0.8, (1.0, -1.0), 0.3), gt)
  add('thin_lines_exact', gt.copy(), gt)
  gt = np.zeros((120, 90), np.uint8)
  cv2.circle(gt, (45, 60), 30, 255, 1)
  add('thin_ring_1px_soft', _soft(gt > 128, rng, 1.0, (0.0, 0.5), 0.2), gt)
  gt = np.zeros((41, 53), np.uint8)
  gt[20, 30] = 255
  add('single_pixel_gt', (rng.random(gt.shape) * 255).astype(np.uint8), gt)
  # Empty and full masks (mBA: no GT boundary, 0/0 officially).
  add('empty_gt_zero_pred', np.zeros((30, 45), np.uint8), np.zeros((30, 45), np.uint8))
  add('empty_gt_soft_pred', (rng.random((60, 50)) * 200).astype(np.uint8),
      np.zeros((60, 50), np.uint8))
  add('empty_gt_full_pred', np.full((33, 47), 255, np.uint8), np.zeros((33, 47), np.uint8))
  add('full_gt_full_pred', np.full((50, 41), 255, np.uint8), np.full((50, 41), 255, np.uint8))
  add('full_gt_zero_pred', np.zeros((50, 41), np.uint8), np.full((50, 41), 255, np.uint8))
  add('full_gt_soft_pred', (55 + rng.random((44, 39)) * 200).astype(np.uint8),
      np.full((44, 39), 255, np.uint8))
  # The GT touching the image border; a low-contrast prediction (mBA thresholds the raw values
  # at 128, BIoU the min-max stretched ones); a constant 128 prediction.
  gt = np.zeros((100, 80), np.uint8)
  gt[:, :37] = 255
  gt[70:, :] = 255
  add('border_touching_shifted', _soft(gt > 128, rng, 1.5, (-2.0, 3.0), 0.1), gt)
  gt = _blobs(rng, 90, 110, 5, 0.6).astype(np.uint8) * 255
  soft = _soft(gt > 128, rng, 2.0, (1.0, 1.0), 0.2)
  add('low_contrast_pred', (100 + soft.astype(np.float32) * 50 / 255).astype(np.uint8), gt)
  add('const_128_pred', np.full((64, 48), 128, np.uint8),
      _blobs(rng, 64, 48, 4, 0.5).astype(np.uint8) * 255)
  # Image sizes: a diagonal of 125 (0.02 * 125 = 2.5: round half to even), one row, 3x5, a
  # checkerboard (every pixel on the boundary), and one large enough that mBA's radii differ
  # (450x720: radii 1, 1, 2, 2, 3).
  gt = _blobs(rng, 75, 100, 4, 0.5).astype(np.uint8) * 255
  add('diagonal_125', _soft(gt > 128, rng, 1.0, (0.5, 0.5), 0.4), gt)
  gt = np.zeros((1, 40), np.uint8)
  gt[0, 5:17] = 255
  gt[0, 30] = 255
  add('one_row', (rng.random((1, 40)) * 255).astype(np.uint8), gt)
  add('tiny_3x5', np.array([[0, 200, 90, 255, 10], [30, 129, 128, 127, 250], [255, 0, 60, 70, 5]],
                           np.uint8),
      np.array([[0, 255, 0, 255, 0], [0, 255, 255, 0, 255], [255, 0, 0, 0, 0]], np.uint8))
  checker = ((np.indices((32, 36)).sum(axis=0) % 2) * 255).astype(np.uint8)
  add('checkerboard', (rng.random(checker.shape) * 255).astype(np.uint8), checker)
  gt = _blobs(rng, 450, 720, 12, 0.65).astype(np.uint8)
  for _ in range(15):
    p0, p1 = rng.integers(0, 450, 2), rng.integers(0, 720, 2)
    cv2.line(gt, (int(p1[0]), int(p0[0])), (int(p1[1]), int(p0[1])), 1, int(rng.integers(1, 4)))
  add('large_450x720', _soft(gt > 0, rng, 2.0, (1.5, -1.0), 0.8, 12.0), gt * 255)
  return cases


def official_per_image(module, pred, gt):
  mba, biou = module.MBAMeasure(), module.BIoUMeasure()
  with np.errstate(invalid='ignore', divide='ignore'):   # 0/0 mBA: kept as the official NaN
    mba.step(pred=pred, gt=gt)
  biou.step(pred=pred, gt=gt)
  return float(mba.bas[0]), np.asarray(biou.bious[0], np.float64)


def official_dataset(module, gt_paths, pred_paths):
  with np.errstate(invalid='ignore', divide='ignore'):
    _, _, _, _, _, _, _, mba, biou = module.evaluator(
        [str(p) for p in gt_paths], [str(p) for p in pred_paths], metrics=['MBA', 'BIoU'],
        num_workers=1)
  return float(mba), np.asarray(biou['curve'], np.float64)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--birefnet_repo', required=True)
  parser.add_argument('--fixture_dir', default=str(FIXTURE))
  parser.add_argument('--out', default=str(OUT))
  args = parser.parse_args(argv)
  module = official_module(args.birefnet_repo)
  fixture = pathlib.Path(args.fixture_dir)
  expected = json.loads((fixture / 'expected.json').read_text())
  names = [p['name'] for p in expected['pairs']]
  gt_paths = [fixture / p['gt'] for p in expected['pairs']]
  pred_paths = [fixture / p['pred'] for p in expected['pairs']]

  fixture_mba, fixture_biou = [], []
  for gt_path, pred_path in zip(gt_paths, pred_paths):
    # As the official evaluator loads a pair: grayscale, pred cv2.resize'd to the GT size.
    gt = cv2.imread(str(gt_path), cv2.IMREAD_GRAYSCALE)
    pred = cv2.imread(str(pred_path), cv2.IMREAD_GRAYSCALE)
    pred = cv2.resize(pred, (gt.shape[1], gt.shape[0]))
    mba, biou = official_per_image(module, pred, gt)
    fixture_mba.append(mba)
    fixture_biou.append(biou)
  all_mba, all_biou = official_dataset(module, gt_paths, pred_paths)
  with_boundary = [i for i, v in enumerate(fixture_mba) if not np.isnan(v)]
  sub_mba, sub_biou = official_dataset(module, [gt_paths[i] for i in with_boundary],
                                       [pred_paths[i] for i in with_boundary])

  data = {}
  case_names, case_mba, case_biou = [], [], []
  for name, pred, gt in boundary_cases():
    mba, biou = official_per_image(module, pred, gt)
    case_names.append(name)
    case_mba.append(mba)
    case_biou.append(biou)
    # Lossless PNG bytes (cv2.imdecode gives the arrays back): a third of the .npy size.
    data[f'case_pred/{name}'] = np.frombuffer(cv2.imencode('.png', pred)[1], np.uint8)
    data[f'case_gt/{name}'] = np.frombuffer(cv2.imencode('.png', gt)[1], np.uint8)

  import PIL, scipy, skimage  # pylint: disable=g-import-not-at-top,multiple-imports
  provenance = dict(
      generator='tools/make_boundary_golden.py',
      official='github.com/ZhengPeng7/BiRefNet evaluation/metrics.py MBAMeasure, BIoUMeasure, '
               'evaluator(metrics=["MBA", "BIoU"])',
      birefnet_official_commit='25cb9309bacf3dde954e4584594e16e142c51de5',
      versions=dict(python=platform.python_version(), numpy=np.__version__,
                    opencv=cv2.__version__, scipy=scipy.__version__,
                    scikit_image=skimage.__version__, pillow=PIL.__version__),
      nan='official 0/0 (mBA of a GT without boundary)')
  data.update(
      provenance=np.array(json.dumps(provenance)),
      fixture_names=np.array(names), fixture_mba=np.array(fixture_mba),
      fixture_biou=np.stack(fixture_biou),
      fixture_dataset_mba=np.array(all_mba), fixture_dataset_biou=all_biou,
      fixture_boundary_names=np.array([names[i] for i in with_boundary]),
      fixture_boundary_dataset_mba=np.array(sub_mba), fixture_boundary_dataset_biou=sub_biou,
      case_names=np.array(case_names), case_mba=np.array(case_mba),
      case_biou=np.stack(case_biou))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out, **data)
  print(f'wrote {out} ({out.stat().st_size} bytes): {len(names)} fixture pairs '
        f'({len(with_boundary)} with a GT boundary), {len(case_names)} boundary cases')
  print('official dataset mBA (all pairs):', all_mba, '; pairs with a boundary:', sub_mba,
        '; maxBIoU', all_biou.max(), 'meanBIoU', all_biou.mean())
  for name, mba, biou in zip(case_names, case_mba, case_biou):
    print(f'  {name:<26} mBA {mba:.6f}  maxBIoU {biou.max():.6f}  meanBIoU {biou.mean():.6f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

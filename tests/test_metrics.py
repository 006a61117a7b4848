"""birefnet_jax.metrics against the field's reference values.

References: shared/reference/metrics (expected.json and curves.npz, produced by pysodmetrics
and the official BiRefNet / DIS HCE code), tests/data/boundary_metrics_golden.npz (mBA and
BIoU of the same pairs from the official BiRefNet code, tools/make_boundary_golden.py), and, on
random inputs, pysodmetrics, scipy and scikit-image themselves (test extras; those tests are
skipped where they are not installed).
The metric code is numpy + OpenCV only (no JAX), so no JAX precision settings apply here.
"""

import json
import pathlib

import cv2
import numpy as np
import pytest

from birefnet_jax import metrics
from birefnet_jax.metrics import sod

import reference

REFERENCE = reference.REFERENCE / 'metrics'
EXPECTED = json.loads((REFERENCE / 'expected.json').read_text())
CURVES = np.load(REFERENCE / 'curves.npz')
PAIRS = EXPECTED['pairs']
FLOAT_KEYS = ('Sm', 'MAE', 'wFm', 'maxFm', 'meanFm', 'adpFm', 'maxEm', 'meanEm', 'adpEm')
TOL = 1e-9
BOUNDARY = np.load(pathlib.Path(__file__).parent / 'data' / 'boundary_metrics_golden.npz')


@pytest.fixture(scope='module')
def per_image():
  """Our per-image results for every fixture pair, in the fixture's (sorted) order."""
  out = []
  for pair in PAIRS:
    pred = metrics.read_gray(REFERENCE / pair['pred'])
    gt = metrics.read_gray(REFERENCE / pair['gt'])
    out.append(metrics.image_metrics(pred, gt))
  return out


def test_fixture_order_matches_curves():
  assert [p['name'] for p in PAIRS] == list(CURVES['names'])
  assert [p['name'] for p in PAIRS] == sorted(p['name'] for p in PAIRS)


@pytest.mark.parametrize('index', range(len(PAIRS)), ids=[p['name'] for p in PAIRS])
def test_per_image_values(per_image, index):
  pair, ours = PAIRS[index], per_image[index]
  for key in FLOAT_KEYS:
    assert abs(ours[key] - pair['metrics'][key]) <= TOL, (key, ours[key], pair['metrics'][key])
  assert ours['HCE'] == pair['metrics']['HCE']
  assert ours['HCE_components'] == pair['HCE_components']
  for ours_key, ref_key in (('fm', 'per_image_fm'), ('em', 'per_image_em'),
                            ('precision', 'per_image_precision'),
                            ('recall', 'per_image_recall')):
    np.testing.assert_allclose(ours['curves'][ours_key], CURVES[ref_key][index], rtol=0,
                               atol=TOL, err_msg=ours_key)
  # mBA and BIoU: the official values (NaN = official 0/0 for a GT without boundary: None).
  assert BOUNDARY['fixture_names'][index] == pair['name']
  official_mba = BOUNDARY['fixture_mba'][index]
  if np.isnan(official_mba):
    assert ours['mBA'] is None
  else:
    assert abs(ours['mBA'] - official_mba) <= TOL, (ours['mBA'], official_mba)
  official_biou = BOUNDARY['fixture_biou'][index]
  np.testing.assert_allclose(ours['curves']['biou'], official_biou, rtol=0, atol=TOL)
  assert abs(ours['maxBIoU'] - official_biou.max()) <= TOL
  assert abs(ours['meanBIoU'] - official_biou.mean()) <= TOL


def test_dataset_values_and_curves(per_image):
  acc = metrics.MetricAccumulator()
  for pair, result in zip(PAIRS, per_image):
    acc.add(result, pair['name'])
  result = acc.result()
  assert set(result) == set(metrics.METRIC_KEYS)
  assert result['n_images'] == len(PAIRS)
  for key, value in EXPECTED['dataset'].items():
    if key in result:
      assert abs(result[key] - value) <= TOL, (key, result[key], value)
  curves = acc.curves()
  for ours_key, ref_key in (('fm', 'fm_curve'), ('em', 'em_curve'),
                            ('precision', 'precision_curve'), ('recall', 'recall_curve')):
    np.testing.assert_allclose(curves[ours_key], CURVES[ref_key], rtol=0, atol=TOL)
  # BIoU: the official evaluator's dataset curve. mBA: the official evaluator's value over the
  # pairs whose GT has a boundary (over all pairs the official mean is NaN: 6 GTs are empty or
  # full, and those are the ones left out).
  np.testing.assert_allclose(curves['biou'], BOUNDARY['fixture_dataset_biou'], rtol=0, atol=TOL)
  assert abs(result['maxBIoU'] - BOUNDARY['fixture_dataset_biou'].max()) <= TOL
  assert abs(result['meanBIoU'] - BOUNDARY['fixture_dataset_biou'].mean()) <= TOL
  assert np.isnan(BOUNDARY['fixture_dataset_mba'])
  assert abs(result['mBA'] - BOUNDARY['fixture_boundary_dataset_mba']) <= TOL
  with_boundary = set(BOUNDARY['fixture_boundary_names'])
  assert acc.without_boundary() == [p['name'] for p in PAIRS if p['name'] not in with_boundary]
  assert len(acc.without_boundary()) == 6


def test_evaluate_pairs_parallel_from_paths_and_arrays():
  """Two workers over file paths, one over arrays: identical dataset values."""
  preds = [REFERENCE / p['pred'] for p in PAIRS]
  gts = [REFERENCE / p['gt'] for p in PAIRS]
  parallel = metrics.evaluate_pairs(preds, gts, workers=2)
  for key, value in EXPECTED['dataset'].items():
    if key in parallel:
      assert abs(parallel[key] - value) <= TOL, key
  subset = [i for i, p in enumerate(PAIRS) if not p['name'].startswith('dis_large')][:6]
  arrays = metrics.evaluate_pairs([metrics.read_gray(preds[i]) for i in subset],
                                  [metrics.read_gray(gts[i]) for i in subset], workers=1)
  assert arrays['HCE'] == np.mean([PAIRS[i]['metrics']['HCE'] for i in subset])
  assert abs(arrays['Sm'] - np.mean([PAIRS[i]['metrics']['Sm'] for i in subset])) <= TOL


def test_accumulator_update_resizes_prediction_to_gt():
  index = next(i for i, p in enumerate(PAIRS) if p['name'] == 'resized_pred_down')
  pair = PAIRS[index]
  pred = metrics.read_gray(REFERENCE / pair['pred'])
  gt = metrics.read_gray(REFERENCE / pair['gt'])
  assert pred.shape != gt.shape
  acc = metrics.MetricAccumulator()
  acc.update(pred, gt, name=pair['name'])
  result = acc.result()
  assert abs(result['wFm'] - pair['metrics']['wFm']) <= TOL
  assert result['HCE'] == pair['metrics']['HCE']


def test_bad_inputs_raise_clear_errors(tmp_path):
  with pytest.raises(ValueError, match='uint8'):
    metrics.image_metrics(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8))
  with pytest.raises(ValueError, match=r'missing\.png: cannot be read as an image'):
    metrics.read_gray(tmp_path / 'missing.png')
  with pytest.raises(ValueError, match='no image'):
    metrics.MetricAccumulator().result()


# --- random inputs against the reference libraries themselves ------------------------------

def _random_pair(rng, h, w):
  gt = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), rng.uniform(1, 6)) > 0.5
  soft = cv2.GaussianBlur(gt.astype(np.float32), (0, 0), rng.uniform(0.3, 3))
  noise = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), rng.uniform(0.5, 3))
  p = np.clip(soft + rng.uniform(-0.6, 0.6) * (noise - 0.5) * 2, 0, 1)
  lo, hi = sorted(rng.integers(0, 256, 2))
  return (lo + p * (hi - lo)).astype(np.uint8), gt.astype(np.uint8) * 255


@pytest.mark.filterwarnings('ignore:This class will be removed')
def test_random_pairs_match_pysodmetrics():
  psm = pytest.importorskip('py_sod_metrics')
  rng = np.random.default_rng(0)
  for _ in range(40):
    pred, gt = _random_pair(rng, *rng.integers(12, 90, 2))
    ours = metrics.image_metrics(pred, gt, with_hce=False)
    s, f, e, wf, mae = (psm.Smeasure(), psm.Fmeasure(), psm.Emeasure(),
                        psm.WeightedFmeasure(), psm.MAE())
    for m in (s, f, e, wf, mae):
      m.step(pred, gt)
    ref_s = s.get_results()['sm']
    if np.isnan(ref_s):   # degenerate quadrant: we follow the official code (0)
      assert ours['Sm'] == 0.0
    else:
      assert abs(ours['Sm'] - ref_s) <= TOL
    assert abs(ours['wFm'] - wf.get_results()['wfm']) <= TOL
    assert abs(ours['MAE'] - mae.get_results()['mae']) <= TOL
    assert abs(ours['adpFm'] - f.get_results()['fm']['adp']) <= TOL
    assert abs(ours['adpEm'] - e.get_results()['em']['adp']) <= TOL
    np.testing.assert_allclose(ours['curves']['fm'], f.get_results()['fm']['curve'], atol=TOL)
    np.testing.assert_allclose(ours['curves']['em'], e.get_results()['em']['curve'], atol=TOL)


def test_weighted_f_measure_ties_and_far_background():
  """Equidistant GT pixels everywhere (scipy's tie order) and distances past the weight cap."""
  psm = pytest.importorskip('py_sod_metrics')
  rng = np.random.default_rng(1)
  grid = np.zeros((90, 97), np.uint8)
  grid[::6, ::5] = 255
  grid[3::12, 2::10] = 255
  far = np.zeros((620, 40), np.uint8)
  far[2:5, 10:13] = 255
  for gt in (grid, far):
    pred = (rng.random(gt.shape) * 255).astype(np.uint8)
    ref = psm.WeightedFmeasure()
    ref.step(pred, gt)
    ours = sod.weighted_f_measure(sod.normalize_prediction(pred), gt > 128)
    assert abs(ours - ref.get_results()['wfm']) <= TOL


def test_skeleton_matches_skimage():
  morphology = pytest.importorskip('skimage.morphology')
  rng = np.random.default_rng(2)
  for i in range(60):
    h, w = rng.integers(5, 70, 2)
    mask = rng.random((h, w)) < rng.uniform(0.2, 0.9)
    if i % 2:
      mask = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), rng.uniform(0.5, 3)) > 0.5
    np.testing.assert_array_equal(metrics.skeletonize(mask), morphology.skeletonize(mask))
  for pair in PAIRS:
    gt = metrics.read_gray(REFERENCE / pair['gt']) > 128
    np.testing.assert_array_equal(metrics.skeletonize(gt), morphology.skeletonize(gt),
                                  err_msg=pair['name'])


def test_hce_matches_pysodmetrics_on_binary_maps():
  """On {0, 255} maps, neither all-0 nor all-255, pysodmetrics' HCE variant and the official
  one coincide (the thresholds pred > 128 and pred / 255 > 0.5 agree; no full-image mask)."""
  psm = pytest.importorskip('py_sod_metrics')
  rng = np.random.default_rng(3)
  checked = 0
  for i in range(80):
    h, w = rng.integers(10, 90, 2)
    gt = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), rng.uniform(1, 5)) > 0.5
    soft = cv2.GaussianBlur(gt.astype(np.float32), (0, 0), rng.uniform(0.5, 3))
    soft += 0.5 * (cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 1.5) - 0.5)
    pred = np.where(soft > 0.5, 255, 0).astype(np.uint8)
    if i % 4 == 0:
      pred[rng.random((h, w)) < 0.02] = 255   # speckles: independent FP regions
    gt = gt.astype(np.uint8) * 255
    if pred.min() == pred.max() or gt.min() == gt.max():
      continue
    ref = psm.HumanCorrectionEffortMeasure()
    ref.step(pred, gt)
    assert metrics.human_correction_effort(pred, gt) == ref.get_results()['hce']
    checked += 1
  assert checked > 50

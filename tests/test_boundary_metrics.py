"""mBA and BIoU (birefnet_jax.metrics.boundary) on our own boundary cases, and their flow into
the training validation.

Golden values: tests/data/boundary_metrics_golden.npz, made by running the official BiRefNet
``MBAMeasure`` / ``BIoUMeasure`` (commit 25cb930) with tools/make_boundary_golden.py on the
cases stored there (thin structures, empty and full masks, single pixels, one-row and 3x5
images, a checkerboard, the 2 %-diagonal rounding, a 450x720 pair whose mBA radii differ). The
metric fixture pairs are checked in test_metrics.py.
"""

import pathlib

import cv2
import numpy as np
import pytest

from birefnet_jax import metrics
from birefnet_jax.metrics import boundary
from birefnet_jax.metrics import evaluation
from birefnet_jax.metrics import sod

GOLDEN = np.load(pathlib.Path(__file__).parent / 'data' / 'boundary_metrics_golden.npz')
CASES = list(GOLDEN['case_names'])
TOL = 1e-9


def case(name):
  pred = cv2.imdecode(GOLDEN[f'case_pred/{name}'], cv2.IMREAD_UNCHANGED)
  gt = cv2.imdecode(GOLDEN[f'case_gt/{name}'], cv2.IMREAD_UNCHANGED)
  return pred.reshape(gt.shape), gt


def assert_equals_official(index, mba, biou):
  official_mba = GOLDEN['case_mba'][index]
  if np.isnan(official_mba):
    assert mba is None
  else:
    assert mba is not None and abs(mba - official_mba) <= TOL, (mba, official_mba)
  np.testing.assert_allclose(biou, GOLDEN['case_biou'][index], rtol=0, atol=TOL)


@pytest.mark.filterwarnings('ignore:Mean of empty slice')   # Sm of the one-row case
@pytest.mark.parametrize('index', range(len(CASES)), ids=CASES)
def test_boundary_cases_equal_the_official_code(index):
  pred, gt = case(CASES[index])
  result = metrics.image_metrics(pred, gt, with_hce=False)
  assert_equals_official(index, result['mBA'], result['curves']['biou'])
  assert abs(result['maxBIoU'] - GOLDEN['case_biou'][index].max()) <= TOL


def test_cases_cover_what_they_claim():
  """The golden cases hold the edge cases named in the issue (a check of the data file)."""
  mba = dict(zip(CASES, GOLDEN['case_mba']))
  for name in ('empty_gt_zero_pred', 'empty_gt_full_pred', 'full_gt_full_pred',
               'full_gt_zero_pred'):
    assert np.isnan(mba[name]), name     # no GT boundary: the official 0/0
  assert mba['thin_lines_exact'] == 1.0
  pred, gt = case('large_450x720')
  assert len(set(boundary.mba_radii(*gt.shape))) == 3
  assert boundary.biou_dilation(*case('diagonal_125')[1].shape) == 2   # round(2.5): half to even
  assert case('one_row')[1].shape == (1, 40)


def test_large_images_count_with_numpy(monkeypatch):
  """Above 2**24 pixels the histogram is counted with numpy (cv2's float32 counts would round):
  the same values, checked here by forcing that path on the cases."""
  monkeypatch.setattr(boundary, '_EXACT_FLOAT32_COUNT', 0)
  for index, name in enumerate(CASES):
    pred, gt = case(name)
    curve = boundary.boundary_iou_curve(pred, sod.binarize_gt(gt), sod.value_table(pred))
    assert_equals_official(index, boundary.boundary_accuracy(pred, gt), curve)


def test_dataset_mba_without_any_boundary_is_none():
  acc = metrics.MetricAccumulator(with_hce=False)
  for name in ('empty_gt_zero_pred', 'full_gt_soft_pred'):
    acc.update(*case(name), name=name)
  result = acc.result()
  assert result['mBA'] is None
  assert acc.without_boundary() == ['empty_gt_zero_pred', 'full_gt_soft_pred']
  expected = np.mean([GOLDEN['case_biou'][CASES.index(n)]
                      for n in ('empty_gt_zero_pred', 'full_gt_soft_pred')], axis=0)
  assert abs(result['maxBIoU'] - expected.max()) <= TOL
  acc.update(*case('thin_ring_1px_soft'), name='ring')   # one image with a boundary: its mBA
  assert abs(acc.result()['mBA'] - GOLDEN['case_mba'][CASES.index('thin_ring_1px_soft')]) <= TOL


def _tiny_validation_config():
  from birefnet_jax import recipes  # pylint: disable=g-import-not-at-top
  config = recipes.recipe('DIS5K', image_size=(32, 32), epochs=1)
  config.data.update(dict(source='synthetic', train_sets='synthetic-train',
                          val_sets='synthetic-val', synthetic_val_examples=3, num_workers=0))
  config.eval_batch_size_per_device = 2
  config.max_eval_images = 0
  return config


def test_training_validation_reports_boundary_metrics(monkeypatch):
  """train.evaluate scores mBA / maxBIoU / meanBIoU like the other metrics, and leaves out a
  metric that is undefined (mBA when no GT of the set has a boundary)."""
  import jax  # pylint: disable=g-import-not-at-top
  from birefnet_jax import inference, sharding, train  # pylint: disable=g-import-not-at-top
  from birefnet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _tiny_validation_config()
  mesh = sharding.make_mesh()
  # A stand-in for the model: a fixed function of the image (the metrics are what is tested).
  predict = jax.jit(lambda state, images: jax.nn.sigmoid(4 * images.mean(axis=-1)))
  results, _ = train.evaluate(predict, None, config, mesh)
  acc = metrics.MetricAccumulator()
  for example in pipeline.eval_examples(config.data, 'synthetic-val'):
    prob = np.asarray(predict(None, example['image'][None].astype(np.float32)))[0]
    gt = example['mask_uint8']
    acc.update(inference.probabilities_to_mask(prob, gt.shape), gt)
  expected = acc.result()
  for key in ('mBA', 'maxBIoU', 'meanBIoU'):
    assert 0 < results[f'synthetic-val/{key}'] <= 1
    assert abs(results[f'synthetic-val/{key}'] - expected[key]) <= TOL, key
  monkeypatch.setattr(evaluation.boundary, 'boundary_accuracy', lambda pred, gt: None)
  results, _ = train.evaluate(predict, None, config, mesh)
  assert 'synthetic-val/mBA' not in results and 'synthetic-val/maxBIoU' in results

"""``python -m birefnet_jax.evaluate`` on the metric fixtures.

Expected dataset values come from the fixture (expected.json, curves.npz): for a subset of
pairs, mean-type metrics are the mean of the fixture's per-image values and max/mean F/E come
from the mean of the fixture's per-image curves.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from birefnet_jax import evaluate

import reference

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = reference.REFERENCE / 'metrics'
EXPECTED = json.loads((REFERENCE / 'expected.json').read_text())
CURVES = np.load(REFERENCE / 'curves.npz')
NAMES = [p['name'] for p in EXPECTED['pairs']]
TOL = 1e-9


def expected_for(names):
  """Dataset values of a subset of the fixture pairs, from the fixture's per-image data."""
  rows = [NAMES.index(n) for n in names]
  pairs = [EXPECTED['pairs'][i] for i in rows]
  out = {k: float(np.mean([p['metrics'][k] for p in pairs]))
         for k in ('Sm', 'MAE', 'adpFm', 'wFm', 'adpEm', 'HCE')}
  fm = CURVES['per_image_fm'][rows].mean(axis=0)
  em = CURVES['per_image_em'][rows].mean(axis=0)
  out.update(maxFm=fm.max(), meanFm=fm.mean(), maxEm=em.max(), meanEm=em.mean(),
             n_images=len(rows))
  return out


def assert_close(result, expected):
  assert set(result) == set(evaluate.evaluation.METRIC_KEYS)
  assert result['n_images'] == expected['n_images']
  for key, value in expected.items():
    assert abs(result[key] - value) <= TOL, (key, result[key], value)


def copy_pairs(names, gt_dir, pred_dir):
  gt_dir.mkdir(parents=True)
  pred_dir.mkdir(parents=True)
  for n in names:
    shutil.copy(REFERENCE / 'gt' / f'{n}.png', gt_dir)
    shutil.copy(REFERENCE / 'pred' / f'{n}.png', pred_dir)


def test_whole_fixture_json_equals_expected(tmp_path, capsys):
  out = tmp_path / 'res' / 'metrics.json'
  evaluate.main(['--pred_dir', str(REFERENCE / 'pred'), '--gt_dir', str(REFERENCE / 'gt'),
                 '--json', str(out), '--workers', '2'])
  result = json.loads(out.read_text())
  expected = dict(EXPECTED['dataset'], n_images=len(NAMES))
  expected.pop('HCE_pysodmetrics')
  assert list(result) == ['Sm', 'MAE', 'maxFm', 'meanFm', 'adpFm', 'wFm', 'maxEm', 'meanEm',
                          'adpEm', 'HCE', 'n_images']
  assert_close(result, expected)
  captured = capsys.readouterr()
  assert 'images/s' in captured.err
  # The paper's DIS5K column order, values <= 1 printed as .xxx, HCE as an integer.
  header = next(l for l in captured.out.splitlines() if 'Dataset' in l)
  columns = [c.strip() for c in header.strip('& ').split('&')]
  assert columns[:11] == ['Dataset', 'maxFm', 'wFmeasure', 'MAE', 'Smeasure', 'meanEm', 'HCE',
                          'maxEm', 'meanFm', 'adpEm', 'adpFm']
  row = next(l for l in captured.out.splitlines() if l.startswith('& metrics'))
  cells = [c.strip() for c in row.strip('& ').split('&')]
  assert cells[1] == '.674' and cells[6] == '156'


def test_multi_dataset_layouts_one_row_each(tmp_path, capsys):
  small = [n for n in NAMES if not n.startswith('dis_large')]
  split = {'DIS-TE1': small[:5], 'DIS-TE2': small[5:9]}
  # DIS-TE1 in the DIS5K layout (DATASET/gt/), DIS-TE2 with images directly in DATASET/.
  copy_pairs(split['DIS-TE1'], tmp_path / 'G' / 'DIS-TE1' / 'gt', tmp_path / 'P' / 'DIS-TE1')
  copy_pairs(split['DIS-TE2'], tmp_path / 'G' / 'DIS-TE2', tmp_path / 'P' / 'DIS-TE2')
  (tmp_path / 'G' / 'empty').mkdir()   # not a dataset: no images
  out = tmp_path / 'multi.json'
  evaluate.main(['--pred_dir', str(tmp_path / 'P'), '--gt_dir', str(tmp_path / 'G'),
                 '--json', str(out), '--workers', '1', '--quiet'])
  result = json.loads(out.read_text())
  assert sorted(result) == ['DIS-TE1', 'DIS-TE2']
  for name, names in split.items():
    assert_close(result[name], expected_for(names))
  rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith('& DIS-')]
  assert [r.split('&')[1].strip() for r in rows] == ['DIS-TE1', 'DIS-TE2']


def test_missing_prediction_errors_or_skips(tmp_path, capsys):
  names = [n for n in NAMES if not n.startswith('dis_large')][:4]
  copy_pairs(names, tmp_path / 'gt', tmp_path / 'pred')
  (tmp_path / 'pred' / f'{names[1]}.png').unlink()
  args = ['--pred_dir', str(tmp_path / 'pred'), '--gt_dir', str(tmp_path / 'gt'),
          '--workers', '1', '--quiet']
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(args)
  assert exit_info.value.code == 1
  assert re.search(f'^error: .*1 of 4 GT images have no prediction.*{names[1]}',
                   capsys.readouterr().err, re.MULTILINE)
  out = tmp_path / 'skip.json'
  evaluate.main(args + ['--skip_missing', '--json', str(out)])
  assert 'WARNING' in capsys.readouterr().err
  kept = [n for n in names if n != names[1]]
  assert_close(json.loads(out.read_text()), expected_for(kept))


def test_module_entry_point(tmp_path):
  names = ['resized_pred_down', 'resized_pred_up', 'tiny_object']
  copy_pairs(names, tmp_path / 'gt', tmp_path / 'pred')
  out = tmp_path / 'cli.json'
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run(
      [sys.executable, '-m', 'birefnet_jax.evaluate', '--pred_dir', str(tmp_path / 'pred'),
       '--gt_dir', str(tmp_path / 'gt'), '--json', str(out), '--workers', '2'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert_close(json.loads(out.read_text()), expected_for(names))

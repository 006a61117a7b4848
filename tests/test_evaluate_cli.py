"""``python -m birefnet_jax.evaluate`` on the metric fixtures.

Expected dataset values come from the fixture (expected.json, curves.npz) and, for mBA and
BIoU, from the official code's values in tests/data/boundary_metrics_golden.npz: for a subset of
pairs, mean-type metrics are the mean of the fixture's per-image values (mBA: over the pairs
whose GT has a boundary) and max/mean F/E/BIoU come from the mean of the per-image curves.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from birefnet_jax import curve_plots
from birefnet_jax import evaluate

import reference

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = reference.REFERENCE / 'metrics'
EXPECTED = json.loads((REFERENCE / 'expected.json').read_text())
CURVES = np.load(REFERENCE / 'curves.npz')
NAMES = [p['name'] for p in EXPECTED['pairs']]
BOUNDARY = np.load(pathlib.Path(__file__).parent / 'data' / 'boundary_metrics_golden.npz')
TOL = 1e-9


def expected_for(names):
  """Dataset values of a subset of the fixture pairs, from the fixture's per-image data."""
  rows = [NAMES.index(n) for n in names]
  pairs = [EXPECTED['pairs'][i] for i in rows]
  out = {k: float(np.mean([p['metrics'][k] for p in pairs]))
         for k in ('Sm', 'MAE', 'adpFm', 'wFm', 'adpEm', 'HCE')}
  fm = CURVES['per_image_fm'][rows].mean(axis=0)
  em = CURVES['per_image_em'][rows].mean(axis=0)
  biou = BOUNDARY['fixture_biou'][rows].mean(axis=0)
  mba = [v for v in BOUNDARY['fixture_mba'][rows] if not np.isnan(v)]
  out.update(maxFm=fm.max(), meanFm=fm.mean(), maxEm=em.max(), meanEm=em.mean(),
             maxBIoU=biou.max(), meanBIoU=biou.mean(), mBA=np.mean(mba) if mba else None,
             n_images=len(rows))
  return out


def assert_close(result, expected):
  assert set(result) == set(evaluate.evaluation.METRIC_KEYS)
  assert result['n_images'] == expected['n_images']
  for key, value in expected.items():
    if value is None:
      assert result[key] is None, key
    else:
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
  expected = dict(EXPECTED['dataset'], n_images=len(NAMES),
                  mBA=float(BOUNDARY['fixture_boundary_dataset_mba']),
                  maxBIoU=BOUNDARY['fixture_dataset_biou'].max(),
                  meanBIoU=BOUNDARY['fixture_dataset_biou'].mean())
  expected.pop('HCE_pysodmetrics')
  assert list(result) == ['Sm', 'MAE', 'maxFm', 'meanFm', 'adpFm', 'wFm', 'maxEm', 'meanEm',
                          'adpEm', 'HCE', 'mBA', 'maxBIoU', 'meanBIoU', 'n_images']
  assert_close(result, expected)
  captured = capsys.readouterr()
  assert 'images/s' in captured.err
  # The paper's DIS5K column order, values <= 1 printed as .xxx, HCE as an integer.
  header = next(l for l in captured.out.splitlines() if 'Dataset' in l)
  columns = [c.strip() for c in header.strip('& ').split('&')]
  assert columns == ['Dataset', 'maxFm', 'wFmeasure', 'MAE', 'Smeasure', 'meanEm', 'HCE',
                     'maxEm', 'meanFm', 'adpEm', 'adpFm', 'mBA', 'maxBIoU', 'meanBIoU', 'n']
  row = next(l for l in captured.out.splitlines() if l.startswith('& metrics'))
  cells = [c.strip() for c in row.strip('& ').split('&')]
  assert cells[1] == '.674' and cells[6] == '156'
  # mBA over the 29 pairs with a GT boundary (official: .714 over those; NaN over all 35).
  assert cells[11:14] == ['.714', '.516', '.417']
  assert re.search(r'warning: dataset metrics: 6 of 35 GT images have no boundary', captured.err)


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


def png_size(path):
  """(width, height) from a PNG's signature and IHDR chunk; fails on anything else."""
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR', path
  return int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')


def test_plot_writes_the_curves_of_each_dataset(tmp_path):
  pytest.importorskip('matplotlib')
  split = {'DIS-TE1': ['realistic_1', 'realistic_2', 'thin_lines_only'],
           'DIS-TE2': ['soft_blur_heavy', 'tiny_object']}
  for name, names in split.items():
    copy_pairs(names, tmp_path / 'G' / name / 'gt', tmp_path / 'P' / name)
  plots = tmp_path / 'plots'
  evaluate.main(['--pred_dir', str(tmp_path / 'P'), '--gt_dir', str(tmp_path / 'G'),
                 '--plot', str(plots), '--workers', '1', '--quiet', '--no_hce'])
  assert sorted(p.name for p in plots.iterdir()) == sorted(
      f'{d}_{f}' for d in split for f in ('precision_recall.png', 'f_measure.png',
                                          'e_measure.png', 'curves.json'))
  for name, names in split.items():
    for kind in ('precision_recall', 'f_measure', 'e_measure'):
      path = plots / f'{name}_{kind}.png'
      assert png_size(path) == curve_plots.FIGURE_SIZE_PX
      image = cv2.imread(str(path))
      assert image.shape == curve_plots.FIGURE_SIZE_PX[::-1] + (3,) and image.std() > 10
    # The plotted numbers: the mean of the fixture's per-image curves over the dataset.
    data = json.loads((plots / f'{name}_curves.json').read_text())
    rows = [NAMES.index(n) for n in names]
    assert data['thresholds'] == list(range(255, -1, -1))
    for key in ('precision', 'recall', 'fm', 'em'):
      np.testing.assert_allclose(data[key], CURVES[f'per_image_{key}'][rows].mean(axis=0),
                                 rtol=0, atol=TOL, err_msg=key)


def test_plot_figures_hold_the_curves():
  """Each figure's line is the data set's curve: recall -> precision, thresholds -> F and E."""
  pytest.importorskip('matplotlib')
  curves = {'precision': CURVES['precision_curve'], 'recall': CURVES['recall_curve'],
            'fm': CURVES['fm_curve'], 'em': CURVES['em_curve']}
  figures = curve_plots.curve_figures(curves, 'metrics')
  levels = np.arange(255, -1, -1)
  for kind, (x, y) in {'precision_recall': (curves['recall'], curves['precision']),
                       'f_measure': (levels, curves['fm']),
                       'e_measure': (levels, curves['em'])}.items():
    line = figures[kind].axes[0].lines[0]
    np.testing.assert_array_equal(line.get_xdata(), x)
    np.testing.assert_array_equal(line.get_ydata(), y)
    width, height = figures[kind].get_size_inches() * figures[kind].dpi
    assert (round(width), round(height)) == curve_plots.FIGURE_SIZE_PX


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'matplotlib', None)   # import matplotlib -> ImportError
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(['--pred_dir', str(REFERENCE / 'pred'), '--gt_dir', str(REFERENCE / 'gt'),
                   '--plot', str(tmp_path / 'plots')])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert re.search(r'^error: --plot needs matplotlib, which is not installed$', err, re.MULTILINE)
  assert "pip install 'birefnet_jax[plot]'" in err
  assert not (tmp_path / 'plots').exists()

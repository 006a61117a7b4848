"""Smoke test of tools/bench_model.py: one tiny run end to end, JSON fields present (no timings
are asserted), and the clear message when the official checkout cannot be used."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'bench_model.py'


@pytest.fixture(scope='module')
def bench():
  spec = importlib.util.spec_from_file_location('bench_model', TOOL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _smaller_tiny(bench):
  """The tool's 'tiny' model cut further (one block per stage, single-scale input), so that the
  train step compiles in about a minute on 2 CPU cores."""
  from birefnet_jax.models import config as config_lib
  tiny = bench.tiny_model_config

  def make(dtype='float32'):
    cfg = tiny(dtype)
    cfg.backbone = config_lib.swin_config(8, (1, 1, 1, 1), (1, 2, 4, 8), 7)
    cfg.mul_scl_ipt = ''
    return cfg

  return make


def test_train_run_writes_json_rows(bench, tmp_path, monkeypatch):
  monkeypatch.setattr(bench, 'tiny_model_config', _smaller_tiny(bench))
  out = tmp_path / 'bench.json'
  not_a_checkout = tmp_path / 'empty'
  not_a_checkout.mkdir()
  result = bench.main(['--preset=tiny', '--sizes=64', '--batch_sizes=2', '--dtypes=float32',
                       '--modes=train', '--repeats=1', '--warmup=1', '--fast_compile',
                       '--max_batch_search', '--remat',
                       '--no_deform_conv', f'--torch-official={not_a_checkout}',
                       f'--json={out}'])
  written = json.loads(out.read_text())
  assert written['device']['platform'] == result['device']['platform']
  jax_rows = [r for r in written['rows'] if r['impl'] == 'jax']
  assert [(r['mode'], r['size'], r['batch'], r['dtype'], r['remat']) for r in jax_rows] == [
      ('train', '64x64', 2, 'float32', False), ('train', '64x64', 2, 'float32', True)]
  for r in jax_rows:
    assert r['status'] == 'ok', r
    for key in ('median_ms', 'images_per_s', 'compile_s', 'gflops', 'compiled_mem_gib'):
      assert isinstance(r[key], (int, float)) and r[key] > 0, (key, r)
    assert 'peak_mem_gib' in r and 'tflops_per_s' in r
    assert math.isfinite(r['loss'])
  # The remat row really recomputes: its program does the forward of the blocks twice.
  plain, remat = jax_rows
  assert remat['gflops'] > plain['gflops'] * 1.1, (plain['gflops'], remat['gflops'])
  torch_rows = [r for r in written['rows'] if r['impl'] == 'torch-official']
  assert len(torch_rows) == 1 and 'not a checkout of the official BiRefNet' in \
      torch_rows[0]['status']
  if written['device']['platform'] == 'cpu':
    assert written['max_batch'] == []
    assert any('max batch search skipped' in n for n in written['notes'])


def test_bad_arguments_fail_clearly(bench):
  with pytest.raises(SystemExit, match='multiples of 32'):
    bench.parse_size('100')
  with pytest.raises(SystemExit, match='unknown dtype'):
    bench.main(['--preset=tiny', '--dtypes=float8'])
  with pytest.raises(ValueError, match='unknown backbone preset'):
    bench.main(['--preset=swin_v9'])
  with pytest.raises(SystemExit, match='unknown remat policy'):
    bench.main(['--preset=tiny', '--remat', '--remat_policy=save_everything_please'])

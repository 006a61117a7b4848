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
                       f'--json={out}', f'--jsonl={tmp_path / "rows.jsonl"}'])
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
  # The remat row really recomputes: its program (XLA's count) does the forward of the blocks
  # twice; the analytic model FLOPs (MFU's numerator) are the same for both.
  plain, remat = jax_rows
  assert remat['xla_gflops'] > plain['xla_gflops'] * 1.1, (plain, remat)
  assert remat['gflops'] == plain['gflops']
  assert plain['attention'] == 'sdpa->xla'   # the default matches the official SDPA
  # Every row was also written as a JSON line the moment it was measured.
  lines = [json.loads(line) for line in (tmp_path / 'rows.jsonl').read_text().splitlines()]
  assert [r['impl'] for r in lines] == ['torch-official', 'jax', 'jax']
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
  with pytest.raises(SystemExit, match='unknown attention'):
    bench.main(['--preset=tiny', '--attention=flash'])


def test_bounded_max_batch_search(bench):
  """Doubling from the start, halving from a first failure, bisection, at most N tries."""
  import argparse  # pylint: disable=import-outside-toplevel
  cfg = bench.make_model_config('tiny', 'float32', remat=True, attention='einsum')

  def search(fits_up_to, start, tries, limit=256):
    args = argparse.Namespace(preset='tiny', max_batch_limit=limit, max_batch_start=start,
                              max_batch_tries=tries)
    return bench.max_batch_search(args, cfg, (64, 64), try_batch=lambda b: b <= fits_up_to,
                                  bytes_limit=1)

  r = search(37, 16, 0)
  assert (r['max_batch'], r['first_oom'], r['settled']) == (37, 38, True)
  assert [b for b, _ in r['tried']][:3] == [16, 32, 64]
  r = search(37, 16, 3)
  assert (r['max_batch'], r['first_oom'], r['settled']) == (32, 64, False)
  r = search(5, 16, 3)                      # the guess fails: halve, then bisect
  assert r['tried'] == [(16, False), (8, False), (4, True)] and r['max_batch'] == 4
  r = search(300, 128, 0)
  assert r['max_batch'] == 256 and r['hit_limit']
  assert bench.resolve_attention('sdpa', 'bfloat16', 'gpu') == 'cudnn'
  assert bench.resolve_attention('sdpa', 'float32', 'gpu') == 'xla'
  assert bench.resolve_attention('sdpa', 'bfloat16', 'cpu') == 'xla'
  assert bench.resolve_attention('einsum', 'bfloat16', 'gpu') == 'einsum'
  assert bench.default_peak_tflops('NVIDIA H200', 'bfloat16') == 790.0

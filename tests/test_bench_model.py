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
                       '--max_batch_search',
                       '--no_deform_conv', f'--torch-official={not_a_checkout}',
                       f'--json={out}'])
  written = json.loads(out.read_text())
  assert written['device']['platform'] == result['device']['platform']
  jax_rows = [r for r in written['rows'] if r['impl'] == 'jax']
  assert len(jax_rows) == 1
  r = jax_rows[0]
  assert r['status'] == 'ok', r
  assert (r['mode'], r['size'], r['batch'], r['dtype'], r['remat']) == (
      'train', '64x64', 2, 'float32', False)
  for key in ('median_ms', 'images_per_s', 'compile_s', 'gflops', 'compiled_mem_gib'):
    assert isinstance(r[key], (int, float)) and r[key] > 0, (key, r)
  assert 'peak_mem_gib' in r and 'tflops_per_s' in r
  assert math.isfinite(r['loss'])
  torch_rows = [r for r in written['rows'] if r['impl'] == 'torch-official']
  assert len(torch_rows) == 1 and 'not a checkout of the official BiRefNet' in \
      torch_rows[0]['status']
  if written['device']['platform'] == 'cpu':
    assert written['max_batch'] == []
    assert any('max batch search skipped' in n for n in written['notes'])


def test_remat_recomputes_backbone_blocks(bench):
  """Inside the swap, the gradient program recomputes the blocks: more FLOPs, same gradient;
  outside it, the model is the original again."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from birefnet_jax.models import pvt_v2, swin

  model = swin.SwinTransformer(embed_dim=8, depths=(2,), num_heads=(1,), window_size=4)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 32, 3), dtype=np.float32))
  params = model.init(jax.random.PRNGKey(0), x)

  def grad_program():
    loss = lambda p: sum(jnp.sum(f ** 2) for f in model.apply(p, x))
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled, bench.compiled_costs(compiled)[0]

  before = (swin.SwinBlock, pvt_v2.Block)
  plain, plain_flops = grad_program()
  with bench.remat_backbone_blocks('nothing_saveable'):
    assert swin.SwinBlock is not before[0] and pvt_v2.Block is not before[1]
    remat, remat_flops = grad_program()
  assert (swin.SwinBlock, pvt_v2.Block) == before
  assert remat_flops > plain_flops
  # Same gradient up to float32 reassociation (XLA fuses the recomputed program differently).
  for a, b in zip(jax.tree.leaves(plain(params)), jax.tree.leaves(remat(params))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(a).max()) + 1e-12)


def test_bad_arguments_fail_clearly(bench):
  with pytest.raises(SystemExit, match='multiples of 32'):
    bench.parse_size('100')
  with pytest.raises(SystemExit, match='unknown dtype'):
    bench.main(['--preset=tiny', '--dtypes=float8'])
  with pytest.raises(ValueError, match='unknown backbone preset'):
    bench.main(['--preset=swin_v9'])

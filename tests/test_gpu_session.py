"""The GPU session's dry run, exactly as CI runs it: ``tools/gpu_session.sh --dry-run`` as a
subprocess, then its JSON lines and its Markdown table.

The official model's rows are checked when the official code and its packages are there
(``.official`` or $BIREFNET_OFFICIAL, torch, timm, kornia, ...); otherwise the run must say why
they were skipped, and everything of ours must still have run.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_step(tmp_path):
  out = tmp_path / 'results'
  env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  proc = subprocess.run(['bash', str(ROOT / 'tools' / 'gpu_session.sh'), '--dry-run'], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=1800)
  log = (out / 'session.log').read_text() if (out / 'session.log').exists() else ''
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

  lines = (out / 'rows.jsonl').read_text().splitlines()
  rows = [json.loads(line) for line in lines]          # every line is one JSON object
  ends = {r['mode']: r for r in rows if r.get('impl') == 'step'}
  assert list(ends) == ['env', 'deform', 'infer', 'train', 'max_batch'], ends
  for name, end in ends.items():
    assert end['status'] == f"ok ({end['seconds']:.0f} s)", (name, end, log[-3000:])

  by_step = lambda step, impl: [r for r in rows if r['step'] == step and r.get('impl') == impl]
  env_row, = by_step('env', 'env')
  assert env_row['jax_platform'] == 'cpu' and env_row['jax'] and env_row['python']
  probe, = by_step('env', 'scatter-add probe')
  assert probe['status'].startswith('ok') and probe['median_ms'] > 0

  deform = by_step('deform', 'jax-deform') + by_step('deform', 'jax-conv')
  assert sorted({(r['kernel'], r['dtype'], r['mode']) for r in deform}) == sorted(
      (k, d, m) for k in (1, 3, 7) for d in ('float32', 'bfloat16') for m in ('fwd', 'fwd+bwd'))
  assert all(r['status'] == 'ok' and r['median_ms'] > 0 and r['gflops'] > 0 for r in deform)
  torch_deform = by_step('deform', 'torch-deform')
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
    assert len(torch_deform) == 6 and all(r['status'].startswith('ok') for r in torch_deform)
  except ImportError:
    assert all(r['status'].startswith('error') for r in torch_deform)

  infer = by_step('infer', 'jax')
  assert [(r['batch'], r['attention']) for r in infer] == [(2, 'einsum'), (2, 'sdpa->xla')]
  train = by_step('train', 'jax')
  assert [(r['batch'], r['remat']) for r in train] == [(2, False)]
  for r in infer + train:
    assert r['status'] == 'ok', r
    # Analytic FLOPs (3x the forward for a step) beside XLA's own count.
    assert r['gflops'] > 0 and r['xla_gflops'] > 0 and r['tflops_per_s'] > 0
  assert math.isfinite(train[0]['loss'])
  assert train[0]['gflops'] > 2 * infer[0]['gflops']
  searched, = [r for r in rows if r['step'] == 'max_batch' and r.get('impl') == 'jax']
  assert searched['batch'] == 2 and searched['tried'] == [[2, True]]

  for step in ('infer', 'train'):
    official = [r for r in rows if r['step'] == step and r.get('impl', '').startswith('torch-')]
    assert official, step
    if any(r['status'].startswith('skipped') for r in official):
      assert len(official) == 1   # one row that says why (no checkout, a missing package)
    else:
      assert all(r['status'].startswith('ok') and r['median_ms'] > 0 and r['gflops'] > 0
                 for r in official), official

  table = (out / 'table.md').read_text()
  assert table.strip() in proc.stdout
  body = [line for line in table.splitlines() if line.startswith('| ')]
  assert body[0].startswith('| step | impl | mode |') and 'MFU' in body[0]
  assert len(body) == 1 + sum(1 for r in rows if r.get('impl') != 'env')
  assert table.startswith('Environment: ')


def test_max_batch_guess():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location('gpu_session', ROOT / 'tools' / 'gpu_session.py')
  session = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(session)
  gib = 2**30
  row = lambda b, m, remat=True: dict(step='train', impl='jax', remat=remat, status='ok',
                                      batch=b, compiled_mem_gib=m)
  # 4 GiB fixed + 2 GiB per image; 85 % of 100 GiB -> (85 - 4) / 2 = 40.
  assert session.max_batch_guess([row(2, 8), row(4, 12), row(4, 50, remat=False)],
                                 100 * gib) == 40
  assert session.max_batch_guess([row(2, 8)], 100 * gib) == 21      # 4 GiB per image
  assert session.max_batch_guess([], 100 * gib) == 16
  assert session.max_batch_guess([row(2, 8)], None) == 16

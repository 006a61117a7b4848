"""The training loop end to end on the quickstart config (synthetic data, tiny BiRefNet):
it lowers the loss, writes metrics.jsonl / TensorBoard / checkpoints, and a run restarted from its
checkpoint logs exactly the losses of an uninterrupted run."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def quickstart_config(**overrides):
  # Loaded by path: configs/ on sys.path would let configs/dis.py shadow the stdlib's dis.
  spec = importlib.util.spec_from_file_location('quickstart_config', ROOT / 'configs/quickstart.py')
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  config = quickstart.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


# Small images and no grain workers keep the runs quick; the architecture is the quickstart one.
FAST = ('--config.data.image_size=(64, 64)', '--config.data.num_workers=0',
        '--config.data.synthetic_val_examples=8')


def run_main(workdir, cache_dir, *flags, stderr=False):
  """``python -m birefnet_jax.main --config configs/quickstart.py`` in a fresh process."""
  pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH')) if p)
  env = dict(os.environ, PYTHONPATH=pythonpath, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),   # later runs skip most compilation
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  cmd = [sys.executable, '-m', 'birefnet_jax.main', '--config', str(ROOT / 'configs/quickstart.py'),
         '--workdir', str(workdir), *FAST, *flags]
  proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True,
                        timeout=1800, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return (proc.stdout, proc.stderr) if stderr else proc.stdout


def read_jsonl(workdir, kind):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


def test_quickstart_lowers_its_loss_and_writes_its_outputs(tmp_path, cache_dir):
  workdir = tmp_path / 'run'
  out = run_main(workdir, cache_dir, '--config.total_steps=60', '--config.log_every=15',
                 '--config.eval_every=60', '--config.ckpt_every=30',
                 '--config.num_sample_images=2')
  assert 'step 60/60' in out and 'img/s' in out and 'ETA' in out
  # One input shape: the train step compiled once, and the log says so.
  assert re.search(r'step 1: training shape 64x64 \(HxW\) compiled in [0-9.]+s; '
                   r'1 compiled shape\(s\)\n', out), out[:3000]
  assert out.count('compiled shape(s)') == 1
  logs = read_jsonl(workdir, 'train')
  assert [r['step'] for r in logs] == [15, 30, 45, 60]
  for r in logs:
    assert {'loss', 'loss_pix', 'loss_gdt', 'lr', 'steps_per_sec', 'images_per_sec'} <= set(r)
    assert np.isfinite(r['loss'])
  losses = [r['loss'] for r in logs]
  # Mean loss of steps 46..60 clearly below that of steps 1..15.
  assert losses[-1] < 0.85 * losses[0], losses
  val = read_jsonl(workdir, 'val')
  assert [v['step'] for v in val] == [60]
  assert val[0]['synthetic-val/n_images'] == 8 and 0 <= val[0]['synthetic-val/Sm'] <= 1
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['30', '60']
  assert any(f.startswith('events') for f in os.listdir(workdir / 'tensorboard'))
  assert (workdir / 'samples' / 'step_60.png').is_file()

  # The workdir is a checkpoint: the model from model_config.json, the weights of the checkpoint
  # chosen (best by validation Sm: only step 60 was validated; 'latest'; a step number), and the
  # training resolution.
  from birefnet_jax import model_loading
  loaded = model_loading.load(workdir)
  assert loaded.resolution == (64, 64) and 'step 60, best Sm' in loaded.description
  assert loaded.model.cfg.backbone.embed_dim == quickstart_config().model.backbone.embed_dim
  assert model_loading.choose_step(str(workdir), 'latest') == (60, 'latest')
  older = model_loading.load(workdir, step=30)
  assert 'step 30' in older.description
  # Two checkpoints of different steps hold different weights; the best is the one of step 60.
  kernel = lambda v: np.asarray(v['params']['decoder']['conv_out1_0']['kernel'])
  assert not np.array_equal(kernel(older.variables), kernel(loaded.variables))
  with pytest.raises(FileNotFoundError, match='no checkpoint of step 45; saved steps: 30, 60'):
    model_loading.load(workdir, step=45)

  # A second start of the finished run does nothing and says so.
  again = run_main(workdir, cache_dir, '--config.total_steps=60')
  assert 'this run is already complete' in again and 'step 60' in again
  assert len(read_jsonl(workdir, 'train')) == 4


def test_init_from_a_training_workdir(tmp_path, cache_dir):
  """config.init_from takes a training workdir (fine-tuning from one's own run): every array
  is loaded, and the first logged loss is that of the trained weights, not of a random init."""
  source, tuned, fresh = tmp_path / 'source', tmp_path / 'tuned', tmp_path / 'fresh'
  common = ('--config.log_every=1', '--config.eval_every=-1', '--config.eval_at_end=False',
            '--config.ckpt_every=1000')
  run_main(source, cache_dir, '--config.total_steps=20', *common)
  out = run_main(tuned, cache_dir, '--config.total_steps=1', f'--config.init_from={source}', *common)
  loaded = re.search(r'init_from \S+: loaded (\d+)/(\d+) arrays; missing 0, unexpected 0, '
                     r'shape mismatch 0', out)
  assert loaded and loaded.group(1) == loaded.group(2), out[-2000:]
  run_main(fresh, cache_dir, '--config.total_steps=1', *common)
  # Both first steps see the same batch (same seed): only the starting weights differ, and the
  # trained ones score clearly better (20 steps lower the quickstart loss by ~15%).
  first_tuned, first_fresh = read_jsonl(tuned, 'train')[0]['loss'], read_jsonl(fresh, 'train')[0]['loss']
  assert first_tuned < 0.95 * first_fresh, (first_tuned, first_fresh)


def test_restart_from_checkpoint_logs_the_same_losses(tmp_path, cache_dir):
  # The quickstart model has drop-path on: its random keys must follow the step too.
  common = ('--config.log_every=1', '--config.ckpt_every=3', '--config.eval_every=-1',
            '--config.eval_at_end=False')
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  run_main(straight, cache_dir, '--config.total_steps=6', *common)
  # A run that ends after step 3 (its last checkpoint), restarted in the same workdir.
  run_main(resumed, cache_dir, '--config.total_steps=3', *common)
  out = run_main(resumed, cache_dir, '--config.total_steps=6', *common)
  assert 'resumed from the checkpoint of step 3' in out
  a = {r['step']: r for r in read_jsonl(straight, 'train')}
  b = {r['step']: r for r in read_jsonl(resumed, 'train')}
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for step in range(1, 7):
    for name in ('loss', 'loss_pix', 'loss_gdt', 'grad_norm', 'lr'):
      np.testing.assert_allclose(b[step][name], a[step][name], rtol=1e-6,
                                 err_msg=f'{name} at step {step}')
  # Every step sees another batch: a data order off by one would show.
  assert len({round(r['loss'], 4) for r in a.values()}) == 6


def test_grain_workers_leave_no_shared_memory_behind(tmp_path, cache_dir):
  """With grain worker processes, batches arrive in shared memory blocks; every one must be
  unlinked by the end (Python's resource tracker warns about each one left)."""
  _, err = run_main(tmp_path / 'run', cache_dir, '--config.total_steps=4',
                    '--config.data.num_workers=1', '--config.eval_every=-1',
                    '--config.eval_at_end=False', stderr=True)
  assert 'leaked shared_memory' not in err, err[-2000:]


def test_finetune_lambdas_follow_the_step():
  from birefnet_jax import train
  config = quickstart_config(finetune_last_epochs=-2, epochs=5)
  # Epochs 1..3 before the window, epochs 4 and 5 are finetune epochs 1 and 2 (step: 0-based).
  assert train.loss_lambdas(config, 0, 10, 5) == {'bce': 30.0, 'iou': 0.5, 'ssim': 10.0}
  assert train.loss_lambdas(config, 29, 10, 5) == {'bce': 30.0, 'iou': 0.5, 'ssim': 10.0}
  assert train.loss_lambdas(config, 30, 10, 5) == {'bce': 0.0, 'iou': 0.25, 'ssim': 10.0}
  assert train.loss_lambdas(config, 49, 10, 5) == {'bce': 0.0, 'iou': 0.125, 'ssim': 10.0}


def test_resize_to_gt_matches_the_device_resize():
  import jax.numpy as jnp
  from birefnet_jax import inference
  from birefnet_jax.models.resize import (resize_bilinear_align_corners,
                                          resize_bilinear_align_corners_np)
  prob = np.random.default_rng(0).uniform(size=(32, 48)).astype(np.float32)
  for size in ((75, 41), (32, 48), (16, 100)):
    want = np.asarray(resize_bilinear_align_corners(jnp.asarray(prob)[None, :, :, None], size))
    np.testing.assert_allclose(resize_bilinear_align_corners_np(prob, size), want[0, :, :, 0],
                               rtol=0, atol=1e-6)
  # Truncation, not rounding (official mul(255).byte()).
  np.testing.assert_array_equal(
      inference.probabilities_to_mask(np.float32([[0.999, 0.5, 0.0039, 1.0]]), (1, 4)),
      [[254, 127, 0, 255]])

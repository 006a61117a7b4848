"""config.init_from through a whole run (python -m birefnet_jax.main): from a converter output and
from a training workdir.

The source weights are made here, independently of the trainer: random numpy arrays of the
tiny model's variable shapes, written as an official-style PyTorch state dict (torch
names and layouts, Swin's relative_position_index buffers, BatchNorm running statistics set far
from their init values) in a .safetensors file, converted with the converter
(tools/convert_torch_weights.py's convert_file). The run starts from that folder; a second run
starts from the first run's workdir.

What is checked on each run's first checkpoint (the state after one AdamW update):
  - every parameter is within one first AdamW step of the source's. AdamW's first update is
    ``-lr0 * (g / (|g| + eps) + wd * p)``, so ``|p1 - p0| <= lr0 * (1 + wd * |p0|)`` whatever the
    gradient (clipping only shrinks g). lr0 = 1e-5 here; a parameter left at a random init, or
    taken from another array, is off by orders of magnitude more;
  - the BatchNorm running statistics come from the source: a train step sets them to
    ``0.9 * s0 + 0.1 * (batch statistic)``; the source's are set to 1e3..2e3 (the model's init:
    mean 0, var 1), the batch statistics are O(1);
and that the run trains: most parameters move by ~lr0 in step 1 and again in step 2, and the
logged losses are finite.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import reference
from tiny_model import FAST_XLA, MODEL_FLAGS, ROOT, quickstart_config, random_variables

LR, WARMUP = 1e-3, 100          # the first update's lr: LR * 1 / WARMUP
LR0 = LR / WARMUP
WEIGHT_DECAY = float(quickstart_config().optim.weight_decay)   # AdamW's decoupled decay

# The tiny quickstart model at 64x64, no validation: every run here compiles the same train step
# (shared through the compilation cache).
RUN_FLAGS = MODEL_FLAGS + (
    '--config.data.image_size=(64, 64)', '--config.data.num_workers=0',
    '--config.data.augment=False', '--config.deterministic=True',
    '--config.data.synthetic_train_examples=16', '--config.batch_size=4',
    f'--config.optim.lr={LR}', f'--config.optim.warmup_steps={WARMUP}',
    '--config.total_steps=2', '--config.log_every=1', '--config.ckpt_every=1',
    '--config.eval_every=-1', '--config.eval_at_end=False', '--config.num_sample_images=0')


def run_main(workdir, cache_dir, *flags):
  pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH')) if p)
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_'))}
  env.update(PYTHONPATH=pythonpath, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', XLA_FLAGS=FAST_XLA)
  cmd = [sys.executable, '-m', 'birefnet_jax.main', '--config', str(ROOT / 'configs/quickstart.py'),
         '--workdir', str(workdir), *RUN_FLAGS, *flags]
  proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True,
                        timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc.stdout


def train_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == 'train']


def flat(tree, prefix=()):
  out = {}
  for key, value in tree.items():
    if hasattr(value, 'items'):
      out.update(flat(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = np.asarray(value)
  return out


def checkpoint_variables(workdir, step):
  from birefnet_jax import model_loading  # pylint: disable=g-import-not-at-top
  return flat(model_loading.load(str(workdir), step=step).variables)


# ----------------------------------------------------------------------------------------------
# An official-style state dict of the tiny model, made without torch.
# ----------------------------------------------------------------------------------------------

def relative_position_index(window):
  """Swin's buffer, as the official code builds it."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij')).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  rel[:, :, 0] += window - 1
  rel[:, :, 1] += window - 1
  rel[:, :, 0] *= 2 * window - 1
  return rel.sum(-1).astype(np.int64)


def torch_layout(path, value):
  if path[-1] == 'kernel' and value.ndim == 4:    # conv HWIO -> OIHW
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  if path[-1] == 'kernel' and value.ndim == 2:    # Dense (in, out) -> Linear (out, in)
    return np.ascontiguousarray(value.T)
  return np.ascontiguousarray(value)


def official_state_dict(variables, window):
  """{(collection, *path): array} of the tiny model -> {torch key: array}. The torch key of each Flax path is
  taken from the official fixture state dict (a superset: the same modules, wider and with
  every switch on), so the names are the official ones."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from birefnet_jax.convert import names  # pylint: disable=g-import-not-at-top
  official = load_file(str(reference.path('swin_w12_tiny.safetensors')))
  torch_key = {}
  for key, value in official.items():
    mapped = names.torch_to_flax(key, value)
    if mapped is not None:
      torch_key[(mapped[0],) + mapped[1]] = key
  state_dict = {}
  for path, value in variables.items():
    assert path in torch_key, f'{"/".join(path)} has no counterpart in the official names'
    state_dict[torch_key[path]] = torch_layout(path, value)
  blocks = {k.rsplit('.', 2)[0] for k in state_dict if k.endswith('attn.qkv.weight')}
  for block in blocks:
    state_dict[f'{block}.relative_position_index'] = relative_position_index(window)
  return state_dict


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """(converter output folder, the source variables {path: array}) of the tiny model."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from birefnet_jax.convert import convert_file  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp('converted')
  config = quickstart_config()
  variables = random_variables(config.model, seed=1234)
  src = tmp / 'tiny_birefnet.safetensors'
  state_dict = official_state_dict(variables, config.model.backbone.window_size)
  save_file(state_dict, str(src))
  cfg, _, backbone_only, _ = convert_file(str(src), str(tmp / 'converted'))
  assert not backbone_only and cfg.backbone.embed_dim == config.model.backbone.embed_dim
  return tmp / 'converted', variables


def beyond_one_step(first, source):
  """{param path: number of elements of ``first`` more than one first AdamW step (lr LR0) from
  ``source``}: ``|p1 - p0| <= lr0 * (1 + wd * |p0|)``, plus a relative 1e-3 and p0's float32
  spacing for rounding."""
  counts = {}
  for path, p0 in source.items():
    if path[0] == 'params':
      bound = LR0 * (1 + WEIGHT_DECAY * np.abs(p0)) * (1 + 1e-3) + np.spacing(np.abs(p0))
      counts[path] = int((np.abs(first[path] - p0) > bound).sum())
  return counts


def assert_started_from(run_dir, source, out):
  """The run's first checkpoint is one AdamW step (lr LR0) from ``source`` ({path: array})."""
  loaded = re.search(r'init_from \S+: loaded (\d+)/(\d+) arrays; missing 0, unexpected 0, '
                     r'shape mismatch 0', out)
  assert loaded and loaded.group(1) == loaded.group(2), out[-3000:]
  logs = train_records(run_dir)
  assert [r['step'] for r in logs] == [1, 2]
  assert all(np.isfinite(r['loss']) for r in logs), logs
  np.testing.assert_allclose(logs[0]['lr'], LR0, rtol=1e-6)   # the bound below assumes it

  first, second = checkpoint_variables(run_dir, 1), checkpoint_variables(run_dir, 2)
  params = [p for p in source if p[0] == 'params']
  assert params and set(p for p in first if p[0] == 'params') == set(params)
  for path, outside in beyond_one_step(first, source).items():
    assert not outside, f'{"/".join(path)}: {outside} elements are more than one AdamW step away'
  moved = sum(int((np.abs(first[p] - source[p]) > 0.5 * LR0).sum()) for p in params)
  total = sum(source[p].size for p in params)
  # It trains: Adam's first step moves every parameter with a non-negligible gradient by ~lr0
  # (measured: 79% of the elements; the others have a zero gradient: the biases before a
  # BatchNorm, the deformable convolutions' taps that only see padding at the 2x2 deepest
  # level), and the second step (lr 2 lr0) moves them again (measured: 68%).
  assert moved > 0.7 * total, (moved, total)
  step2 = sum(int((np.abs(second[p] - first[p]) > 0.5 * LR0).sum()) for p in params)
  assert step2 > 0.5 * total, (step2, total)

  stats = [p for p in source if p[0] == 'batch_stats']
  assert stats and set(p for p in first if p[0] == 'batch_stats') == set(stats)
  for path in stats:
    # A train step sets them to 0.9 * source + 0.1 * (batch mean / unbiased batch variance).
    # The batch statistics are O(1) (measured: |.| < 2), the source's >= 810 (1e3..2e3 at the
    # converter output), the model's own init 0 and 1.
    batch_part = (first[path] - 0.9 * source[path]) / 0.1
    assert np.abs(batch_part).max() <= 100, ('/'.join(path), np.abs(batch_part).max())
    if path[-1] == 'var':
      assert batch_part.min() >= -1e-6 * source[path].max(), ('/'.join(path), batch_part.min())
  return first


@pytest.fixture(scope='module')
def converted_run(tmp_path_factory, cache_dir, converted):
  """A run started from the converter output: (workdir, its output)."""
  folder, _ = converted
  run = tmp_path_factory.mktemp('from_converted') / 'run'
  return run, run_main(run, cache_dir, f'--config.init_from={folder}')


def test_init_from_a_converted_checkpoint(converted, converted_run):
  _, source = converted
  run, out = converted_run
  assert_started_from(run, source, out)


def test_init_from_a_training_workdir(tmp_path, cache_dir, converted_run):
  """A run started from another run's workdir starts from that run's latest checkpoint (it
  validated nothing, so there is no best one)."""
  source_run, _ = converted_run
  latest = checkpoint_variables(source_run, 2)
  run = tmp_path / 'run'
  out = run_main(run, cache_dir, f'--config.init_from={source_run}')
  first = assert_started_from(run, latest, out)
  # And not from the source's earlier checkpoint (step 1, also kept): the source's second update
  # (lr 2 lr0) moved most parameters by up to 2 lr0, so that after one step (lr0) from step 2
  # many elements are farther than one step from step 1 (measured: 45% of them).
  counts = beyond_one_step(first, checkpoint_variables(source_run, 1))
  fraction = sum(counts.values()) / sum(latest[p].size for p in counts)
  assert fraction > 0.2, fraction

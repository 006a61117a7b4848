"""The whole DINOv3 BiRefNet (pyramid neck, frozen backbone) against the official model.

Fixture ``tests/data/dinov3_birefnet_tiny.*``: official BiRefNet (commit 25cb930) with Config.bb
'dino_v3_s' at tiny widths and random weights; see tests/data/README.md for every change.
"""

import gzip
import json
from pathlib import Path
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load as load_safetensors

from birefnet_jax import optim
from birefnet_jax.convert import convert_state_dict, load_converted
from birefnet_jax.models import config as config_lib
from birefnet_jax.models.birefnet import BiRefNet

jax.config.update('jax_default_matmul_precision', 'highest')

DATA = Path(__file__).parent / 'data'
ROOT = Path(__file__).parent.parent
NAME = 'dinov3_birefnet_tiny'
F64_ATOL = 1e-9   # float64 vs torch float64: summation order only (observed ~1e-13)


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@pytest.fixture(scope='module')
def desc():
  return json.loads((DATA / f'{NAME}.json').read_text())


@pytest.fixture(scope='module')
def io():
  return np.load(DATA / f'{NAME}.npz')


@pytest.fixture(scope='module')
def state_dict():
  return load_safetensors(gzip.decompress((DATA / f'{NAME}.safetensors.gz').read_bytes()))


@pytest.fixture(scope='module')
def converted(state_dict, desc):
  kwargs = desc['backbone']['create_model_kwargs']
  return convert_state_dict(state_dict, source=NAME, dino_heads=kwargs['num_heads'],
                            dino_out_indices=kwargs['out_indices'])


def test_converted_config_is_the_official_one(converted, desc, state_dict):
  cfg, variables = converted
  bb, kwargs = cfg.backbone, desc['backbone']['create_model_kwargs']
  assert bb.family == 'dino_v3' and not bb.swiglu
  assert (bb.embed_dim, bb.num_heads, tuple(bb.out_indices)) == (
      kwargs['embed_dim'], kwargs['num_heads'], tuple(kwargs['out_indices']))
  assert bb.depth == max(kwargs['out_indices']) + 1     # timm pruned the blocks after it
  assert tuple(cfg.pyramid_neck_channels) == tuple(desc['decoder_literals']['pyramid_neck_channels'])
  assert cfg.mul_scl_ipt == 'cat' and cfg.cxt_num == 3 and not cfg.dec_ipt_split
  assert config_lib.backbone_frozen(cfg) == desc['config']['freeze_bb'] is True
  n_leaves = len(jax.tree.leaves(variables))
  n_torch = sum(1 for k in state_dict if not k.endswith('num_batches_tracked'))
  assert n_leaves == n_torch


def test_eval_logits_and_neck(converted, io, desc):
  cfg, variables = converted
  tol = desc['tolerances']
  model = BiRefNet(cfg)
  apply = jax.jit(lambda v, x: model.apply(
      v, x, capture_intermediates=lambda m, _: (m.name or '').startswith('pyramid_neck_')))
  logits, state = apply(variables, nhwc(io['input']))
  np.testing.assert_allclose(np.asarray(logits), nhwc(io['eval_final_logits']), rtol=0,
                             atol=tol['eval_final_logits'])
  captured = state['intermediates']['decoder']
  for i in (1, 2, 3, 4):
    key = f'eval_neck_x{i}'
    ours = captured[f'pyramid_neck_x{i}']['__call__'][0]
    np.testing.assert_allclose(np.asarray(ours), nhwc(io[key]), rtol=0, atol=tol[key],
                               err_msg=key)


def test_train_outputs(converted, io, desc):
  cfg, variables = converted
  tol = desc['tolerances']
  model = BiRefNet(cfg)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True, deterministic=True,
                                           mutable=['batch_stats']))
  outs, _ = apply(variables, nhwc(io['input']))
  for name, ours in zip(('train_m4_logits', 'train_m3_logits', 'train_m2_logits',
                         'train_final_logits'), outs['scaled_logits']):
    np.testing.assert_allclose(np.asarray(ours), nhwc(io[name]), rtol=0, atol=tol[name],
                               err_msg=name)


def test_eval_logits_float64(converted, io):
  cfg, variables = converted
  model = BiRefNet(cfg)
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    logits = jax.jit(model.apply)(v64, jnp.asarray(nhwc(io['input']), jnp.float64))
    assert logits.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(logits), nhwc(io['eval_final_logits_f64']), rtol=0,
                               atol=F64_ATOL)


def small_dino_model(freeze):
  """A small DINOv3 BiRefNet (no InRef / OutRef / pyramid input) for gradient checks."""
  cfg = config_lib.model_config('dino_v3_s', mul_scl_ipt='', cxt_num=0, squeeze_blocks=0,
                                dec_ipt=False, ms_supervision=False, out_ref=False,
                                batch_norm=False, aspp_planes=4, dec_inter_channels=4,
                                pyramid_neck_channels=(16, 8, 8, 8), freeze_backbone=freeze)
  cfg.backbone = config_lib.dino_v3_config(16, 4, 2, 32, False, (0, 1, 2, 3))
  model = BiRefNet(cfg)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x))))(params)
  return cfg, params, grads


def test_freeze_rule_is_the_official_one():
  """Official Config.freeze_bb = 'dino_v3' in bb; model.freeze_backbone overrides it."""
  assert config_lib.backbone_frozen(config_lib.model_config('dino_v3_s'))
  assert not config_lib.backbone_frozen(config_lib.model_config('swin_v1_l'))
  assert config_lib.backbone_frozen(config_lib.model_config('swin_v1_t', freeze_backbone=True))
  assert not config_lib.backbone_frozen(config_lib.model_config('dino_v3_s',
                                                                freeze_backbone=False))


@pytest.mark.parametrize('frozen', [True, False])
def test_frozen_backbone_gets_no_gradient(frozen):
  _, _, grads = small_dino_model(frozen)
  bb_norm = float(optax.tree.norm(grads['bb']))
  rest_norm = float(optax.tree.norm({k: v for k, v in grads.items() if k != 'bb'}))
  assert rest_norm > 0.0
  assert (bb_norm == 0.0) if frozen else (bb_norm > 0.0)


def test_optimizer_leaves_a_frozen_backbone_alone():
  """torch's AdamW skips parameters without a gradient: no step and no weight decay."""
  _, params, _ = small_dino_model(True)
  tx, _ = optim.make_optimizer(optim.optimizer_config(lr=0.1), steps_per_epoch=1,
                               frozen=('bb',))
  opt_state = tx.init(params)
  ones = jax.tree.map(jnp.ones_like, params)   # even a non-zero gradient
  updates, _ = tx.update(ones, opt_state, params)
  assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates['bb']))
  assert all(float(jnp.max(jnp.abs(u))) > 0.0 for u in jax.tree.leaves(updates['decoder']))
  # no AdamW moments are kept for the frozen subtree
  moments = [leaf for leaf in jax.tree.leaves(opt_state) if getattr(leaf, 'ndim', 0) > 0]
  n_trained = sum(int(np.prod(a.shape)) for k, v in params.items() if k != 'bb'
                  for a in jax.tree.leaves(v))
  assert sum(int(np.prod(m.shape)) for m in moments) == 2 * n_trained


def test_converter_command_takes_the_dino_heads_and_out_indices(tmp_path, desc, io):
  """tools/convert_torch_weights.py on a DINOv3 BiRefNet of no official preset's widths (the
  fixture): without the flags one error line names the file and the flag to give; with them it
  converts, model_config.json holds the given heads and out indices (the fixture's), and the
  loaded output gives the official eval logits."""
  src = tmp_path / f'{NAME}.safetensors'
  src.write_bytes(gzip.decompress((DATA / f'{NAME}.safetensors.gz').read_bytes()))
  tool = str(ROOT / 'tools' / 'convert_torch_weights.py')

  def convert(*flags, dst):
    return subprocess.run([sys.executable, tool, str(src), str(tmp_path / dst), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)

  result = convert(dst='without_flags')
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, result.stderr
  assert str(src) in errors[0] and '--dino-heads' in errors[0], errors[0]
  assert not (tmp_path / 'without_flags').exists()

  result = convert('--dino-out-indices', '0,1,3', dst='bad_flag')
  assert result.returncode == 2 and 'four comma-separated ints' in result.stderr, result.stderr

  kwargs = desc['backbone']['create_model_kwargs']
  result = convert('--dino-heads', str(kwargs['num_heads']), '--dino-out-indices',
                   ','.join(map(str, kwargs['out_indices'])), dst='converted')
  assert result.returncode == 0, result.stderr[-2000:]
  backbone = json.loads((tmp_path / 'converted' / 'model_config.json').read_text())['backbone']
  assert backbone['family'] == 'dino_v3'
  assert backbone['num_heads'] == kwargs['num_heads'] == 2
  assert tuple(backbone['out_indices']) == tuple(kwargs['out_indices']) == (0, 1, 3, 4)
  model, variables = load_converted(str(tmp_path / 'converted'))
  logits = jax.jit(model.apply)(variables, nhwc(io['input']))
  np.testing.assert_allclose(np.asarray(logits), nhwc(io['eval_final_logits']), rtol=0,
                             atol=desc['tolerances']['eval_final_logits'])

"""Swin v1 backbone against the official PyTorch fixtures (float32 and float64)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from birefnet_jax.convert.names import nest, torch_to_flax
from birefnet_jax.models import swin
from birefnet_jax.models.swin import DropPath, SwinTransformer, relative_position_index

import reference

jax.config.update('jax_default_matmul_precision', 'highest')

REFERENCE = reference.REFERENCE
VARIANTS = ['swin_w12_tiny', 'swin_w7_tiny_cls']


@functools.lru_cache(maxsize=None)
def load_variant(name):
  """(constructor kwargs, converted backbone variables, io arrays, torch bb.* state dict)."""
  kwargs = json.loads((REFERENCE / f'{name}.json').read_text())['backbone']['kwargs']
  state = {k[len('bb.'):]: v for k, v in load_file(str(REFERENCE / f'{name}.safetensors')).items()
           if k.startswith('bb.')}
  flat = {}
  for key, value in state.items():
    mapped = torch_to_flax(key, value)
    if mapped is not None:
      collection, path, array = mapped
      flat[(collection,) + path] = array
  io = np.load(REFERENCE / f'{name}.io.npz')
  return kwargs, nest(flat), io, state


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@pytest.fixture(params=VARIANTS)
def variant(request):
  return (request.param,) + load_variant(request.param)


def test_param_tree_matches_checkpoint(variant):
  _, kwargs, variables, io, _ = variant
  model = SwinTransformer(**kwargs)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(nhwc(io['input'])))
  ours = {k: v.shape for k, v in traverse_util.flatten_dict(abstract).items()}
  theirs = {k: v.shape for k, v in traverse_util.flatten_dict(variables).items()}
  assert sorted(ours) == sorted(theirs)
  assert ours == theirs


def test_relative_position_index_matches_checkpoint(variant):
  _, kwargs, _, _, state = variant
  buffers = {k: v for k, v in state.items() if k.endswith('relative_position_index')}
  assert len(buffers) == sum(kwargs['depths'])
  expected = relative_position_index(kwargs['window_size'])
  assert expected.dtype == np.int64
  for key, buffer in buffers.items():
    np.testing.assert_array_equal(expected, buffer, err_msg=key)


@pytest.mark.parametrize('attention', ['einsum', 'xla'])
def test_outputs_match_official_float32(variant, attention):
  """Both window-attention paths: our einsums, and jax.nn.dot_product_attention (the path that
  runs cuDNN's fused kernel with attention='cudnn' on GPU) with its bias and mask layout."""
  name, kwargs, variables, io, _ = variant
  tol = json.loads((REFERENCE / 'tolerances.json').read_text())['variants'][name]['arrays']
  model = SwinTransformer(**kwargs, attention=attention)
  outs = jax.jit(model.apply)(variables, jnp.asarray(nhwc(io['input'])))
  assert len(outs) == 4
  for i, out in enumerate(outs, start=1):
    ref = nhwc(io[f'eval_bb_x{i}'])
    assert out.shape == ref.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=tol[f'eval_bb_x{i}'],
                               err_msg=f'{name} x{i}')


def test_outputs_match_official_float64(variant):
  name, kwargs, variables, io, _ = variant
  ref = np.load(REFERENCE / f'{name}.f64.npz')
  tol = json.loads((REFERENCE / 'tolerances_f64.json').read_text())['variants'][name]['arrays']
  # The float32 weights upcast, the float32 input upcast: as the float64 fixture run.
  variables64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
  with jax.enable_x64(True):
    x = jnp.asarray(nhwc(io['input']).astype(np.float64))
    outs = jax.jit(SwinTransformer(**kwargs).apply)(variables64, x)
    outs = [np.asarray(o) for o in outs]
  for i, out in enumerate(outs, start=1):
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, nhwc(ref[f'eval_bb_x{i}']), rtol=0,
                               atol=tol[f'eval_bb_x{i}'], err_msg=f'{name} x{i}')


def test_unknown_attention_is_refused():
  model, variables = tiny_model_and_variables(attention='flash')
  with pytest.raises(ValueError, match="attention must be one of .*'flash'"):
    model.apply(variables, jnp.zeros((1, 64, 64, 3)))


def tiny_model_and_variables(**overrides):
  """The swin_w7_tiny_cls backbone with its fixture weights (no random init to compile)."""
  kwargs, variables, _, _ = load_variant('swin_w7_tiny_cls')
  return SwinTransformer(**{**kwargs, **overrides}), variables


def test_any_input_size():
  # 102x74: patch embed pads to 104x76; stages 26x19, 13x10, 7x5, 4x3, so every stage pads to
  # window multiples (w=7) and every patch merging pads an odd height or width.
  model, variables = tiny_model_and_variables()
  x = jax.random.normal(jax.random.key(1), (1, 102, 74, 3))
  outs = jax.jit(model.apply)(variables, x)
  assert [o.shape for o in outs] == [(1, 26, 19, 8), (1, 13, 10, 16), (1, 7, 5, 32), (1, 4, 3, 64)]
  assert all(bool(jnp.isfinite(o).all()) for o in outs)


def test_drop_path_is_stochastic_and_reproducible():
  model, variables = tiny_model_and_variables(drop_path_rate=0.5)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  forward = jax.jit(model.apply, static_argnames='deterministic')
  eval_out = forward(variables, x)[3]

  def train(seed):
    return forward(variables, x, deterministic=False, rngs={'drop_path': jax.random.key(seed)})[3]

  a, b, c = train(5), train(5), train(6)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.abs(a - eval_out).max()) > 1e-3
  assert float(jnp.abs(a - c).max()) > 1e-3


def test_drop_path_drops_whole_samples_with_timm_scaling():
  x = jnp.ones((2000, 3, 3, 2))
  y = DropPath(0.25).apply({}, x, deterministic=False, rngs={'drop_path': jax.random.key(0)})
  per_sample = np.asarray(y).reshape(2000, -1)
  # Each sample is either dropped entirely or kept and scaled by 1 / keep_prob.
  assert np.all((per_sample == 0).all(1) | np.isclose(per_sample, 1 / 0.75).all(1))
  assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.04


def test_bfloat16_compute_stays_close():
  kwargs, variables, io, _ = load_variant('swin_w7_tiny_cls')
  x = jnp.asarray(nhwc(io['input']))
  outs = jax.jit(SwinTransformer(**kwargs, dtype=jnp.bfloat16).apply)(variables, x)
  for i, out in enumerate(outs, start=1):
    assert out.dtype == jnp.float32  # the residual stream and output norms stay float32
    ref = nhwc(io[f'eval_bb_x{i}'])
    assert np.abs(np.asarray(out) - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize('h,w', [(8, 13), (3, 12), (1, 1), (12, 6), (20, 17)])
@pytest.mark.parametrize('shifted', [False, True])
def test_pad_and_roll_in_one_pass_equals_pad_then_roll(h, w, shifted):
  """The window padding (with a per-channel fill) and the cyclic shift as one concatenation of
  slices per axis, and its inverse, against numpy's pad and roll; shifts that reach into the
  padding (h, w < shift) included."""
  win = 12
  shift = win // 2 if shifted else 0
  rng = np.random.default_rng(h * 100 + w)
  x = rng.normal(size=(2, h, w, 5)).astype(np.float32)
  fill = rng.normal(size=(5,)).astype(np.float32)
  pad_b, pad_r = (-h) % win, (-w) % win
  padded = np.concatenate([x, np.broadcast_to(fill, (2, h, pad_r, 5))], axis=2)
  padded = np.concatenate([padded, np.broadcast_to(fill, (2, pad_b, w + pad_r, 5))], axis=1)
  want = np.roll(padded, (-shift, -shift), axis=(1, 2))
  got = swin._pad_and_roll(jnp.asarray(x), pad_b, pad_r, shift, jnp.asarray(fill))
  np.testing.assert_array_equal(np.asarray(got), want)
  back = swin._unroll_and_crop(jnp.asarray(want), h, w, shift)
  np.testing.assert_array_equal(np.asarray(back), x)

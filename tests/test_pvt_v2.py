"""PVT-v2 backbone against the official PyTorch model (golden fixtures of ../shared/reference)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from birefnet_jax.convert import names
from birefnet_jax.models import config
from birefnet_jax.models.pvt_v2 import DropPath, PyramidVisionTransformerImpr

import reference

jax.config.update('jax_default_matmul_precision', 'highest')

REFERENCE = reference.REFERENCE
VARIANT = 'pvt_v2_b0_quarter'
ARCH_FIELDS = ('embed_dims', 'num_heads', 'mlp_ratios', 'depths', 'sr_ratios')


def tiny_model(**overrides):
  kwargs = json.loads((REFERENCE / f'{VARIANT}.json').read_text())['backbone']['kwargs']
  fields = {k: tuple(kwargs[k]) for k in ARCH_FIELDS}
  fields['drop_path_rate'] = kwargs['drop_path_rate']
  fields.update(overrides)
  return PyramidVisionTransformerImpr(**fields)


def converted_backbone(state_dict):
  """``bb.*`` entries through the naming rule, without the 'bb' head: {path: array}."""
  flat = {}
  for key, value in state_dict.items():
    if not key.startswith('bb.'):
      continue
    mapped = names.torch_to_flax(key, value)
    if mapped is None:  # buffers only
      continue
    collection, path, array = mapped
    assert collection == 'params', key
    flat[path[1:]] = array
  return flat


@pytest.fixture(scope='module')
def state_dict():
  return load_file(REFERENCE / f'{VARIANT}.safetensors')


@pytest.fixture(scope='module')
def params(state_dict):
  return names.nest(converted_backbone(state_dict))


@pytest.fixture(scope='module')
def io():
  return np.load(REFERENCE / f'{VARIANT}.io.npz')


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def test_param_tree_matches_official_state_dict(state_dict, io):
  expected = {p: a.shape for p, a in converted_backbone(state_dict).items()}
  x = jax.ShapeDtypeStruct(nhwc(io['input']).shape, jnp.float32)
  abstract = jax.eval_shape(tiny_model().init, jax.random.key(0), x)
  assert set(abstract) == {'params'}
  got = {p: v.shape for p, v in names.flatten(abstract['params']).items()}
  assert sorted(got) == sorted(expected)
  assert got == expected


def test_forward_matches_official_float32(params, io):
  tol = json.loads((REFERENCE / 'tolerances.json').read_text())['variants'][VARIANT]['arrays']
  outs = jax.jit(tiny_model().apply)({'params': params}, nhwc(io['input']))
  assert len(outs) == 4
  for i, out in enumerate(outs, start=1):
    ref = nhwc(io[f'eval_bb_x{i}'])
    assert out.shape == ref.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=tol[f'eval_bb_x{i}'],
                               err_msg=f'eval_bb_x{i}')


def test_forward_matches_official_float64(params, io):
  ref = np.load(REFERENCE / f'{VARIANT}.f64.npz')
  tol = json.loads((REFERENCE / 'tolerances_f64.json').read_text())['variants'][VARIANT]['arrays']
  with jax.enable_x64(True):  # scoped: other tests keep float32 defaults
    params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    outs = jax.jit(tiny_model().apply)({'params': params64},
                                       jnp.asarray(nhwc(io['input']), jnp.float64))
    outs = [np.asarray(o) for o in outs]
  for i, out in enumerate(outs, start=1):
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, nhwc(ref[f'eval_bb_x{i}']), rtol=0, atol=tol[f'eval_bb_x{i}'],
                               err_msg=f'eval_bb_x{i}')
  assert jnp.zeros(()).dtype == jnp.float32  # x64 did not leak


@pytest.mark.parametrize('preset', ['pvt_v2_b0', 'pvt_v2_b1', 'pvt_v2_b2', 'pvt_v2_b5'])
def test_full_size_preset_matches_official_manifest(preset):
  manifest = json.loads((REFERENCE / 'manifests' / f'{preset}.json').read_text())
  expected = {}
  for entry in manifest['keys']:
    if not entry['key'].startswith('bb.'):
      continue
    # A zero-strided view: the naming rule only needs the shape to transpose.
    mapped = names.torch_to_flax(entry['key'], np.broadcast_to(np.float32(0), entry['shape']))
    if mapped is None:
      continue
    collection, path, array = mapped
    assert collection == 'params', entry['key']
    expected[path[1:]] = (array.shape, entry['dtype'])
  bb = config.backbone_config(preset)
  model = PyramidVisionTransformerImpr(**{k: bb[k] for k in ARCH_FIELDS},
                                       drop_path_rate=bb.drop_path_rate)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  got = {p: (v.shape, str(v.dtype)) for p, v in names.flatten(abstract['params']).items()}
  assert sorted(got) == sorted(expected)
  assert got == expected


def _torch_reference(state_dict, x_nchw, kwargs):
  """The official forward written out with torch.nn.functional on the state dict (NCHW/tokens)."""
  import torch
  import torch.nn.functional as F
  w = {k[3:]: torch.from_numpy(v).double() for k, v in state_dict.items() if k.startswith('bb.')}
  x = torch.from_numpy(x_nchw).double()
  outs = []
  for s in range(1, 5):
    k, st = (7, 4) if s == 1 else (3, 2)
    x = F.conv2d(x, w[f'patch_embed{s}.proj.weight'], w[f'patch_embed{s}.proj.bias'], st, k // 2)
    b, c, h, wd = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = F.layer_norm(x, (c,), w[f'patch_embed{s}.norm.weight'], w[f'patch_embed{s}.norm.bias'])
    heads, r = kwargs['num_heads'][s - 1], kwargs['sr_ratios'][s - 1]
    for i in range(kwargs['depths'][s - 1]):
      p = f'block{s}.{i}.'
      y = F.layer_norm(x, (c,), w[p + 'norm1.weight'], w[p + 'norm1.bias'], 1e-6)
      q = F.linear(y, w[p + 'attn.q.weight'], w[p + 'attn.q.bias'])
      q = q.reshape(b, -1, heads, c // heads).permute(0, 2, 1, 3)
      src = y
      if r > 1:
        src = F.conv2d(y.transpose(1, 2).reshape(b, c, h, wd), w[p + 'attn.sr.weight'],
                       w[p + 'attn.sr.bias'], r).reshape(b, c, -1).transpose(1, 2)
        src = F.layer_norm(src, (c,), w[p + 'attn.norm.weight'], w[p + 'attn.norm.bias'])
      kv = F.linear(src, w[p + 'attn.kv.weight'], w[p + 'attn.kv.bias'])
      kv = kv.reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
      attn = torch.softmax(q @ kv[0].transpose(-2, -1) * (c // heads) ** -0.5, -1)
      a = (attn @ kv[1]).transpose(1, 2).reshape(b, -1, c)
      x = x + F.linear(a, w[p + 'attn.proj.weight'], w[p + 'attn.proj.bias'])
      y = F.layer_norm(x, (c,), w[p + 'norm2.weight'], w[p + 'norm2.bias'], 1e-6)
      y = F.linear(y, w[p + 'mlp.fc1.weight'], w[p + 'mlp.fc1.bias'])
      hid = y.shape[-1]
      y = F.conv2d(y.transpose(1, 2).reshape(b, hid, h, wd), w[p + 'mlp.dwconv.dwconv.weight'],
                   w[p + 'mlp.dwconv.dwconv.bias'], 1, 1, groups=hid).flatten(2).transpose(1, 2)
      y = F.linear(F.gelu(y), w[p + 'mlp.fc2.weight'], w[p + 'mlp.fc2.bias'])
      x = x + y
    x = F.layer_norm(x, (c,), w[f'norm{s}.weight'], w[f'norm{s}.bias'], 1e-6)
    x = x.reshape(b, h, wd, c).permute(0, 3, 1, 2)
    outs.append(x.numpy())
  return outs


def test_odd_input_size(state_dict, params):
  """1x70x90: stage sizes follow torch's conv arithmetic and the sr convs drop the remainder
  (e.g. 18x23 -> 2x2 with r = 8), which the 192x160 fixture never exercises."""
  kwargs = json.loads((REFERENCE / f'{VARIANT}.json').read_text())['backbone']['kwargs']
  x = np.random.default_rng(0).standard_normal((1, 70, 90, 3)).astype(np.float32)
  outs = jax.jit(tiny_model().apply)({'params': params}, x)
  # floor((n + 2p - k) / s) + 1 for (k7 s4 p3), then (k3 s2 p1) three times.
  assert [o.shape[1:3] for o in outs] == [(18, 23), (9, 12), (5, 6), (3, 3)]
  assert [o.shape[3] for o in outs] == list(kwargs['embed_dims'])
  pytest.importorskip('torch')
  refs = _torch_reference(state_dict, x.transpose(0, 3, 1, 2), kwargs)
  for i, (out, ref) in enumerate(zip(outs, refs), start=1):
    np.testing.assert_allclose(np.asarray(out), nhwc(ref), rtol=0, atol=5e-5, err_msg=f'x{i}')


def test_input_too_small_for_spatial_reduction_is_a_clear_error(params):
  with pytest.raises(ValueError, match='too small'):
    tiny_model().apply({'params': params}, np.zeros((1, 16, 32, 3), np.float32))


def test_bfloat16_compute_keeps_float32_params(params, io):
  x = nhwc(io['input'])
  model = tiny_model(dtype=jnp.bfloat16)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(x.shape, jnp.float32))
  assert {v.dtype for v in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  outs = jax.jit(model.apply)({'params': params}, x)
  for i, out in enumerate(outs, start=1):
    assert out.dtype == jnp.bfloat16
    ref = nhwc(io[f'eval_bb_x{i}'])
    err = np.abs(np.asarray(out, np.float32) - ref)
    # bf16 has an 8-bit mantissa: errors of a few 1e-2 on unit-scale normalized features.
    assert err.mean() < 0.02 and err.max() < 0.25, (i, err.mean(), err.max())


def test_drop_path_is_per_sample_and_rescales():
  x = jnp.ones((4000, 3, 2, 5), jnp.float32)
  y = np.asarray(DropPath(0.25).apply({}, x, deterministic=False,
                                      rngs={'drop_path': jax.random.key(1)}))
  per_sample = y.reshape(len(y), -1)
  assert np.all(per_sample == per_sample[:, :1])          # one draw per sample
  assert set(np.unique(per_sample)) == {0.0, np.float32(1 / 0.75)}
  assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.03  # ~ 4 sigma
  np.testing.assert_array_equal(DropPath(0.25).apply({}, x, deterministic=True), x)


def test_drop_path_only_in_training(params, io):
  tol = json.loads((REFERENCE / 'tolerances.json').read_text())['variants'][VARIANT]['arrays']
  x = np.concatenate([nhwc(io['input'])] * 2)  # images a, b, a, b
  apply = jax.jit(tiny_model(drop_path_rate=0.5).apply, static_argnames='deterministic')
  # deterministic (the default) ignores the rate and needs no rng: the official eval outputs.
  eval_outs = apply({'params': params}, x)
  for i, out in enumerate(eval_outs, start=1):
    np.testing.assert_allclose(np.asarray(out), np.concatenate([nhwc(io[f'eval_bb_x{i}'])] * 2),
                               rtol=0, atol=tol[f'eval_bb_x{i}'])
  with pytest.raises(Exception, match='drop_path'):
    apply({'params': params}, x, deterministic=False)
  train_x4 = np.asarray(apply({'params': params}, x, deterministic=False,
                              rngs={'drop_path': jax.random.key(3)})[3])
  # Same image, independent per-sample masks over the 14 branches with a rate > 0: they differ.
  assert not np.allclose(train_x4[0], train_x4[2], atol=1e-4)
  assert not np.allclose(train_x4[1], train_x4[3], atol=1e-4)
  # drop_path_rate 0 is the identity even in training.
  no_drop = jax.jit(tiny_model(drop_path_rate=0.0).apply, static_argnames='deterministic')(
      {'params': params}, x, deterministic=False)
  for a, b in zip(no_drop, eval_outs):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)

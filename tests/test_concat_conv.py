"""layers.ConcatConv (a conv over a channel concatenation computed as a sum of convs over its
parts) against ``nn.Conv`` on the concatenation; layers.composed_conv3x3_pair and SimpleConvs'
projection (two 3x3 convs and a 1x1 as one 5x5 conv plus a border correction) against the
convs run one after the other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from birefnet_jax.models.birefnet import SimpleConvs
from birefnet_jax.models.layers import (ConcatConv, composed_conv3x3_pair, conv,
                                        conv_of_concatenation)

WIDTHS = (3, 5, 2)


def parts_and_params(rng, features=4, k=3):
  parts = [jnp.asarray(rng.normal(size=(2, 6, 7, c))) for c in WIDTHS]
  params = {'kernel': jnp.asarray(rng.normal(size=(k, k, sum(WIDTHS), features))),
            'bias': jnp.asarray(rng.normal(size=(features,)))}
  return parts, params


def reference_conv(parts, params, padding):
  """nn.Conv (torch padding) on the concatenation, float64, in numpy's hands."""
  x = np.concatenate([np.asarray(p) for p in parts], -1)
  kernel, bias = np.asarray(params['kernel']), np.asarray(params['bias'])
  k = kernel.shape[0]
  x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  out = np.zeros(x.shape[:1] + (h, w, kernel.shape[-1]))
  for i in range(k):
    for j in range(k):
      out += np.einsum('bhwc,co->bhwo', x[:, i:i + h, j:j + w], kernel[i, j])
  return out + bias


@pytest.mark.parametrize('k,padding', [(1, 0), (3, 1)])
def test_sum_of_part_convs_equals_conv_of_concatenation(k, padding):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    parts, params = parts_and_params(rng, k=k)
    got = ConcatConv(4, k, padding=padding).apply({'params': params}, parts)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), reference_conv(parts, params, padding),
                               rtol=0, atol=1e-12)


def test_parameters_are_those_of_nn_conv():
  """Same names, shapes and initial values as the nn.Conv it replaces (checkpoints, inits)."""
  x = jnp.zeros((1, 5, 5, sum(WIDTHS)), jnp.float32)
  parts = [jnp.zeros((1, 5, 5, c), jnp.float32) for c in WIDTHS]
  key = jax.random.key(3)
  plain = conv(4, 3, padding=1).init(key, x)['params']
  split = ConcatConv(4, 3, padding=1).init(key, parts)['params']
  assert jax.tree.map(jnp.shape, split) == jax.tree.map(jnp.shape, plain)
  for name in ('kernel', 'bias'):
    np.testing.assert_array_equal(np.asarray(split[name]), np.asarray(plain[name]))


def test_bfloat16_close_to_float64_and_in_bfloat16():
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    parts, params = parts_and_params(rng)
    want = reference_conv(parts, params, 1)
  parts32 = [p.astype(jnp.float32) for p in parts]
  params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  got = ConcatConv(4, 3, padding=1, dtype=jnp.bfloat16).apply({'params': params32}, parts32)
  assert got.dtype == jnp.bfloat16
  # bf16 operands (8 bits of mantissa) over 90 products of unit normals
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                             atol=0.05 * np.abs(want).max())


def test_parts_that_do_not_fill_the_kernel_are_refused():
  parts = [jnp.zeros((1, 4, 4, 3))]
  with pytest.raises(ValueError, match='3 channels in all, the kernel takes 5'):
    conv_of_concatenation(parts, jnp.zeros((1, 1, 5, 2)), 0, jnp.float32)


def test_simple_convs_projection_equals_projecting_its_output():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    module = SimpleConvs(out_channels=6, inter_channels=5)
    x = jnp.asarray(rng.normal(size=(1, 8, 9, 3)))
    variables = module.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), variables)
    project = jnp.asarray(rng.normal(size=(6, 1)))
    full = module.apply(variables, x)
    assert full.shape == (1, 8, 9, 6)
    got = module.apply(variables, x, project)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full) @ np.asarray(project),
                               rtol=0, atol=1e-11)


@pytest.mark.parametrize('height,width', [(6, 7), (1, 4), (2, 1), (5, 5)])
def test_composed_conv3x3_pair_is_exact_at_every_pixel(height, width):
  """Interior and border pixels (and maps one or two pixels thin, where the strips overlap)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(height * 10 + width)
    x = rng.normal(size=(2, height, width, 3))
    k1, b1 = rng.normal(size=(3, 3, 3, 5)), rng.normal(size=(5,))
    k2, b2 = rng.normal(size=(3, 3, 5, 2)), rng.normal(size=(2,))
    first = reference_conv([x], {'kernel': k1, 'bias': b1}, 1)
    want = reference_conv([first], {'kernel': k2, 'bias': b2}, 1)
    got = composed_conv3x3_pair(*(jnp.asarray(a) for a in (x, k1, b1, k2, b2)), jnp.float64)
    assert got.dtype == jnp.float64 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-11)

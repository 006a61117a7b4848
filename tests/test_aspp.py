"""ASPPDeformable's call-time rewrite: conv1 as one matmul per branch with the pooled branch as
a per-image bias, against the plain formulation; parameter tree unchanged."""

import jax
import jax.numpy as jnp
import numpy as np

from birefnet_jax.models.aspp import ASPPDeformable, PooledBiasConv1x1


def test_pooled_bias_equals_conv_of_broadcast_concatenation():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    branches = [jnp.asarray(rng.normal(size=(2, 5, 4, c))) for c in (4, 3, 5)]   # 12 channels
    pooled = jnp.asarray(rng.normal(size=(2, 1, 1, 3)))
    module = PooledBiasConv1x1(7)
    params = module.init(jax.random.key(0), branches, pooled)['params']
    assert params['kernel'].shape == (1, 1, 15, 7)
    kernel = jnp.asarray(rng.normal(size=(1, 1, 15, 7)))
    got = module.apply({'params': {'kernel': kernel}}, branches, pooled)
    concatenated = jnp.concatenate(branches + [jnp.broadcast_to(pooled, (2, 5, 4, 3))], axis=-1)
    want = jnp.einsum('bhwc,co->bhwo', concatenated, kernel[0, 0],
                      precision=jax.lax.Precision.HIGHEST)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12)


def test_parameter_tree_is_the_official_one():
  module = ASPPDeformable(in_channels=4, planes=3)
  x = jnp.zeros((1, 6, 6, 4), jnp.float32)
  variables = module.init(jax.random.key(0), x, train=False, deterministic=True)
  shapes = jax.tree.map(jnp.shape, variables['params'])
  assert shapes['conv1'] == {'kernel': (1, 1, 15, 4)}
  assert shapes['global_avg_pool_1'] == {'kernel': (1, 1, 4, 3)}
  for name, k in (('aspp1', 1), ('aspp_deforms_0', 1), ('aspp_deforms_1', 3),
                  ('aspp_deforms_2', 7)):
    assert shapes[name]['atrous_conv'] == {
        'offset_conv': {'kernel': (k, k, 4, 2 * k * k), 'bias': (2 * k * k,)},
        'modulator_conv': {'kernel': (k, k, 4, k * k), 'bias': (k * k,)},
        'regular_conv': {'kernel': (k, k, 4, 3)}}, name
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables['params']))

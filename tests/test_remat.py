"""The model's remat switch: the backbone blocks are recomputed in the backward pass (the compiled
gradient program does more FLOPs) and the gradients do not change; remat policies by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from birefnet_jax.models import layers, pvt_v2, swin


def _flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def _grad_and_flops(model, params, x):
  # A fixed random projection of the outputs: sum(f ** 2) of LayerNorm'd stage outputs would be
  # constant in the parameters (a zero gradient, all rounding noise).
  probes = [jax.random.normal(jax.random.PRNGKey(i), f.shape)
            for i, f in enumerate(jax.eval_shape(model.apply, params, x))]
  loss = lambda p: sum(jnp.sum(f * r) for f, r in zip(model.apply(p, x), probes))
  compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  return compiled(params), _flops(compiled)


BACKBONES = {
    'swin': lambda **kw: swin.SwinTransformer(embed_dim=8, depths=(2, 2), num_heads=(1, 2),
                                              window_size=4, **kw),
    'pvt_v2': lambda **kw: pvt_v2.PyramidVisionTransformerImpr(
        embed_dims=(8, 8, 16, 16), num_heads=(1, 1, 2, 2), mlp_ratios=(2, 2, 2, 2),
        depths=(1, 1, 1, 1), sr_ratios=(4, 2, 1, 1), **kw),
}


@pytest.mark.parametrize('family,policy', [('swin', ''), ('pvt_v2', 'dots_saveable')])
def test_remat_recomputes_blocks_with_the_same_gradient(family, policy):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 64, 3), dtype=np.float32))
  plain_model = BACKBONES[family]()
  params = jax.jit(plain_model.init)(jax.random.PRNGKey(0), x)
  plain, plain_flops = _grad_and_flops(plain_model, params, x)
  remat, remat_flops = _grad_and_flops(BACKBONES[family](remat=True, remat_policy=policy),
                                       params, x)
  assert remat_flops > plain_flops
  # Same gradient up to float32 reassociation (XLA fuses the recomputed program differently).
  assert jax.tree.structure(plain) == jax.tree.structure(remat)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(a).max()) + 1e-12)


def test_remat_policy_names():
  assert layers.checkpoint_policy('') is None
  assert layers.checkpoint_policy('dots_saveable') is jax.checkpoint_policies.dots_saveable
  with pytest.raises(ValueError, match="unknown remat policy 'everything'"):
    layers.checkpoint_policy('everything')
  with pytest.raises(ValueError, match='needs arguments'):
    layers.checkpoint_policy('save_only_these_names')

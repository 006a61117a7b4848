"""The inference fast path on the fixture model: BatchNorms folded into their convs (against the
unfolded model and the official logits), and bfloat16 with kernels cast once against float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import reference
from birefnet_jax import inference
from birefnet_jax.convert import convert_state_dict
from birefnet_jax.models.birefnet import BiRefNet

VARIANT = 'swin_w7_tiny_cls'


@pytest.fixture(scope='module')
def fixture_model():
  cfg, variables = convert_state_dict(load_file(reference.path(f'{VARIANT}.safetensors')),
                                      inref_order=reference.inref_order(VARIANT))
  return cfg, variables, reference.io(VARIANT)


def _batch_norm_count(params):
  if not isinstance(params, dict):
    return 0
  own = int(set(params) == {'scale', 'bias'})
  return own + sum(_batch_norm_count(v) for v in params.values())


def test_folded_batch_norms_match_the_unfolded_model(fixture_model):
  cfg, variables, io = fixture_model
  folded = inference.fold_batch_norms(variables)
  # Every BatchNorm folded: only LayerNorm-like {'scale', 'bias'} pairs named norm* remain.
  before = _batch_norm_count(variables['params'])
  stats = jax.tree_util.tree_leaves_with_path(folded['batch_stats'])
  assert stats and all(getattr(p[-1], 'key', '') == 'folded_shift' for p, _ in stats)
  assert _batch_norm_count(folded['params']) == before - len(stats)
  model = BiRefNet(cfg)
  x = reference.nhwc(io['input'])
  with jax.default_matmul_precision('highest'):
    both = jax.jit(lambda a, b, images: (model.apply(a, images), model.apply(b, images)))
    plain, fast = (np.asarray(o) for o in both(variables, folded, x))
  # Float32 summation order only: the fold is exact in real arithmetic.
  scale = np.abs(plain).max()
  np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-5 * scale)
  tol = reference.tolerances(VARIANT)['arrays']['eval_final_logits']
  np.testing.assert_allclose(fast, reference.nhwc(io['eval_final_logits']), rtol=0, atol=tol)


def test_bfloat16_predictor_close_to_float32(fixture_model):
  """Folded, kernels in bfloat16, activations bfloat16 between blocks: the probabilities within
  0.05 of the official float32 ones (mean difference below 0.01)."""
  cfg, variables, io = fixture_model
  model = BiRefNet(cfg)
  predictor = inference.Predictor(model, variables, resolution='original', dtype='bfloat16')
  got = np.asarray(predictor(jnp.asarray(reference.nhwc(io['input']))))
  want = 1 / (1 + np.exp(-reference.nhwc(io['eval_final_logits'])[..., 0]))
  assert got.dtype == np.float32 and got.shape == want.shape
  diff = np.abs(got - want)
  assert diff.max() < 0.05 and diff.mean() < 0.01, (diff.max(), diff.mean())

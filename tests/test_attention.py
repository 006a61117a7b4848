"""The window attention core: its recomputing gradient against autodiff, and what it stores."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import ad_checkpoint

from birefnet_jax.models import attention

B, WINDOWS, HEADS, N, HEAD_DIM = 2, 3, 2, 16, 8


def _operands(dtype, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((B, WINDOWS, HEADS, N, HEAD_DIM)), dtype)
             for _ in range(3))
  wide = jnp.promote_types(dtype, jnp.float32)
  bias = jnp.asarray(rng.standard_normal((HEADS, N, N)), wide)
  regions = rng.integers(0, 3, (WINDOWS, N))
  different = jnp.asarray(regions[:, None, :, None] != regions[:, None, None, :])
  cotangent = jnp.asarray(rng.standard_normal((B, WINDOWS, HEADS, N, HEAD_DIM)), wide)
  return q, k, v, bias, different, cotangent


def _grads(core, q, k, v, bias, different, cotangent):
  def loss(q, k, v, bias):
    out = core(q, k, v, bias, different, 0.35)
    return jnp.vdot(out.astype(cotangent.dtype), cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)


@pytest.mark.parametrize('masked', [False, True])
def test_recomputed_gradient_equals_autodiff_in_float64(masked):
  with jax.enable_x64(True):
    q, k, v, bias, different, cotangent = _operands(jnp.float64)
    different = different if masked else None
    want = _grads(attention.softmax_attention, q, k, v, bias, different, cotangent)
    got = _grads(attention.softmax_attention_recomputed, q, k, v, bias, different, cotangent)
    for name, w, g in zip(('q', 'k', 'v', 'bias'), want, got):
      assert g.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-12, err_msg=name)
      assert np.abs(np.asarray(w)).max() > 0.1   # a gradient that is really there


@pytest.mark.parametrize('masked', [False, True])
def test_recomputed_gradient_follows_autodiffs_dtypes_in_bfloat16(masked):
  q, k, v, bias, different, cotangent = _operands(jnp.bfloat16)
  different = different if masked else None
  want = _grads(attention.softmax_attention, q, k, v, bias, different, cotangent)
  got = _grads(attention.softmax_attention_recomputed, q, k, v, bias, different, cotangent)
  for name, w, g in zip(('q', 'k', 'v', 'bias'), want, got):
    assert g.dtype == w.dtype, name            # bf16 for q/k/v, float32 for the bias
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    # the same ops in the same dtypes: equal up to a bf16 rounding of differently ordered sums
    np.testing.assert_allclose(g, w, rtol=0, atol=2 ** -7 * np.abs(w).max(), err_msg=name)


def test_recomputed_forward_is_the_plain_forward_and_the_mask_masks():
  q, k, v, bias, different, _ = _operands(jnp.float32)
  plain = attention.softmax_attention(q, k, v, bias, different, 0.35)
  np.testing.assert_array_equal(
      np.asarray(attention.softmax_attention_recomputed(q, k, v, bias, different, 0.35)),
      np.asarray(plain))
  # numpy reference: masked pairs take no weight
  logits = np.einsum('bwhqd,bwhkd->bwhqk', np.asarray(q, np.float64) * 0.35, np.asarray(k))
  logits = logits + np.asarray(bias)[None, None] + np.where(np.asarray(different), -np.inf, 0)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum('bwhqk,bwhkd->bwhqd', probs, np.asarray(v, np.float64))
  np.testing.assert_allclose(np.asarray(plain), want, rtol=0, atol=1e-5)


def _saved_shapes(core, capsys):
  q, k, v, bias, different, _ = _operands(jnp.bfloat16)
  capsys.readouterr()
  ad_checkpoint.print_saved_residuals(
      lambda q, k, v, bias: core(q, k, v, bias, different, 0.35), q, k, v, bias)
  return re.findall(r'\w+\[([\d,]*)\]', capsys.readouterr().out)


def test_recomputed_gradient_stores_no_attention_matrix(capsys):
  """Autodiff keeps (.., N, N) intermediates for the backward pass; the recomputing core keeps
  only its inputs (q, k, v, the bias and the mask)."""
  window_matrix = f'{B},{WINDOWS},{HEADS},{N},{N}'
  assert window_matrix in _saved_shapes(attention.softmax_attention, capsys)
  saved = _saved_shapes(attention.softmax_attention_recomputed, capsys)
  assert window_matrix not in saved
  assert saved and all(s in (f'{B},{WINDOWS},{HEADS},{N},{HEAD_DIM}', f'{HEADS},{N},{N}',
                                   f'{WINDOWS},1,{N},{N}') for s in saved), saved

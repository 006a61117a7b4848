"""Windowed softmax attention as two batched matmuls, and its gradient without stored logits.

:func:`softmax_attention` is Swin's 'einsum' attention core: ``softmax(q k^T * scale + bias +
mask) v`` over (B, windows, heads, N, head_dim) operands, with the logits in the compute dtype of
``q`` (float32 in the float32/float64 paths), the softmax in at least float32 and the
probabilities cast back to ``v``'s dtype for the second matmul, as under torch's autocast.

Differentiated by plain autodiff, that program keeps its (B, windows, heads, N, N) intermediates
for the backward pass (the logits, the float32 softmax, the cast probabilities): several times
the bytes of q, k and v for a 12x12 window, written in the forward pass and read back in the
backward. :func:`softmax_attention_recomputed` is the same forward with a ``jax.custom_vjp``
that keeps only its inputs and recomputes the logits and the softmax in the backward pass, where
they are fused into the passes that form the logits' gradient (as flash attention does on a GPU,
here with a whole window's row at once, as N is small). Its backward follows autodiff's dtype
flow op for op: the gradient reaching the probabilities is formed in ``v``'s dtype and widened,
the softmax's is computed in float32 (``p * (dp - sum(p * dp))``, jax's own rule), and narrowed
to the logits' dtype before the two matmuls that give dq and dk. The model uses it in its
low-precision modes; the float32/float64 reference paths keep plain autodiff.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _logits(q, k, bias, different, scale):
  softmax_dtype = jnp.promote_types(q.dtype, jnp.float32)
  q = q * jnp.asarray(scale, q.dtype)        # the official scales q before Q K^T
  logits = jnp.einsum('bwhqd,bwhkd->bwhqk', q, k, preferred_element_type=q.dtype)
  logits = logits.astype(softmax_dtype) + bias.astype(softmax_dtype)
  if different is not None:  # shared by all images and heads
    # Added as 0 / -inf (exactly the masked where) rather than selected: XLA then fuses the
    # comparison that builds it into the softmax's pass over the logits.
    logits = logits + jnp.where(different, jnp.asarray(-jnp.inf, softmax_dtype),
                                jnp.asarray(0, softmax_dtype))
  return q, logits


def softmax_attention(q, k, v, bias, different, scale: float):
  """``softmax(q k^T * scale + bias [+ -inf where different]) v``.

  q, k, v: (B, nW, heads, N, hd); bias: (heads, N, N); different: None or a boolean (nW, 1, N, N)
  (True: the two tokens lie in different regions of a shifted window, so they do not attend to
  each other). Returns (B, nW, heads, N, hd) in ``v``'s dtype."""
  _, logits = _logits(q, k, bias, different, scale)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bwhqk,bwhkd->bwhqd', probs, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _recomputed(q, k, v, bias, different, scale):
  return softmax_attention(q, k, v, bias, different, scale)


def _recomputed_forward(q, k, v, bias, different, scale):
  return softmax_attention(q, k, v, bias, different, scale), (q, k, v, bias, different)


def _recomputed_backward(scale, residuals, d_out):
  q, k, v, bias, different = residuals
  d_out = d_out.astype(v.dtype)
  q_scaled, logits = _logits(q, k, bias, different, scale)
  probs = jax.nn.softmax(logits, axis=-1)                     # float32 (or float64)
  probs_cast = probs.astype(v.dtype)
  d_v = jnp.einsum('bwhqk,bwhqd->bwhkd', probs_cast, d_out)
  d_probs = jnp.einsum('bwhqd,bwhkd->bwhqk', d_out, v).astype(probs.dtype)
  d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
  d_bias = jnp.sum(d_logits, axis=(0, 1)).astype(bias.dtype)
  d_logits = d_logits.astype(q.dtype)                         # the logits' dtype
  d_q = jnp.einsum('bwhqk,bwhkd->bwhqd', d_logits, k) * jnp.asarray(scale, q.dtype)
  d_k = jnp.einsum('bwhqk,bwhqd->bwhkd', d_logits, q_scaled)
  d_different = None if different is None else np.zeros(different.shape, jax.dtypes.float0)
  return d_q, d_k, d_v, d_bias, d_different


_recomputed.defvjp(_recomputed_forward, _recomputed_backward)


def softmax_attention_recomputed(q, k, v, bias, different, scale: float):
  """:func:`softmax_attention` with a gradient that stores only q, k, v, the bias and the
  mask and recomputes the logits and the softmax in the backward pass (see the module docstring)."""
  return _recomputed(q, k, v, bias, different, float(scale))

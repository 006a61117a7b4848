"""The align-corners bilinear resize (models/resize.py) against torch's F.interpolate, forward and
gradient, in float32 and float64; the numpy host copy; the bfloat16 path against float32; and its
gradient free of scatter-adds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from birefnet_jax.models.resize import (interpolation_matrix, resize_bilinear_align_corners,
                                        resize_bilinear_align_corners_np)

# (input H, W) -> (output H, W): up, down, mixed, to and from one pixel.
CASES = [((7, 5), (16, 11)), ((24, 32), (12, 16)), ((9, 13), (4, 30)), ((1, 6), (3, 1))]


def _torch_resize(x_nhwc, size, requires_grad=False):
  t = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
  t.requires_grad_(requires_grad)
  out = F.interpolate(t, size=size, mode='bilinear', align_corners=True)
  return t, out


@pytest.mark.parametrize('dtype,atol', [(np.float32, 2e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize('in_hw,out_hw', CASES)
def test_matches_torch_forward_and_gradient(in_hw, out_hw, dtype, atol):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *in_hw, 3)).astype(dtype)
  cotangent = rng.standard_normal((2, *out_hw, 3)).astype(dtype)
  t, want = _torch_resize(x, out_hw, requires_grad=True)
  want.backward(torch.from_numpy(np.ascontiguousarray(cotangent.transpose(0, 3, 1, 2))))
  with jax.enable_x64(dtype == np.float64):
    got, vjp = jax.vjp(lambda a: resize_bilinear_align_corners(a, out_hw), jnp.asarray(x))
    (grad,) = vjp(jnp.asarray(cotangent))
    assert got.dtype == dtype and grad.dtype == dtype
    np.testing.assert_allclose(np.asarray(got), want.detach().numpy().transpose(0, 2, 3, 1),
                               rtol=0, atol=atol)
    np.testing.assert_allclose(np.asarray(grad), t.grad.numpy().transpose(0, 2, 3, 1),
                               rtol=0, atol=4 * atol)


def test_numpy_host_copy_matches():
  x = np.random.default_rng(1).standard_normal((9, 13, 2)).astype(np.float32)
  got = np.asarray(resize_bilinear_align_corners(jnp.asarray(x)[None], (20, 7)))[0]
  np.testing.assert_allclose(resize_bilinear_align_corners_np(x, (20, 7)), got, rtol=0, atol=1e-6)


def test_interpolation_matrix_rows_are_two_weights_summing_to_one():
  m = interpolation_matrix(7, 16)
  assert m.shape == (16, 7)
  assert ((m != 0).sum(1) <= 2).all()
  np.testing.assert_allclose(m.sum(1), 1, atol=1e-6)
  np.testing.assert_array_equal(m[0], np.eye(7)[0])
  np.testing.assert_array_equal(m[-1], np.eye(7)[-1])


def test_bfloat16_close_to_float32():
  """bf16 weights and activations with float32 sums: within bf16 rounding of the float32 resize
  (relative 2^-8 of each of the two roundings of weights/inputs and the rounded output)."""
  x = np.random.default_rng(2).standard_normal((1, 12, 10, 4)).astype(np.float32)
  want = np.asarray(resize_bilinear_align_corners(jnp.asarray(x), (31, 23)))
  got = resize_bilinear_align_corners(jnp.asarray(x, jnp.bfloat16), (31, 23))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=0.05)
  assert np.abs(np.asarray(got, np.float32) - want).mean() < 0.01


def test_gradient_has_no_gather_or_scatter():
  x = jnp.ones((1, 6, 5, 2), jnp.bfloat16)
  grad = jax.grad(lambda a: resize_bilinear_align_corners(a, (13, 9)).astype(jnp.float32).sum())
  text = str(jax.make_jaxpr(grad)(x))
  assert 'scatter' not in text and 'gather' not in text
  assert text.count('dot_general') >= 4

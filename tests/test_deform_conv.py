"""modulated_deform_conv2d against an independent numpy DCNv2 reference (torchvision semantics),
plain convolution, and finite differences; the fast path (hand-written backward, tiles, bf16)
against the previous JAX-differentiated implementation; DeformableConv2d's parameters and initial
behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from birefnet_jax.models.deform_conv import (DeformableConv2d, modulated_deform_conv2d,
                                             modulated_deform_conv2d_autodiff)

jax.config.update('jax_default_matmul_precision', 'highest')


# ---------------------------------------------------------------- numpy reference (float64)

def bilinear_torchvision(img, y, x):
  """torchvision's deform_conv2d ``bilinear_interpolate`` for one point; img (H, W, C)."""
  h, w, _ = img.shape
  if y <= -1 or y >= h or x <= -1 or x >= w:
    return np.zeros(img.shape[-1])
  y_low, x_low = int(np.floor(y)), int(np.floor(x))
  y_high, x_high = y_low + 1, x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1 - ly, 1 - lx

  def pixel(r, c):
    return img[r, c] if (0 <= r < h and 0 <= c < w) else np.zeros(img.shape[-1])

  return (hy * hx * pixel(y_low, x_low) + hy * lx * pixel(y_low, x_high)
          + ly * hx * pixel(y_high, x_low) + ly * lx * pixel(y_high, x_high))


def deform_conv_reference(x, offset, mask, kernel, padding, stride, dilation):
  """DCNv2 with explicit loops: x (B,H,W,C), offset (B,Ho,Wo,2T), mask (B,Ho,Wo,T), kernel HWIO."""
  x, offset, mask, kernel = (np.asarray(a, np.float64) for a in (x, offset, mask, kernel))
  (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
  b_, h, w, _ = x.shape
  kh, kw, _, o = kernel.shape
  ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
  wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
  out = np.zeros((b_, ho, wo, o))
  for b in range(b_):
    for oy in range(ho):
      for ox in range(wo):
        for i in range(kh):
          for j in range(kw):
            t = i * kw + j
            y = oy * sh - ph + i * dh + offset[b, oy, ox, 2 * t]
            xx = ox * sw - pw + j * dw + offset[b, oy, ox, 2 * t + 1]
            v = mask[b, oy, ox, t] * bilinear_torchvision(x[b], y, xx)
            out[b, oy, ox] += v @ kernel[i, j]
  return out


def output_size(h, w, k, padding, stride, dilation):
  (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
  return (h + 2 * ph - dh * (k - 1) - 1) // sh + 1, (w + 2 * pw - dw * (k - 1) - 1) // sw + 1


def random_case(seed, b, h, w, c, o, k, padding, stride, dilation, offset_scale):
  rng = np.random.default_rng(seed)
  ho, wo = output_size(h, w, k, padding, stride, dilation)
  x = rng.normal(size=(b, h, w, c))
  offset = rng.normal(scale=offset_scale, size=(b, ho, wo, 2 * k * k))
  mask = rng.uniform(0, 2, size=(b, ho, wo, k * k))
  kernel = rng.normal(size=(k, k, c, o))
  return x, offset, mask, kernel


def run(x, offset, mask, kernel, padding, stride, dilation, dtype=jnp.float64):
  fn = jax.jit(lambda *a: modulated_deform_conv2d(*a, padding=padding, stride=stride,
                                                  dilation=dilation))
  return fn(*(jnp.asarray(a, dtype) for a in (x, offset, mask, kernel)))


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# ---------------------------------------------------------------- forward

CASES = [
    # b, h, w, c, o, k, padding, stride, dilation, offset scale
    (2, 5, 6, 3, 4, 3, (1, 1), (1, 1), (1, 1), 1.5),
    (1, 6, 5, 2, 3, 7, (3, 3), (1, 1), (1, 1), 4.0),     # most samples leave the map
    (2, 4, 5, 3, 2, 1, (0, 0), (1, 1), (1, 1), 2.0),
    (1, 7, 6, 2, 3, 3, (2, 1), (2, 1), (2, 1), 1.0),     # asymmetric padding/stride/dilation
    (1, 6, 7, 2, 2, 3, (0, 0), (2, 2), (1, 1), 3.0),     # no padding, stride 2
]


@pytest.mark.parametrize('case', CASES)
def test_matches_numpy_reference(x64, case):
  b, h, w, c, o, k, padding, stride, dilation, scale = case
  args = random_case(sum(case[:6]), b, h, w, c, o, k, padding, stride, dilation, scale)
  got = np.asarray(run(*args, padding, stride, dilation))
  want = deform_conv_reference(*args, padding, stride, dilation)
  assert np.abs(want).max() > 1
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize('case', CASES)
def test_torch_statement_matches_numpy_reference(case):
  """tests/torch_reference.py (the torch DCN used by the decoder-block test and the benchmarks)
  agrees with the numpy reference on every case, asymmetric stride/dilation included."""
  torch = pytest.importorskip('torch')
  from torch_reference import deform_conv2d  # pylint: disable=import-outside-toplevel
  b, h, w, c, o, k, padding, stride, dilation, scale = case
  x, offset, mask, kernel = random_case(sum(case[:6]), b, h, w, c, o, k, padding, stride,
                                        dilation, scale)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))
  got = deform_conv2d(nchw(x), nchw(offset), torch.from_numpy(np.transpose(kernel, (3, 2, 0, 1))),
                      stride=stride, padding=padding, dilation=dilation, mask=nchw(mask))
  want = deform_conv_reference(x, offset, mask, kernel, padding, stride, dilation)
  np.testing.assert_allclose(np.transpose(got.numpy(), (0, 2, 3, 1)), want, rtol=0, atol=1e-12)


def test_samples_on_and_beyond_the_border(x64):
  """Integer and half-integer sample points at -1, -0.5, 0, H-1, H-0.5, H (and beyond)."""
  rng = np.random.default_rng(3)
  b, h, w, c, o, k = 1, 4, 5, 2, 3, 3
  x = rng.normal(size=(b, h, w, c)) + 2   # non-zero everywhere, so a dropped corner shows
  kernel = rng.normal(size=(k, k, c, o))
  ho, wo = h, w
  oy, ox = np.meshgrid(np.arange(ho), np.arange(wo), indexing='ij')
  targets_y = np.array([-1.0, -0.5, 0.0, h - 1.0, h - 0.5, h, -1.25, h + 0.25, 1.5])
  targets_x = np.array([-1.0, -0.5, 0.0, w - 1.0, w - 0.5, w, 2.0, -0.75, w - 0.25])
  offset = np.zeros((b, ho, wo, 2 * k * k))
  for t in range(k * k):
    i, j = divmod(t, k)
    ty = targets_y[(t + oy + 2 * ox) % len(targets_y)]
    tx = targets_x[(2 * t + ox + oy) % len(targets_x)]
    offset[0, :, :, 2 * t] = ty - (oy - 1 + i)      # lands exactly on ty
    offset[0, :, :, 2 * t + 1] = tx - (ox - 1 + j)
  mask = rng.uniform(0.5, 1.5, size=(b, ho, wo, k * k))
  args = (x, offset, mask, kernel)
  got = np.asarray(run(*args, (1, 1), (1, 1), (1, 1)))
  want = deform_conv_reference(*args, (1, 1), (1, 1), (1, 1))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
  # The single-pixel rule itself: a point at y = H - 1 reads row H-1 fully; at y = -1 or H nothing.
  img = x[0]
  np.testing.assert_allclose(bilinear_torchvision(img, h - 1.0, 1.0), img[h - 1, 1])
  assert not bilinear_torchvision(img, -1.0, 1.0).any()
  assert not bilinear_torchvision(img, float(h), 1.0).any()


@pytest.mark.parametrize('k,padding,stride,dilation', [
    (1, 0, 1, 1), (3, 1, 1, 1), (7, 3, 1, 1), (3, 2, 2, 2), (3, (0, 1), (1, 2), (2, 1))])
def test_zero_offsets_unit_mask_is_a_plain_conv(x64, k, padding, stride, dilation):
  rng = np.random.default_rng(k)
  x = rng.normal(size=(2, 9, 8, 3))
  kernel = rng.normal(size=(k, k, 3, 5))
  pad = padding if isinstance(padding, tuple) else (padding, padding)
  st = stride if isinstance(stride, tuple) else (stride, stride)
  dil = dilation if isinstance(dilation, tuple) else (dilation, dilation)
  ho, wo = output_size(9, 8, k, pad, st, dil)
  offset = np.zeros((2, ho, wo, 2 * k * k))
  mask = np.ones((2, ho, wo, k * k))
  got = run(x, offset, mask, kernel, padding, stride, dilation)
  want = jax.lax.conv_general_dilated(
      jnp.asarray(x), jnp.asarray(kernel), window_strides=st,
      padding=((pad[0], pad[0]), (pad[1], pad[1])), rhs_dilation=dil,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12)


def test_bfloat16_inputs(x64):
  """bf16 in, bf16 out: samples blended in float32 and rounded to bf16 for the bf16 matmul (float32
  accumulation), so the result is the float64 op on the same bf16 values up to one bf16 rounding
  (unit roundoff 2^-8) of every sample and one of the result."""
  args = random_case(11, 1, 6, 6, 4, 8, 3, (1, 1), (1, 1), (1, 1), 1.5)
  bf16_args = [jnp.asarray(a, jnp.bfloat16) for a in args]
  got = run(*bf16_args, (1, 1), (1, 1), (1, 1), dtype=jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  exact = [np.asarray(a, np.float64) for a in bf16_args]
  want = deform_conv_reference(*exact, (1, 1), (1, 1), (1, 1))
  # sum over taps and channels of |kernel * mask * sample|: bounds the sample roundings' effect
  magnitude = deform_conv_reference(np.abs(exact[0]), exact[1], exact[2], np.abs(exact[3]),
                                    (1, 1), (1, 1), (1, 1))
  got = np.asarray(got, np.float64)
  bound = 2 ** -8 * (magnitude + np.abs(got)) * 1.01 + 1e-6
  assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
  assert np.abs(got - want).max() > 0   # it did round: a bf16 path, not float32 in disguise


def test_float32_default_dtype_close_to_reference():
  args = random_case(5, 1, 5, 5, 3, 4, 3, (1, 1), (1, 1), (1, 1), 2.0)
  got = run(*args, (1, 1), (1, 1), (1, 1), dtype=jnp.float32)
  assert got.dtype == jnp.float32
  want = deform_conv_reference(*args, (1, 1), (1, 1), (1, 1))
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- gradients

def finite_difference_gradient(fn, args, index, eps=1e-6):
  """Central differences of the scalar fn(*args) w.r.t. every element of args[index] (vmapped)."""
  a = args[index]
  n = a.size
  basis = jnp.eye(n, dtype=a.dtype).reshape((n,) + a.shape)

  def at(delta):
    perturbed = list(args)
    perturbed[index] = a + delta
    return fn(*perturbed)

  plus = jax.vmap(at)(eps * basis)
  minus = jax.vmap(at)(-eps * basis)
  return np.asarray((plus - minus) / (2 * eps)).reshape(a.shape)


@pytest.mark.parametrize('k,padding,stride,dilation', [(3, 1, 1, 1), (3, 1, 2, 2), (1, 0, 1, 1)])
def test_gradients_match_finite_differences(x64, k, padding, stride, dilation):
  rng = np.random.default_rng(7 + k + stride)
  b, h, w, c, o = 1, 5, 6, 2, 3
  pad, st, dil = (padding,) * 2, (stride,) * 2, (dilation,) * 2
  ho, wo = output_size(h, w, k, pad, st, dil)
  x = rng.normal(size=(b, h, w, c))
  # Offsets = integer shift (some samples leave the map) + fraction kept away from integer
  # coordinates, where the bilinear sampler has kinks.
  offset = (rng.integers(-2, 3, size=(b, ho, wo, 2 * k * k))
            + rng.uniform(0.15, 0.85, size=(b, ho, wo, 2 * k * k)))
  mask = rng.uniform(0, 2, size=(b, ho, wo, k * k))
  kernel = rng.normal(size=(k, k, c, o))
  probe = jnp.asarray(rng.normal(size=(b, ho, wo, o)))
  args = [jnp.asarray(a) for a in (x, offset, mask, kernel)]

  def loss(*a):
    y = modulated_deform_conv2d(*a, padding=padding, stride=stride, dilation=dilation)
    return jnp.sum(y * probe)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
  for index, name in enumerate(['x', 'offset', 'mask', 'kernel']):
    want = finite_difference_gradient(jax.jit(loss), args, index)
    assert np.abs(want).max() > 1e-2, name
    np.testing.assert_allclose(np.asarray(grads[index]), want, rtol=0,
                               atol=1e-7 * max(1.0, np.abs(want).max()), err_msg=name)


def test_gradient_with_respect_to_offset_is_zero_outside(x64):
  """Points beyond the border contribute nothing, so neither do their offsets."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 4, 4, 2)))
  offset = jnp.full((1, 4, 4, 2), 10.3)
  mask = jnp.ones((1, 4, 4, 1))
  kernel = jnp.asarray(rng.normal(size=(1, 1, 2, 2)))
  g = jax.grad(lambda o: modulated_deform_conv2d(x, o, mask, kernel, padding=0).sum())(offset)
  assert not np.asarray(g).any()


# ---------------------------------------------------------------- the module

def test_module_names_shapes_and_init_is_plain_conv():
  k, c, o = 3, 4, 6
  module = DeformableConv2d(out_channels=o, kernel_size=k)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 5, c)), jnp.float32)
  params = module.init(jax.random.key(0), x)['params']
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes == {
      'offset_conv': {'kernel': (k, k, c, 2 * k * k), 'bias': (2 * k * k,)},
      'modulator_conv': {'kernel': (k, k, c, k * k), 'bias': (k * k,)},
      'regular_conv': {'kernel': (k, k, c, o)},
  }
  assert not any(np.asarray(v).any() for v in jax.tree.leaves(
      {n: params[n] for n in ('offset_conv', 'modulator_conv')}))
  y = module.apply({'params': params}, x)
  want = jax.lax.conv_general_dilated(x, params['regular_conv']['kernel'], (1, 1),
                                      ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=0, atol=1e-5)


def test_module_uses_predicted_offsets_and_two_sigmoid_mask(x64):
  rng = np.random.default_rng(2)
  k, c, o = 3, 3, 2
  x = jnp.asarray(rng.normal(size=(1, 5, 6, c)))
  module = DeformableConv2d(out_channels=o, kernel_size=k)
  params = module.init(jax.random.key(1), x)['params']
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(scale=0.5, size=p.shape)), params)
  y = module.apply({'params': params}, x)

  def conv(w, bias):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias

  offset = conv(params['offset_conv']['kernel'], params['offset_conv']['bias'])
  mask = 2 / (1 + np.exp(-np.asarray(conv(params['modulator_conv']['kernel'],
                                          params['modulator_conv']['bias']))))
  want = deform_conv_reference(x, offset, mask, params['regular_conv']['kernel'],
                               (1, 1), (1, 1), (1, 1))
  np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=1e-12)


def test_bad_shapes_are_reported():
  x = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match='offset must have shape'):
    modulated_deform_conv2d(x, jnp.zeros((1, 4, 4, 9)), jnp.zeros((1, 4, 4, 9)),
                            jnp.zeros((3, 3, 2, 1)), padding=1)
  with pytest.raises(ValueError, match='kernel must be'):
    modulated_deform_conv2d(x, jnp.zeros((1, 4, 4, 18)), jnp.zeros((1, 4, 4, 9)),
                            jnp.zeros((3, 3, 3, 1)), padding=1)


# ---------------------------------------------------------------- the fast path vs the previous one

FAST_CASES = [
    # b, h, w, c, o, k, padding, stride, dilation, offset scale, max_sample_bytes
    (2, 6, 5, 3, 4, 3, (1, 1), (1, 1), (1, 1), 2.0, None),   # decoder 3x3 branch, one tile
    (1, 7, 6, 2, 3, 7, (3, 3), (1, 1), (1, 1), 3.0, 1),      # 7x7, many samples out; 1 row a tile
    (2, 5, 6, 3, 2, 1, (0, 0), (1, 1), (1, 1), 2.0, None),   # the 1x1 branches
    (1, 7, 6, 2, 3, 3, (2, 1), (2, 1), (2, 1), 1.0, None),   # asymmetric padding/stride/dilation
    (1, 8, 7, 2, 3, 3, (1, 1), (2, 2), (1, 1), 2.0, 432),    # stride 2; 3 tiles of 6 rows, 2 pad
]


def fast_and_previous(case, dtype, seed):
  """Inputs of ``case`` in ``dtype`` and (fn(op) -> (y, grads)) for the loss sum(y * probe)."""
  b, h, w, c, o, k, padding, stride, dilation, scale, max_bytes = case
  x, offset, mask, kernel = random_case(seed, b, h, w, c, o, k, padding, stride, dilation, scale)
  ho, wo = output_size(h, w, k, padding, stride, dilation)
  probe = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(b, ho, wo, o)), jnp.float32)
  args = [jnp.asarray(a, dtype) for a in (x, offset, mask, kernel)]

  def value_and_grads(op, **extra):
    def both(*a):
      y, vjp = jax.vjp(lambda *v: op(*v, padding=padding, stride=stride, dilation=dilation,
                                     **extra), *a)
      return y, vjp(probe.astype(y.dtype))
    return jax.jit(both)(*args)

  extra = {} if max_bytes is None else dict(max_sample_bytes=max_bytes)
  return (value_and_grads(modulated_deform_conv2d, **extra),
          value_and_grads(modulated_deform_conv2d_autodiff))


@pytest.mark.parametrize('case', FAST_CASES)
def test_fast_path_matches_previous_implementation_float32(case):
  """Forward and the four gradients (x, offset, mask, kernel) of the fast path against the
  JAX-differentiated previous implementation, float32, to float32 summation-order error."""
  (y, grads), (y_ref, grads_ref) = fast_and_previous(case, jnp.float32, sum(case[:6]))
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0,
                             atol=2e-5 * np.abs(np.asarray(y_ref)).max())
  for name, got, want in zip(['x', 'offset', 'mask', 'kernel'], grads, grads_ref):
    want = np.asarray(want)
    assert np.abs(want).max() > 0.1, name
    assert got.dtype == jnp.float32, name
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 * np.abs(want).max(),
                               err_msg=name)


def test_fast_path_gradients_exact_on_the_border(x64):
  """Sample points exactly on -1, 0, H-1, H (and W) and beyond, float64: every gradient equals the
  previous implementation's (torchvision's rule: a point on -1 or H is outside, its offset and
  mask gradients are 0; a point on H-1 is inside)."""
  rng = np.random.default_rng(4)
  b, h, w, c, o, k = 1, 4, 5, 2, 3, 3
  x = jnp.asarray(rng.normal(size=(b, h, w, c)) + 2)
  kernel = jnp.asarray(rng.normal(size=(k, k, c, o)))
  oy, ox = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  targets_y = np.array([-1.0, -0.5, 0.0, h - 1.0, h - 0.5, h, -1.25, h + 0.25, 1.5])
  targets_x = np.array([-1.0, -0.5, 0.0, w - 1.0, w - 0.5, w, 2.0, -0.75, w - 0.25])
  offset = np.zeros((b, h, w, 2 * k * k))
  for t in range(k * k):
    i, j = divmod(t, k)
    offset[0, :, :, 2 * t] = targets_y[(t + oy + 2 * ox) % 9] - (oy - 1 + i)
    offset[0, :, :, 2 * t + 1] = targets_x[(2 * t + ox + oy) % 9] - (ox - 1 + j)
  offset = jnp.asarray(offset)
  mask = jnp.asarray(rng.uniform(0.5, 1.5, size=(b, h, w, k * k)))
  probe = jnp.asarray(rng.normal(size=(b, h, w, o)))

  def grads(op):
    loss = lambda *a: jnp.sum(op(*a, padding=1) * probe)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, offset, mask, kernel)

  fast, previous = grads(modulated_deform_conv2d), grads(modulated_deform_conv2d_autodiff)
  for name, got, want in zip(['x', 'offset', 'mask', 'kernel'], fast, previous):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12,
                               err_msg=name)
  # A tap whose point lies on y = -1 or y = H (outside): zero offset and mask gradient.
  d_offset = np.asarray(fast[1]).reshape(b, h, w, k * k, 2)
  d_mask = np.asarray(fast[2])
  on_border = np.zeros((h, w, k * k), bool)
  for t in range(k * k):
    ty = targets_y[(t + oy + 2 * ox) % 9]
    on_border[..., t] = (ty == -1.0) | (ty == h)
  assert on_border.any()
  assert not d_offset[0][on_border].any() and not d_mask[0][on_border].any()
  assert np.abs(d_mask).max() > 0


@pytest.mark.parametrize('case', [FAST_CASES[0], FAST_CASES[1]])
def test_bfloat16_path_against_float32(case):
  """bf16 inputs (the model's bf16 mode) against the float32 op on the same bf16-rounded values:
  forward and gradients within 2 % of the largest magnitude (bf16 samples and operands, float32
  accumulation; the offset gradient sums products of differences of bf16 pixels)."""
  seed = sum(case[:6])
  b, h, w, c, o, k, padding, stride, dilation, scale, max_bytes = case
  extra = {} if max_bytes is None else dict(max_sample_bytes=max_bytes)
  x, offset, mask, kernel = random_case(seed, b, h, w, c, o, k, padding, stride, dilation, scale)
  ho, wo = output_size(h, w, k, padding, stride, dilation)
  probe = jnp.asarray(np.random.default_rng(seed).normal(size=(b, ho, wo, o)), jnp.bfloat16)
  bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (x, offset, mask, kernel)]

  def value_and_grads(args, g):
    op = lambda *a: modulated_deform_conv2d(*a, padding=padding, stride=stride,
                                            dilation=dilation, **extra)
    y, vjp = jax.vjp(op, *args)
    return y, vjp(g.astype(y.dtype))

  y, grads = jax.jit(value_and_grads)(bf16, probe)
  y32, grads32 = jax.jit(value_and_grads)([a.astype(jnp.float32) for a in bf16], probe)
  assert y.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  for name, got, want in zip(['y', 'x', 'offset', 'mask', 'kernel'], (y,) + tuple(grads),
                             (y32,) + tuple(grads32)):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=0.02 * np.abs(want).max(), err_msg=name)
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999, name


def test_module_runs_the_fast_path_in_bfloat16():
  """DeformableConv2d(dtype=bfloat16) on float32 input: close to the float32 module (2 %)."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(1, 6, 5, 4)), jnp.float32)
  module32 = DeformableConv2d(out_channels=6, kernel_size=3)
  params = module32.init(jax.random.key(0), x)['params']
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(scale=0.3, size=p.shape), jnp.float32),
                        params)
  y32 = module32.apply({'params': params}, x)
  y16 = DeformableConv2d(out_channels=6, kernel_size=3, dtype=jnp.bfloat16).apply(
      {'params': params}, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=0,
                             atol=0.02 * np.abs(np.asarray(y32)).max())

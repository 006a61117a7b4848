"""Modulated deformable convolution (DCNv2) with torchvision's semantics, written with JAX gathers.

``modulated_deform_conv2d`` reproduces ``torchvision.ops.deform_conv2d(input, offset, weight,
mask=mask)`` (one offset group, one weight group, no bias) in NHWC:

* kernel tap ``t = i * kw + j`` (row-major); offset channel ``2t`` is the row shift Δy and
  ``2t + 1`` the column shift Δx of tap t; mask channel t scales tap t;
* tap t of output pixel (oy, ox) samples ``y = oy * stride - pad + i * dilation + Δy`` (and x
  likewise) bilinearly from the image zero-padded outside [0, H-1] x [0, W-1]; a point with
  ``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W`` is 0 (torchvision's test, which also zeroes
  the offset gradient exactly on that border);
* ``out[o] = sum_{c, t} kernel[i, j, c, o] * mask_t * sample_t[c]``.

``modulated_deform_conv2d`` (the model's op) is a ``jax.custom_vjp`` whose residuals are its four
inputs. The image is re-packed once so that each pixel carries its 2x2 neighbourhood (4C
channels, the image zero-padded by one pixel, so out-of-image corners read zeros and need no
masking). Forward: one gather of every (position, tap) neighbourhood, the bilinear blend (four
multiply-adds, fused with the gather by XLA) into a (positions, taps * C) sample buffer, and one
``dot_general`` with the (taps * C, O) kernel. Backward, recomputing the gather: the kernel
gradient ``samples^T @ g`` and the sample gradient ``g @ kernel^T`` as matmuls; the offset and mask
gradients from the four corner values dotted with the sample gradient over channels (a (positions,
taps, 4) array); dx by one scatter-add of the four corners' shares into a (B, H+2, W+2, C)
buffer, cropped. Positions are processed in tiles by a scan when the sample buffer would exceed
``max_sample_bytes`` (default 4 MiB on CPU, where small tiles stay in cache, 256 MiB elsewhere).

Dtypes: coordinates, bilinear weights, the blend and every accumulation run in at least float32
(float64 under x64), as torchvision's autocast does. With float32/float64 ``x`` the samples and
matmuls are in that dtype, the result exact to summation order (the float64 tests check it to
1e-12 against a numpy reference and finite differences). With bfloat16/float16 ``x`` (the model's
bf16 mode) the pixels are gathered in that dtype, blended in float32, rounded to it for the matmul
(float32 accumulation); the gradients are returned in the inputs' dtypes, dx accumulated in a
float32 buffer. The result is cast back to ``x.dtype``.

``modulated_deform_conv2d_autodiff`` is the previous implementation (a scan over kernel rows,
differentiated by JAX, float32 throughout), kept as an independent reference for the tests and
``tools/bench_deform_conv.py --before``.

Traced inside ``loop_free()`` (the ONNX export) the op is its forward alone, with no custom_vjp and
no scan: position tiles (bounded as on an accelerator) are computed one after another by a Python
loop and concatenated, the same arithmetic, as one straight-line graph instead of an ONNX ``Loop``.
"""

import contextlib
import contextvars
import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp

# The fast path's bound on its (positions x taps x C) sample buffer, beyond which it tiles the
# positions with a scan. On CPU small tiles stay in cache (measured: 4 MiB tiles ran the 7x7
# forward+backward at 64² ~1.5x faster than one 200 MB tile); on an accelerator a tile should be
# large, each scan step being sequential, but the backward holds up to ~10x the float32 sample
# buffer (the four corners, the sample gradient, the four corners' dx shares): 256 MiB keeps a
# tile's backward within a few GiB, and a tile of the 7x7 branch (C = 64) still has ~20k positions.
DEFAULT_MAX_SAMPLE_BYTES = {'cpu': 4 << 20}
DEFAULT_MAX_SAMPLE_BYTES_ACCELERATOR = 256 << 20


# True while tracing for a graph format without a usable loop (ONNX): see loop_free().
_LOOP_FREE = contextvars.ContextVar('deform_conv_loop_free', default=False)


@contextlib.contextmanager
def loop_free():
  """Within this context ``modulated_deform_conv2d`` traces as one straight-line forward graph
  (no ``lax.scan``, no custom_vjp; tiles as on an accelerator, in a Python loop), e.g. for ONNX,
  whose converters turn a scan into a slow ``Loop``. Not differentiable inside."""
  token = _LOOP_FREE.set(True)
  try:
    yield
  finally:
    _LOOP_FREE.reset(token)


def _pair(value, name: str) -> tuple[int, int]:
  if isinstance(value, int):
    return value, value
  if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
    return int(value[0]), int(value[1])
  raise ValueError(f'deform_conv.py: {name} must be an int or a pair of ints, got {value!r}')


def _neighbourhoods(x):
  """(B, H, W, C) -> (B * (H+1) * (W+1), 4C): row (b, a, c) holds the 2x2 window of the image
  zero-padded by one pixel whose top-left corner is pixel (a - 1, c - 1), corners ordered
  (top-left, top-right, bottom-left, bottom-right)."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  windows = jnp.concatenate([xp[:, :-1, :-1], xp[:, :-1, 1:], xp[:, 1:, :-1], xp[:, 1:, 1:]],
                            axis=-1)
  return windows.reshape(b * (h + 1) * (w + 1), 4 * c)


class _Geometry(NamedTuple):
  """Everything static about one call: shapes, the conv's geometry, dtypes and the tiling."""
  batch: int
  height: int
  width: int
  channels: int
  kh: int
  kw: int
  out_features: int
  out_h: int
  out_w: int
  pad: tuple[int, int]
  stride: tuple[int, int]
  dilation: tuple[int, int]
  compute_dtype: Any      # coordinates, bilinear weights, blending, accumulation
  sample_dtype: Any       # the gathered pixels and the matmul operands
  tile_rows: int          # output positions per tile
  num_tiles: int
  precision: Any

  @property
  def taps(self):
    return self.kh * self.kw

  @property
  def rows(self):
    return self.batch * self.out_h * self.out_w


def _check_shapes(x, offset, mask, kernel, padding, stride, dilation):
  """Validated ((pad_h, pad_w), (stride_h, stride_w), (dil_h, dil_w), out_h, out_w)."""
  pad_h, pad_w = _pair(padding, 'padding')
  stride_h, stride_w = _pair(stride, 'stride')
  dil_h, dil_w = _pair(dilation, 'dilation')
  if x.ndim != 4:
    raise ValueError(f'deform_conv.py: x must be (B, H, W, C), got shape {x.shape}')
  batch, height, width, channels = x.shape
  if kernel.ndim != 4 or kernel.shape[2] != channels:
    raise ValueError(f'deform_conv.py: kernel must be (kh, kw, C={channels}, O), '
                     f'got shape {kernel.shape}')
  kh, kw, _, _ = kernel.shape
  taps = kh * kw
  out_h = (height + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1
  out_w = (width + 2 * pad_w - dil_w * (kw - 1) - 1) // stride_w + 1
  if out_h <= 0 or out_w <= 0:
    raise ValueError(f'deform_conv.py: empty output ({out_h}, {out_w}) for input {x.shape}, '
                     f'kernel {kernel.shape}, padding {padding}, stride {stride}, '
                     f'dilation {dilation}')
  if offset.shape != (batch, out_h, out_w, 2 * taps):
    raise ValueError(f'deform_conv.py: offset must have shape {(batch, out_h, out_w, 2 * taps)}, '
                     f'got {offset.shape}')
  if mask.shape != (batch, out_h, out_w, taps):
    raise ValueError(f'deform_conv.py: mask must have shape {(batch, out_h, out_w, taps)}, '
                     f'got {mask.shape}')
  return (pad_h, pad_w), (stride_h, stride_w), (dil_h, dil_w), out_h, out_w


def modulated_deform_conv2d(x, offset, mask, kernel, *, padding, stride=1, dilation=1,
                            precision=None, max_sample_bytes=None):
  """torchvision's ``deform_conv2d`` with a mask, NHWC (the fast path: one gather, one matmul,
  a hand-written backward; see the module docstring).

  Args:
    x: (B, H, W, C) input. bfloat16/float16 ``x`` samples and multiplies in that dtype (the
      bilinear blending and every accumulation stay float32); float32/float64 is exact.
    offset: (B, Ho, Wo, 2 * kh * kw), channels (Δy, Δx) per tap, taps row-major.
    mask: (B, Ho, Wo, kh * kw) modulation of every tap.
    kernel: (kh, kw, C, O) weights (torch's OIHW transposed to HWIO).
    padding, stride, dilation: ints or (row, column) pairs, as in torch.
    precision: passed to the matmuls (``jax.lax.Precision``); None uses the default.
    max_sample_bytes: the most bytes the (positions x taps x C) sample buffer may take in the
      compute dtype; more positions than that are processed in tiles by a scan. None: 4 MiB on
      CPU, 256 MiB elsewhere (``DEFAULT_MAX_SAMPLE_BYTES``).
  Returns:
    (B, Ho, Wo, O) in ``x.dtype``.
  """
  pad, strides, dil, out_h, out_w = _check_shapes(x, offset, mask, kernel, padding, stride,
                                                  dilation)
  batch, height, width, channels = x.shape
  kh, kw, _, out_features = kernel.shape
  compute_dtype = jnp.promote_types(
      jnp.result_type(x.dtype, offset.dtype, mask.dtype, kernel.dtype), jnp.float32)
  low_precision = jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32
  sample_dtype = jnp.dtype(x.dtype) if low_precision else compute_dtype
  loop_free_graph = _LOOP_FREE.get()
  if max_sample_bytes is None:   # loop-free: few tiles, as each is a copy of the graph
    max_sample_bytes = (DEFAULT_MAX_SAMPLE_BYTES_ACCELERATOR if loop_free_graph else
                        DEFAULT_MAX_SAMPLE_BYTES.get(jax.default_backend(),
                                                     DEFAULT_MAX_SAMPLE_BYTES_ACCELERATOR))
  rows = batch * out_h * out_w
  row_bytes = kh * kw * channels * jnp.dtype(compute_dtype).itemsize
  if isinstance(batch, int):
    tile_rows = max(1, min(rows, int(max_sample_bytes) // row_bytes))
    num_tiles = -(-rows // tile_rows)
    tile_rows = -(-rows // num_tiles)          # balanced tiles: at most num_tiles - 1 pad rows
  else:   # a symbolic batch (jax.export with a polymorphic batch): one tile, no padding rows
    tile_rows, num_tiles = rows, 1
  if isinstance(precision, list):
    precision = tuple(precision)
  geo = _Geometry(batch, height, width, channels, kh, kw, out_features, out_h, out_w, pad,
                  strides, dil, jnp.dtype(compute_dtype), jnp.dtype(sample_dtype), tile_rows,
                  num_tiles, precision)
  if loop_free_graph:
    return _forward(geo, x, offset, mask, kernel, unroll_tiles=True)
  return _deform_op(geo)(x, offset, mask, kernel)


@functools.lru_cache(maxsize=None)
def _deform_op(geo: _Geometry):
  """The custom_vjp op for one geometry; its residuals are its four inputs."""

  @jax.custom_vjp
  def op(x, offset, mask, kernel):
    return _forward(geo, x, offset, mask, kernel)

  def op_fwd(x, offset, mask, kernel):
    return _forward(geo, x, offset, mask, kernel), (x, offset, mask, kernel)

  def op_bwd(residuals, g):
    return _backward(geo, *residuals, g)

  op.defvjp(op_fwd, op_bwd)
  return op


def _row_inputs(geo: _Geometry, offset, mask):
  """Per output position (row = (b, oy, ox), padded to num_tiles * tile_rows rows): Δy, Δx and
  mask per tap (rows, T), the tap-0 sampling origin (oy*stride - pad, ox*stride - pad) and the
  image index, each (rows,)."""
  cdt = geo.compute_dtype
  taps, rows = geo.taps, geo.rows
  offset = offset.astype(cdt).reshape(rows, taps, 2)
  mask = mask.astype(cdt).reshape(rows, taps)
  origin_y = jnp.arange(geo.out_h) * geo.stride[0] - geo.pad[0]
  origin_x = jnp.arange(geo.out_w) * geo.stride[1] - geo.pad[1]
  shape = (geo.batch, geo.out_h, geo.out_w)
  origin_y = jnp.broadcast_to(origin_y[None, :, None], shape).reshape(rows).astype(cdt)
  origin_x = jnp.broadcast_to(origin_x[None, None, :], shape).reshape(rows).astype(cdt)
  image = jax.lax.broadcasted_iota(jnp.int32, shape, 0).reshape(rows)   # iota, not arange: a
  # symbolic batch (jax.export, jax2onnx's dynamic B) stays a shape, never a value
  extra = 0 if geo.num_tiles == 1 else geo.num_tiles * geo.tile_rows - rows
  per_row = (offset[..., 0], offset[..., 1], mask, origin_y, origin_x, image)
  if extra:   # pad rows: mask 0, so they contribute nothing and receive zero gradients
    per_row = tuple(jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1)) for a in per_row)
  return per_row


def _tiled(geo: _Geometry, arrays):
  return tuple(a.reshape((geo.num_tiles, geo.tile_rows) + a.shape[1:]) for a in arrays)


def _sample_points(geo: _Geometry, dy, dx, origin_y, origin_x, image):
  """For (n, T) taps: the fractions (ly, lx), whether the point is inside torchvision's border
  (-1 < y < H, -1 < x < W), the row of its 2x2 neighbourhood in ``_neighbourhoods`` and the
  index of its top-left corner in the one-pixel-padded image flattened to (B*(H+2)*(W+2))."""
  cdt = geo.compute_dtype
  tap_y = jnp.repeat(jnp.arange(geo.kh) * geo.dilation[0], geo.kw).astype(cdt)
  tap_x = jnp.tile(jnp.arange(geo.kw) * geo.dilation[1], geo.kh).astype(cdt)
  y = origin_y[:, None] + tap_y + dy
  x = origin_x[:, None] + tap_x + dx
  inside = (y > -1) & (y < geo.height) & (x > -1) & (x < geo.width)
  y0 = jnp.floor(y)
  x0 = jnp.floor(x)
  # Top-left corner (y0, x0) is in [-1, H-1] x [-1, W-1] for points inside: padded pixel
  # (y0 + 1, x0 + 1). Points outside only need an in-bounds index: their weights are zero.
  a = jnp.clip(y0.astype(jnp.int32) + 1, 0, geo.height)
  c = jnp.clip(x0.astype(jnp.int32) + 1, 0, geo.width)
  img = image[:, None]
  packed_row = (img * (geo.height + 1) + a) * (geo.width + 1) + c
  padded_index = (img * (geo.height + 2) + a) * (geo.width + 2) + c
  return y - y0, x - x0, inside, packed_row, padded_index


def _bilinear(ly, lx):
  """(..., 4) weights of the corners (top-left, top-right, bottom-left, bottom-right)."""
  hy, hx = 1 - ly, 1 - lx
  return jnp.stack([hy * hx, hy * lx, ly * hx, ly * lx], axis=-1)


def _blend(corners, weights):
  """sum_k weights[..., k] * corners[..., k, :] as four multiply-adds (a reduce over the corner
  axis would have XLA's CPU backend materialize the broadcast weights at corners' size)."""
  out = corners[..., 0, :] * weights[..., 0, None]
  for k in range(1, 4):
    out = out + corners[..., k, :] * weights[..., k, None]
  return out


def _gather_corners(geo: _Geometry, windows, packed_row):
  """(n, T, 4, C) corner pixels in the compute dtype, gathered in the sample dtype."""
  n = packed_row.shape[0]
  corners = windows.at[packed_row].get(mode='promise_in_bounds')
  return corners.reshape(n, geo.taps, 4, geo.channels).astype(geo.compute_dtype)


def _matmul(a, b, contract, geo: _Geometry):
  return jax.lax.dot_general(a.astype(geo.sample_dtype), b.astype(geo.sample_dtype),
                             (contract, ((), ())), precision=geo.precision,
                             preferred_element_type=geo.compute_dtype)


def _forward(geo: _Geometry, x, offset, mask, kernel, unroll_tiles: bool = False):
  windows = _neighbourhoods(x.astype(geo.sample_dtype))
  kernel2d = kernel.reshape(geo.taps * geo.channels, geo.out_features)

  def tile(dy, dx, m, origin_y, origin_x, image):
    ly, lx, inside, packed_row, _ = _sample_points(geo, dy, dx, origin_y, origin_x, image)
    weights = _bilinear(ly, lx) * jnp.where(inside, m, 0)[..., None]
    corners = _gather_corners(geo, windows, packed_row)
    samples = _blend(corners, weights)                                   # (n, T, C), fp32
    samples = samples.reshape(-1, geo.taps * geo.channels)
    return _matmul(samples, kernel2d, ((1,), (0,)), geo)                 # (n, O)

  per_row = _row_inputs(geo, offset, mask)
  if geo.num_tiles == 1:
    out = tile(*per_row)
  elif unroll_tiles:
    tiled = _tiled(geo, per_row)
    out = jnp.concatenate([tile(*(a[i] for a in tiled)) for i in range(geo.num_tiles)])
  else:
    _, out = jax.lax.scan(lambda carry, xs: (carry, tile(*xs)), None, _tiled(geo, per_row))
    out = out.reshape(-1, geo.out_features)
  return out[:geo.rows].reshape(geo.batch, geo.out_h, geo.out_w, geo.out_features).astype(x.dtype)


def _backward(geo: _Geometry, x, offset, mask, kernel, g):
  cdt = geo.compute_dtype
  windows = _neighbourhoods(x.astype(geo.sample_dtype))
  kernel2d = kernel.reshape(geo.taps * geo.channels, geo.out_features)
  w2 = geo.width + 2
  corner_step = jnp.array([0, 1, w2, w2 + 1], jnp.int32)   # TL, TR, BL, BR in the padded image

  def tile(carry, xs):
    dx_image, dkernel = carry
    dy, dx, m, origin_y, origin_x, image, g_rows = xs
    ly, lx, inside, packed_row, padded_index = _sample_points(geo, dy, dx, origin_y, origin_x,
                                                              image)
    scale = jnp.where(inside, m, 0)
    bilinear = _bilinear(ly, lx)
    weights = bilinear * scale[..., None]                                 # (n, T, 4)
    corners = _gather_corners(geo, windows, packed_row)                   # (n, T, 4, C)
    samples = _blend(corners, weights).reshape(-1, geo.taps * geo.channels)
    dkernel = dkernel + _matmul(samples, g_rows, ((0,), (0,)), geo)       # (T*C, O)
    d_samples = _matmul(g_rows, kernel2d, ((1,), (1,)), geo)              # (n, T*C)
    d_samples = d_samples.reshape(-1, geo.taps, geo.channels)
    # d loss / d corner value, reduced over channels: everything the offsets and mask need.
    # A batched matrix-vector product over channels, not a broadcast multiply and a sum: the
    # (n, T, 4, C) broadcast of d_samples is never built. Full precision: these are the offset
    # and mask gradients' only sums.
    d_corner = jnp.einsum('ntkc,ntc->ntk', corners, d_samples,
                          precision=jax.lax.Precision.HIGHEST)              # (n, T, 4)
    d_mask = jnp.where(inside, jnp.sum(bilinear * d_corner, axis=-1), 0)
    hy, hx = 1 - ly, 1 - lx
    d_y = scale * ((d_corner[..., 2] - d_corner[..., 0]) * hx
                   + (d_corner[..., 3] - d_corner[..., 1]) * lx)
    d_x = scale * ((d_corner[..., 1] - d_corner[..., 0]) * hy
                   + (d_corner[..., 3] - d_corner[..., 2]) * ly)
    updates = weights[..., None] * d_samples[:, :, None, :]               # (n, T, 4, C)
    indices = padded_index[..., None] + corner_step
    dx_image = dx_image.at[indices.reshape(-1)].add(
        updates.reshape(-1, geo.channels), mode='promise_in_bounds')
    return (dx_image, dkernel), (d_y, d_x, d_mask)

  per_row = _row_inputs(geo, offset, mask)
  g_rows = g.reshape(geo.rows, geo.out_features)
  extra = 0 if geo.num_tiles == 1 else geo.num_tiles * geo.tile_rows - geo.rows
  if extra:
    g_rows = jnp.pad(g_rows, ((0, extra), (0, 0)))
  init = (jnp.zeros((geo.batch * (geo.height + 2) * w2, geo.channels), cdt),
          jnp.zeros((geo.taps * geo.channels, geo.out_features), cdt))
  if geo.num_tiles == 1:
    (dx_image, dkernel), (d_y, d_x, d_mask) = tile(init, per_row + (g_rows,))
  else:
    (dx_image, dkernel), (d_y, d_x, d_mask) = jax.lax.scan(
        tile, init, _tiled(geo, per_row + (g_rows,)))
  rows = geo.rows
  d_offset = jnp.stack([d_y, d_x], axis=-1).reshape(-1, 2 * geo.taps)[:rows]
  d_mask = d_mask.reshape(-1, geo.taps)[:rows]
  dx_image = dx_image.reshape(geo.batch, geo.height + 2, w2, geo.channels)
  return (dx_image[:, 1:-1, 1:-1].astype(x.dtype),
          d_offset.reshape(offset.shape).astype(offset.dtype),
          d_mask.reshape(mask.shape).astype(mask.dtype),
          dkernel.reshape(kernel.shape).astype(kernel.dtype))


def modulated_deform_conv2d_autodiff(x, offset, mask, kernel, *, padding, stride=1, dilation=1,
                            precision=None):
  """The previous implementation, differentiated by JAX: a scan over kernel rows whose body (a
  packed 2x2 gather, the bilinear blend and a kw*C -> O matmul) is rematerialized in the backward
  pass, everything in at least float32. Same arguments and result as
  ``modulated_deform_conv2d``; kept as the independent reference for the tests and the benchmark.

  Args:
    x: (B, H, W, C) input.
    offset: (B, Ho, Wo, 2 * kh * kw), channels (Δy, Δx) per tap, taps row-major.
    mask: (B, Ho, Wo, kh * kw) modulation of every tap.
    kernel: (kh, kw, C, O) weights (torch's OIHW transposed to HWIO).
    padding, stride, dilation: ints or (row, column) pairs, as in torch.
    precision: passed to the matmuls (``jax.lax.Precision``); None uses the default.
  Returns:
    (B, Ho, Wo, O) in ``x.dtype``.
  """
  (pad_h, pad_w), (stride_h, stride_w), (dil_h, dil_w), out_h, out_w = _check_shapes(
      x, offset, mask, kernel, padding, stride, dilation)
  batch, height, width, channels = x.shape
  kh, kw, _, out_features = kernel.shape

  compute_dtype = jnp.promote_types(
      jnp.result_type(x.dtype, offset.dtype, mask.dtype, kernel.dtype), jnp.float32)
  positions = out_h * out_w
  windows = _neighbourhoods(x.astype(compute_dtype))

  # Inputs grouped by kernel row (the scan axis first): the kw taps of a row are one step.
  offset = offset.astype(compute_dtype).reshape(batch, positions, kh, kw, 2)
  row_dy = jnp.moveaxis(offset[..., 0], 2, 0)                        # (kh, B, P, kw)
  row_dx = jnp.moveaxis(offset[..., 1], 2, 0)
  row_mask = jnp.moveaxis(mask.astype(compute_dtype).reshape(batch, positions, kh, kw), 2, 0)
  row_kernel = kernel.astype(compute_dtype).reshape(kh, kw * channels, out_features)
  row_shift = (jnp.arange(kh) * dil_h).astype(compute_dtype)         # i * dilation
  col_shift = (jnp.arange(kw) * dil_w).astype(compute_dtype)         # j * dilation

  grid_y = (jnp.arange(out_h) * stride_h - pad_h).astype(compute_dtype)
  grid_x = (jnp.arange(out_w) * stride_w - pad_w).astype(compute_dtype)
  grid_y = jnp.broadcast_to(grid_y[:, None], (out_h, out_w)).reshape(positions, 1)
  grid_x = jnp.broadcast_to(grid_x[None, :], (out_h, out_w)).reshape(positions, 1)
  image_base = jax.lax.broadcasted_iota(jnp.int32, (batch, 1, 1), 0) * ((height + 1) * (width + 1))

  @jax.checkpoint  # recompute the row's gather in the backward pass instead of storing it
  def kernel_row_contribution(windows, dy, dx, m, w, row):
    y = grid_y + row + dy                                            # (B, P, kw)
    xx = grid_x + col_shift + dx
    inside = (y > -1) & (y < height) & (xx > -1) & (xx < width)
    y0 = jnp.floor(y)
    x0 = jnp.floor(xx)
    ly = y - y0
    lx = xx - x0
    # Top-left corner (y0, x0) in [-1, H-1] x [-1, W-1] for points inside; windows row a = y0 + 1.
    # Points outside only need an in-bounds index: their weights are zero.
    a = jnp.clip(y0.astype(jnp.int32) + 1, 0, height)
    c = jnp.clip(x0.astype(jnp.int32) + 1, 0, width)
    rows = image_base + a * (width + 1) + c
    corners = windows.at[rows].get(mode='promise_in_bounds')          # (B, P, kw, 4C)
    corners = corners.reshape(batch, positions, kw, 4, channels)
    scale = jnp.where(inside, m, 0)
    hy, hx = 1 - ly, 1 - lx
    weights = jnp.stack([hy * hx, hy * lx, ly * hx, ly * lx], axis=-1) * scale[..., None]
    samples = jnp.einsum('bpjkc,bpjk->bpjc', corners, weights, precision=precision)
    samples = samples.reshape(batch, positions, kw * channels)
    return jnp.einsum('bpc,co->bpo', samples, w, precision=precision)

  def step(acc, per_row):
    return acc + kernel_row_contribution(windows, *per_row), None

  out0 = jnp.zeros((batch, positions, out_features), compute_dtype)
  out, _ = jax.lax.scan(step, out0, (row_dy, row_dx, row_mask, row_kernel, row_shift))
  return out.reshape(batch, out_h, out_w, out_features).astype(x.dtype)


class DeformableConv2d(nn.Module):
  """The official ``DeformableConv2d``: offsets and a 2*sigmoid mask predicted by convs of the
  same geometry, then a modulated deformable conv with ``regular_conv``'s weight (no bias).

  Parameter names mirror the official state dict: ``offset_conv``, ``modulator_conv`` (kernel and
  bias; both zero-initialized, so a fresh module is a plain conv with zero padding) and
  ``regular_conv`` (only its ``kernel`` is used). The offset and modulator convs stay two convs:
  run as one conv of their concatenated kernels (3k² channels), the quickstart's train step
  compiled in 206-247 s instead of 114-125 s on a 2-core CPU (LLVM's instruction selection on
  the elemental backward convs XLA emits for 147 channels), for no measured gain.
  With ``dtype`` bfloat16/float16 the input is cast to it, so the deformable conv takes its fast
  low-precision path (bf16 samples, float32 blending and accumulation).
  """
  out_channels: int
  kernel_size: int = 3
  stride: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    pad = k // 2
    in_channels = x.shape[-1]
    offset_kernel, offset_bias = ConvParams(k, in_channels, 2 * k * k, name='offset_conv')()
    mask_kernel, mask_bias = ConvParams(k, in_channels, k * k, name='modulator_conv')()
    inputs, offset_kernel, offset_bias, mask_kernel, mask_bias = promote_dtype(
        x, offset_kernel, offset_bias, mask_kernel, mask_bias, dtype=self.dtype)

    def conv(kernel, bias):
      return jax.lax.conv_general_dilated(
          inputs, kernel, (self.stride, self.stride), ((pad, pad), (pad, pad)),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias

    offset = conv(offset_kernel, offset_bias)
    modulator = conv(mask_kernel, mask_bias)
    mask = 2 * jax.nn.sigmoid(modulator.astype(jnp.promote_types(modulator.dtype, jnp.float32)))
    kernel = RegularConvWeight(k, self.out_channels, name='regular_conv')(in_channels)
    y = modulated_deform_conv2d(inputs, offset, mask, kernel, padding=pad, stride=self.stride)
    return y.astype(self.dtype or x.dtype)


class ConvParams(nn.Module):
  """The ``kernel`` (k, k, C, out) and ``bias`` (out,) of a zero-initialized conv, as
  ``nn.Conv`` names them; the caller runs the conv."""
  kernel_size: int
  in_channels: int
  out_channels: int

  @nn.compact
  def __call__(self):
    k = self.kernel_size
    zeros = nn.initializers.zeros
    return (self.param('kernel', zeros, (k, k, self.in_channels, self.out_channels), jnp.float32),
            self.param('bias', zeros, (self.out_channels,), jnp.float32))


class RegularConvWeight(nn.Module):
  """Holds the official ``regular_conv.weight`` as ``kernel`` (k, k, C, out); nothing else."""
  kernel_size: int
  out_channels: int

  @nn.compact
  def __call__(self, in_channels: int):
    k = self.kernel_size
    return self.param('kernel', nn.initializers.lecun_normal(),
                      (k, k, in_channels, self.out_channels))


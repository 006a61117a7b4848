"""Bilinear resize with ``align_corners=True`` as PyTorch computes it.

``jax.image.resize`` uses half-pixel centres and antialiases when downsampling; the official
BiRefNet calls ``F.interpolate(mode='bilinear', align_corners=True)`` everywhere (pyramid input,
feature fusion, decoder upsampling, losses), which maps output pixel ``o`` to source coordinate
``o * (in - 1) / (out - 1)`` and never antialiases.

Parity detail: torch computes the coordinates in the tensor's dtype,
``src = dtype((in - 1) / (out - 1)) * dtype(o)`` (``area_pixel_compute_scale`` /
``guard_index_and_lambda`` in ``aten/src/ATen/native/UpSample.h``), and interpolates along W
first, then along H. Doing the same reproduces torch's float32 resize to ~1e-7 (exact
coordinates differ by up to ~1e-4 on a unit-variance map).

Each axis is resized by a dense matmul with a static (out, in) interpolation matrix (two
non-zeros per row), not by gathering: the gradient is then the transposed matmul, where a gather's
gradient would be a scatter-add (slow on GPUs under contention, openxla/xla#26371). Float32 and
float64 inputs multiply at full precision (never TF32); low-precision inputs multiply in their
dtype with float32 sums.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _coordinate_dtype(dtype):
  return np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32


def source_indices(in_size: int, out_size: int, dtype=np.float32):
  """Static (index0, index1, lambda) for one axis, computed as torch does."""
  cdt = _coordinate_dtype(dtype)
  if out_size > 1:
    scale = cdt(in_size - 1) / cdt(out_size - 1)
  else:
    scale = cdt(0)
  src = (scale * np.arange(out_size, dtype=cdt)).astype(cdt)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam = np.clip(src - i0.astype(cdt), 0, 1).astype(cdt)
  i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
  return i0.astype(np.int32), i1.astype(np.int32), lam


def _axis_weights(x, axis: int, out_size: int):
  """``source_indices`` for resizing ``axis`` of ``x``, with ``lam`` shaped to broadcast along
  that axis; None when the axis already has ``out_size``."""
  in_size = x.shape[axis]
  if in_size == out_size:
    return None
  i0, i1, lam = source_indices(in_size, out_size, x.dtype)
  shape = [1] * x.ndim
  shape[axis] = out_size
  return i0, i1, lam.reshape(shape)


def interpolation_matrix(in_size: int, out_size: int, dtype=np.float32) -> np.ndarray:
  """The (out_size, in_size) matrix of one axis: row o holds ``1 - lam`` at ``i0`` and ``lam``
  at ``i1`` (``source_indices``), so ``matrix @ x`` is the 1-D resize of ``x`` along that axis.
  When ``i0 == i1`` (the last source pixel) the two weights add up in the coordinate dtype."""
  cdt = _coordinate_dtype(dtype)
  i0, i1, lam = source_indices(in_size, out_size, dtype)
  matrix = np.zeros((out_size, in_size), cdt)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, i0), (1 - lam).astype(cdt))
  np.add.at(matrix, (rows, i1), lam)
  return matrix


def _matmul_dtypes(dtype):
  """(precision, accumulation dtype) of the resize matmuls for inputs of ``dtype``."""
  if jnp.dtype(dtype) in (jnp.float32, jnp.float64):
    # Full precision: GPUs would otherwise run float32 matmuls as TF32.
    return jax.lax.Precision.HIGHEST, jnp.dtype(dtype)
  return None, jnp.float32


def _resize_axis(x, axis: int, out_size: int):
  """Resizes ``axis`` (1 = H or 2 = W) of NHWC ``x`` by a dense matmul with
  :func:`interpolation_matrix` (in ``x``'s dtype), accumulated in at least float32. Linear in
  ``x``, so its gradient is the transposed matmul: no gather, no scatter-add."""
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  matrix = jnp.asarray(interpolation_matrix(in_size, out_size, x.dtype)).astype(x.dtype)
  precision, accumulate = _matmul_dtypes(x.dtype)
  spec = 'oh,bhwc->bowc' if axis == 1 else 'ow,bhwc->bhoc'
  out = jnp.einsum(spec, matrix, x, precision=precision, preferred_element_type=accumulate)
  return out.astype(x.dtype)


def resize_bilinear_align_corners(x, size):
  """Resizes NHWC ``x`` to ``size = (height, width)`` like torch's align_corners=True bilinear.

  Two dense matmuls, along W then along H (torch's order); in a low-precision dtype the weights
  and the output between and after them are in that dtype, the sums in float32."""
  out_h, out_w = int(size[0]), int(size[1])
  x = _resize_axis(x, 2, out_w)
  return _resize_axis(x, 1, out_h)


def _resize_axis_np(x, axis: int, out_size: int):
  weights = _axis_weights(x, axis, out_size)
  if weights is None:
    return x
  i0, i1, lam = weights
  out = np.take(x, i0, axis=axis)
  out *= 1 - lam                      # in place: outputs can be large (original image sizes)
  upper = np.take(x, i1, axis=axis)
  upper *= lam
  out += upper
  return out


def resize_bilinear_align_corners_np(x, size):
  """The same resize on the host, in numpy, for ``x`` of shape (H, W, ...), by gathering the two
  source pixels (equal to :func:`resize_bilinear_align_corners` up to float rounding). For outputs whose sizes vary from image
  to image (original image or GT sizes), where a jitted resize would compile once per size."""
  x = np.asarray(x)
  if x.dtype not in (np.float32, np.float64):
    x = x.astype(np.float32)
  x = _resize_axis_np(x, 1, int(size[1]))
  return _resize_axis_np(x, 0, int(size[0]))

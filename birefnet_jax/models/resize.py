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
"""

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


def _resize_axis(x, axis: int, out_size: int):
  weights = _axis_weights(x, axis, out_size)
  if weights is None:
    return x
  i0, i1, lam = weights
  lam = jnp.asarray(lam).astype(x.dtype)
  x0 = jnp.take(x, jnp.asarray(i0), axis=axis, mode='clip')
  x1 = jnp.take(x, jnp.asarray(i1), axis=axis, mode='clip')
  return (1 - lam) * x0 + lam * x1


def resize_bilinear_align_corners(x, size):
  """Resizes NHWC ``x`` to ``size = (height, width)`` like torch's align_corners=True bilinear."""
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
  """The same resize on the host, in numpy, for ``x`` of shape (H, W, ...): bit-identical to
  :func:`resize_bilinear_align_corners` run op by op. For outputs whose sizes vary from image
  to image (original image or GT sizes), where a jitted resize would compile once per size."""
  x = np.asarray(x)
  if x.dtype not in (np.float32, np.float64):
    x = x.astype(np.float32)
  x = _resize_axis_np(x, 1, int(size[1]))
  return _resize_axis_np(x, 0, int(size[0]))

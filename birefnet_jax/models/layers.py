"""Small layers shared by the BiRefNet modules, with PyTorch's numerics.

Parameter names follow the official state dict (see ``birefnet_jax.convert.names``): a conv's
``weight`` is our ``kernel`` (HWIO), a norm's ``weight`` is our ``scale``, BatchNorm running
statistics live in the ``batch_stats`` collection as ``mean`` / ``var``.
"""

import functools
from typing import Any

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp


def remat_if(module_class, enabled: bool, static_argnums: tuple[int, ...], policy: str = ''):
  """``module_class`` rematerialized in the backward pass when ``enabled``, else itself.

  ``static_argnums`` count ``self`` as 0 (flax's convention for ``nn.remat``). ``policy`` names
  what may still be saved, a ``jax.checkpoint_policies`` attribute ('dots_saveable', ...);
  '' saves nothing (everything inside the block is recomputed).
  """
  if not enabled:
    return module_class
  return nn.remat(module_class, static_argnums=static_argnums, policy=checkpoint_policy(policy))


def checkpoint_policy(name: str):
  """The ``jax.checkpoint_policies`` entry called ``name`` ('' or None: save nothing)."""
  if not name:
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None or name.startswith('_'):
    known = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith('_'))
    raise ValueError(f'unknown remat policy {name!r}; jax.checkpoint_policies has {known}')
  if name in ('save_only_these_names', 'save_any_names_but_these', 'save_from_both_policies',
              'save_and_offload_only_these_names'):
    raise ValueError(f'remat policy {name!r} needs arguments; give a plain policy name such as '
                     "'dots_saveable' or 'nothing_saveable'")
  return policy


def conv(features: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
         use_bias: bool = True, groups: int = 1, dtype: Any = None, name: str | None = None):
  """A ``torch.nn.Conv2d`` in NHWC with torch's explicit symmetric zero padding (never 'SAME')."""
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                 feature_group_count=groups, dtype=dtype, name=name)


def conv_of_concatenation(parts, kernel, padding: int, accumulate_dtype):
  """``conv(concatenate(parts, -1), kernel)`` (stride 1, symmetric zero ``padding``) as the sum
  of one conv per part with that part's input rows of ``kernel`` (kh, kw, sum C, O), accumulated
  in ``accumulate_dtype``: the wide concatenation is never written and read back, which is the
  cheaper form when O is narrower than the concatenation (the decoder's 1x1 and 3x3 fusing
  convs). The parts and the kernel are used in the dtype they come in."""
  out, start = None, 0
  for part in parts:
    rows = part.shape[-1]
    y = jax.lax.conv_general_dilated(part, kernel[:, :, start:start + rows], (1, 1),
                                     ((padding, padding), (padding, padding)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     preferred_element_type=accumulate_dtype)
    out = y if out is None else out + y
    start += rows
  if start != kernel.shape[2]:
    raise ValueError(f'layers.py: the parts have {start} channels in all, the kernel takes '
                     f'{kernel.shape[2]}')
  return out


class ConcatConv(nn.Module):
  """``conv(features, kernel_size, padding=padding)`` on the channel concatenation of ``parts``
  (a sequence of (B, H, W, C_i)), computed by :func:`conv_of_concatenation` without building it.
  The same parameters as that ``nn.Conv`` (``kernel`` (k, k, sum C_i, features), ``bias``),
  initialized alike. The sum accumulates in at least float32, then the bias is added and the
  result cast to the compute ``dtype`` (float32/float64: exact to summation order)."""
  features: int
  kernel_size: int
  padding: int = 0
  use_bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, parts):
    if not isinstance(parts, (tuple, list)):
      parts = (parts,)
    kernel, bias = conv_params(self, self.kernel_size, sum(p.shape[-1] for p in parts),
                               self.features, self.use_bias)
    *parts, kernel, bias = promote_dtype(*parts, kernel, bias, dtype=self.dtype)
    accumulate = jnp.promote_types(kernel.dtype, jnp.float32)
    y = conv_of_concatenation(parts, kernel, self.padding, accumulate)
    if bias is not None:
      y = y + bias.astype(accumulate)
    return y.astype(kernel.dtype)


class ConvWeights(nn.Module):
  """The ``kernel`` (k, k, in_channels, features) and ``bias`` (features,) of an ``nn.Conv``
  (the same names and initializers), for a caller that runs the conv itself."""
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, in_channels: int):
    return conv_params(self, self.kernel_size, in_channels, self.features)


def conv_params(module: nn.Module, kernel_size: int, in_channels: int, features: int,
                use_bias: bool = True):
  """Declare on ``module`` the ``kernel`` (k, k, in_channels, features) and ``bias`` (features,
  or None without ``use_bias``) that an ``nn.Conv`` in its place would have: the same names,
  shapes, float32 and initializers, so checkpoints and the weight converter see an nn.Conv."""
  k = kernel_size
  kernel = module.param('kernel', nn.linear.default_kernel_init,
                        (k, k, in_channels, features), jnp.float32)
  bias = (module.param('bias', nn.initializers.zeros_init(), (features,), jnp.float32)
          if use_bias else None)
  return kernel, bias


def apply_conv(x, kernel, bias, padding: int, dtype: Any = None):
  """What ``nn.Conv`` (stride 1, symmetric zero ``padding``) computes with this ``kernel`` and
  ``bias`` (or None): the inputs promoted to ``dtype``, one conv, the bias added."""
  x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((padding, padding), (padding, padding)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y if bias is None else y + bias


def composed_conv3x3_pair(x, kernel1, bias1, kernel2, bias2, accumulate_dtype):
  """``conv(conv(x, kernel1) + bias1, kernel2) + bias2`` for two 3x3 convs with zero padding 1
  and nothing between them (the official SimpleConvs), as one 5x5 conv of ``x`` (padding 2)
  with the composed kernel and bias, exact: at the border pixels the composition would also
  count the first conv's values on the ring of positions just outside the image, which the
  second conv's zero padding leaves out; those are computed from thin strips of the image
  (its first/last row and column) and subtracted. ``x`` is used in its dtype for the 5x5 conv;
  the kernels are composed, and the strips computed, in ``accumulate_dtype``, which is also the
  result's dtype."""
  acc = accumulate_dtype
  k1, b1, k2, b2 = (a.astype(acc) for a in (kernel1, bias1, kernel2, bias2))
  _, height, width, _ = x.shape
  numbers = ('NHWC', 'HWIO', 'NHWC')

  def conv(a, kernel, padding):
    return jax.lax.conv_general_dilated(a, kernel, (1, 1), padding, dimension_numbers=numbers,
                                        preferred_element_type=acc)

  # kernel[s + t] += k1[s] @ k2[t]: tap t of the second conv over tap s of the first
  composed = jnp.zeros((5, 5) + k1.shape[2:3] + k2.shape[3:], acc)
  for ty in range(3):
    for tx in range(3):
      composed = composed.at[ty:ty + 3, tx:tx + 3].add(
          jnp.einsum('hwcm,mo->hwco', k1, k2[ty, tx]))
  bias = b2 + jnp.einsum('m,hwmo->o', b1, k2)
  out = conv(x, composed.astype(x.dtype), ((2, 2), (2, 2))) + bias

  # The first conv on the outer ring: row -1 (and H) sees only image row 0 (H-1), through the
  # kernel's last (first) row; column -1 (W), rows 0..H-1 only (the corners belong to the rows),
  # sees column 0 (W-1) through the kernel's last (first) column.
  xs = x.astype(acc)
  top = conv(xs[:, :1], k1[2:], ((0, 0), (2, 2))) + b1                 # (B, 1, W + 2, M)
  bottom = conv(xs[:, -1:], k1[:1], ((0, 0), (2, 2))) + b1
  left = conv(xs[:, :, :1], k1[:, 2:], ((1, 1), (0, 0))) + b1           # (B, H, 1, M)
  right = conv(xs[:, :, -1:], k1[:, :1], ((1, 1), (0, 0))) + b1
  # ... and what the second conv would take of them at the border pixels
  valid = ((0, 0), (0, 0))
  rows_pad = lambda a, before, after: jnp.pad(a, ((0, 0), (before, after), (0, 0), (0, 0)))
  cols_pad = lambda a, before, after: jnp.pad(a, ((0, 0), (0, 0), (before, after), (0, 0)))
  ring = (rows_pad(conv(top, k2[:1], valid), 0, height - 1)
          + rows_pad(conv(bottom, k2[2:], valid), height - 1, 0)
          + cols_pad(conv(left, k2[:, :1], ((1, 1), (0, 0))), 0, width - 1)
          + cols_pad(conv(right, k2[:, 2:], ((1, 1), (0, 0))), width - 1, 0))
  return out - ring


def layer_norm(epsilon: float = 1e-5, dtype: Any = None, name: str | None = None):
  """``torch.nn.LayerNorm`` over the last axis (torch's eps default is 1e-5, flax's is 1e-6)."""
  return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, dtype=dtype, name=name)


gelu = functools.partial(nn.gelu, approximate=False)  # torch nn.GELU() is the exact erf form


class BatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d`` (eps 1e-5, momentum 0.1) over the last axis of NHWC input.

  In training it normalizes with the biased batch variance and, like torch, updates the running
  variance with the unbiased one (N / (N - 1)). Under ``jax.jit`` over a data-parallel mesh the
  batch statistics are those of the global batch (torch's DDP computes them per GPU).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    if not train and self.has_variable('batch_stats', 'folded_shift'):
      # Folded into the preceding layer for inference (inference.fold_batch_norms): what is
      # left is a per-channel shift, zero when it went into that layer's bias.
      shift = self.get_variable('batch_stats', 'folded_shift')
      out_dtype = self.dtype or x.dtype
      return x.astype(out_dtype) + shift.astype(out_dtype) if shift.size else x.astype(out_dtype)
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    if train:
      xs = x.astype(stat_dtype)
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xs, axes)
      var = jnp.mean(jnp.square(xs - mean), axes)
      if not self.is_initializing():
        n = x.size // features
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        running_mean.value = ((1 - m) * running_mean.value + m * mean).astype(running_mean.value.dtype)
        running_var.value = ((1 - m) * running_var.value + m * unbiased).astype(running_var.value.dtype)
    else:
      mean = running_mean.value.astype(stat_dtype)
      var = running_var.value.astype(stat_dtype)
    inv = (scale.astype(stat_dtype) / jnp.sqrt(var + self.epsilon))
    y = (x.astype(stat_dtype) - mean) * inv + bias.astype(stat_dtype)
    return y.astype(self.dtype or x.dtype)


class DropPath(nn.Module):
  """Stochastic depth per sample (timm ``DropPath``): zero a sample's residual branch with
  probability ``rate`` and scale the kept ones by ``1 / (1 - rate)``. Identity when
  ``deterministic`` or ``rate == 0``; otherwise draws from the ``'drop_path'`` rng stream."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = jax.random.bernoulli(self.make_rng('drop_path'), keep_prob, shape).astype(x.dtype)
    if keep_prob > 0.0:  # timm divides only when something can be kept
      keep = keep / jnp.asarray(keep_prob, x.dtype)
    return x * keep

"""Small layers shared by the BiRefNet modules, with PyTorch's numerics.

Parameter names follow the official state dict (see ``birefnet_jax.convert.names``): a conv's
``weight`` is our ``kernel`` (HWIO), a norm's ``weight`` is our ``scale``, BatchNorm running
statistics live in the ``batch_stats`` collection as ``mean`` / ``var``.
"""

import functools
from typing import Any

import flax.linen as nn
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

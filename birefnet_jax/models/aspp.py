"""The official ``ASPPDeformable``: four deformable branches and a global-pooling branch, fused by
a 1x1 conv.

Branches (in the concatenation order of the official forward): ``aspp1`` (1x1 deformable),
``aspp_deforms_0/1/2`` (1x1, 3x3, 7x7 deformable; ``aspp1`` and ``aspp_deforms_0`` are two
independent 1x1 branches), and ``global_avg_pool_1/2`` (mean over H, W -> 1x1 conv -> BN -> ReLU,
broadcast back to H x W, which is what the official align_corners resize of a 1x1 map does).
Each branch has ``planes`` channels (official 256); ``conv1`` maps the 5 * planes back to
``in_channels`` -> ``bn1`` -> ReLU -> Dropout(0.5). No dilation anywhere despite the "atrous" names.

The pooled branch is constant over H x W, so its share of ``conv1`` is a per-image bias: ``conv1``'s
kernel is split at call time into the rows of each deformable branch (one 1x1 conv of its
planes channels each, summed) and the rows of the pooled branch (a matmul of the pooled vector),
which never builds the broadcast (B, H, W, planes) map nor the 5 * planes concatenation. Parameter
names and shapes are unchanged (``conv1.kernel`` is (1, 1, 5 * planes, in_channels)).

``batch_norm=False`` mirrors the official ``nn.Identity`` that replaces every BatchNorm when the
training batch size is 1: no BN variables exist then.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from birefnet_jax.models import layers
from birefnet_jax.models.deform_conv import DeformableConv2d

BRANCH_KERNEL_SIZES = (1, 3, 7)  # official parallel_block_sizes


def batch_norm_or_identity(enabled: bool, dtype: Any, name: str):
  """``layers.BatchNorm`` called as ``(x, train)``, or an identity with the same call."""
  if enabled:
    return layers.BatchNorm(dtype=dtype, name=name)
  return lambda x, train: x


class DeformableBranch(nn.Module):
  """The official ``_ASPPModuleDeformable``: DeformableConv2d (no bias) -> BN -> ReLU."""
  planes: int
  kernel_size: int
  batch_norm: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = DeformableConv2d(self.planes, self.kernel_size, dtype=self.dtype, name='atrous_conv')(x)
    x = batch_norm_or_identity(self.batch_norm, self.dtype, 'bn')(x, train)
    return nn.relu(x)


class ASPPDeformable(nn.Module):
  """Output has ``in_channels`` channels and the input's spatial size."""
  in_channels: int
  planes: int = 256
  dropout_rate: float = 0.5
  batch_norm: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool, deterministic: bool):
    if x.shape[-1] != self.in_channels:
      raise ValueError(f'aspp.py: ASPPDeformable(in_channels={self.in_channels}) got input with '
                       f'{x.shape[-1]} channels (shape {x.shape})')
    branch = lambda k, name: DeformableBranch(self.planes, k, self.batch_norm, self.dtype,
                                              name=name)
    outs = [branch(1, 'aspp1')(x, train)]
    outs += [branch(k, f'aspp_deforms_{j}')(x, train) for j, k in enumerate(BRANCH_KERNEL_SIZES)]

    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = layers.conv(self.planes, 1, use_bias=False, dtype=self.dtype,
                         name='global_avg_pool_1')(pooled)
    pooled = batch_norm_or_identity(self.batch_norm, self.dtype, 'global_avg_pool_2')(
        pooled, train)
    pooled = nn.relu(pooled)

    y = PooledBiasConv1x1(self.in_channels, dtype=self.dtype, name='conv1')(
        outs, pooled.astype(outs[0].dtype))
    y = batch_norm_or_identity(self.batch_norm, self.dtype, 'bn1')(y, train)
    y = nn.relu(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic or not train)


class PooledBiasConv1x1(nn.Module):
  """The official ``conv1`` (1x1, no bias) on ``concat(branches + [broadcast(pooled)])``,
  computed as ``sum_i branches[i] @ kernel[rows_i] + pooled @ kernel[rows of pooled]``: one
  matmul per branch (``layers.conv_of_concatenation``: the (B, H, W, 4 * planes) concatenation is
  never built, and ``conv1`` narrows it to ``in_channels``) and one per-image vector, added as a
  bias. Sums accumulate in at least float32 and the result is cast to the compute dtype once.
  ``kernel`` is (1, 1, branch channels + pooled channels, features), as ``nn.Conv`` names and
  initializes it."""
  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, branches, pooled):
    branches = tuple(branches) if isinstance(branches, (tuple, list)) else (branches,)
    n = sum(b.shape[-1] for b in branches)
    kernel, _ = layers.conv_params(self, 1, n + pooled.shape[-1], self.features, use_bias=False)
    *branches, pooled, kernel = promote_dtype(*branches, pooled, kernel, dtype=self.dtype)
    accumulate = jnp.promote_types(kernel.dtype, jnp.float32)
    y = layers.conv_of_concatenation(branches, kernel[:, :, :n], 0, accumulate)
    bias = jax.lax.dot_general(pooled, kernel[0, 0, n:], (((3,), (0,)), ((), ())),
                               preferred_element_type=accumulate)     # (B, 1, 1, features)
    return (y + bias).astype(kernel.dtype)

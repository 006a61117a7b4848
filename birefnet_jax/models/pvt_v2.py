"""PVT-v2 backbone (``PyramidVisionTransformerImpr`` of the official ``models/backbones/pvt_v2.py``).

The "Impr" variant: overlapping strided-conv patch embeddings, spatial-reduction attention whose
keys/values come from a strided conv (kernel = stride = sr_ratio, no pooling, no ReLU), and a
Mix-FFN (fc1 -> depthwise 3x3 conv -> GELU -> fc2). Four stages; each returns its tokens after a
stage LayerNorm as an NHWC map.

Everything runs on NHWC maps: the official code flattens ``B x C x H x W`` to tokens ``B x (H*W)
x C`` in row-major (h, w) order, which is exactly ``reshape(B, H*W, C)`` of an NHWC map, so the
token <-> map reshapes of the official code need no transposes here.

Module names mirror the official state dict (``birefnet_jax.convert.names``):
``patch_embed{s}/{proj,norm}``, ``block{s}_{i}/{norm1, attn/{q,kv,proj,sr,norm}, norm2,
mlp/{fc1,dwconv/dwconv,fc2}}``, ``norm{s}``.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from birefnet_jax.models import layers
from birefnet_jax.models.layers import DropPath, remat_if

# LayerNorm eps of the official code: the blocks and stage outputs use the pvt_v2_b* presets'
# partial(nn.LayerNorm, eps=1e-6); the patch embeddings and the sr norm are plain nn.LayerNorm.
BLOCK_NORM_EPS = 1e-6
PATCH_EMBED_NORM_EPS = 1e-5
SR_NORM_EPS = 1e-5


class OverlapPatchEmbed(nn.Module):
  """Strided conv with torch's symmetric padding k // 2 (k7 s4 p3 or k3 s2 p1), then LayerNorm."""
  embed_dim: int
  kernel_size: int
  stride: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = layers.conv(self.embed_dim, self.kernel_size, stride=self.stride,
                    padding=self.kernel_size // 2, dtype=self.dtype, name='proj')(x)
    return layers.layer_norm(PATCH_EMBED_NORM_EPS, dtype=self.dtype, name='norm')(x)


class Attention(nn.Module):
  """Multi-head attention whose keys/values come from a map reduced ``sr_ratio`` times."""
  dim: int
  num_heads: int
  sr_ratio: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    head_dim = c // self.num_heads
    tokens = x.reshape(b, h * w, c)
    q = nn.Dense(c, dtype=self.dtype, name='q')(tokens).reshape(b, h * w, self.num_heads, head_dim)
    if self.sr_ratio > 1:
      # Conv with kernel = stride = r and no padding ('VALID'): floor(h / r) x floor(w / r) tokens.
      reduced = layers.conv(c, self.sr_ratio, stride=self.sr_ratio, dtype=self.dtype, name='sr')(x)
      reduced = reduced.reshape(b, -1, c)
      kv_tokens = layers.layer_norm(SR_NORM_EPS, dtype=self.dtype, name='norm')(reduced)
    else:
      kv_tokens = tokens
    # The kv features are laid out (2, heads, head_dim): keys first, then values.
    kv = nn.Dense(2 * c, dtype=self.dtype, name='kv')(kv_tokens)
    kv = kv.reshape(b, -1, 2, self.num_heads, head_dim)
    k, v = kv[:, :, 0], kv[:, :, 1]

    logits = jnp.einsum('bnhd,bmhd->bhnm', q, k) * jnp.asarray(head_dim**-0.5, q.dtype)
    # Softmax in at least float32 (float64 stays float64) whatever the compute dtype.
    probs = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    out = jnp.einsum('bhnm,bmhd->bnhd', probs.astype(v.dtype), v).reshape(b, h, w, c)
    return nn.Dense(c, dtype=self.dtype, name='proj')(out)


class DWConv(nn.Module):
  """Depthwise 3x3 conv (stride 1, padding 1, bias); a module of its own only for the official
  parameter path ``mlp.dwconv.dwconv``."""
  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    return layers.conv(self.features, 3, padding=1, groups=self.features, dtype=self.dtype,
                       name='dwconv')(x)


class MixFFN(nn.Module):
  """fc1 -> depthwise 3x3 conv -> exact GELU -> fc2 (the official ``Mlp``)."""
  hidden_features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    out_features = x.shape[-1]
    x = nn.Dense(self.hidden_features, dtype=self.dtype, name='fc1')(x)
    x = DWConv(self.hidden_features, dtype=self.dtype, name='dwconv')(x)
    x = layers.gelu(x)
    return nn.Dense(out_features, dtype=self.dtype, name='fc2')(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
  dim: int
  num_heads: int
  mlp_ratio: float
  sr_ratio: int
  drop_path_rate: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    drop_path = DropPath(self.drop_path_rate)  # one rate, a fresh draw per branch
    y = layers.layer_norm(BLOCK_NORM_EPS, dtype=self.dtype, name='norm1')(x)
    y = Attention(self.dim, self.num_heads, self.sr_ratio, dtype=self.dtype, name='attn')(y)
    x = x + drop_path(y, deterministic)
    y = layers.layer_norm(BLOCK_NORM_EPS, dtype=self.dtype, name='norm2')(x)
    y = MixFFN(int(self.dim * self.mlp_ratio), dtype=self.dtype, name='mlp')(y)
    return x + drop_path(y, deterministic)


def stage_sizes(height: int, width: int) -> list[tuple[int, int]]:
  """Spatial sizes of the 4 stage outputs: conv arithmetic of k7 s4 p3, then k3 s2 p1 thrice."""
  sizes = [((height - 1) // 4 + 1, (width - 1) // 4 + 1)]
  for _ in range(3):
    h, w = sizes[-1]
    sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
  return sizes


class PyramidVisionTransformerImpr(nn.Module):
  """PVT-v2 encoder. ``__call__(x)`` with x (B, H, W, C_in) returns [x1, x2, x3, x4], NHWC, of
  spatial sizes ``stage_sizes(H, W)`` and ``embed_dims`` channels, after the stage norms.

  ``dtype`` is the compute dtype (e.g. bfloat16); parameters stay float32.
  """
  embed_dims: Sequence[int]
  num_heads: Sequence[int]
  mlp_ratios: Sequence[float]
  depths: Sequence[int]
  sr_ratios: Sequence[int]
  drop_path_rate: float = 0.1
  dtype: Any = None
  remat: bool = False   # rematerialize every block in the backward pass (saves memory)
  remat_policy: str = ''  # what remat may still save: a jax.checkpoint_policies name

  def _check(self, x):
    n = {len(self.embed_dims), len(self.num_heads), len(self.mlp_ratios), len(self.depths),
         len(self.sr_ratios)}
    if n != {4}:
      raise ValueError(f'{__name__}: embed_dims, num_heads, mlp_ratios, depths and sr_ratios '
                       f'need 4 entries each (one per stage), got {self.embed_dims}, '
                       f'{self.num_heads}, {self.mlp_ratios}, {self.depths}, {self.sr_ratios}')
    for dim, heads in zip(self.embed_dims, self.num_heads):
      if dim % heads:
        raise ValueError(f'{__name__}: embed dim {dim} is not divisible by {heads} heads')
    if x.ndim != 4:
      raise ValueError(f'{__name__}: expected an NHWC batch (B, H, W, C), got shape {x.shape}')
    for s, ((h, w), r) in enumerate(zip(stage_sizes(*x.shape[1:3]), self.sr_ratios), start=1):
      if h < r or w < r:
        raise ValueError(f'{__name__}: input {x.shape[1]}x{x.shape[2]} is too small: stage {s} '
                         f'is {h}x{w}, smaller than its spatial-reduction kernel {r}x{r}')

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    self._check(x)
    # Stochastic depth grows linearly over all blocks (np.linspace, as the official code).
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    block = remat_if(Block, self.remat, (2,), self.remat_policy)   # Block(x, deterministic)
    outs = []
    for s in range(4):
      kernel_size, stride = (7, 4) if s == 0 else (3, 2)
      x = OverlapPatchEmbed(self.embed_dims[s], kernel_size, stride, dtype=self.dtype,
                            name=f'patch_embed{s + 1}')(x)
      for i in range(self.depths[s]):
        x = block(self.embed_dims[s], self.num_heads[s], self.mlp_ratios[s], self.sr_ratios[s],
                  drop_path_rate=rates[sum(self.depths[:s]) + i], dtype=self.dtype,
                  name=f'block{s + 1}_{i}')(x, deterministic)
      x = layers.layer_norm(BLOCK_NORM_EPS, dtype=self.dtype, name=f'norm{s + 1}')(x)
      outs.append(x)
    return outs

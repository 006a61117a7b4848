"""DINOv3 ViT backbone (timm ``vit_*_patch16_dinov3``, the ``Eva`` class) returning NHWC features.

The official BiRefNet builds it with ``timm.create_model(name, features_only=True,
dynamic_img_size=True, out_indices=...)``: a ``FeatureGetterNet`` whose ``model`` is the Eva ViT
with the blocks after the last out index and the final norm pruned. Its forward:

  patch_embed: conv 16x16 / 16 (bias)                         -> (B, H/16, W/16, D)
  tokens = [cls, 4 registers, patches]                         no absolute position embedding
  blocks: x += gamma_1 * attn(norm1(x), rope); x += gamma_2 * mlp(norm2(x))
    attn: fused qkv (no bias), DINOv3 2-D RoPE on the patch tokens only (rotate-half layout),
      softmax(q k^T / sqrt(hd)) v, proj (bias)
    mlp: fc1 -> GELU (erf) -> fc2, or SwiGLU fc1_g / fc1_x -> silu(g) * x -> fc2 (S+, H+, 7B)
  features: the patch tokens after blocks ``out_indices`` (no norm), reshaped to (B, H/16, W/16, D)

All four features are at stride 16 with D channels; BiRefNet's pyramid neck resizes them to
strides 4..32 (``birefnet_jax.models.pyramid_neck``). Parameter names mirror the official state
dict (``bb.model.blocks.3.attn.qkv.weight`` -> ``bb/model/blocks_3/attn/qkv/kernel``).

DINOv3 RoPE (timm ``RotaryEmbeddingDinoV3``, eval mode: no coordinate augmentation): patch
centres ``(i + 0.5) / h`` mapped to [-1, 1] per axis, periods ``temperature ** (2 k / (hd / 2))``
for k < hd / 4, angles ``2 pi coord / period`` (row angles then column angles), sin/cos repeated
for the two halves. timm builds coordinates and periods in float32 and casts them to the model's
float dtype; so do we (at trace time, in numpy), so float64 runs match timm's ``model.double()``.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from birefnet_jax.models.layers import gelu, layer_norm, remat_if

PATCH_SIZE = 16


def rope_coords_periods(grid_h: int, grid_w: int, head_dim: int, temperature: float):
  """Patch-centre coordinates (N, 2) in [-1, 1] and periods (head_dim // 4,), float32 numpy."""
  if head_dim % 4:
    raise ValueError(f'DINOv3 RoPE needs a head dim divisible by 4, got {head_dim}')
  n_freq = head_dim // 4
  exponents = (np.float32(2.0) * np.arange(n_freq, dtype=np.float32)
               / np.float32(head_dim // 2)).astype(np.float32)
  periods = np.power(np.float32(temperature), exponents).astype(np.float32)
  axes = [((np.arange(0.5, s, dtype=np.float32)) / np.float32(s)).astype(np.float32)
          for s in (grid_h, grid_w)]
  grid = np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 2)
  coords = (np.float32(2.0) * grid - np.float32(1.0)).astype(np.float32)
  return coords, periods


def rope_tables(grid_h: int, grid_w: int, head_dim: int, temperature: float, dtype):
  """sin and cos (N, head_dim) in ``dtype`` (at least float32), computed as timm does."""
  coords, periods = rope_coords_periods(grid_h, grid_w, head_dim, temperature)
  coords = jnp.asarray(coords, dtype)
  periods = jnp.asarray(periods, dtype)
  angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).reshape(coords.shape[0], -1)
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  return jnp.concatenate([sin, sin], -1), jnp.concatenate([cos, cos], -1)


def apply_rope(x, sin, cos):
  """timm ``apply_rot_embed(half=True)``: x * cos + rotate_half(x) * sin, cast back to x's dtype."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], -1)
  return (x * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
  """timm ``EvaAttention`` with fused qkv (no bias) and RoPE on the non-prefix tokens."""
  num_heads: int
  num_prefix_tokens: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, sin, cos):
    b, n, c = x.shape
    hd = c // self.num_heads
    qkv = nn.Dense(3 * c, use_bias=False, dtype=self.dtype, name='qkv')(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]          # (b, n, heads, hd)
    npt = self.num_prefix_tokens
    rope = lambda t: jnp.concatenate(
        [t[:, :npt], apply_rope(t[:, npt:], sin[None, :, None], cos[None, :, None])], axis=1)
    q, k = rope(q), rope(k)
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(hd**-0.5, logits_dtype)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, n, c)
    return nn.Dense(c, dtype=self.dtype, name='proj')(out)


class Mlp(nn.Module):
  """timm ``Mlp`` (fc1 -> exact GELU -> fc2) or, with ``swiglu``, ``SwiGLU`` (fc1_g, fc1_x, fc2)."""
  hidden: int
  swiglu: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if self.swiglu:
      g = nn.Dense(self.hidden, dtype=self.dtype, name='fc1_g')(x)
      h = nn.Dense(self.hidden, dtype=self.dtype, name='fc1_x')(x)
      h = nn.silu(g) * h
    else:
      h = gelu(nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x))
    return nn.Dense(c, dtype=self.dtype, name='fc2')(h)


class Block(nn.Module):
  """timm ``EvaBlock``: pre-norm attention and MLP, each scaled by a LayerScale vector."""
  num_heads: int
  mlp_hidden: int
  swiglu: bool
  num_prefix_tokens: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, sin, cos):
    c = x.shape[-1]
    stream = x.dtype
    gamma_1 = self.param('gamma_1', nn.initializers.constant(1e-5), (c,))
    gamma_2 = self.param('gamma_2', nn.initializers.constant(1e-5), (c,))
    h = layer_norm(1e-5, dtype=self.dtype, name='norm1')(x)
    h = Attention(self.num_heads, self.num_prefix_tokens, dtype=self.dtype, name='attn')(h, sin, cos)
    x = x + (gamma_1.astype(h.dtype) * h).astype(stream)
    h = layer_norm(1e-5, dtype=self.dtype, name='norm2')(x)
    h = Mlp(self.mlp_hidden, self.swiglu, dtype=self.dtype, name='mlp')(h)
    return x + (gamma_2.astype(h.dtype) * h).astype(stream)


class PatchEmbed(nn.Module):
  """timm ``PatchEmbed`` (NHWC output): ``proj`` = conv 16x16, stride 16, with bias."""
  embed_dim: int
  dtype: Any = None

  @nn.compact
  def __call__(self, images):
    return nn.Conv(self.embed_dim, (PATCH_SIZE, PATCH_SIZE), strides=(PATCH_SIZE, PATCH_SIZE),
                   padding='VALID', dtype=self.dtype, name='proj')(images)


class EvaViT(nn.Module):
  """The pruned timm Eva (``FeatureGetterNet.model``): features after ``out_indices`` blocks."""
  embed_dim: int
  num_heads: int
  mlp_hidden: int
  out_indices: Sequence[int]
  swiglu: bool = False
  num_reg_tokens: int = 4
  rope_temperature: float = 100.0
  dtype: Any = None
  remat: bool = False
  remat_policy: str = ''

  @nn.compact
  def __call__(self, images):
    b, height, width, _ = images.shape
    if height % PATCH_SIZE or width % PATCH_SIZE:
      raise ValueError(f'DINOv3 needs height and width that are multiples of {PATCH_SIZE}, '
                       f'got {height}x{width}')
    d = self.embed_dim
    stream_dtype = jnp.promote_types(images.dtype, jnp.float32)
    x = PatchEmbed(d, dtype=self.dtype, name='patch_embed')(images)
    gh, gw = x.shape[1:3]
    x = x.reshape(b, gh * gw, d).astype(stream_dtype)
    cls_token = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, d))
    reg_token = self.param('reg_token', nn.initializers.normal(1e-6), (1, self.num_reg_tokens, d))
    prefix = [jnp.broadcast_to(cls_token, (b, 1, d)),
              jnp.broadcast_to(reg_token, (b, self.num_reg_tokens, d))]
    x = jnp.concatenate([p.astype(stream_dtype) for p in prefix] + [x], axis=1)
    npt = 1 + self.num_reg_tokens

    sin, cos = rope_tables(gh, gw, d // self.num_heads, self.rope_temperature, stream_dtype)
    block_class = remat_if(Block, self.remat, (), self.remat_policy)
    features = []
    for i in range(max(self.out_indices) + 1):
      x = block_class(self.num_heads, self.mlp_hidden, self.swiglu, npt, dtype=self.dtype,
                      name=f'blocks_{i}')(x, sin, cos)
      if i in self.out_indices:
        features.append(x[:, npt:].reshape(b, gh, gw, d))
    return features


class DinoV3(nn.Module):
  """``timm.create_model(..., features_only=True)``: the four NHWC stride-16 features (x1..x4)."""
  embed_dim: int
  num_heads: int
  mlp_hidden: int
  out_indices: Sequence[int]
  swiglu: bool = False
  num_reg_tokens: int = 4
  rope_temperature: float = 100.0
  dtype: Any = None
  remat: bool = False
  remat_policy: str = ''

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    del deterministic  # no dropout or stochastic depth in the official DINOv3 backbones
    return tuple(EvaViT(self.embed_dim, self.num_heads, self.mlp_hidden, tuple(self.out_indices),
                        swiglu=self.swiglu, num_reg_tokens=self.num_reg_tokens,
                        rope_temperature=self.rope_temperature, dtype=self.dtype,
                        remat=self.remat, remat_policy=self.remat_policy,
                        name='model')(images))

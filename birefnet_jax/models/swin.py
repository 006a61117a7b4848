"""Swin Transformer v1, the detection-style backbone of the official BiRefNet.

Mirrors ``models/backbones/swin_v1.py`` of the official code (itself Swin's detection variant):
any input size (right/bottom zero padding to patch and window multiples, odd sizes padded before
patch merging), no absolute position embedding, and a LayerNorm ``norm{s}`` on each of the four
stage outputs. Module names follow the official state dict (``layers_2/blocks_17/attn/qkv`` is
``layers.2.blocks.17.attn.qkv``), so ``birefnet_jax.convert.names`` maps every key one to one.

Layout is NHWC throughout. With a low-precision compute ``dtype`` (e.g. bfloat16) the matmuls and
convolutions run in that dtype while the residual stream, the LayerNorms and the softmax stay in
float32, as under torch's autocast (where LayerNorm outputs float32 and ``x + branch`` promotes).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from birefnet_jax.models.layers import DropPath, conv, gelu, layer_norm, remat_if


def relative_position_index(window_size: int) -> np.ndarray:
  """The official ``relative_position_index`` buffer, (w*w, w*w) int64.

  Tokens of a window are flattened row-major (i = y*w + x); the entry for query i and key j is
  ``(y_i - y_j + w - 1) * (2w - 1) + (x_i - x_j + w - 1)``, a row of the bias table.
  """
  w = window_size
  ys, xs = np.meshgrid(np.arange(w), np.arange(w), indexing='ij')
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  dy = ys[:, None] - ys[None, :] + (w - 1)
  dx = xs[:, None] - xs[None, :] + (w - 1)
  return (dy * (2 * w - 1) + dx).astype(np.int64)


def shifted_window_mask(padded_h: int, padded_w: int, window_size: int) -> np.ndarray:
  """Additive attention mask of the shifted blocks, (num_windows, w*w, w*w), 0 or -inf.

  As the official ``BasicLayer.forward``: the *padded* map is split into 3 x 3 regions by the
  slices [0, Hp-w), [Hp-w, Hp-s), [Hp-s, Hp) (same on W) with s = w // 2; after the cyclic
  shift, a token may only attend to tokens of its own region. Padded tokens are not masked.
  Every row keeps its own token, so -inf never makes a softmax row empty.
  """
  w, s = window_size, window_size // 2
  bounds_h = (0, padded_h - w, padded_h - s, padded_h)
  bounds_w = (0, padded_w - w, padded_w - s, padded_w)
  labels = np.zeros((padded_h, padded_w), np.int64)
  for i in range(3):
    for j in range(3):
      labels[bounds_h[i]:bounds_h[i + 1], bounds_w[j]:bounds_w[j + 1]] = 3 * i + j
  windows = window_partition(labels[None, :, :, None], w)[0, ..., 0]  # (nW, w*w)
  different = windows[:, :, None] != windows[:, None, :]
  return np.where(different, -np.inf, 0.0)


def window_partition(x, window_size: int):
  """(B, Hp, Wp, C) -> (B, nW, w*w, C); windows row-major over the map, tokens row-major inside.

  Works on numpy and jax arrays. Window n = row * (Wp / w) + col, as the official partition
  (whose batch-major flattening to B*nW is the same order).
  """
  b, hp, wp, c = x.shape
  w = window_size
  x = x.reshape(b, hp // w, w, wp // w, w, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (hp // w) * (wp // w), w * w, c)


def window_reverse(windows, window_size: int, padded_h: int, padded_w: int):
  """(B, nW, w*w, C) -> (B, Hp, Wp, C), the inverse of :func:`window_partition`."""
  b, _, _, c = windows.shape
  w = window_size
  x = windows.reshape(b, padded_h // w, padded_w // w, w, w, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, padded_h, padded_w, c)


ATTENTION_IMPLEMENTATIONS = ('einsum', 'xla', 'cudnn')


class WindowAttention(nn.Module):
  """Multi-head self-attention inside each window, with the relative position bias.

  Input (B, nW, N, C) with N = w*w; all windows of all images in one batched computation.
  ``attention`` picks how: 'einsum' (two einsums around a float32 softmax; the reference, and
  the default), or ``jax.nn.dot_product_attention`` with ``implementation`` 'xla' or 'cudnn'
  (cuDNN's fused attention: GPU only, bfloat16/float16 compute only). The fused kernels take one
  additive bias per (window, head): the relative position bias plus, in shifted blocks, the
  window's mask, broadcast over the batch.
  """
  dim: int
  num_heads: int
  window_size: int
  dtype: Any = None
  attention: str = 'einsum'

  @nn.compact
  def __call__(self, windows, mask=None):
    b, nw, n, c = windows.shape
    heads = self.num_heads
    head_dim = self.dim // heads
    w = self.window_size
    table = self.param('relative_position_bias_table', nn.initializers.truncated_normal(0.02),
                       ((2 * w - 1) ** 2, heads))

    # qkv features are laid out (3, heads, head_dim), as the official reshape reads them.
    qkv = nn.Dense(3 * self.dim, dtype=self.dtype, name='qkv')(windows)
    qkv = qkv.reshape(b, nw, n, 3, heads, head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    index = relative_position_index(w).reshape(-1)
    bias = table[index].reshape(n, n, heads).transpose(2, 0, 1)  # (heads, N, N)

    if self.attention == 'einsum':
      # Logits and softmax in at least float32 (float64 stays float64).
      logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
      logits = jnp.einsum('bwqhd,bwkhd->bwhqk', q, k, preferred_element_type=logits_dtype)
      logits = logits * jnp.asarray(head_dim ** -0.5, logits_dtype)
      logits = logits + bias.astype(logits_dtype)
      if mask is not None:  # (nW, N, N), shared by all images and heads
        logits = logits + jnp.asarray(mask, logits_dtype)[None, :, None]
      probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      out = jnp.einsum('bwhqk,bwkhd->bwqhd', probs, v)
    elif self.attention in ('xla', 'cudnn'):
      bias = bias[None]                                            # (1, heads, N, N)
      if mask is not None:                                         # (B*nW, heads, N, N)
        bias = bias[None] + jnp.asarray(mask, bias.dtype)[None, :, None]
        bias = jnp.broadcast_to(bias, (b, nw, heads, n, n)).reshape(b * nw, heads, n, n)
      flat = lambda t: t.reshape(b * nw, n, heads, head_dim)     # (batch, tokens, heads, dim)
      if self.attention == 'cudnn':
        bias = bias.astype(q.dtype)   # cuDNN takes the bias in the compute dtype
      out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), bias,
                                         scale=head_dim ** -0.5,
                                         implementation=self.attention)
    else:
      raise ValueError(f'WindowAttention: attention must be one of {ATTENTION_IMPLEMENTATIONS}, '
                       f'got {self.attention!r}')
    out = out.reshape(b, nw, n, c)
    return nn.Dense(self.dim, dtype=self.dtype, name='proj')(out)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2 (the official dropouts have rate 0)."""
  hidden_dim: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    out_dim = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name='fc1')(x)
    x = gelu(x)
    return nn.Dense(out_dim, dtype=self.dtype, name='fc2')(x)


class SwinBlock(nn.Module):
  """One Swin block on a (B, H, W, C) map; shifted by w // 2 when ``shifted``."""
  dim: int
  num_heads: int
  window_size: int
  shifted: bool
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Any = None
  attention: str = 'einsum'

  @nn.compact
  def __call__(self, x, shift_mask, deterministic: bool = True):
    _, h, w_, _ = x.shape
    win = self.window_size
    drop_path = DropPath(self.drop_path_rate, name='drop_path')

    shortcut = x
    y = layer_norm(name='norm1')(x)
    # Pad after the norm: padded tokens are zero vectors, attended to like any other token.
    pad_b, pad_r = (-h) % win, (-w_) % win
    if pad_b or pad_r:
      y = jnp.pad(y, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    hp, wp = h + pad_b, w_ + pad_r
    shift = win // 2 if self.shifted else 0
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    y = window_partition(y, win)
    y = WindowAttention(self.dim, self.num_heads, win, dtype=self.dtype,
                        attention=self.attention, name='attn')(y, shift_mask if shift else None)
    y = window_reverse(y, win, hp, wp)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    y = y[:, :h, :w_, :]
    x = shortcut + drop_path(y, deterministic).astype(shortcut.dtype)

    y = layer_norm(name='norm2')(x)
    y = Mlp(int(self.dim * self.mlp_ratio), dtype=self.dtype, name='mlp')(y)
    return x + drop_path(y, deterministic).astype(x.dtype)


class PatchMerging(nn.Module):
  """2x2 neighbourhood -> channels, LayerNorm(4C), Linear(4C -> 2C, no bias).

  The channel order is x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] (the row offset
  varies first), the official order. Odd sizes are zero-padded at the bottom/right first.
  """
  dim: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    _, h, w, _ = x.shape
    if h % 2 or w % 2:
      x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    x = layer_norm(name='norm')(x)
    return nn.Dense(2 * self.dim, use_bias=False, dtype=self.dtype, name='reduction')(x)


class SwinStage(nn.Module):
  """The official ``BasicLayer``: ``depth`` blocks alternating plain/shifted windows.

  Returns the stage output (before downsampling) and the downsampled map (or None).
  """
  dim: int
  depth: int
  num_heads: int
  window_size: int
  mlp_ratio: float
  drop_path_rates: Sequence[float]
  downsample: bool
  dtype: Any = None
  remat: bool = False
  remat_policy: str = ''
  attention: str = 'einsum'

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    _, h, w, _ = x.shape
    # remat: recompute each block in the backward pass instead of storing its activations.
    # SwinBlock(x, shift_mask, deterministic): deterministic (argnum 3 with self) is static.
    block = remat_if(SwinBlock, self.remat, (3,), self.remat_policy)
    win = self.window_size
    # Built on the padded size, with no clamping of the window for small maps.
    mask = shifted_window_mask(-(-h // win) * win, -(-w // win) * win, win)
    for m in range(self.depth):
      x = block(self.dim, self.num_heads, win, shifted=(m % 2 == 1),
                    mlp_ratio=self.mlp_ratio, drop_path_rate=float(self.drop_path_rates[m]),
                    dtype=self.dtype, attention=self.attention,
                    name=f'blocks_{m}')(x, mask, deterministic)
    if not self.downsample:
      return x, None
    down = PatchMerging(self.dim, dtype=self.dtype, name='downsample')(x)
    return x, down.astype(x.dtype)


class PatchEmbed(nn.Module):
  """Zero-pad W (right) then H (bottom) to patch multiples, conv k=s=patch, LayerNorm."""
  embed_dim: int
  patch_size: int = 4
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    _, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      x = jnp.pad(x, ((0, 0), (0, (-h) % p), (0, (-w) % p), (0, 0)))
    x = conv(self.embed_dim, p, stride=p, padding=0, dtype=self.dtype, name='proj')(x)
    return layer_norm(name='norm')(x)


class SwinTransformer(nn.Module):
  """Swin v1 backbone: (B, H, W, 3) -> 4 stage outputs (B, H/4·2^-s, W/4·2^-s, E·2^s), s = 0..3.

  Output sizes are ceil-divisions for sizes that are not multiples of 32. ``dtype`` is the compute
  dtype of matmuls/convs (parameters stay float32); outputs are float32 (or float64 in x64 runs).
  """
  embed_dim: int
  depths: Sequence[int]
  num_heads: Sequence[int]
  window_size: int
  mlp_ratio: float = 4.0
  patch_size: int = 4
  drop_path_rate: float = 0.2
  dtype: Any = None
  remat: bool = False   # rematerialize every block in the backward pass (saves memory)
  remat_policy: str = ''  # what remat may still save: a jax.checkpoint_policies name
  attention: str = 'einsum'  # window attention: 'einsum', 'xla' or 'cudnn' (WindowAttention)

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'SwinTransformer expects NHWC images (B, H, W, 3), got shape {x.shape}')
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f'SwinTransformer: depths {tuple(self.depths)} and num_heads '
                       f'{tuple(self.num_heads)} must have the same length')
    # The residual stream stays in (at least) float32, as under torch autocast.
    stream_dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = PatchEmbed(self.embed_dim, self.patch_size, dtype=self.dtype, name='patch_embed')(x)
    x = x.astype(stream_dtype)

    # Stochastic depth rate grows linearly over all blocks of all stages (official dpr).
    rates = np.linspace(0, self.drop_path_rate, sum(self.depths)).tolist()
    outs = []
    num_stages = len(self.depths)
    for s in range(num_stages):
      dim = self.embed_dim * 2**s
      first = sum(self.depths[:s])
      stage_out, x = SwinStage(dim, self.depths[s], self.num_heads[s], self.window_size,
                               self.mlp_ratio, rates[first:first + self.depths[s]],
                               downsample=s < num_stages - 1, dtype=self.dtype,
                               remat=self.remat, remat_policy=self.remat_policy,
                               attention=self.attention, name=f'layers_{s}')(x, deterministic)
      outs.append(layer_norm(name=f'norm{s}')(stage_out))
    return tuple(outs)

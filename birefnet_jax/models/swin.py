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

from birefnet_jax.models.attention import softmax_attention, softmax_attention_recomputed
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


def shifted_window_regions(padded_h: int, padded_w: int, window_size: int) -> np.ndarray:
  """Region label of every token of every window of the shifted blocks, (num_windows, w*w) int32.

  As the official ``BasicLayer.forward``: the *padded* map is split into 3 x 3 regions by the
  slices [0, Hp-w), [Hp-w, Hp-s), [Hp-s, Hp) (same on W) with s = w // 2; after the cyclic
  shift, a token may only attend to tokens of its own region (padded tokens are not masked).
  The official dense mask is ``labels[:, :, None] != labels[:, None, :]``; keeping the labels
  (a few KB) instead of that (nW, N, N) constant lets the comparison fuse into the softmax.
  """
  w, s = window_size, window_size // 2
  bounds_h = (0, padded_h - w, padded_h - s, padded_h)
  bounds_w = (0, padded_w - w, padded_w - s, padded_w)
  labels = np.zeros((padded_h, padded_w), np.int32)
  for i in range(3):
    for j in range(3):
      labels[bounds_h[i]:bounds_h[i + 1], bounds_w[j]:bounds_w[j + 1]] = 3 * i + j
  return window_partition(labels[None, :, :, None], w)[0, ..., 0]  # (nW, w*w)


def shifted_window_mask(padded_h: int, padded_w: int, window_size: int) -> np.ndarray:
  """Additive attention mask of the shifted blocks, (num_windows, w*w, w*w), 0 or -inf: the
  dense form of :func:`shifted_window_regions`. Every row keeps its own token, so -inf never
  makes a softmax row empty."""
  windows = shifted_window_regions(padded_h, padded_w, window_size)
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


def _pad_and_roll(x, pad_b: int, pad_r: int, shift: int, value):
  """``jnp.roll(pad(x), (-shift, -shift), (1, 2))`` for (B, H, W, C) ``x`` padded at the
  bottom/right with the per-channel ``value`` (C,), built as one nested concatenation of slices
  of ``x`` (row bands, each a concatenation of column pieces), which XLA fuses into one pass,
  instead of a pad and two rolls (three passes)."""
  b, h, w, c = x.shape
  fill = lambda rows, cols: jnp.broadcast_to(value, (b, rows, cols, c))
  if shift >= h or shift >= w:   # the shift reaches into the padding: the general form
    padded = jnp.concatenate([jnp.concatenate([x, fill(h, pad_r)], axis=2),
                              fill(pad_b, w + pad_r)], axis=1)
    return jnp.roll(padded, (-shift, -shift), axis=(1, 2))

  def joined(pieces, axis):
    pieces = [p for p in pieces if p.shape[axis]]
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=axis)

  def band(rows):   # the same column shift and padding for every row band
    return joined([rows[:, :, shift:], fill(rows.shape[1], pad_r), rows[:, :, :shift]], 2)

  return joined([band(x[:, shift:]), fill(pad_b, w + pad_r), band(x[:, :shift])], 1)


def _unroll_and_crop(x, h: int, w: int, shift: int):
  """``jnp.roll(x, (shift, shift), (1, 2))[:, :h, :w]`` for the padded (B, Hp, Wp, C) ``x``, as
  one nested concatenation of slices: the inverse of :func:`_pad_and_roll`."""
  _, hp, wp, _ = x.shape
  if not shift:
    return x[:, :h, :w]
  if shift >= h or shift >= w:
    return jnp.roll(x, (shift, shift), axis=(1, 2))[:, :h, :w]
  band = lambda rows: jnp.concatenate([rows[:, :, wp - shift:], rows[:, :, :w - shift]], axis=2)
  return jnp.concatenate([band(x[:, hp - shift:]), band(x[:, :h - shift])], axis=1)


def _partition_heads(qkv, window_size: int, heads: int):
  """(B, Hp, Wp, 3*heads*hd) -> q, k, v each (B, nW, heads, w*w, hd): the window partition, the
  official (3, heads, head_dim) feature split and the head-major layout of the batched matmuls,
  in one transpose."""
  b, hp, wp, f = qkv.shape
  w = window_size
  hd = f // (3 * heads)
  x = qkv.reshape(b, hp // w, w, wp // w, w, 3, heads, hd)
  x = x.transpose(5, 0, 1, 3, 6, 2, 4, 7)            # (3, B, Hp/w, Wp/w, heads, w, w, hd)
  x = x.reshape(3, b, (hp // w) * (wp // w), heads, w * w, hd)
  return x[0], x[1], x[2]


def _merge_heads(out, window_size: int, padded_h: int, padded_w: int):
  """(B, nW, heads, w*w, hd) -> (B, Hp, Wp, heads*hd): the inverse of :func:`_partition_heads`
  for one of q/k/v (window reverse and head merge in one transpose)."""
  b, _, heads, _, hd = out.shape
  w = window_size
  x = out.reshape(b, padded_h // w, padded_w // w, heads, w, w, hd)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6)               # (B, Hp/w, w, Wp/w, w, heads, hd)
  return x.reshape(b, padded_h, padded_w, heads * hd)


class WindowAttention(nn.Module):
  """(Shifted) window multi-head self-attention on a (B, H, W, C) map, with the relative
  position bias; returns (B, H, W, C).

  As the official block: the map is zero-padded at the bottom/right to window multiples, rolled
  by -``shift`` (shifted blocks), split into windows, attended (with ``regions`` from
  :func:`shifted_window_regions` masking tokens of other regions in shifted blocks), merged,
  rolled back and cropped. Computed without work on the padding: qkv runs on the real tokens
  only (a padded token is a zero vector, so its q/k/v are exactly the qkv bias, which fills the
  padding), and the output is cropped before ``proj`` (a per-token map).

  ``attention`` picks how: 'einsum' (two batched matmuls around a float32 softmax, the
  reference and the default; with a low-precision ``dtype`` the logits come out of the matmul in
  that dtype and the softmax runs in float32, as under torch autocast; there its gradient
  recomputes the logits rather than storing them, ``attention.softmax_attention_recomputed``), or
  ``jax.nn.dot_product_attention`` with ``implementation`` 'xla' or 'cudnn' (cuDNN's fused
  attention: GPU only, bfloat16/float16 compute only). The fused kernels take one additive bias
  per (window, head): the relative position bias plus, in shifted blocks, the window's mask,
  broadcast over the batch.
  """
  dim: int
  num_heads: int
  window_size: int
  dtype: Any = None
  attention: str = 'einsum'

  @nn.compact
  def __call__(self, x, shift: int = 0, regions=None):
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f'WindowAttention: attention must be one of {ATTENTION_IMPLEMENTATIONS}, '
                       f'got {self.attention!r}')
    _, h, w_, _ = x.shape
    heads = self.num_heads
    head_dim = self.dim // heads
    w = self.window_size
    n = w * w
    table = self.param('relative_position_bias_table', nn.initializers.truncated_normal(0.02),
                       ((2 * w - 1) ** 2, heads))

    qkv_layer = nn.Dense(3 * self.dim, dtype=self.dtype, name='qkv')
    qkv = qkv_layer(x)                                    # real tokens only
    pad_b, pad_r = (-h) % w, (-w_) % w
    hp, wp = h + pad_b, w_ + pad_r
    # padded tokens: qkv(0) = the bias, exactly; then the cyclic shift, in the same pass
    qkv = _pad_and_roll(qkv, pad_b, pad_r, shift,
                        qkv_layer.variables['params']['bias'].astype(qkv.dtype))
    q, k, v = _partition_heads(qkv, w, heads)             # (B, nW, heads, N, hd)
    b, nw = q.shape[:2]
    index = relative_position_index(w).reshape(-1)
    bias = table[index].reshape(n, n, heads).transpose(2, 0, 1)  # (heads, N, N)
    different = None
    if shift:
      regions = jnp.asarray(regions)
      different = regions[:, None, :, None] != regions[:, None, None, :]   # (nW, 1, N, N)

    if self.attention == 'einsum':
      # Low precision (the fast path): the gradient recomputes the logits instead of storing
      # them (attention.softmax_attention_recomputed); float32/float64: plain autodiff.
      low_precision = jnp.finfo(q.dtype).bits < 32
      core = softmax_attention_recomputed if low_precision else softmax_attention
      out = core(q, k, v, bias, different, head_dim ** -0.5)
    else:
      bias = bias[None]                                            # (1, heads, N, N)
      if different is not None:                                    # (B*nW, heads, N, N)
        bias = jnp.where(different, jnp.asarray(-jnp.inf, bias.dtype), bias)[None]
        bias = jnp.broadcast_to(bias, (b, nw, heads, n, n)).reshape(b * nw, heads, n, n)
      # (batch, tokens, heads, dim)
      flat = lambda t: t.transpose(0, 1, 3, 2, 4).reshape(b * nw, n, heads, head_dim)
      if self.attention == 'cudnn':
        bias = bias.astype(q.dtype)   # cuDNN takes the bias in the compute dtype
      out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), bias,
                                         scale=head_dim ** -0.5,
                                         implementation=self.attention)
      out = out.reshape(b, nw, n, heads, head_dim).transpose(0, 1, 3, 2, 4)
    out = _merge_heads(out, w, hp, wp)
    out = _unroll_and_crop(out, h, w_, shift)             # crop before proj
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
  def __call__(self, x, shift_regions, deterministic: bool = True):
    win = self.window_size
    drop_path = DropPath(self.drop_path_rate, name='drop_path')

    shortcut = x
    y = layer_norm(name='norm1')(x)
    if self.dtype is not None:
      y = y.astype(self.dtype)     # what qkv computes in; half the bytes to read
    shift = win // 2 if self.shifted else 0
    y = WindowAttention(self.dim, self.num_heads, win, dtype=self.dtype,
                        attention=self.attention, name='attn')(y, shift,
                                                               shift_regions if shift else None)
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
    # SwinBlock(x, shift_regions, deterministic): deterministic (argnum 3 with self) is static.
    block = remat_if(SwinBlock, self.remat, (3,), self.remat_policy)
    win = self.window_size
    # Built on the padded size, with no clamping of the window for small maps.
    regions = shifted_window_regions(-(-h // win) * win, -(-w // win) * win, win)
    for m in range(self.depth):
      x = block(self.dim, self.num_heads, win, shifted=(m % 2 == 1),
                    mlp_ratio=self.mlp_ratio, drop_path_rate=float(self.drop_path_rates[m]),
                    dtype=self.dtype, attention=self.attention,
                    name=f'blocks_{m}')(x, regions, deterministic)
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

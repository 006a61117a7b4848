"""birefnet_jax.flops against XLA's own count where XLA counts right (no loops), and the figures
the GPU session relies on (SwinL at 1024² ~2.5 TFLOP per image).

XLA's cost analysis of a convolution counts only the taps that fall inside the unpadded input
(a 3x3 conv with padding 1 on 32² counts (94/96)² of the taps); the analytic counter counts every
tap, as the hardware computes them. The tests correct for that explicitly. XLA's count of a
``lax.scan`` is its body once: the deformable conv (one scan step per kernel row) is undercounted
by XLA, which is why the counter exists.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from birefnet_jax import flops
from birefnet_jax.models import config as config_lib
from birefnet_jax.models import layers
from birefnet_jax.models.deform_conv import DeformableConv2d
from birefnet_jax.models.swin import WindowAttention


def xla_flops(module, *inputs):
  """XLA's count for ``module.apply`` (the lowered program: no compile needed)."""
  shapes = jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a), *inputs)
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  lowered = jax.jit(lambda v, *a: module.apply(v, *a)).lower(variables, *inputs)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def valid_taps(size, k, padding, stride=1):
  """Taps of a 1-D conv that read inside the input (what XLA counts), summed over outputs."""
  out = (size + 2 * padding - k) // stride + 1
  return sum(sum(1 for t in range(k) if 0 <= o * stride - padding + t < size) for o in range(out))


@pytest.mark.parametrize('k,stride,padding', [(3, 1, 1), (4, 4, 0), (7, 4, 3), (1, 1, 0)])
def test_conv_matches_xla(k, stride, padding):
  h, w, c_in, c_out = 32, 24, 16, 24
  fc = flops.FlopCount()
  ho, wo = flops.conv(fc, 'p', (h, w), c_in, c_out, k, stride=stride, padding=padding)
  x = jnp.ones((1, h, w, c_in))
  module = layers.conv(c_out, k, stride=stride, padding=padding, use_bias=False)
  expected_xla = 2 * valid_taps(h, k, padding, stride) * valid_taps(w, k, padding, stride) \
      * c_in * c_out
  assert xla_flops(module, x) == expected_xla
  assert fc.total == 2 * ho * wo * k * k * c_in * c_out
  if padding == 0:
    assert fc.total == expected_xla


def test_grouped_conv_and_dense_match_xla():
  x = jnp.ones((1, 16, 16, 32))
  fc = flops.FlopCount()
  flops.conv(fc, 'p', (16, 16), 32, 32, 3, padding=1, groups=32)
  xla = xla_flops(layers.conv(32, 3, padding=1, groups=32, use_bias=False), x)
  assert xla == fc.total * valid_taps(16, 3, 1) ** 2 // 48**2
  fc = flops.FlopCount()
  flops.dense(fc, 'p', 16 * 16, 32, 40)
  assert xla_flops(nn.Dense(40, use_bias=False), x) == fc.total


def test_window_attention_matches_xla():
  """qkv, Q K^T, P V and proj of Swin's WindowAttention on a map that needs window padding: qkv
  and proj run on the real tokens only; XLA adds the softmax and the biases (~2 % here)."""
  dim, heads, win = 64, 2, 7
  n = win * win
  x = jnp.ones((1, 12, 13, dim))          # padded to 14 x 14: 4 windows, 196 - 156 padding tokens
  fc = flops.FlopCount()
  tokens, padded = 12 * 13, 14 * 14
  flops.dense(fc, 'a', tokens, dim, 3 * dim)    # qkv and proj on the real tokens only
  fc.add('a', 'attention', 4 * padded * n * dim)
  flops.dense(fc, 'a', tokens, dim, dim)
  xla = xla_flops(WindowAttention(dim, heads, win), x)
  assert fc.total <= xla <= 1.05 * fc.total, (xla, fc.total)


def test_swin_backbone_counts_what_xla_counts():
  """The whole Swin backbone (no loops): XLA's count is the analytic one plus elementwise work
  (LayerNorm, softmax, GELU, biases), which is large at this toy width (embed_dim 16)."""
  from birefnet_jax.models.swin import SwinTransformer  # pylint: disable=import-outside-toplevel
  bb = config_lib.swin_config(16, (2, 2, 2, 2), (1, 2, 4, 8), 7)
  fc = flops.FlopCount()
  flops.swin(fc, 'b', bb, (64, 64))
  module = SwinTransformer(bb.embed_dim, bb.depths, bb.num_heads, bb.window_size)
  xla = xla_flops(module, jnp.ones((1, 64, 64, 3)))
  assert fc.total < xla < 1.3 * fc.total, (xla, fc.total)


def test_dino_v3_backbone_counts_what_xla_counts():
  """The DINOv3 ViT (no loops): as for Swin, XLA adds only elementwise work."""
  from birefnet_jax.models.dino_v3 import DinoV3  # pylint: disable=import-outside-toplevel
  for swiglu in (False, True):
    bb = config_lib.dino_v3_config(32, 4, 2, 64, swiglu, (0, 1, 2, 3))
    fc = flops.FlopCount()
    flops.dino_v3(fc, 'b', bb, (64, 96))
    module = DinoV3(bb.embed_dim, bb.num_heads, bb.mlp_hidden, bb.out_indices, swiglu=swiglu)
    xla = xla_flops(module, jnp.ones((1, 64, 96, 3)))
    assert fc.total < xla < 1.3 * fc.total, (swiglu, xla, fc.total)


def test_dino_v3_model_counts_the_neck():
  cfg = config_lib.model_config('dino_v3_s')
  parts = flops.count(cfg, (512, 512)).by_part()
  # neck: 1x1 convs from 768 channels to 384 / 768 / 1536 / 3072 at strides 4 / 8 / 16 / 32
  expected = sum(2 * (512 // s) ** 2 * 768 * c for s, c in zip((4, 8, 16, 32),
                                                               (384, 768, 1536, 3072)))
  assert parts['neck'] == expected


def test_deformable_conv_xla_counts_one_tile_of_the_scan(monkeypatch):
  """In one tile (no scan) XLA sees the whole deformable conv: the analytic count, within the
  elementwise extras (the sampling weights). Tiled by a scan over positions, XLA counts one
  tile's body: below the analytic count."""
  from birefnet_jax.models import deform_conv  # pylint: disable=import-outside-toplevel
  h = w = 32
  c_in, c_out = 16, 24
  x = jnp.ones((1, h, w, c_in))
  for k in (1, 3):
    fc = flops.FlopCount()
    flops.deformable_conv(fc, 'd', (h, w), c_in, c_out, k)
    kinds = fc.by_kind()
    pad_fraction = (valid_taps(h, k, k // 2) / (h * k)) ** 2   # the offset/modulator convs
    whole = kinds['conv'] * pad_fraction + kinds['deform_matmul'] + kinds['deform_sampling']
    monkeypatch.setitem(deform_conv.DEFAULT_MAX_SAMPLE_BYTES, 'cpu', 1 << 30)   # one tile
    xla = xla_flops(DeformableConv2d(c_out, k), x)
    assert whole <= xla <= 1.1 * whole, (k, xla, whole)
    # Tiles of ~20 kB: (32 * 32 positions x k^2 taps x 16 channels x 4 bytes) / 20 kB tiles.
    monkeypatch.setitem(deform_conv.DEFAULT_MAX_SAMPLE_BYTES, 'cpu', 20000)
    tiled = xla_flops(DeformableConv2d(c_out, k), x)
    assert tiled < 0.6 * whole, (k, tiled, whole)


def test_tiny_model_parts_and_xla():
  """The tool's tiny BiRefNet: every part is counted and XLA's count (scan bodies once) is
  below the analytic one."""
  from birefnet_jax.models.birefnet import BiRefNet  # pylint: disable=import-outside-toplevel
  cfg = config_lib.model_config('swin_v1_t', aspp_planes=16, dec_inter_channels=8,
                                ipt_inter_channels=6)
  cfg.backbone = config_lib.swin_config(8, (2, 2, 2, 2), (1, 2, 4, 8), 7)
  fc = flops.count(cfg, (64, 64))
  parts = fc.by_part()
  assert set(parts) == {'backbone', 'backbone_half', 'squeeze', 'inref', 'lateral', 'outref',
                        'decoder_block4', 'decoder_block3', 'decoder_block2', 'decoder_block1'}
  assert all(v > 0 for v in parts.values())
  model = BiRefNet(cfg)
  images = jnp.ones((1, 64, 64, 3))
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  cost = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  assert 0.5 * fc.total < float(cost['flops']) < fc.total
  # Train mode adds the multi-stage heads and OutRef predictions; a step is 3x its forward.
  train = flops.count(cfg, (64, 64), train=True).total
  assert train > fc.total
  assert flops.train_step_flops(cfg, (64, 64), batch=2) == 6 * train


def test_swin_l_1024_is_about_2_5_tflop():
  cfg = config_lib.model_config('swin_v1_l')
  fc = flops.count(cfg, 1024)
  # ~2.54 TFLOP as the official model computes it, less the ~146 GFLOP of qkv / proj on window
  # padding tokens that our Swin skips (window 12: stage 1's 256² tokens are padded to 264²).
  assert 2.3e12 < fc.total < 2.5e12, fc.total
  kinds = fc.by_kind()
  # The 7x7 deformable conv of the 256² stage alone: 2 * 256² * 49 * 64 * 256 (~105 GFLOP).
  assert kinds['deform_matmul'] > 105e9
  assert kinds['attention'] > 50e9
  assert flops.forward_flops(cfg, 1024, batch=4) == 4 * fc.total
  # Every preset at a non-square size counts (and scales roughly with the pixels).
  for preset in list(config_lib.SWIN_PRESETS) + list(config_lib.PVT_PRESETS):
    c = config_lib.model_config(preset)
    small, big = flops.count(c, (512, 384)).total, flops.count(c, (1024, 768)).total
    assert 3.5 * small < big < 5 * small, preset

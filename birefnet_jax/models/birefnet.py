"""BiRefNet: encoder (backbone twice, 'cat' pyramid), context fusion, squeeze block and the decoder
with InRef (image patches at every stage), OutRef (gradient attention) and multi-stage heads.

Data flow (official ``models/birefnet.py``; shapes for an H x W input, C_i the backbone channels):

  images (B,H,W,3) -> backbone -> x1..x4 (H/4..H/32)            full resolution pass
  resize(images, H/2) -> backbone -> upsample -> concat onto x1..x4  ('cat': channels doubled)
  x4 <- concat(resize(x1), resize(x2), resize(x3), x4)            context fusion (cxt_num = 3)
  x4 <- BasicDecBlk(x4)                                           squeeze block
  decoder: stage 4..1, each = concat(feature, InRef(image patches)) -> BasicDecBlk
           -> multi-stage logits m_i and OutRef gradient attention -> upsample + lateral(x_{i-1})
  final logits (B,H,W,1)

Module names mirror the official state dict (see ``birefnet_jax.convert.names``).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from birefnet_jax.models import config as config_lib
from birefnet_jax.models.decoder_blocks import BasicDecBlk
from birefnet_jax.models.dino_v3 import DinoV3
from birefnet_jax.models.gdt import laplacian_gdt_gt
from birefnet_jax.models.layers import (BatchNorm, ConvWeights, apply_conv, composed_conv3x3_pair,
                                        conv, conv_params, remat_if)
from birefnet_jax.models.pvt_v2 import PyramidVisionTransformerImpr
from birefnet_jax.models.pyramid_neck import neck_channels, pyramid_neck
from birefnet_jax.models.resize import resize_bilinear_align_corners as resize
from birefnet_jax.models.swin import SwinTransformer

INREF_ORDERS = ('current', 'legacy')


def compute_dtype(cfg: ml_collections.ConfigDict):
  """None (= follow the inputs: float32, or float64 under x64) or a reduced precision dtype."""
  name = cfg.get('dtype', 'float32')
  if name in (None, 'float32', 'float64'):
    return None
  return jnp.dtype(name)


def image_to_patches(images, size, order: str = 'current'):
  """Cuts NHWC ``images`` into a grid of (h, w) = ``size`` patches stacked on channels.

  'current' is the official einops ``b c (hg h) (wg w) -> b (c hg wg) h w`` (colour-major, grid
  row-major); 'legacy' is the order of official code before 2024-11-05 (patch-major, grid
  column-major, colour fastest), which the older released weights were trained with.
  """
  b, height, width, c = images.shape
  h, w = size
  if height % h or width % w:
    raise ValueError(f'input of size {height}x{width} cannot be cut into {h}x{w} patches: '
                     'BiRefNet needs height and width that are multiples of 32')
  gh, gw = height // h, width // w
  x = images.reshape(b, gh, h, gw, w, c)
  if order == 'current':
    x = x.transpose(0, 2, 4, 5, 1, 3)   # (b, h, w, c, gh, gw)
  elif order == 'legacy':
    x = x.transpose(0, 2, 4, 3, 1, 5)   # (b, h, w, gw, gh, c)
  else:
    raise ValueError(f'inref_order must be one of {INREF_ORDERS}, got {order!r}')
  return x.reshape(b, h, w, c * gh * gw)


def build_backbone(bb: ml_collections.ConfigDict, dtype, name='bb', remat: bool = False,
                   remat_policy: str = '', attention: str = 'einsum'):
  if bb.family == 'swin':
    return SwinTransformer(embed_dim=bb.embed_dim, depths=tuple(bb.depths),
                           num_heads=tuple(bb.num_heads), window_size=bb.window_size,
                           mlp_ratio=bb.mlp_ratio, patch_size=bb.patch_size,
                           drop_path_rate=bb.drop_path_rate, dtype=dtype, remat=remat,
                           remat_policy=remat_policy, attention=attention, name=name)
  if bb.family == 'pvt_v2':
    if attention != 'einsum':
      raise ValueError(f"model.attention={attention!r} applies to Swin's window attention only; "
                       "PVTv2 backbones take 'einsum'")
    return PyramidVisionTransformerImpr(embed_dims=tuple(bb.embed_dims),
                                        num_heads=tuple(bb.num_heads),
                                        mlp_ratios=tuple(bb.mlp_ratios), depths=tuple(bb.depths),
                                        sr_ratios=tuple(bb.sr_ratios),
                                        drop_path_rate=bb.drop_path_rate, dtype=dtype,
                                        remat=remat, remat_policy=remat_policy,
                                        name=name)
  if bb.family == 'dino_v3':
    if attention != 'einsum':
      raise ValueError(f"model.attention={attention!r} applies to Swin's window attention only; "
                       "DINOv3 backbones take 'einsum'")
    return DinoV3(embed_dim=bb.embed_dim, num_heads=bb.num_heads, mlp_hidden=bb.mlp_hidden,
                  out_indices=tuple(bb.out_indices), swiglu=bb.swiglu,
                  num_reg_tokens=bb.num_reg_tokens, rope_temperature=bb.rope_temperature,
                  dtype=dtype, remat=remat, remat_policy=remat_policy, name=name)
  raise ValueError(f'unknown backbone family {bb.family!r} (expected swin, pvt_v2 or dino_v3)')


def decoder_block_class(cfg):
  """BasicDecBlk, rematerialized in the backward pass when ``cfg.remat``."""
  # BasicDecBlk(x, train, deterministic): both flags are static.
  return remat_if(BasicDecBlk, cfg.get('remat', False), (2, 3), cfg.get('remat_policy', ''))


def encoder_channels(cfg) -> tuple[int, int, int, int]:
  """Channels of x1..x4 fed to the decoder ('cat' doubles them), shallow to deep."""
  channels = config_lib.backbone_channels(cfg.backbone)
  factor = 2 if cfg.mul_scl_ipt == 'cat' else 1
  return tuple(c * factor for c in channels)


class SimpleConvs(nn.Module):
  """InRef block: conv3x3 -> conv3x3, no normalization, no activation (official SimpleConvs).

  ``project`` (out_channels, P), optional: return ``conv_out(conv1(x)) @ project``, computed as
  one 5x5 conv of ``x`` to P channels (``layers.composed_conv3x3_pair``, with ``project`` folded
  into conv_out's kernel and bias; exact, as all three are linear), so neither the
  inter_channels- nor the out_channels-wide map is built (``OutputConv``, at full resolution).
  The parameters are the two ``nn.Conv``'s either way."""
  out_channels: int
  inter_channels: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, project=None):
    kernel1, bias1 = ConvWeights(self.inter_channels, 3, name='conv1')(x.shape[-1])
    kernel2, bias2 = ConvWeights(self.out_channels, 3, name='conv_out')(self.inter_channels)
    if project is not None:
      accumulate = jnp.promote_types(jnp.result_type(kernel2, project), jnp.float32)
      kernel2 = jnp.einsum('hwco,op->hwcp', kernel2.astype(accumulate),
                           project.astype(accumulate))
      bias2 = bias2.astype(accumulate) @ project.astype(accumulate)
      if self.dtype is not None:
        x = x.astype(self.dtype)
      return composed_conv3x3_pair(x, kernel1, bias1, kernel2, bias2,
                                   jnp.promote_types(x.dtype, accumulate))
    for kernel, bias in ((kernel1, bias1), (kernel2, bias2)):   # as nn.Conv computes it
      x = apply_conv(x, kernel, bias, 1, self.dtype)
    return x


class BasicLatBlk(nn.Module):
  """Lateral block: a 1x1 conv with bias."""
  out_channels: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    return conv(self.out_channels, 1, dtype=self.dtype, name='conv')(x)


class OutputConv(nn.Module):
  """The official tail ``conv_out1(cat([upsample(p1), inref]))``: a 1x1 conv to one logit.

  ``inref``: None (no InRef), or a function of a projection that returns the InRef map
  (``Decoder``: ipt_blk1 on the full-resolution image), ``inref_channels`` wide, or its
  projection (``SimpleConvs``' ``project``).

  In the float32/float64 path computed as written. With a low-precision ``dtype`` the 1x1 conv
  is split by its input rows: the p1 part runs before the (linear, per-channel) resize,
  resize(p1) @ W == resize(p1 @ W), so one channel is upsampled to full resolution instead of
  p1's (192 for SwinL); the InRef part is folded into ipt_blk1's last conv, so neither wide map
  exists at full resolution and nothing is concatenated there. Same parameters (``kernel``
  (1, 1, C_p1 + C_inref, 1), ``bias``).
  """
  dtype: Any = None

  @nn.compact
  def __call__(self, p1, inref, inref_channels, size):
    c_p1 = p1.shape[-1]
    c_in = c_p1 + (0 if inref is None else inref_channels)
    kernel, bias = conv_params(self, 1, c_in, 1)
    if self.dtype is None:
      x = resize(p1, size)
      if inref is not None:
        x = jnp.concatenate([x, inref(None)], -1)
      return apply_conv(x, kernel, bias, 0)   # as flax's nn.Conv computes it
    w = kernel[0, 0]
    out = resize(jnp.einsum('bhwc,co->bhwo', p1.astype(self.dtype), w[:c_p1].astype(self.dtype)),
                 size)
    if inref is not None:
      out = out + inref(w[c_p1:]).astype(self.dtype)
    return out + bias.astype(self.dtype)


class Decoder(nn.Module):
  cfg: ml_collections.ConfigDict
  dtype: Any = None

  def _inref(self, name, out_channels, images, size, project=None):
    cfg = self.cfg
    if cfg.dec_ipt_split:
      patches = image_to_patches(images, size, cfg.inref_order)
    else:
      patches = images
    patches = resize(patches, size)
    return SimpleConvs(out_channels, cfg.ipt_inter_channels, dtype=self.dtype, name=name)(
        patches, project)

  def _dec_block(self, name, out_channels, x, train, deterministic):
    cfg = self.cfg
    block = decoder_block_class(cfg)
    return block(out_channels=out_channels, inter_channels=cfg.dec_inter_channels,
                 planes=cfg.aspp_planes, batch_norm=cfg.batch_norm,
                 dropout_rate=cfg.dropout_rate, dtype=self.dtype,
                 name=name)(x, train, deterministic)

  def _gradient_attention(self, level, p, train):
    """OutRef at one level: returns (p * attention, gradient prediction logits)."""
    cfg = self.cfg
    g = conv(16, 3, padding=1, dtype=self.dtype, name=f'gdt_convs_{level}_0')(p)
    if cfg.batch_norm:
      g = BatchNorm(dtype=self.dtype, name=f'gdt_convs_{level}_1')(g, train)
    g = nn.relu(g)
    pred = None
    if train or self.is_initializing():
      pred = conv(1, 1, dtype=self.dtype, name=f'gdt_convs_pred_{level}_0')(g)
    attention = nn.sigmoid(conv(1, 1, dtype=self.dtype, name=f'gdt_convs_attn_{level}_0')(g))
    return p * attention, pred

  @nn.compact
  def __call__(self, images, x1, x2, x3, x4, gdt_gt, train: bool, deterministic: bool):
    cfg = self.cfg
    height, width = images.shape[1:3]
    ch = encoder_channels(cfg)[::-1]                      # (C4, C3, C2, C1)
    ipt_out = (ch[0] // 8, ch[1] // 8, ch[2] // 8, ch[3] // 8)
    if config_lib.uses_pyramid_neck(cfg.backbone):        # ViT features -> a Swin-L pyramid
      x1, x2, x3, x4 = pyramid_neck((x1, x2, x3, x4), (height, width), neck_channels(cfg),
                                    BasicLatBlk, self.dtype)
      ch = neck_channels(cfg)[::-1]                       # the InRef widths stay the backbone's
    dec_out = (ch[1], ch[2], ch[3], ch[3] // 2)
    heads = cfg.ms_supervision and (train or self.is_initializing())
    out_ref = cfg.ms_supervision and cfg.out_ref

    scaled_logits, gdt_preds, gdt_labels = [], [], []

    def side_outputs(level, p):
      """Multi-stage head m_level (train only) and OutRef; returns the attended feature."""
      m = None
      if heads:
        m = conv(1, 1, dtype=self.dtype, name=f'conv_ms_spvn_{level}')(p)
        if train:
          scaled_logits.append(m)
      if out_ref:
        p, pred = self._gradient_attention(level, p, train)
        if train:
          gdt_labels.append(gdt_gt * resize(m, (height, width)).astype(gdt_gt.dtype))
          gdt_preds.append(pred)
      return p

    # Stage 4. Each stage's input is the official cat([x, InRef]), kept as its two parts: the
    # block's conv_in sums one conv per part (layers.ConcatConv) instead.
    x = x4
    if cfg.dec_ipt:
      x = (x, self._inref('ipt_blk5', ipt_out[0], images, x4.shape[1:3]))
    p4 = self._dec_block('decoder_block4', dec_out[0], x, train, deterministic)
    p4 = side_outputs(4, p4)
    # Stage 3.
    x = resize(p4, x3.shape[1:3]) + BasicLatBlk(dec_out[0], self.dtype, name='lateral_block4')(x3)
    if cfg.dec_ipt:
      x = (x, self._inref('ipt_blk4', ipt_out[0], images, x3.shape[1:3]))
    p3 = self._dec_block('decoder_block3', dec_out[1], x, train, deterministic)
    p3 = side_outputs(3, p3)
    # Stage 2.
    x = resize(p3, x2.shape[1:3]) + BasicLatBlk(dec_out[1], self.dtype, name='lateral_block3')(x2)
    if cfg.dec_ipt:
      x = (x, self._inref('ipt_blk3', ipt_out[1], images, x2.shape[1:3]))
    p2 = self._dec_block('decoder_block2', dec_out[2], x, train, deterministic)
    p2 = side_outputs(2, p2)
    # Stage 1 (no side outputs), then full resolution.
    x = resize(p2, x1.shape[1:3]) + BasicLatBlk(dec_out[2], self.dtype, name='lateral_block2')(x1)
    if cfg.dec_ipt:
      x = (x, self._inref('ipt_blk2', ipt_out[2], images, x1.shape[1:3]))
    p1 = self._dec_block('decoder_block1', dec_out[3], x, train, deterministic)
    inref = None
    if cfg.dec_ipt:   # called by OutputConv, with the projection it folds into ipt_blk1
      inref = lambda project: self._inref('ipt_blk1', ipt_out[3], images, (height, width),
                                          project)
    final = OutputConv(self.dtype, name='conv_out1_0')(p1, inref, ipt_out[3], (height, width))
    scaled_logits.append(final)
    return scaled_logits, gdt_preds, gdt_labels


class BiRefNet(nn.Module):
  """The whole model. ``apply(variables, images)`` gives the final logits (B,H,W,1) in eval mode;
  with ``train=True`` a dict of everything the losses need (see ``__call__``)."""
  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, images, train: bool = False, deterministic: bool | None = None):
    """images: (B,H,W,3) ImageNet-normalized, H and W multiples of 32.

    train=False: returns final logits (B,H,W,1) (float32).
    train=True: returns dict(scaled_logits=[m4, m3, m2, final], gdt_preds=[g4, g3, g2],
      gdt_labels=[l4, l3, l2], class_logits=(B, num_classes) or None); BatchNorm uses batch
      statistics (call with mutable=['batch_stats']). ``deterministic`` (default: not train)
      turns Dropout and DropPath off, e.g. to compare train mode with the official model.
    """
    cfg = self.cfg
    if deterministic is None:
      deterministic = not train
    dtype = compute_dtype(cfg)
    height, width = images.shape[1:3]
    if height % 32 or width % 32:
      raise ValueError(f'BiRefNet needs height and width that are multiples of 32, got {height}x{width}')
    x = images if dtype is None else images.astype(dtype)
    backbone = build_backbone(cfg.backbone, dtype, remat=cfg.get('remat', False),
                              remat_policy=cfg.get('remat_policy', ''),
                              attention=cfg.get('attention', 'einsum'))

    # Encoder: full resolution, then the half-resolution pyramid pass. A frozen backbone
    # (official freeze_bb, the DINOv3 default) passes no gradient to its parameters. In a
    # low-precision mode the stage outputs (float32 LayerNorms) continue in the compute dtype:
    # their consumers (resizes, concatenations, convs) are bf16 work under torch autocast too,
    # and half the bytes to move.
    encode = backbone
    if config_lib.backbone_frozen(cfg):
      encode = lambda a, **kw: [jax.lax.stop_gradient(f) for f in backbone(a, **kw)]
    low = (lambda f: f) if dtype is None else (lambda f: f.astype(dtype))
    features = [low(f) for f in encode(x, deterministic=deterministic)]
    if cfg.mul_scl_ipt in ('cat', 'add'):
      half = resize(x, (height // 2, width // 2))
      for i, f in enumerate(encode(half, deterministic=deterministic)):
        f = resize(low(f), features[i].shape[1:3])
        features[i] = (jnp.concatenate([features[i], f], -1) if cfg.mul_scl_ipt == 'cat'
                       else features[i] + f)
    elif cfg.mul_scl_ipt:
      raise ValueError(f"mul_scl_ipt must be 'cat', 'add' or '', got {cfg.mul_scl_ipt!r}")
    x1, x2, x3, x4 = features

    class_logits = None
    if cfg.auxiliary_classification and (train or self.is_initializing()):
      pooled = jnp.mean(x4.astype(jnp.float32) if dtype is not None else x4, axis=(1, 2))
      class_logits = nn.Dense(cfg.num_classes, dtype=dtype, name='cls_head_0')(pooled)
      class_logits = class_logits.astype(jnp.promote_types(class_logits.dtype, jnp.float32))

    # Context fusion and squeeze.
    if cfg.cxt_num:
      context = [resize(f, x4.shape[1:3]) for f in (x1, x2, x3)][-cfg.cxt_num:]
      # the official cat(context + [x4]), kept as parts when a squeeze block's conv_in takes it
      x4 = tuple(context + [x4]) if cfg.squeeze_blocks else jnp.concatenate(context + [x4], -1)
    for i in range(cfg.squeeze_blocks):
      block = decoder_block_class(cfg)
      x4 = block(out_channels=encoder_channels(cfg)[3], inter_channels=cfg.dec_inter_channels,
                 planes=cfg.aspp_planes, batch_norm=cfg.batch_norm,
                 dropout_rate=cfg.dropout_rate, dtype=dtype,
                 name=f'squeeze_module_{i}')(x4, train, deterministic)

    gdt_gt = None
    if train and cfg.ms_supervision and cfg.out_ref:
      gdt_gt = laplacian_gdt_gt(images)
    scaled_logits, gdt_preds, gdt_labels = Decoder(cfg, dtype=dtype, name='decoder')(
        x, x1, x2, x3, x4, gdt_gt, train=train, deterministic=deterministic)

    out_dtype = jnp.promote_types(images.dtype, jnp.float32)
    cast = lambda a: a.astype(out_dtype)
    if not train:
      return cast(scaled_logits[-1])
    return dict(scaled_logits=[cast(a) for a in scaled_logits],
                gdt_preds=[cast(a) for a in gdt_preds],
                gdt_labels=[cast(a) for a in gdt_labels],
                class_logits=class_logits)

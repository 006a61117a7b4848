"""Model hyper-parameters: backbone presets and the BiRefNet switches, as an ml_collections config.

Every switch of the official default ``Config`` that changes the network is a field here; the
defaults are the official ones (DIS5K, Swin-L). Decoder widths that are integer literals in the
official code (ASPP planes 256, decoder inter channels 64, InRef inter channels 64) are fields too.
"""

import ml_collections

SWIN_PRESETS = {
    # name: (embed_dim, depths, num_heads, window_size)
    'swin_v1_t': (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    'swin_v1_s': (96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    'swin_v1_b': (128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    'swin_v1_l': (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}

PVT_PRESETS = {
    # name: (embed_dims, num_heads, mlp_ratios, depths, sr_ratios)
    'pvt_v2_b0': ((32, 64, 160, 256), (1, 2, 5, 8), (8, 8, 4, 4), (2, 2, 2, 2), (8, 4, 2, 1)),
    'pvt_v2_b1': ((64, 128, 320, 512), (1, 2, 5, 8), (8, 8, 4, 4), (2, 2, 2, 2), (8, 4, 2, 1)),
    'pvt_v2_b2': ((64, 128, 320, 512), (1, 2, 5, 8), (8, 8, 4, 4), (3, 4, 6, 3), (8, 4, 2, 1)),
    'pvt_v2_b5': ((64, 128, 320, 512), (1, 2, 5, 8), (4, 4, 4, 4), (3, 6, 40, 3), (8, 4, 2, 1)),
}

DINO_V3_PRESETS = {
    # name: (timm model, embed_dim, depth, num_heads, mlp_hidden, swiglu, out_indices)
    # (official models/backbones/dino_v3.py; widths from timm's vit_*_patch16_dinov3 definitions:
    # Mlp hidden = 4 D, SwiGLU hidden = mlp_ratio D rounded up to swiglu_align_to)
    'dino_v3_s': ('vit_small_patch16_dinov3.lvd1689m', 384, 12, 6, 1536, False, (3, 5, 7, 11)),
    'dino_v3_s_plus': ('vit_small_plus_patch16_dinov3.lvd1689m', 384, 12, 6, 1536, True,
                       (3, 5, 7, 11)),
    'dino_v3_b': ('vit_base_patch16_dinov3.lvd1689m', 768, 12, 12, 3072, False, (3, 5, 7, 11)),
    'dino_v3_l': ('vit_large_patch16_dinov3.lvd1689m', 1024, 24, 16, 4096, False,
                  (5, 11, 17, 23)),
    'dino_v3_h_plus': ('vit_huge_plus_patch16_dinov3.lvd1689m', 1280, 32, 20, 5120, True,
                       (7, 15, 23, 31)),
    'dino_v3_7b': ('vit_7b_patch16_dinov3.lvd1689m', 4096, 40, 32, 8192, True, (9, 19, 29, 39)),
}

# The pyramid neck's output widths, deep to shallow (x4, x3, x2, x1): the official Decoder maps
# the ViT features to Swin-L's widths ("Use the channels of swin_v1_l as default"), doubled for
# mul_scl_ipt 'cat'.
PYRAMID_NECK_CHANNELS = (1536, 768, 384, 192)

NUM_DIS_CLASSES = 219  # len(dataset.class_labels_TR_sorted) of the official code


def swin_config(embed_dim, depths, num_heads, window_size, drop_path_rate=0.2):
  return ml_collections.ConfigDict(dict(
      family='swin', embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads),
      window_size=window_size, mlp_ratio=4.0, patch_size=4, drop_path_rate=drop_path_rate))


def pvt_config(embed_dims, num_heads, mlp_ratios, depths, sr_ratios, drop_path_rate=0.1):
  return ml_collections.ConfigDict(dict(
      family='pvt_v2', embed_dims=tuple(embed_dims), num_heads=tuple(num_heads),
      mlp_ratios=tuple(mlp_ratios), depths=tuple(depths), sr_ratios=tuple(sr_ratios),
      drop_path_rate=drop_path_rate))


def dino_v3_config(embed_dim, depth, num_heads, mlp_hidden, swiglu, out_indices,
                   timm_name=''):
  """A DINOv3 ViT (timm Eva): features of blocks ``out_indices``, all at stride 16."""
  out_indices = tuple(int(i) for i in out_indices)
  if len(out_indices) != 4 or list(out_indices) != sorted(set(out_indices)) or (
      out_indices[0] < 0 or out_indices[-1] >= depth):
    raise ValueError(f'DINOv3 out_indices must be 4 increasing block indices below the depth '
                     f'{depth}, got {out_indices}')
  return ml_collections.ConfigDict(dict(
      family='dino_v3', timm_name=timm_name, embed_dim=embed_dim, depth=depth,
      num_heads=num_heads, mlp_hidden=mlp_hidden, swiglu=swiglu, out_indices=tuple(out_indices),
      num_reg_tokens=4, rope_temperature=100.0))


def backbone_config(name: str) -> ml_collections.ConfigDict:
  """The official preset ``name`` (e.g. 'swin_v1_l', 'pvt_v2_b2')."""
  if name in SWIN_PRESETS:
    return swin_config(*SWIN_PRESETS[name])
  if name in PVT_PRESETS:
    return pvt_config(*PVT_PRESETS[name])
  if name in DINO_V3_PRESETS:
    timm_name, *args = DINO_V3_PRESETS[name]
    return dino_v3_config(*args, timm_name=timm_name)
  raise ValueError(f'unknown backbone preset {name!r}; known: '
                   f'{sorted(SWIN_PRESETS) + sorted(PVT_PRESETS) + sorted(DINO_V3_PRESETS)}')


def backbone_channels(bb: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """Channels of the 4 backbone stages, shallow to deep (C1, C2, C3, C4), before 'cat'."""
  if bb.family == 'swin':
    return tuple(int(bb.embed_dim * 2**i) for i in range(4))
  if bb.family == 'dino_v3':
    return (int(bb.embed_dim),) * 4
  return tuple(int(c) for c in bb.embed_dims)


def uses_pyramid_neck(bb: ml_collections.ConfigDict) -> bool:
  """Official ``Decoder.use_pyramid_neck``: backbones without a feature pyramid (ViT / DINO)."""
  return bb.family == 'dino_v3'


def backbone_frozen(cfg: ml_collections.ConfigDict) -> bool:
  """Whether the model config's backbone is frozen (no gradient, no optimizer update).

  ``freeze_backbone`` None is the official rule (``Config.freeze_bb = 'dino_v3' in bb``): DINOv3
  frozen, every other backbone trained.
  """
  choice = cfg.get('freeze_backbone', None)
  if choice is None:
    return cfg.backbone.family == 'dino_v3'
  return bool(choice)


def model_config(backbone: str = 'swin_v1_l', **overrides) -> ml_collections.ConfigDict:
  """The official default BiRefNet (DIS5K task) on the backbone preset ``backbone``."""
  cfg = ml_collections.ConfigDict(dict(
      backbone=backbone_config(backbone),
      mul_scl_ipt='cat',          # 'cat' (official default), 'add' or '' (single pass)
      cxt_num=3,                  # shallower features concatenated onto x4 before squeezing
      dec_ipt=True,               # InRef
      dec_ipt_split=True,         # InRef patches (else the resized whole image)
      inref_order='current',      # 'current' (einops, official since 2024-11-05) or 'legacy'
      ms_supervision=True,
      out_ref=True,               # OutRef (needs ms_supervision)
      squeeze_blocks=1,           # 'BasicDecBlk_x1'
      batch_norm=True,            # official: BatchNorm2d if batch_size > 1 else Identity
      aspp_planes=256,            # ASPPDeformable in_channelster
      dec_inter_channels=64,      # BasicDecBlk inter_channels ('fixed')
      ipt_inter_channels=64,      # SimpleConvs inter width of ipt_blk1..5
      auxiliary_classification=False,
      num_classes=NUM_DIS_CLASSES,
      dropout_rate=0.5,           # Dropout after the ASPPDeformable projection (training only)
      dtype='float32',            # compute dtype; parameters stay float32
      remat=False,                # recompute backbone and decoder blocks in the backward pass
      remat_policy='',            # what remat may still save ('' nothing; 'dots_saveable', ...)
      attention='einsum',         # Swin window attention: 'einsum', 'xla' or 'cudnn' (fused, GPU)
      # pyramid neck (DINOv3 only): widths of the lateral blocks mapping x4..x1 (deep to
      # shallow), before the 'cat' doubling; official: Swin-L's widths
      pyramid_neck_channels=PYRAMID_NECK_CHANNELS,
      # None: the official rule (DINOv3 frozen, others trained); True / False force it
      freeze_backbone=ml_collections.config_dict.placeholder(bool),
  ))
  cfg.update(overrides)
  return cfg

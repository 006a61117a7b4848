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


def backbone_config(name: str) -> ml_collections.ConfigDict:
  """The official preset ``name`` (e.g. 'swin_v1_l', 'pvt_v2_b2')."""
  if name in SWIN_PRESETS:
    return swin_config(*SWIN_PRESETS[name])
  if name in PVT_PRESETS:
    return pvt_config(*PVT_PRESETS[name])
  raise ValueError(f'unknown backbone preset {name!r}; known: '
                   f'{sorted(SWIN_PRESETS) + sorted(PVT_PRESETS)}')


def backbone_channels(bb: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """Channels of the 4 backbone stages, shallow to deep (C1, C2, C3, C4), before 'cat'."""
  if bb.family == 'swin':
    return tuple(int(bb.embed_dim * 2**i) for i in range(4))
  return tuple(int(c) for c in bb.embed_dims)


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
  ))
  cfg.update(overrides)
  return cfg

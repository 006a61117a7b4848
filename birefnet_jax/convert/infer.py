"""Inferring the whole BiRefNet architecture from a state dict's names and shapes.

Everything the official Config decides is visible in the tensors, except three things:
- PVTv2 head counts (they do not change any shape): every official preset uses (1, 2, 5, 8).
- DINOv3 head counts and out_indices (the blocks after the last out index are pruned, so the
  block count is ``max(out_indices) + 1``): read from the official preset with the same widths
  and block count, or given by the caller (``dino_heads``, ``dino_out_indices``).
- The InRef patch order (identical keys and shapes, see ``birefnet_jax.models.birefnet``):
  the caller chooses it (``inref_order``).
"""

import math
import re

import numpy as np

from birefnet_jax.models import config as config_lib

PVT_DEFAULT_HEADS = (1, 2, 5, 8)


def _count(state_dict, pattern: str) -> int:
  regex = re.compile(pattern)
  indices = {int(m.group(1)) for k in state_dict for m in [regex.match(k)] if m}
  if indices and indices != set(range(len(indices))):
    raise ValueError(f'non-contiguous indices for {pattern}: {sorted(indices)}')
  return len(indices)


def infer_dino_v3(state_dict, prefix: str = 'bb.', heads=None, out_indices=None):
  """DINOv3 config from the ``{prefix}model.*`` tensors of timm's features_only model."""
  sd = state_dict
  p = f'{prefix}model.'
  embed_dim = sd[f'{p}cls_token'].shape[-1]
  depth = _count(sd, re.escape(f'{p}blocks.') + r'(\d+)\.')
  swiglu = f'{p}blocks.0.mlp.fc1_g.weight' in sd
  hidden = sd[f'{p}blocks.0.mlp.{"fc1_g" if swiglu else "fc1"}.weight'].shape[0]
  reg_tokens = sd[f'{p}reg_token'].shape[1] if f'{p}reg_token' in sd else 0
  # preset: (timm name, embed_dim, depth, heads, mlp hidden, swiglu, out_indices)
  preset = [v for v in config_lib.DINO_V3_PRESETS.values()
            if (v[1], v[2], v[4], v[5]) == (embed_dim, depth, hidden, swiglu)]
  if heads is None:
    if not preset:
      raise ValueError(f'DINOv3 backbone of width {embed_dim}, {depth} blocks, MLP {hidden} '
                       f'(swiglu {swiglu}) is no official preset: give its head count '
                       '(convert_torch_weights.py --dino-heads N)')
    heads = preset[0][3]
  if out_indices is None:
    if not preset:
      raise ValueError(f'DINOv3 backbone of width {embed_dim}, {depth} blocks is no official '
                       'preset: give its out_indices '
                       '(convert_torch_weights.py --dino-out-indices I,J,K,L)')
    out_indices = preset[0][6]
  out_indices = tuple(int(i) for i in out_indices)
  if max(out_indices) + 1 != depth or len(out_indices) != 4:
    raise ValueError(f'DINOv3 out_indices {out_indices} do not fit the {depth} blocks of the '
                     'checkpoint (the blocks after the last out index are pruned)')
  bb = config_lib.dino_v3_config(embed_dim, depth, heads, hidden, swiglu, out_indices,
                                 timm_name=preset[0][0] if preset else '')
  bb.num_reg_tokens = reg_tokens
  return bb


def infer_backbone(state_dict, prefix: str = 'bb.', pvt_heads=PVT_DEFAULT_HEADS, dino_heads=None,
                   dino_out_indices=None):
  """Backbone config from the ``bb.*`` (or bare backbone) tensors."""
  sd = state_dict
  if f'{prefix}model.cls_token' in sd:  # DINOv3 (timm Eva inside FeatureGetterNet)
    return infer_dino_v3(sd, prefix, dino_heads, dino_out_indices)
  if f'{prefix}patch_embed.proj.weight' in sd:  # Swin v1
    embed_dim = sd[f'{prefix}patch_embed.proj.weight'].shape[0]
    patch_size = sd[f'{prefix}patch_embed.proj.weight'].shape[-1]
    num_layers = _count(sd, re.escape(prefix) + r'layers\.(\d+)\.')
    depths, heads, windows = [], [], []
    for s in range(num_layers):
      depth = _count(sd, re.escape(f'{prefix}layers.{s}.blocks.') + r'(\d+)\.')
      table = sd[f'{prefix}layers.{s}.blocks.0.attn.relative_position_bias_table']
      window = (math.isqrt(table.shape[0]) + 1) // 2
      if (2 * window - 1) ** 2 != table.shape[0]:
        raise ValueError(f'relative_position_bias_table of stage {s} has {table.shape[0]} rows, '
                         'not (2w-1)^2 for any window w')
      depths.append(depth)
      heads.append(table.shape[1])
      windows.append(window)
    if len(set(windows)) != 1:
      raise ValueError(f'stages use different window sizes {windows}')
    if num_layers != 4:
      raise ValueError(f'expected 4 Swin stages, found {num_layers}')
    bb = config_lib.swin_config(embed_dim, depths, heads, windows[0])
    bb.patch_size = patch_size
    return bb
  if f'{prefix}patch_embed1.proj.weight' in sd:  # PVTv2
    dims, depths, mlp_ratios, sr_ratios = [], [], [], []
    for s in range(1, 5):
      dims.append(sd[f'{prefix}patch_embed{s}.proj.weight'].shape[0])
      depths.append(_count(sd, re.escape(f'{prefix}block{s}.') + r'(\d+)\.'))
      mlp_ratios.append(sd[f'{prefix}block{s}.0.mlp.fc1.weight'].shape[0] // dims[-1])
      sr = sd.get(f'{prefix}block{s}.0.attn.sr.weight')
      sr_ratios.append(sr.shape[-1] if sr is not None else 1)
    return config_lib.pvt_config(dims, pvt_heads, mlp_ratios, depths, sr_ratios)
  raise ValueError('cannot tell the backbone: neither Swin (patch_embed.proj.weight), PVTv2 '
                   '(patch_embed1.proj.weight) nor DINOv3 (model.cls_token) tensors under the '
                   f'prefix {prefix!r}')


def infer_model_config(state_dict, inref_order: str = 'current', pvt_heads=PVT_DEFAULT_HEADS,
                       dino_heads=None, dino_out_indices=None):
  """The model config (``models.config.model_config`` fields) of a full BiRefNet state dict."""
  sd = state_dict
  bb = infer_backbone(sd, 'bb.', pvt_heads, dino_heads, dino_out_indices)
  native = np.array(config_lib.backbone_channels(bb))          # C1..C4
  cfg = config_lib.model_config('swin_v1_l')
  cfg.backbone = bb
  cfg.inref_order = inref_order

  if 'decoder.lateral_block4.conv.weight' not in sd:
    raise ValueError('not a BiRefNet checkpoint: decoder.lateral_block4.conv.weight is missing')
  neck = config_lib.uses_pyramid_neck(bb)
  # x3 enters the decoder through lateral_block4, or through the pyramid neck first
  c3 = sd['decoder.pyramid_neck_x3.conv.weight' if neck
          else 'decoder.lateral_block4.conv.weight'].shape[1]
  factor = c3 // native[2]
  if factor * native[2] != c3 or factor not in (1, 2):
    raise ValueError(f'decoder width {c3} does not fit the backbone stage-3 width {native[2]}')
  cfg.mul_scl_ipt = 'cat' if factor == 2 else 'add'
  channels = native * factor
  if neck:
    cfg.pyramid_neck_channels = tuple(
        int(sd[f'decoder.pyramid_neck_x{i}.conv.weight'].shape[0] // factor) for i in (4, 3, 2, 1))

  cfg.squeeze_blocks = _count(sd, r'squeeze_module\.(\d+)\.')
  if cfg.squeeze_blocks:
    squeeze_in = sd['squeeze_module.0.conv_in.weight'].shape[1]
    extra = squeeze_in - channels[3]
    options = {n: int(sum(channels[:3][3 - n:])) for n in range(4)}
    matches = [n for n, total in options.items() if total == extra]
    if not matches:
      raise ValueError(f'squeeze_module.0 takes {squeeze_in} channels; no cxt_num fits '
                       f'(C4={channels[3]}, context options {options})')
    cfg.cxt_num = matches[0]
  else:
    cfg.cxt_num = 0  # without a squeeze block the context width cannot be read off; assume none

  block = 'decoder.decoder_block4.'
  cfg.dec_inter_channels = sd[block + 'conv_in.weight'].shape[0]
  cfg.aspp_planes = sd[block + 'dec_att.aspp1.atrous_conv.regular_conv.weight'].shape[0]
  cfg.batch_norm = any(k.endswith('.running_mean') for k in sd)
  cfg.dec_ipt = 'decoder.ipt_blk1.conv1.weight' in sd
  if cfg.dec_ipt:
    if 'decoder.ipt_blk5.conv1.weight' not in sd:
      raise ValueError('decoder.ipt_blk1 exists but decoder.ipt_blk5 does not: a checkpoint of the '
                       'pre-May-2024 layout (official commit b0c7031), which is not supported')
    cfg.ipt_inter_channels = sd['decoder.ipt_blk5.conv1.weight'].shape[0]
    cfg.dec_ipt_split = sd['decoder.ipt_blk5.conv1.weight'].shape[1] != 3
  cfg.ms_supervision = 'decoder.conv_ms_spvn_4.weight' in sd
  cfg.out_ref = 'decoder.gdt_convs_4.0.weight' in sd
  cfg.auxiliary_classification = 'cls_head.0.weight' in sd
  if cfg.auxiliary_classification:
    cfg.num_classes = sd['cls_head.0.weight'].shape[0]
  return cfg

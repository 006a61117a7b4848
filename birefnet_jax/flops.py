"""Analytic FLOPs of one BiRefNet forward pass, from the model config and the input size.

Why not XLA's cost analysis: it counts a while loop's body once, and the deformable convolution
(``models/deform_conv.py``) is a ``lax.scan`` over the kernel rows, so XLA sees one row of seven
for a 7x7 kernel (on a CPU compile of the 256² decoder stage it counted 15 of 105 GFLOP). Nor do
all backends count custom calls (cuDNN's fused attention). This counter walks the model as
``models/birefnet.py`` builds it and counts, per image:

* ``conv``: every convolution, 2 * output positions * kh * kw * C_in / groups * C_out (the
  deformable convs' offset and modulator convs included);
* ``dense``: every Dense / Linear, 2 * tokens * C_in * C_out (Swin's qkv and proj on the real
  tokens only: the window padding's q/k/v are the qkv bias, and the output is cropped before
  proj);
* ``attention``: the two attention matmuls (Q K^T and P V), 4 * queries * keys * C per window
  (Swin) or per image (PVT's reduced keys);
* ``deform_sampling``: the bilinear sampling of the deformable conv, the 4 corners weighted and
  summed, 8 * positions * taps * C_in;
* ``deform_matmul``: the deformable conv's (positions x taps*C_in) @ (taps*C_in x C_out),
  2 * positions * taps * C_in * C_out.

A multiply-add is 2 FLOPs, as XLA counts. Elementwise work (norms, activations, softmax, resizes,
residual adds, biases) is not counted: it is a few per cent of the total and not what MFU means.
``train=True`` counts the train-mode forward (the multi-stage heads and OutRef prediction convs
too); a train step is then about 3x that (forward, and a backward of twice the forward),
``train_step_flops``. With remat the step recomputes the forward of the rematerialized blocks on
top; MFU conventionally leaves that out (it is "model" FLOPs), and so does this module.

Usage: ``count(cfg, (H, W))`` -> :class:`FlopCount` with ``.total`` (FLOPs per image),
``.by_part()`` and ``.by_kind()``; ``python -m birefnet_jax.flops`` prints a table for every
preset and a few sizes.
"""

import collections
import dataclasses

from birefnet_jax.models import config as config_lib
from birefnet_jax.models import pyramid_neck

KINDS = ('conv', 'dense', 'attention', 'deform_sampling', 'deform_matmul')
ASPP_KERNEL_SIZES = (1, 1, 3, 7)  # aspp1 and aspp_deforms_{0,1,2} (models/aspp.py)


@dataclasses.dataclass
class FlopCount:
  """FLOPs of one image's forward pass as (part, kind, flops) entries."""
  entries: list = dataclasses.field(default_factory=list)

  def add(self, part, kind, flops):
    if kind not in KINDS:
      raise ValueError(f'flops: unknown kind {kind!r}')
    self.entries.append((part, kind, int(flops)))

  @property
  def total(self) -> int:
    return sum(f for _, _, f in self.entries)

  def by_part(self) -> dict:
    out = collections.OrderedDict()
    for part, _, f in self.entries:
      out[part] = out.get(part, 0) + f
    return dict(out)

  def by_kind(self) -> dict:
    out = {k: 0 for k in KINDS}
    for _, kind, f in self.entries:
      out[kind] += f
    return out

  def gflops(self) -> dict:
    """{'total': GFLOP, part: GFLOP, ..., 'kind/<kind>': GFLOP} (per image)."""
    out = {'total': self.total / 1e9}
    out.update({p: f / 1e9 for p, f in self.by_part().items()})
    out.update({f'kind/{k}': f / 1e9 for k, f in self.by_kind().items()})
    return out


# ----------------------------------------------------------------------------------------------
# Layers


def conv(fc, part, hw, c_in, c_out, k, stride=1, padding=0, groups=1):
  """A conv on an (h, w) input; returns the output size."""
  h, w = hw
  ho = (h + 2 * padding - k) // stride + 1
  wo = (w + 2 * padding - k) // stride + 1
  fc.add(part, 'conv', 2 * ho * wo * k * k * (c_in // groups) * c_out)
  return ho, wo


def dense(fc, part, tokens, c_in, c_out):
  fc.add(part, 'dense', 2 * tokens * c_in * c_out)


def deformable_conv(fc, part, hw, c_in, c_out, k):
  """models/deform_conv.DeformableConv2d (stride 1, padding k // 2): offset and modulator convs,
  the bilinear sampling and the matmul."""
  pad = k // 2
  conv(fc, part, hw, c_in, 2 * k * k, k, padding=pad)
  conv(fc, part, hw, c_in, k * k, k, padding=pad)
  positions = hw[0] * hw[1]
  fc.add(part, 'deform_sampling', 8 * positions * k * k * c_in)
  fc.add(part, 'deform_matmul', 2 * positions * k * k * c_in * c_out)


def aspp_deformable(fc, part, hw, channels, planes):
  for k in ASPP_KERNEL_SIZES:
    deformable_conv(fc, part, hw, channels, planes, k)
  conv(fc, part, (1, 1), channels, planes, 1)                 # global_avg_pool_1 on the mean
  conv(fc, part, hw, 5 * planes, channels, 1)                 # conv1


def basic_dec_blk(fc, part, hw, c_in, c_out, inter, planes):
  conv(fc, part, hw, c_in, inter, 3, padding=1)
  aspp_deformable(fc, part, hw, inter, planes)
  conv(fc, part, hw, inter, c_out, 3, padding=1)


# ----------------------------------------------------------------------------------------------
# Backbones


def _ceil_to(n, m):
  return -(-n // m) * m


def swin(fc, part, bb, hw):
  """models/swin.SwinTransformer on an (H, W) image; returns the 4 stage sizes."""
  p = bb.patch_size
  h, w = -(-hw[0] // p), -(-hw[1] // p)
  conv(fc, part, (h * p, w * p), 3, bb.embed_dim, p, stride=p)
  win = bb.window_size
  n = win * win
  sizes = []
  for s, (depth, heads) in enumerate(zip(bb.depths, bb.num_heads)):
    del heads  # the matmul FLOPs do not depend on the head split
    c = bb.embed_dim * 2**s
    tokens = h * w
    padded = _ceil_to(h, win) * _ceil_to(w, win)   # the window-padded map attention runs on
    hidden = int(c * bb.mlp_ratio)
    for _ in range(depth):
      dense(fc, part, tokens, c, 3 * c)            # qkv (real tokens; padding gets its bias)
      fc.add(part, 'attention', 4 * padded * n * c)  # Q K^T and P V: (padded / n) windows
      dense(fc, part, tokens, c, c)                # proj (cropped to the real tokens first)
      dense(fc, part, tokens, c, hidden)           # mlp.fc1
      dense(fc, part, tokens, hidden, c)           # mlp.fc2
    sizes.append((h, w))
    if s < len(bb.depths) - 1:                     # PatchMerging: LayerNorm(4C) -> 2C
      h, w = -(-h // 2), -(-w // 2)
      dense(fc, part, h * w, 4 * c, 2 * c)
  return sizes


def pvt_v2(fc, part, bb, hw):
  """models/pvt_v2.PyramidVisionTransformerImpr on an (H, W) image; returns the stage sizes."""
  sizes = []
  c_prev, size = 3, hw
  for s in range(4):
    c = bb.embed_dims[s]
    k, stride = (7, 4) if s == 0 else (3, 2)
    size = conv(fc, part, size, c_prev, c, k, stride=stride, padding=k // 2)
    tokens = size[0] * size[1]
    r = bb.sr_ratios[s]
    hidden = int(c * bb.mlp_ratios[s])
    for _ in range(bb.depths[s]):
      dense(fc, part, tokens, c, c)                                 # q
      if r > 1:
        kv_size = conv(fc, part, size, c, c, r, stride=r)           # sr
        kv_tokens = kv_size[0] * kv_size[1]
      else:
        kv_tokens = tokens
      dense(fc, part, kv_tokens, c, 2 * c)                          # kv
      fc.add(part, 'attention', 4 * tokens * kv_tokens * c)
      dense(fc, part, tokens, c, c)                                 # proj
      dense(fc, part, tokens, c, hidden)                            # fc1
      conv(fc, part, size, hidden, hidden, 3, padding=1, groups=hidden)  # dwconv
      dense(fc, part, tokens, hidden, c)                            # fc2
    sizes.append(size)
    c_prev = c
  return sizes


def dino_v3(fc, part, bb, hw):
  """models/dino_v3.DinoV3 on an (H, W) image; returns the 4 feature sizes (all stride 16)."""
  p = 16
  h, w = hw[0] // p, hw[1] // p
  conv(fc, part, (h * p, w * p), 3, bb.embed_dim, p, stride=p)
  c = bb.embed_dim
  tokens = h * w + 1 + bb.num_reg_tokens                    # patches, cls and registers
  for _ in range(bb.depth):
    dense(fc, part, tokens, c, 3 * c)                       # qkv
    fc.add(part, 'attention', 4 * tokens * tokens * c)
    dense(fc, part, tokens, c, c)                           # proj
    if bb.swiglu:
      dense(fc, part, tokens, c, 2 * bb.mlp_hidden)         # fc1_g, fc1_x
    else:
      dense(fc, part, tokens, c, bb.mlp_hidden)             # fc1
    dense(fc, part, tokens, bb.mlp_hidden, c)               # fc2
  return [(h, w)] * 4


def backbone(fc, part, bb, hw):
  if bb.family == 'swin':
    return swin(fc, part, bb, hw)
  if bb.family == 'pvt_v2':
    return pvt_v2(fc, part, bb, hw)
  if bb.family == 'dino_v3':
    return dino_v3(fc, part, bb, hw)
  raise ValueError(f'flops: unknown backbone family {bb.family!r}')


# ----------------------------------------------------------------------------------------------
# The whole model


def count(cfg, size, train: bool = False) -> FlopCount:
  """FLOPs of one image's forward pass of the BiRefNet ``cfg`` at ``size`` = (H, W).

  Parts: 'backbone' (full resolution), 'backbone_half' (the 'cat'/'add' pyramid pass), 'squeeze',
  'neck' (DINOv3's pyramid neck),
  'decoder_block4'..'decoder_block1' (each with its ASPPDeformable), 'inref' (ipt_blk5..1),
  'lateral', 'outref' (gradient attention, multi-stage heads and the output conv).
  """
  height, width = (size, size) if isinstance(size, int) else tuple(size)
  fc = FlopCount()
  bb = cfg.backbone
  sizes = backbone(fc, 'backbone', bb, (height, width))
  if cfg.mul_scl_ipt in ('cat', 'add'):
    backbone(fc, 'backbone_half', bb, (height // 2, width // 2))
  channels = config_lib.backbone_channels(bb)
  factor = 2 if cfg.mul_scl_ipt == 'cat' else 1
  enc = [c * factor for c in channels]                        # x1..x4 channels
  inter, planes = cfg.dec_inter_channels, cfg.aspp_planes

  # Context fusion + squeeze block(s) at x4's size.
  c4 = enc[3] + (sum(enc[:3][-cfg.cxt_num:]) if cfg.cxt_num else 0)
  for _ in range(cfg.squeeze_blocks):
    basic_dec_blk(fc, 'squeeze', sizes[3], c4, enc[3], inter, planes)
    c4 = enc[3]

  ch = enc[::-1]                                              # (C4, C3, C2, C1)
  ipt_out = [c // 8 for c in ch]
  if config_lib.uses_pyramid_neck(bb):                        # 1x1 convs at strides 4..32
    neck = pyramid_neck.neck_channels(cfg)
    sizes = [(height // s, width // s) for s in pyramid_neck.STRIDES]
    for hw, c, n in zip(sizes, enc, neck):
      conv(fc, 'neck', hw, c, n, 1)
    ch = neck[::-1]
    c4 = neck[3]
  dec_out = [ch[1], ch[2], ch[3], ch[3] // 2]
  heads = cfg.ms_supervision and train
  out_ref = cfg.ms_supervision and cfg.out_ref

  def inref(hw, c_out):
    if not cfg.dec_ipt:
      return 0
    grid = (height // hw[0]) * (width // hw[1]) if cfg.dec_ipt_split else 1
    conv(fc, 'inref', hw, 3 * grid, cfg.ipt_inter_channels, 3, padding=1)
    conv(fc, 'inref', hw, cfg.ipt_inter_channels, c_out, 3, padding=1)
    return c_out

  def side_outputs(hw, c):
    if heads:
      conv(fc, 'outref', hw, c, 1, 1)                         # conv_ms_spvn
    if out_ref:
      conv(fc, 'outref', hw, c, 16, 3, padding=1)             # gdt_convs
      if train:
        conv(fc, 'outref', hw, 16, 1, 1)                      # gdt_convs_pred
      conv(fc, 'outref', hw, 16, 1, 1)                        # gdt_convs_attn

  stage_sizes = sizes[::-1]                                   # x4, x3, x2, x1
  c_in = c4
  for i, level in enumerate((4, 3, 2, 1)):
    hw = stage_sizes[i]
    if i > 0:
      conv(fc, 'lateral', hw, ch[i], dec_out[i - 1], 1)
      c_in = dec_out[i - 1]
    c_in += inref(hw, ipt_out[max(0, i - 1)])
    basic_dec_blk(fc, f'decoder_block{level}', hw, c_in, dec_out[i], inter, planes)
    if level > 1:
      side_outputs(hw, dec_out[i])
  c_final = dec_out[3] + inref((height, width), ipt_out[3])
  conv(fc, 'outref', (height, width), c_final, 1, 1)          # conv_out1
  return fc


def forward_flops(cfg, size, batch: int = 1, train: bool = False) -> int:
  """FLOPs of a forward pass of ``batch`` images."""
  return batch * count(cfg, size, train=train).total


def train_step_flops(cfg, size, batch: int = 1) -> int:
  """Model FLOPs of a train step: forward (train mode) + backward (2x), i.e. 3x the forward."""
  return 3 * forward_flops(cfg, size, batch, train=True)


def main():
  presets = (list(config_lib.SWIN_PRESETS) + list(config_lib.PVT_PRESETS)
             + list(config_lib.DINO_V3_PRESETS))
  print(f'{"preset":<14} {"size":>5} {"forward GFLOP":>14} {"backbone":>9} {"half":>8} '
        f'{"decoder":>8} {"deform":>8} {"attention":>9}')
  for preset in presets:
    cfg = config_lib.model_config(preset)
    for size in (512, 1024, 2048):
      fc = count(cfg, size)
      parts, kinds = fc.by_part(), fc.by_kind()
      dec = fc.total - parts.get('backbone', 0) - parts.get('backbone_half', 0)
      print(f'{preset:<14} {size:>5} {fc.total / 1e9:>14.1f} {parts["backbone"] / 1e9:>9.1f} '
            f'{parts.get("backbone_half", 0) / 1e9:>8.1f} {dec / 1e9:>8.1f} '
            f'{(kinds["deform_sampling"] + kinds["deform_matmul"]) / 1e9:>8.1f} '
            f'{kinds["attention"] / 1e9:>9.1f}')


if __name__ == '__main__':
  main()

"""The pyramid neck of the official Decoder for backbones without a feature pyramid (DINOv3).

The four ViT features are all at stride 16 with the same width. The official
``Decoder.forward`` (``use_pyramid_neck``) first resizes x1..x4 (bilinear, align_corners=True) to
strides 4, 8, 16 and 32 of the input, then maps each with a lateral block (a 1x1 conv with bias)
to Swin-L's widths (1536, 768, 384, 192 for x4..x1, doubled for mul_scl_ipt 'cat'); the rest of
the decoder then sees a Swin-L-shaped pyramid. The lateral blocks are the decoder's children
``pyramid_neck_x1`` .. ``pyramid_neck_x4`` (state dict ``decoder.pyramid_neck_x1.conv.weight``),
so this is a function called inside the decoder's scope, not a module of its own.
"""

from birefnet_jax.models.resize import resize_bilinear_align_corners as resize

STRIDES = (4, 8, 16, 32)   # x1..x4


def pyramid_neck(features, image_size, out_channels, lateral_block, dtype=None):
  """(x1, x2, x3, x4) at any size -> resized to H/4..H/32 and mapped to ``out_channels``.

  ``out_channels`` are shallow to deep (x1..x4); ``lateral_block(channels, dtype, name=...)``
  builds the 1x1 conv (the decoder's ``BasicLatBlk``), called in the caller's compact scope.
  """
  height, width = image_size
  out = []
  for i, (x, stride, channels) in enumerate(zip(features, STRIDES, out_channels)):
    x = resize(x, (height // stride, width // stride))
    out.append(lateral_block(channels, dtype, name=f'pyramid_neck_x{i + 1}')(x))
  return tuple(out)


def neck_channels(cfg) -> tuple[int, int, int, int]:
  """Output widths of the neck, shallow to deep (x1..x4), 'cat' doubling included."""
  deep_to_shallow = tuple(cfg.get('pyramid_neck_channels', (1536, 768, 384, 192)))
  factor = 2 if cfg.mul_scl_ipt == 'cat' else 1
  return tuple(int(c) * factor for c in deep_to_shallow[::-1])

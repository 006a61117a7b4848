"""The official ``BasicDecBlk``: conv3x3 -> BN -> ReLU -> ASPPDeformable -> conv3x3 -> BN.

It is the squeeze block (``squeeze_module_0``) and every ``decoder_block{4..1}``. It ends with BN,
no activation, no residual. ``inter_channels`` is 64 in the official 'fixed' mode and is also the
in/out width of the ASPPDeformable inside.
"""

from typing import Any

import flax.linen as nn

from birefnet_jax.models import layers
from birefnet_jax.models.aspp import ASPPDeformable, batch_norm_or_identity


class BasicDecBlk(nn.Module):
  out_channels: int
  inter_channels: int = 64
  planes: int = 256            # ASPPDeformable branch width
  batch_norm: bool = True
  dropout_rate: float = 0.5
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool, deterministic: bool):
    # x: one map or the parts of its channel concatenation (layers.ConcatConv never builds it)
    x = layers.ConcatConv(self.inter_channels, 3, padding=1, dtype=self.dtype, name='conv_in')(x)
    x = batch_norm_or_identity(self.batch_norm, self.dtype, 'bn_in')(x, train)
    x = nn.relu(x)
    x = ASPPDeformable(self.inter_channels, self.planes, self.dropout_rate, self.batch_norm,
                       self.dtype, name='dec_att')(x, train, deterministic)
    x = layers.conv(self.out_channels, 3, padding=1, dtype=self.dtype, name='conv_out')(x)
    return batch_norm_or_identity(self.batch_norm, self.dtype, 'bn_out')(x, train)

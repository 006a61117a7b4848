"""Pure-PyTorch statements of ops whose official implementation is a compiled extension.

``deform_conv2d`` has the signature and semantics of ``torchvision.ops.deform_conv2d`` (NCHW,
offsets as (Δy, Δx) pairs per tap, taps row-major, modulation ``mask``), written with one bilinear
``grid_sample`` per tap: zeros outside the map, sample positions in pixel units. It serves the
tests (an independent reference for our modulated deformable convolution) and
``tools/bench_deform_conv.py`` (the torch column where torchvision's compiled op does not load).
"""

import torch
import torch.nn.functional as F


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):  # pylint: disable=redefined-builtin
  """torchvision.ops.deform_conv2d (DCNv2 when ``mask`` is given), one grid_sample per tap."""
  b, c, h, w = input.shape
  if h < 2 or w < 2:
    raise ValueError(f'deform_conv2d: input {h}x{w}: this statement needs H, W >= 2')
  o, c_w, kh, kw = weight.shape
  if c_w != c:
    raise ValueError(f'deform_conv2d: weight takes {c_w} input channels, input has {c} '
                     '(grouped weights are not supported here)')
  (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
  out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
  out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
  if offset.shape[1] != 2 * kh * kw:
    raise ValueError(f'deform_conv2d: offset has {offset.shape[1]} channels, expected '
                     f'{2 * kh * kw} (offset groups are not supported here)')
  ys = (torch.arange(out_h, dtype=input.dtype, device=input.device) * sh - ph).view(1, out_h, 1)
  xs = (torch.arange(out_w, dtype=input.dtype, device=input.device) * sw - pw).view(1, 1, out_w)
  out = input.new_zeros(b, o, out_h, out_w)
  for i in range(kh):
    for j in range(kw):
      t = i * kw + j
      y = ys + i * dh + offset[:, 2 * t]
      x = xs + j * dw + offset[:, 2 * t + 1]
      # align_corners=True maps -1/+1 to the centres of the first/last pixel: pixel units.
      grid = torch.stack([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], dim=-1)
      sample = F.grid_sample(input, grid, mode='bilinear', padding_mode='zeros',
                             align_corners=True)
      if mask is not None:
        sample = sample * mask[:, t:t + 1]
      out = out + torch.einsum('bchw,oc->bohw', sample, weight[:, :, i, j])
  if bias is not None:
    out = out + bias.view(1, -1, 1, 1)
  return out

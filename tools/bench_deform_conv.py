"""Times modulated_deform_conv2d (forward, forward+backward) against a plain conv of the same shape.

  python tools/bench_deform_conv.py                      # 1x128x128x64 -> 256, k = 1, 3, 7
  python tools/bench_deform_conv.py --size 64 --kernels 3 --dtype bfloat16 --torch

Forward+backward is the gradient of sum(y * probe) w.r.t. every input (x, offset, mask, kernel
for the deformable conv; x, kernel for the plain conv). Times are medians over --repeats runs of
the jitted function after one warm-up (compilation) call. With --torch, also times
torchvision.ops.deform_conv2d if its compiled op loads, else a pure-torch DCNv2 (one grid_sample
per tap), forward under no_grad and forward+backward with autograd.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from birefnet_jax.models.deform_conv import modulated_deform_conv2d


def median_ms(fn, repeats):
  jax.block_until_ready(fn())  # warm-up: compilation
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def jax_timings(x, offset, mask, kernel, probe, pad, repeats):
  def deform(x, offset, mask, kernel):
    return modulated_deform_conv2d(x, offset, mask, kernel, padding=pad)

  def plain(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  deform_fwd = jax.jit(deform)
  deform_grad = jax.jit(jax.grad(lambda *a: jnp.sum(deform(*a).astype(jnp.float32) * probe),
                                 argnums=(0, 1, 2, 3)))
  plain_fwd = jax.jit(plain)
  plain_grad = jax.jit(jax.grad(lambda *a: jnp.sum(plain(*a).astype(jnp.float32) * probe),
                                argnums=(0, 1)))
  return dict(
      deform_fwd=median_ms(lambda: deform_fwd(x, offset, mask, kernel), repeats),
      deform_fwd_bwd=median_ms(lambda: deform_grad(x, offset, mask, kernel), repeats),
      conv_fwd=median_ms(lambda: plain_fwd(x, kernel), repeats),
      conv_fwd_bwd=median_ms(lambda: plain_grad(x, kernel), repeats))


def torch_reference_deform_conv():
  """tests/torch_reference.py's deform_conv2d (torchvision's signature, pure torch)."""
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
  from torch_reference import deform_conv2d  # pylint: disable=import-outside-toplevel
  return deform_conv2d


def torch_timings(x, offset, mask, kernel, pad, repeats):
  import torch
  label = 'pure torch (grid_sample per tap)'
  reference = torch_reference_deform_conv()
  op = lambda x, o, m, w: reference(x, o, w, padding=pad, mask=m)
  try:
    from torchvision.ops import deform_conv2d
    probe = torch.zeros(1, 1, 3, 3)
    deform_conv2d(probe, torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 1, 1),
                  mask=torch.ones(1, 1, 3, 3))
    op = lambda x, o, m, w: deform_conv2d(x, o, w, padding=pad, mask=m)
    label = 'torchvision.ops.deform_conv2d'
  except Exception:  # the CUDA-built torchvision's compiled ops do not load on the CPU torch
    pass
  tensors = [torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in (
      np.transpose(x, (0, 3, 1, 2)), np.transpose(offset, (0, 3, 1, 2)),
      np.transpose(mask, (0, 3, 1, 2)), np.transpose(kernel, (3, 2, 0, 1)))]

  def timed(fn):
    fn()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)

  def forward():
    with torch.no_grad():
      op(*tensors)

  def forward_backward():
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    op(*leaves).sum().backward()

  return label, timed(forward), timed(forward_backward)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--size', type=int, default=128, help='H = W')
  parser.add_argument('--channels', type=int, default=64)
  parser.add_argument('--out', type=int, default=256)
  parser.add_argument('--kernels', type=int, nargs='+', default=[1, 3, 7])
  parser.add_argument('--offset-scale', type=float, default=2.0,
                      help='std of the random offsets, in pixels')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--torch', action='store_true', help='also time a torch implementation')
  args = parser.parse_args()

  dtype = jnp.dtype(args.dtype)
  b, s, c, o = args.batch, args.size, args.channels, args.out
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}; input {b}x{s}x{s}x{c} -> {o}, '
        f'{args.dtype}, median of {args.repeats} (ms)')
  header = f'{"k":>3} {"deform fwd":>11} {"deform f+b":>11} {"conv fwd":>9} {"conv f+b":>9}'
  header += f' {"fwd ratio":>9} {"f+b ratio":>9}'
  if args.torch:
    header += f' {"torch fwd":>10} {"torch f+b":>10}'
  print(header)
  rng = np.random.default_rng(0)
  torch_label = None
  for k in args.kernels:
    pad = k // 2
    arrays = dict(
        x=rng.normal(size=(b, s, s, c)),
        offset=rng.normal(scale=args.offset_scale, size=(b, s, s, 2 * k * k)),
        mask=rng.uniform(0, 2, size=(b, s, s, k * k)),
        kernel=rng.normal(scale=(k * k * c) ** -0.5, size=(k, k, c, o)))
    inputs = [jnp.asarray(arrays[n], dtype) for n in ('x', 'offset', 'mask', 'kernel')]
    probe = jnp.asarray(rng.normal(size=(b, s, s, o)), jnp.float32)
    t = jax_timings(*inputs, probe, pad, args.repeats)
    line = (f'{k:>3} {t["deform_fwd"]:>11.1f} {t["deform_fwd_bwd"]:>11.1f} {t["conv_fwd"]:>9.1f} '
            f'{t["conv_fwd_bwd"]:>9.1f} {t["deform_fwd"] / t["conv_fwd"]:>9.2f} '
            f'{t["deform_fwd_bwd"] / t["conv_fwd_bwd"]:>9.2f}')
    if args.torch:
      torch_label, fwd, fwd_bwd = torch_timings(arrays['x'], arrays['offset'], arrays['mask'],
                                                arrays['kernel'], pad, args.repeats)
      line += f' {fwd:>10.1f} {fwd_bwd:>10.1f}'
    print(line, flush=True)
  if torch_label:
    print(f'torch column: {torch_label} (float32)')


if __name__ == '__main__':
  main()

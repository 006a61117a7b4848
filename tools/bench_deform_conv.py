"""Times modulated_deform_conv2d (forward, forward+backward) against a plain conv of the same shape,
and against the previous implementation (``--before``).

  python tools/bench_deform_conv.py                    # 1x256x256x64 -> 256, k = 1, 3, 7, float32
  python tools/bench_deform_conv.py --size 64 --dtype float32 bfloat16 --before   # CPU, README
  python tools/bench_deform_conv.py --size 128 256 --dtype float32 bfloat16 --torch
  python tools/bench_deform_conv.py --size 64 --kernels 3 --torch --jsonl rows.jsonl

256² x 64 channels -> 256 is the dominant case: the ASPPDeformable of the last decoder stage of a
1024² input (decoder_block1 at H/4), where the 7x7 branch alone is ~105 GFLOP.

Forward+backward is the gradient of sum(y * probe) w.r.t. every input (x, offset, mask, kernel
for the deformable conv; x, kernel for the plain conv). Times are medians over --repeats runs of
the jitted function after one warm-up (compilation) call; the functions of one (size, kernel,
dtype) are timed round-robin (one call of each per round), so load from other processes falls on
all of them alike, and each row carries its ratio to the plain conv of the same mode
(``vs_conv``). ``--before`` adds ``jax-deform-before`` rows: the previous implementation
(``modulated_deform_conv2d_autodiff``: a scan over kernel rows, differentiated by JAX, float32
throughout). ``--dtype bfloat16`` feeds bfloat16
inputs (the model's bf16 path: sampling coordinates and accumulation stay float32, the result is
bf16). With --torch, also times torchvision.ops.deform_conv2d on CUDA when a GPU is there (the
tensors are moved to the GPU and every timed call ends with torch.cuda.synchronize), float32 (its
kernels have no bf16), on CPU if its compiled op loads, else a pure-torch DCNv2 (one grid_sample
per tap; the row says so), forward under no_grad and forward+backward with autograd.

GFLOP and TFLOP/s are analytic (birefnet_jax.flops): the bilinear sampling (8 per tap and input
channel) and the matmul (2 * taps * C * O) per position; forward+backward counts 3x the forward.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
# pylint: disable=wrong-import-position
from birefnet_jax.models.deform_conv import (modulated_deform_conv2d,
                                             modulated_deform_conv2d_autodiff)

DEFAULT_SIZES = (256,)


def median_ms(fn, repeats):
  return round_robin_median_ms({'fn': fn}, repeats)['fn']


def round_robin_median_ms(fns, repeats):
  """{name: median ms} of the thunks in ``fns``, each warmed up (compiled) once, then called once
  per round for ``repeats`` rounds; an exception in a thunk becomes its value."""
  live, times, results = {}, {}, {}
  for name, fn in fns.items():
    try:
      jax.block_until_ready(fn())  # warm-up: compilation
      live[name], times[name] = fn, []
    except Exception as e:  # pylint: disable=broad-except
      results[name] = e
  for _ in range(repeats):
    for name, fn in live.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  results.update({name: 1e3 * statistics.median(t) for name, t in times.items()})
  return results


def jax_functions(pad, probe, deform_conv=modulated_deform_conv2d):
  """The four jitted functions: deform forward / gradient, plain conv forward / gradient."""

  def deform(x, offset, mask, kernel):
    return deform_conv(x, offset, mask, kernel, padding=pad)

  def plain(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  return dict(
      deform_fwd=jax.jit(deform),
      deform_fwd_bwd=jax.jit(jax.grad(
          lambda *a: jnp.sum(deform(*a).astype(jnp.float32) * probe), argnums=(0, 1, 2, 3))),
      conv_fwd=jax.jit(plain),
      conv_fwd_bwd=jax.jit(jax.grad(
          lambda *a: jnp.sum(plain(*a).astype(jnp.float32) * probe), argnums=(0, 1))))


def jax_timings(x, offset, mask, kernel, probe, pad, repeats):
  fns = jax_functions(pad, probe)
  return dict(
      deform_fwd=median_ms(lambda: fns['deform_fwd'](x, offset, mask, kernel), repeats),
      deform_fwd_bwd=median_ms(lambda: fns['deform_fwd_bwd'](x, offset, mask, kernel), repeats),
      conv_fwd=median_ms(lambda: fns['conv_fwd'](x, kernel), repeats),
      conv_fwd_bwd=median_ms(lambda: fns['conv_fwd_bwd'](x, kernel), repeats))


def torch_reference_deform_conv():
  """tests/torch_reference.py's deform_conv2d (torchvision's signature, pure torch)."""
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
  from torch_reference import deform_conv2d  # pylint: disable=import-outside-toplevel
  return deform_conv2d


def torch_deform_op(device):
  """(label, op(x, offset, mask, weight, pad)): torchvision's deform_conv2d if it runs on
  ``device``, else the pure-torch reference."""
  import torch  # pylint: disable=import-outside-toplevel
  try:
    from torchvision.ops import deform_conv2d  # pylint: disable=import-outside-toplevel
    probe = torch.zeros(1, 1, 3, 3, device=device)
    deform_conv2d(probe, torch.zeros(1, 2, 3, 3, device=device),
                  torch.zeros(1, 1, 1, 1, device=device),
                  mask=torch.ones(1, 1, 3, 3, device=device))
    return (f'torchvision.ops.deform_conv2d ({device.type})',
            lambda x, o, m, w, pad: deform_conv2d(x, o, w, padding=pad, mask=m))
  except Exception:  # pylint: disable=broad-except
    # The CUDA-built torchvision's compiled ops do not load on the CPU torch.
    reference = torch_reference_deform_conv()
    return (f'pure torch DCN (grid_sample per tap; {device.type})',
            lambda x, o, m, w, pad: reference(x, o, w, padding=pad, mask=m))


def torch_timings(x, offset, mask, kernel, pad, repeats):
  """(label, forward ms, forward+backward ms) of the torch deformable conv, float32, on CUDA when
  available; every timed call ends with a device synchronize."""
  import torch  # pylint: disable=import-outside-toplevel
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  label, op = torch_deform_op(device)
  tensors = [torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device) for a in (
      np.transpose(x, (0, 3, 1, 2)), np.transpose(offset, (0, 3, 1, 2)),
      np.transpose(mask, (0, 3, 1, 2)), np.transpose(kernel, (3, 2, 0, 1)))]

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  def timed(fn):
    fn()
    sync()
    times = []
    for _ in range(repeats):
      sync()
      start = time.perf_counter()
      fn()
      sync()
      times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)

  def forward():
    with torch.no_grad():
      op(*tensors, pad)

  def forward_backward():
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    op(*leaves, pad).sum().backward()

  return label, timed(forward), timed(forward_backward)


def deform_gflops(size, channels, out, k, batch=1):
  """Analytic forward GFLOP of the deformable conv (sampling + matmul) and of the plain conv."""
  positions = batch * size * size
  deform = 8 * positions * k * k * channels + 2 * positions * k * k * channels * out
  plain = 2 * positions * k * k * channels * out
  return deform / 1e9, plain / 1e9


def benchmark_rows(sizes=DEFAULT_SIZES, channels=64, out=256, kernels=(1, 3, 7),
                   dtypes=('float32',), repeats=5, torch=False, batch=1, offset_scale=2.0,
                   on_row=None, seed=0, before=False):
  """One row per (size, kernel, implementation, mode): ours per dtype, the plain conv per dtype,
  (``before``) the previous implementation per dtype, and (``torch``) the torch deformable conv in
  float32. ``on_row(row)`` sees each row as soon as it is measured; errors become the row's
  status."""
  rows = []
  on_row = on_row or (lambda row: None)
  rng = np.random.default_rng(seed)

  def add(row):
    row.setdefault('status', 'ok')
    if row.get('median_ms') and row.get('gflops'):
      row['tflops_per_s'] = row['gflops'] / row['median_ms']
    rows.append(row)
    on_row(row)

  for s in sizes:
    for k in kernels:
      pad = k // 2
      arrays = dict(
          x=rng.normal(size=(batch, s, s, channels)),
          offset=rng.normal(scale=offset_scale, size=(batch, s, s, 2 * k * k)),
          mask=rng.uniform(0, 2, size=(batch, s, s, k * k)),
          kernel=rng.normal(scale=(k * k * channels) ** -0.5, size=(k, k, channels, out)))
      probe = jnp.asarray(rng.normal(size=(batch, s, s, out)), jnp.float32)
      deform_g, plain_g = deform_gflops(s, channels, out, k, batch)
      base = dict(size=f'{s}x{s}', batch=batch, kernel=k, channels=f'{channels}->{out}')
      for dtype in dtypes:
        inputs = [jnp.asarray(arrays[n], jnp.dtype(dtype))
                  for n in ('x', 'offset', 'mask', 'kernel')]
        implementations = [('jax-deform', jax_functions(pad, probe))]
        if before:
          implementations.append(('jax-deform-before', jax_functions(
              pad, probe, modulated_deform_conv2d_autodiff)))
        thunks, specs = {}, {}
        for impl, fns in implementations:
          for mode, name, g in (('fwd', 'deform_fwd', deform_g),
                                ('fwd+bwd', 'deform_fwd_bwd', 3 * deform_g)):
            thunks[impl, mode] = lambda f=fns[name]: f(*inputs)
            specs[impl, mode] = g
        fns = implementations[0][1]
        thunks['jax-conv', 'fwd'] = lambda: fns['conv_fwd'](inputs[0], inputs[3])
        thunks['jax-conv', 'fwd+bwd'] = lambda: fns['conv_fwd_bwd'](inputs[0], inputs[3])
        specs['jax-conv', 'fwd'], specs['jax-conv', 'fwd+bwd'] = plain_g, 3 * plain_g
        times = round_robin_median_ms(thunks, repeats)
        for (impl, mode), value in times.items():
          row = dict(impl=impl, mode=mode, dtype=dtype, gflops=specs[impl, mode], **base)
          if isinstance(value, Exception):
            row['status'] = f'error: {type(value).__name__}: {str(value)[:200]}'
          else:
            row['median_ms'] = value
            conv = times.get(('jax-conv', mode))
            if not isinstance(conv, Exception) and conv:
              row['vs_conv'] = value / conv
          add(row)
      if torch:
        row_f = dict(impl='torch-deform', mode='fwd', dtype='float32', gflops=deform_g, **base)
        row_b = dict(impl='torch-deform', mode='fwd+bwd', dtype='float32', gflops=3 * deform_g,
                     **base)
        try:
          label, fwd, fwd_bwd = torch_timings(arrays['x'], arrays['offset'], arrays['mask'],
                                              arrays['kernel'], pad, repeats)
          row_f.update(median_ms=fwd, status=f'ok ({label})')
          row_b.update(median_ms=fwd_bwd, status=f'ok ({label})')
        except Exception as e:  # pylint: disable=broad-except
          row_f['status'] = row_b['status'] = f'error: {type(e).__name__}: {str(e)[:200]}'
        add(row_f)
        add(row_b)
  return rows


def summary_table(rows):
  """Markdown table: per (size, kernel, dtype), forward and forward+backward ms of each
  implementation and its ratio to the plain conv."""
  impls = [i for i in ('jax-deform-before', 'jax-deform', 'jax-conv')
           if any(r['impl'] == i for r in rows)]
  lines = ['| size, k, dtype | ' + ' | '.join(
      f'{i} {m}' for m in ('fwd', 'fwd+bwd') for i in impls) + ' |',
           '|---|' + '---|' * (2 * len(impls))]
  groups = {}
  for r in rows:
    if r['impl'] in impls:
      groups.setdefault((r['size'], r['kernel'], r['dtype']), {})[r['impl'], r['mode']] = r
  for (size, k, dtype), cells in groups.items():
    text = []
    for mode in ('fwd', 'fwd+bwd'):
      for impl in impls:
        r = cells.get((impl, mode), {})
        if not r.get('median_ms'):
          text.append('-')
        elif impl == 'jax-conv':
          text.append(f"{r['median_ms']:.1f}")
        else:
          text.append(f"{r['median_ms']:.1f} ({r.get('vs_conv', float('nan')):.2f}x)")
    lines.append(f'| {size} k={k} {dtype} | ' + ' | '.join(text) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--size', type=int, nargs='+', default=list(DEFAULT_SIZES),
                      help='H = W, one or more (default 256)')
  parser.add_argument('--channels', type=int, default=64)
  parser.add_argument('--out', type=int, default=256)
  parser.add_argument('--kernels', type=int, nargs='+', default=[1, 3, 7])
  parser.add_argument('--offset-scale', type=float, default=2.0,
                      help='std of the random offsets, in pixels')
  parser.add_argument('--dtype', nargs='+', default=['float32'],
                      choices=['float32', 'bfloat16'])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--torch', action='store_true', help='also time a torch implementation')
  parser.add_argument('--before', action='store_true',
                      help='also time the previous implementation (modulated_deform_conv2d_'
                      'autodiff), round-robin with the others')
  parser.add_argument('--jsonl', default='', help='append each row as a JSON line to this file')
  args = parser.parse_args(argv)

  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}; input '
        f'{args.batch}x{args.size}²x{args.channels} -> {args.out}, median of {args.repeats} (ms)',
        flush=True)

  def on_row(row):
    print(f"  {row['size']} k={row['kernel']} {row['impl']:<12} {row['mode']:<7} "
          f"{row['dtype']:<8} " + (f"{row['median_ms']:9.2f} ms" if row.get('median_ms')
                                   else '        -   ')
          + (f"  {row['tflops_per_s']:.3g} TFLOP/s" if row.get('tflops_per_s') else '')
          + (f"  {row['vs_conv']:.2f}x conv" if row.get('vs_conv') else '')
          + ('' if row['status'] == 'ok' else f"  ({row['status']})"), flush=True)
    if args.jsonl:
      with open(args.jsonl, 'a') as f:
        f.write(json.dumps(dict(row, step='deform_conv')) + '\n')

  rows = benchmark_rows(args.size, args.channels, args.out, args.kernels, args.dtype,
                        args.repeats, args.torch, args.batch, args.offset_scale, on_row,
                        before=args.before)
  print('\nms, median (ratio to the plain conv of the same mode):\n' + summary_table(rows))
  return rows


if __name__ == '__main__':
  main()

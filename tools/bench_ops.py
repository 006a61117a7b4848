"""CPU (or any backend) timings of the resize and of one Swin block, this checkout against an
earlier revision, side by side in one run, as ratios.

  python tools/bench_ops.py                      # against the 'main' branch
  python tools/bench_ops.py --baseline_rev=00f1eb6 --repeats=20

The baseline's ``models/resize.py`` and ``models/swin.py`` are read with ``git show REV:PATH``
and loaded as separate modules next to this checkout's (both use this checkout's
``models/layers.py``), so both run in the same process on the same inputs and parameters. Each
row is the median of ``--repeats`` calls of a jitted function (compilation and warm-up excluded,
calls alternating between the two versions); ``ratio`` is baseline / this checkout (above 1:
faster now). Rows: the align-corners resize, forward + backward (``jax.vjp`` with a cotangent
given as an argument), up 2x
and down 2x; one shifted Swin block on a map that needs window padding, forward and forward +
backward; in float32 and bfloat16.
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from birefnet_jax.models import resize as resize_now
from birefnet_jax.models import swin as swin_now


def load_baseline(rev, path, name, tmp):
  """The file ``path`` at git revision ``rev`` of this repository, imported as ``name``."""
  try:
    text = subprocess.run(['git', '-C', ROOT, 'show', f'{rev}:{path}'], check=True,
                          capture_output=True, text=True).stdout
  except subprocess.CalledProcessError as e:
    raise SystemExit(f'bench_ops: cannot read {path} at revision {rev!r}: {e.stderr.strip()}')
  file = os.path.join(tmp, f'{name}.py')
  with open(file, 'w', encoding='utf-8') as f:
    f.write(text)
  spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def median_seconds(fns, args, repeats):
  """Median seconds per call of each jitted fn in ``fns``, the calls alternating."""
  for fn in fns:
    jax.block_until_ready(fn(*args))   # compile + warm-up
    jax.block_until_ready(fn(*args))
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[i].append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def resize_rows(before, repeats):
  rows = []
  rng = np.random.default_rng(0)
  for dtype in (jnp.float32, jnp.bfloat16):
    for name, shape, size in (('resize up 2x', (2, 64, 64, 64), (128, 128)),
                              ('resize down 2x', (2, 128, 128, 64), (64, 64))):
      x = jnp.asarray(rng.standard_normal(shape), dtype)
      g = jnp.asarray(rng.standard_normal((shape[0], *size, shape[3])), dtype)

      def fwd_bwd(m):
        # The cotangent is an argument: with a constant one XLA folds the (linear) gradient.
        def call(a, cotangent):
          out, vjp = jax.vjp(lambda t: m.resize_bilinear_align_corners(t, size), a)
          return out, vjp(cotangent)[0]
        return jax.jit(call)

      fns = [fwd_bwd(m) for m in (before, resize_now)]
      t_before, t_now = median_seconds(fns, (x, g), repeats)
      rows.append((f'{name} fwd+bwd {shape[1]}x{shape[2]}x{shape[3]} B{shape[0]}',
                   jnp.dtype(dtype).name, t_before, t_now))
  return rows


def swin_rows(before, repeats, dim=96, heads=3, win=7, hw=(54, 54), batch=2):
  """One shifted SwinBlock (54x54 map, window 7: padded to 56x56) of both versions."""
  rows = []
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((batch, *hw, dim)), jnp.float32)
  padded = [-(-s // win) * win for s in hw]
  for dtype in (jnp.float32, jnp.bfloat16):
    blocks = [m.SwinBlock(dim, heads, win, shifted=True, dtype=None if dtype == jnp.float32
                          else dtype) for m in (before, swin_now)]
    mask_before = before.shifted_window_mask(*padded, win)
    regions_now = swin_now.shifted_window_regions(*padded, win)
    variables = jax.jit(lambda a: blocks[1].init(jax.random.PRNGKey(0), a, regions_now))(x)
    masks = (mask_before, regions_now)

    def forward(i):
      return jax.jit(lambda v, a: blocks[i].apply(v, a, masks[i]))

    def train(i):
      def loss(v, a):
        return blocks[i].apply(v, a, masks[i]).astype(jnp.float32).sum()
      return jax.jit(jax.grad(loss, argnums=(0, 1)))

    label = f'Swin block (shifted) {hw[0]}x{hw[1]}x{dim} win{win} B{batch}'
    t = median_seconds([forward(0), forward(1)], (variables, x), repeats)
    rows.append((f'{label} fwd', jnp.dtype(dtype).name, *t))
    t = median_seconds([train(0), train(1)], (variables, x), repeats)
    rows.append((f'{label} fwd+bwd', jnp.dtype(dtype).name, *t))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--baseline_rev', default='main', help='git revision to compare with')
  p.add_argument('--repeats', type=int, default=10)
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    resize_before = load_baseline(args.baseline_rev, 'birefnet_jax/models/resize.py',
                                  'resize_baseline', tmp)
    swin_before = load_baseline(args.baseline_rev, 'birefnet_jax/models/swin.py',
                                'swin_baseline', tmp)
    print(f'# {jax.devices()[0].platform}: baseline {args.baseline_rev} vs this checkout, median '
          f'of {args.repeats}', flush=True)
    rows = resize_rows(resize_before, args.repeats) + swin_rows(swin_before, args.repeats)
  width = max(len(r[0]) for r in rows)
  print(f'{"op":<{width}}  {"dtype":>8}  {"before ms":>9}  {"after ms":>8}  {"ratio":>5}')
  for name, dtype, t_before, t_now in rows:
    print(f'{name:<{width}}  {dtype:>8}  {t_before * 1e3:9.2f}  {t_now * 1e3:8.2f}  '
          f'{t_before / t_now:5.2f}')
  return rows


if __name__ == '__main__':
  main()

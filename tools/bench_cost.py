"""What a BiRefNet costs, from XLA's cost analysis of the compiled (never run) program, per image.

  python tools/bench_cost.py --preset swin_v1_l --size 1024 --batch 1
  python tools/bench_cost.py --preset swin_v1_l --size 1024 --modes infer --json /tmp/cost.json
  python tools/bench_cost.py --preset tiny --size 128 --modes infer,train     # seconds on CPU

For each mode the model is lowered and compiled for the local backend (CPU on a machine without an
accelerator) from abstract shapes (``jax.ShapeDtypeStruct``: no weights are made, nothing runs),
and ``compiled.cost_analysis()`` gives 'flops' and 'bytes accessed'. The modes:

* ``infer``: ``model.apply(variables, images)`` in eval mode, as ``jax.jit`` would run it for
  prediction (the variables float32, the compute in ``--dtype``);
* ``train``: the training loop's own step (``train.make_train_step``: train-mode forward with
  Dropout/DropPath on, the official DIS5K losses, gradients, AdamW, the state donated), as
  ``tools/bench_model.py`` times it.

XLA's undercount of loops: the cost analysis counts a while loop's body once. The deformable
convolution (``models/deform_conv.py``) processes its positions in tiles with ``lax.scan`` when its
sample buffer exceeds ``max_sample_bytes`` (4 MiB on CPU), so by default XLA sees one tile of
each. ``--deform_tile_bytes 1e12`` makes every deformable conv one tile (no scan: the same
arithmetic, straight-line), so 'flops' and 'bytes accessed' count all of it. (The previous
implementation, before the fast path, scanned over kernel rows: XLA saw 1 of k rows of each, so
figures measured on it undercount its deformable convs.) The analytic count
(``birefnet_jax.flops``: every conv, matmul, attention matmul and deformable conv, counted from
the config) is printed beside XLA's, with its deformable-conv share. A train step's analytic
count is 3x the train-mode forward.

Figures are per image (divided by ``--batch``). XLA's CPU cost model counts every operand and
result of every fused computation once ('bytes accessed' is HBM-like traffic between fusions,
not cache behaviour): a proxy for the memory traffic of the GPU program, not a measurement of it.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp

import numpy as np

from birefnet_jax import flops as flops_lib
from birefnet_jax import inference, losses, optim, train
from birefnet_jax.models import deform_conv
from birefnet_jax.models.birefnet import BiRefNet
from birefnet_jax.train_state import TrainState

from bench_model import FAST_COMPILE_OPTIONS, SMALL_PRESETS, make_model_config, parse_size
import hlo_bytes

MODES = ('infer', 'train')


def abstract_variables(model, images):
  """The model's variables as ShapeDtypeStructs (no init is compiled or run)."""
  return jax.eval_shape(lambda x: model.init({'params': jax.random.PRNGKey(0)}, x, train=False),
                        jax.ShapeDtypeStruct((1,) + images.shape[1:], images.dtype))


def predictor_variables(model, variables):
  """The abstract variables the predictor keeps (``inference.inference_variables``: BatchNorms
  folded, kernels in a low-precision compute dtype), from zeros of the abstract ones (the
  folding runs on the host; only the shapes and dtypes are used)."""
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), variables)
  prepared = inference.inference_variables(model, zeros)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), prepared)


def lower_infer(model, images, as_predictor=False):
  variables = abstract_variables(model, images)
  if as_predictor:
    variables = predictor_variables(model, variables)
  return jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images)


def lower_train(model, images, batch):
  variables = abstract_variables(model, images)
  tx, schedule = optim.make_optimizer(optim.optimizer_config(), steps_per_epoch=1000,
                                      lr=optim.official_learning_rate('DIS5K', batch))
  step = jax.jit(train.make_train_step(model, tx, schedule, base_rng=jax.random.PRNGKey(0),
                                       deterministic=False, use_class_labels=False),
                 donate_argnums=0)
  state = jax.eval_shape(lambda v: TrainState.create(v, tx), variables)
  masks = jax.ShapeDtypeStruct(images.shape[:3] + (1,), jnp.float32)
  lambdas = {k: jnp.float32(v) for k, v in losses.pixel_lambdas('DIS5K').items() if v != 0}
  return step.lower(state, dict(image=images, mask=masks), lambdas)


def xla_costs(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  cost = cost or {}
  return float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))


def window_tokens(cfg) -> int:
  """Tokens per attention window of a Swin backbone (0 for other backbones)."""
  size = cfg.backbone.get('window_size')
  return int(size) ** 2 if size else 0


def measure(cfg, mode, size, batch, fast=True, as_predictor=False, split_bytes=False):
  """One row of per-image figures for ``mode`` of the model ``cfg`` at ``size`` = (H, W);
  ``split_bytes``: also the bytes by kind (``hlo_bytes.breakdown``), GB per image."""
  model = BiRefNet(cfg)
  images = jax.ShapeDtypeStruct((batch,) + tuple(size) + (3,), jnp.float32)
  start = time.perf_counter()
  lowered = (lower_infer(model, images, as_predictor) if mode == 'infer'
             else lower_train(model, images, batch))
  compiled = lowered.compile(compiler_options=FAST_COMPILE_OPTIONS if fast else None)
  compile_s = time.perf_counter() - start
  flops, nbytes = xla_costs(compiled)
  train_mode = mode == 'train'
  counted = flops_lib.count(cfg, size, train=train_mode)
  kinds = counted.by_kind()
  factor = 3 if train_mode else 1
  deform = factor * (kinds.get('deform_sampling', 0) + kinds.get('deform_matmul', 0))
  row = dict(mode=mode, size=f'{size[0]}x{size[1]}', batch=batch, dtype=cfg.dtype,
             attention=cfg.attention, compile_s=compile_s,
             xla_gflop=flops / batch / 1e9, xla_gb=nbytes / batch / 1e9,
             analytic_gflop=factor * counted.total / 1e9,
             analytic_dense_gflop=factor * kinds.get('dense', 0) / 1e9,
             analytic_deform_gflop=deform / 1e9)
  if split_bytes:
    split = hlo_bytes.breakdown(compiled.as_text(), window_tokens(cfg))
    row['bytes_by_kind_gb'] = {kind: split[kind] / batch / 1e9
                               for kind in hlo_bytes.KINDS + ('total',)}
  return row


def format_breakdown(row):
  split = row['bytes_by_kind_gb']
  lines = [f"  bytes by kind ({row['mode']}; recomputed total {split['total']:.2f} GB, XLA's "
           f"{row['xla_gb']:.2f} GB):"]
  lines += [f'    {split[kind]:8.2f} GB  {100 * split[kind] / split["total"]:5.1f} %  {kind}'
            for kind in hlo_bytes.KINDS]
  return '\n'.join(lines)


COLUMNS = (('mode', '{}'), ('size', '{}'), ('batch', '{}'), ('dtype', '{}'), ('attention', '{}'),
           ('xla_gflop', '{:.1f}'), ('xla_gb', '{:.2f}'), ('analytic_gflop', '{:.1f}'),
           ('analytic_dense_gflop', '{:.1f}'), ('analytic_deform_gflop', '{:.1f}'),
           ('compile_s', '{:.1f}'))


def format_rows(rows):
  header = [name for name, _ in COLUMNS]
  cells = [[fmt.format(r[name]) for name, fmt in COLUMNS] for r in rows]
  widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
            for i, h in enumerate(header)]
  lines = ['  '.join(h.rjust(w) for h, w in zip(header, widths))]
  lines += ['  '.join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
  return '\n'.join(lines)


def build_parser():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='swin_v1_l',
                 help=f'a backbone preset (swin_v1_l, pvt_v2_b2, ...) or one of {SMALL_PRESETS}')
  p.add_argument('--size', default='1024', help='N or HxW, multiples of 32')
  p.add_argument('--train_size', default='',
                 help='size of the train step if not --size (its compile is the slow one)')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16', 'float16'))
  p.add_argument('--attention', default='einsum', help="Swin window attention: einsum, xla, ...")
  p.add_argument('--modes', default='infer,train', help='comma-separated: infer, train')
  p.add_argument('--full_compile', action='store_true',
                 help='compile with the default LLVM optimization (slower; the HLO, and so the '
                 'cost analysis, is the same)')
  p.add_argument('--json', default='', help='also append each row to this file (JSON lines)')
  p.add_argument('--deform_tile_bytes', type=float, default=0,
                 help="the deformable conv's sample-buffer bound per tile (max_sample_bytes); "
                 'e.g. 1e12: one tile, no scan, so XLA counts all of it (0: the default, 4 MiB '
                 'on CPU: a scan over tiles, whose body XLA counts once)')
  p.add_argument('--predictor_variables', action='store_true',
                 help='infer with the variables the predictor keeps (BatchNorms folded, kernels '
                 'cast to the compute dtype once) instead of float32 training variables')
  p.add_argument('--breakdown', action='store_true',
                 help="also split the bytes accessed by kind (tools/hlo_bytes.py): attention "
                 "logits, the converts feeding dots/convs (on a CPU: bf16 operands made f32 for "
                 "its f32 kernels), other converts, dots/convs, everything else")
  return p


def main(argv=None):
  args = build_parser().parse_args(argv)
  modes = [m.strip() for m in args.modes.split(',') if m.strip()]
  for m in modes:
    if m not in MODES:
      raise SystemExit(f'bench_cost: unknown mode {m!r} (expected {MODES})')
  if args.batch < 1:
    raise SystemExit('bench_cost: --batch must be at least 1')
  if args.deform_tile_bytes:
    deform_conv.DEFAULT_MAX_SAMPLE_BYTES[jax.default_backend()] = int(args.deform_tile_bytes)
  size = parse_size(args.size)
  train_size = parse_size(args.train_size) if args.train_size else size
  cfg = make_model_config(args.preset, args.dtype, attention=args.attention)
  print(f'# {args.preset} {cfg.dtype} on {jax.devices()[0].platform}: compiled, not run; '
        'per image', flush=True)
  rows = []
  for mode in modes:
    row = measure(cfg, mode, train_size if mode == 'train' else size, args.batch,
                  fast=not args.full_compile, as_predictor=args.predictor_variables,
                  split_bytes=args.breakdown)
    row.update(preset=args.preset, deform_tile_bytes=args.deform_tile_bytes or None,
               predictor_variables=args.predictor_variables)
    rows.append(row)
    print(format_rows([row]), flush=True)
    if args.breakdown:
      print(format_breakdown(row), flush=True)
    if args.json:
      with open(args.json, 'a', encoding='utf-8') as f:
        f.write(json.dumps(row) + '\n')
  if len(rows) > 1:
    print(format_rows(rows))
  return rows


if __name__ == '__main__':
  main()

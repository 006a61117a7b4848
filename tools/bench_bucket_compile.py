"""Compile time of the train step per input shape: what each dynamic-size bucket costs once.

  python tools/bench_bucket_compile.py                          # quickstart model, 2 shapes
  python tools/bench_bucket_compile.py --config configs/dis.py:backbone=swin_v1_t \
      --shapes 512x512,512x1024 --batch_size 2

Dynamic-size training compiles the train step once per batch shape (data.size_buckets bound the
shapes; without them the official range 256..2304 has 65 x 65 sizes). For each HxW this traces
and lowers the jitted train step (as train.py builds it) on an abstract batch, then compiles it,
and prints both times, wall clock and this process's CPU time (the honest figure on a shared
machine); nothing runs, so large shapes cost no memory beyond the compiler's.
"""

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
# pylint: disable=wrong-import-position
from birefnet_jax import optim
from birefnet_jax import train
from birefnet_jax.models.birefnet import BiRefNet
from birefnet_jax.train_state import TrainState


def load_config(spec):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default=str(Path(__file__).resolve().parents[1] / 'configs' /
                                         'quickstart.py'))
  p.add_argument('--shapes', default='128x128,96x160', help='HxW,HxW,...')
  p.add_argument('--batch_size', type=int, default=8)
  args = p.parse_args(argv)
  config = load_config(args.config)
  model = BiRefNet(config.model)
  tx, schedule = optim.make_optimizer(config.optim, 100, epochs=1, lr=1e-4)
  abstract_state = jax.eval_shape(lambda r: TrainState.create(
      model.init({'params': r}, jnp.zeros((1, 64, 64, 3)), train=False), tx), jax.random.key(0))
  step = jax.jit(train.make_train_step(
      model, tx, schedule, base_rng=jax.random.key(1), deterministic=bool(config.deterministic),
      use_class_labels=bool(config.model.auxiliary_classification)), donate_argnums=(0,))
  lambdas = {k: jax.ShapeDtypeStruct((), jnp.float32)
             for k in train.loss_lambdas(config, 0, 1, int(config.epochs))}
  print(f'{jax.devices()[0].platform}: {config.model.backbone.family} '
        f'(embed {config.model.backbone.get("embed_dim", "-")}), batch {args.batch_size}, '
        f'compute dtype {config.model.dtype}', flush=True)
  print('| shape HxW | trace+lower s (CPU s) | compile s (CPU s) |')
  print('|---|---|---|', flush=True)
  for text in args.shapes.split(','):
    h, w = (int(s) for s in text.lower().split('x'))
    batch = dict(image=jax.ShapeDtypeStruct((args.batch_size, h, w, 3), jnp.float32),
                 mask=jax.ShapeDtypeStruct((args.batch_size, h, w, 1), jnp.float32),
                 class_label=jax.ShapeDtypeStruct((args.batch_size,), jnp.int32))
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = step.lower(abstract_state, batch, lambdas)
    t1, c1 = time.perf_counter(), time.process_time()
    lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    print(f'| {h}x{w} | {t1 - t0:.1f} ({c1 - c0:.1f}) | {t2 - t1:.1f} ({c2 - c1:.1f}) |',
          flush=True)


if __name__ == '__main__':
  main()

"""ONNX export next to our JAX inference, on CPU, in one run: opset, file size, export time and
the median latency of one image in onnxruntime (CPU execution provider) and in jitted JAX.

  python tools/bench_onnx.py --presets swin_v1_t,swin_v1_l --size 1024 --repeats 5
  python tools/bench_onnx.py --presets tiny --size 256 --repeats 3          # seconds, any machine
  python tools/bench_onnx.py --checkpoint converted/lite --size 1024        # a converted model

Random weights unless ``--checkpoint`` (speed does not depend on the values). Both runtimes get
the same NCHW float32 batch; each figure is the median of ``--repeats`` timed calls after one
warm-up call (which includes JAX's compilation, reported as its own column), and the largest
absolute difference of their logits is printed too. Threads: onnxruntime's default (all cores)
and XLA's default; ``--threads N`` sets onnxruntime's intra-op count.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from birefnet_jax import onnx_export  # pylint: disable=g-import-not-at-top,wrong-import-position
from birefnet_jax.models import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from birefnet_jax.models.birefnet import BiRefNet  # pylint: disable=g-import-not-at-top,wrong-import-position


def tiny_config():
  """The tools/bench_model.py 'tiny' model: Swin embed 8, narrow decoder (for a quick run)."""
  cfg = config_lib.model_config('swin_v1_t', aspp_planes=16, dec_inter_channels=8,
                                ipt_inter_channels=6)
  cfg.backbone = config_lib.swin_config(8, (2, 2, 2, 2), (1, 2, 4, 8), 7)
  return cfg


def random_variables(model, size, seed=0):
  """Random variables of the model's shapes (numpy; nothing compiled)."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                          jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
  rng = np.random.default_rng(seed)

  def draw(s):
    scale = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.02
    return rng.normal(0, scale, s.shape).astype(np.float32)
  variables = jax.tree.map(draw, shapes)
  if 'batch_stats' in variables:
    variables['batch_stats'] = jax.tree.map(lambda a: np.abs(a) + 1, variables['batch_stats'])
  return variables


def timed(function, repeats):
  function()   # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    function()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench(name, model, variables, size, repeats, opset, threads, folder):
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  row = {'model': name, 'size': size, 'opset': opset}
  start = time.perf_counter()
  proto = onnx_export.export_onnx(model, variables, height=size, width=size, batch_size=1,
                                  opset=opset)
  data = onnx_export.serialize(proto)
  row['export s'] = time.perf_counter() - start
  row['MiB'] = len(data) / 2**20
  path = os.path.join(folder, f'{name}.onnx')
  with open(path, 'wb') as f:
    f.write(data)
  del proto, data
  options = ort.SessionOptions()
  if threads:
    options.intra_op_num_threads = threads
  start = time.perf_counter()
  session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  row['ort load s'] = time.perf_counter() - start
  x = np.random.default_rng(1).normal(size=(1, 3, size, size)).astype(np.float32)
  ort_out = session.run(None, {onnx_export.INPUT_NAME: x})[0]
  row['ort ms'] = 1e3 * timed(lambda: session.run(None, {onnx_export.INPUT_NAME: x}), repeats)
  forward = jax.jit(onnx_export.logits_function(model, variables))
  start = time.perf_counter()
  jax_out = np.asarray(forward(x))
  row['jax compile s'] = time.perf_counter() - start
  row['jax ms'] = 1e3 * timed(lambda: forward(x).block_until_ready(), repeats)
  row['max |diff|'] = float(np.abs(ort_out - jax_out).max())
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--presets', default='swin_v1_t',
                      help="comma-separated: tiny or a backbone preset (swin_v1_t, swin_v1_l, ...)")
  parser.add_argument('--checkpoint', default=None, help='a converted model instead of presets')
  parser.add_argument('--size', type=int, default=1024)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--opset', type=int, default=onnx_export.DEFAULT_OPSET)
  parser.add_argument('--threads', type=int, default=0)
  args = parser.parse_args(argv)
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  print(f'jax {jax.__version__} ({jax.devices()[0].platform}), onnxruntime {ort.__version__}, '
        f'{os.cpu_count()} CPUs', flush=True)
  columns = ('model', 'size', 'opset', 'MiB', 'export s', 'ort load s', 'ort ms',
             'jax compile s', 'jax ms', 'max |diff|')
  print(' | '.join(columns), flush=True)
  with tempfile.TemporaryDirectory() as folder:
    if args.checkpoint:
      from birefnet_jax.model_loading import load_model  # pylint: disable=g-import-not-at-top
      models = [(os.path.basename(args.checkpoint.rstrip('/')), *load_model(args.checkpoint))]
    else:
      models = []
      for preset in args.presets.split(','):
        cfg = tiny_config() if preset == 'tiny' else config_lib.model_config(preset)
        model = BiRefNet(cfg)
        models.append((preset, model, random_variables(model, args.size)))
    for name, model, variables in models:
      row = bench(name, model, variables, args.size, args.repeats, args.opset, args.threads,
                  folder)
      print(' | '.join(f'{row[c]:.3g}' if isinstance(row[c], float) else str(row[c])
                       for c in columns), flush=True)


if __name__ == '__main__':
  main()

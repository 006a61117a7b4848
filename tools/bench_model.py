"""Speed of the whole BiRefNet: inference and a full train step, JAX next to the official PyTorch.

  python tools/bench_model.py --preset=swin_v1_l --sizes=1024 --batch_sizes=1,4 \
      --dtypes=float32,bfloat16 --json=/tmp/bench.json
  python tools/bench_model.py --preset=swin_v1_l --sizes=1024 --max_batch_search --remat
  python tools/bench_model.py --preset=swin_v1_t --sizes=1024 --batch_sizes=2 \
      --torch-official=/path/to/BiRefNet          # a checkout the user provides
  python tools/bench_model.py --preset=swin_v1_l --sizes=1024 --batch_sizes=8 --dtypes=bfloat16 \
      --attention=einsum,cudnn                    # Swin window attention: ours vs cuDNN's fused
  BIREFNET_XLA_WORKAROUNDS=0 python tools/bench_model.py ...  # without the GPU scatter-add fix
  python tools/bench_model.py --preset=tiny --sizes=128 --batch_sizes=2 --repeats=3   # CPU

Every figure is per call of a jitted function on fixed random inputs: warm-up calls (which include
compilation) are excluded, each timed call ends with ``block_until_ready`` and the median of
``--repeats`` calls is reported. The train step is the training loop's own
(``train.make_train_step``): forward in train mode with mutable batch_stats and Dropout/DropPath
on, the official losses (``losses.total_loss``), gradients, the official AdamW update
(``optim.make_optimizer``) and a donated state, as one XLA program.

Other columns: FLOPs per call from the analytic counter (``birefnet_jax.flops``: the model's convs,
matmuls, window attention and deformable convs; a train step is 3x the train-mode forward), XLA's
own count beside it (``xla GFLOP``: the compiled program's cost analysis, which counts a while
loop's body once and so sees one kernel row of each deformable conv), and MFU from the analytic
FLOPs against ``--peak_tflops`` (default: the device kind's measured peak, ``PEAK_TFLOPS``; none
on CPU); the compiled program's own memory estimate
(arguments + outputs - aliased + temporaries, per config and available on every backend) and the
device's peak bytes in use (GPU/TPU only; a process-wide high-water mark, so run one config per
process for a clean per-config figure).

``--remat`` also times the train step with the model's remat switch on (``model.remat``: every
backbone block and decoder block recomputed in the backward pass); ``--remat_policy`` picks what
may still be saved (``model.remat_policy``, a ``jax.checkpoint_policies`` name).
``--max_batch_search`` (GPU/TPU) finds the largest train batch that fits, by doubling then
bisection, with and without remat. For the most memory, start with
``XLA_PYTHON_CLIENT_MEM_FRACTION=.95`` (the tool sets that default for the search).

``--attention`` defaults to ``sdpa``: the path that matches the official model's fused
``scaled_dot_product_attention`` (``SDPA_enabled``), i.e. cuDNN's fused attention on a GPU in
bf16/fp16 and ``jax.nn.dot_product_attention`` (XLA) elsewhere; ``einsum`` is the reference path.

``--jsonl FILE`` appends every row to FILE as one JSON line the moment it is measured (the
official model's rows too), so that a run cut short keeps what it measured.

``--torch-official DIR`` also times the official PyTorch model built from DIR (random weights,
same preset, resolution and batch): eager and ``torch.compile``, inference and a train step
(official losses, AdamW), under bf16/fp16 autocast on CUDA (fp32 on CPU), with TF32 float32
matmuls as the official scripts set (``precisionHigh``). Each ``torch.compile`` row starts from a
fresh dynamo cache; its "compile s" is the first call (for eager rows, just the first call).
Train rows at batch 1 are skipped: the official ``Config.batch_size`` (8) puts a BatchNorm2d on
the 1x1 ASPP pool, which torch cannot train on one image. The official code needs torchvision
(with its compiled ops), timm, kornia, einops and huggingface_hub; what is missing is reported
and the JAX rows still run. The tool never fetches that code. ``tools/bench_deform_conv.py`` rows
are included when that script exposes ``benchmark_rows()``.
"""

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from birefnet_jax import flops as flops_lib
from birefnet_jax import losses, optim, train
from birefnet_jax.models import config as config_lib
from birefnet_jax.models.layers import checkpoint_policy
from birefnet_jax.models.swin import ATTENTION_IMPLEMENTATIONS
from birefnet_jax.train_state import TrainState

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))

# Peak TFLOP/s by device kind and compute dtype, for MFU. H200: measured on the lent machines (an
# 8192^3 bf16 matmul through torch ran at 769-798 TFLOP/s, not the 989 of the data sheet); its
# TF32 figure is half of that, as on the data sheet (not measured). float32 on NVIDIA GPUs runs
# matmuls and convolutions as TF32 under JAX's default precision, hence the TF32 figure. Others:
# data-sheet dense figures. --peak_tflops overrides.
PEAK_TFLOPS = {
    'h200': {'bfloat16': 790.0, 'float16': 790.0, 'float32': 395.0},
    'h100': {'bfloat16': 989.0, 'float16': 989.0, 'float32': 494.0},
    'a100': {'bfloat16': 312.0, 'float16': 312.0, 'float32': 156.0},
}
PEAK_SOURCE = {'h200': 'measured (bf16 matmul, 8192^3)', 'h100': 'data sheet',
               'a100': 'data sheet'}

# What the official model code uses at import, as (module, attribute): importing a package alone
# can succeed lazily and fail later (huggingface_hub without its http client, torchvision whose
# compiled ops do not load).
OFFICIAL_DEPENDENCIES = (('torchvision.ops', 'deform_conv2d'), ('torchvision.models', 'vgg16'),
                         ('timm.layers', 'DropPath'), ('kornia.filters', 'laplacian'),
                         ('einops', 'rearrange'), ('huggingface_hub', 'PyTorchModelHubMixin'),
                         ('cv2', None))

TABLE_COLUMNS = (
    ('impl', 'impl', '{}'), ('mode', 'mode', '{}'), ('size', 'size', '{}'), ('batch', 'B', '{}'),
    ('dtype', 'dtype', '{}'), ('attention', 'attn', '{}'), ('remat', 'remat', '{}'),
    ('median_ms', 'ms', '{:.1f}'),
    ('images_per_s', 'img/s', '{:.2f}'), ('compile_s', 'compile s', '{:.1f}'),
    ('gflops', 'GFLOP', '{:.1f}'), ('xla_gflops', 'xla GFLOP', '{:.1f}'),
    ('tflops_per_s', 'TFLOP/s', '{:.3g}'), ('mfu', 'MFU', '{:.1%}'),
    ('compiled_mem_gib', 'XLA mem GiB', '{:.2f}'), ('peak_mem_gib', 'peak GiB', '{:.2f}'),
    ('status', 'status', '{}'),
)


# ----------------------------------------------------------------------------------------------
# Configuration


def tiny_model_config(dtype='float32'):
  """A BiRefNet small enough for CPU: Swin with embed_dim 8 and narrow decoder widths."""
  cfg = config_lib.model_config('swin_v1_t', aspp_planes=16, dec_inter_channels=8,
                                ipt_inter_channels=6, dtype=dtype)
  cfg.backbone = config_lib.swin_config(8, (2, 2, 2, 2), (1, 2, 4, 8), 7)
  return cfg


def micro_model_config(dtype='float32'):
  """'tiny' cut further for dry runs (tools/gpu_session.sh --dry-run): one Swin block per stage
  and a single-scale input, the whole decoder kept; its train step compiles in well under a
  minute on 2 CPU cores."""
  cfg = tiny_model_config(dtype)
  cfg.backbone = config_lib.swin_config(8, (1, 1, 1, 1), (1, 2, 4, 8), 7)
  cfg.mul_scl_ipt = ''
  return cfg


SMALL_PRESETS = ('tiny', 'micro')


def make_model_config(preset, dtype, remat=False, remat_policy='', attention='einsum'):
  if preset == 'tiny':
    cfg = tiny_model_config(dtype)
  elif preset == 'micro':
    cfg = micro_model_config(dtype)
  else:
    cfg = config_lib.model_config(preset, dtype=dtype)
  if attention == 'sdpa' and cfg.backbone.family != 'swin':
    attention = 'einsum'   # PVTv2 has one attention path
  attention = resolve_attention(attention, dtype)
  cfg.remat = bool(remat)
  cfg.remat_policy = remat_policy if remat else ''
  cfg.attention = attention
  return cfg


ATTENTION_CHOICES = ('sdpa',) + tuple(ATTENTION_IMPLEMENTATIONS)


def resolve_attention(attention, dtype, platform=None):
  """'sdpa' (as the official fused SDPA) -> 'cudnn' on a GPU in bf16/fp16, else 'xla'; other
  names unchanged."""
  if attention != 'sdpa':
    return attention
  if platform is None:
    platform = jax.devices()[0].platform
  return 'cudnn' if platform == 'gpu' and dtype in ('bfloat16', 'float16') else 'xla'


def model_flops(cfg, mode, size, batch):
  """Analytic FLOPs of one call: a forward of ``batch`` images, or a train step (3x the
  train-mode forward)."""
  if mode == 'train':
    return flops_lib.train_step_flops(cfg, size, batch)
  return flops_lib.forward_flops(cfg, size, batch)


def parse_size(text):
  """'1024' -> (1024, 1024); '2048x1536' -> (2048, 1536) as (H, W)."""
  parts = text.lower().split('x')
  try:
    hw = tuple(int(p) for p in parts)
  except ValueError:
    raise SystemExit(f'bench_model: bad --sizes entry {text!r} (expected N or HxW)') from None
  if len(hw) == 1:
    hw = hw * 2
  if len(hw) != 2 or hw[0] % 32 or hw[1] % 32 or min(hw) <= 0:
    raise SystemExit(f'bench_model: bad --sizes entry {text!r}: H and W must be positive '
                     'multiples of 32')
  return hw


def csv(text):
  return [t.strip() for t in text.split(',') if t.strip()]


def build_parser():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', default='swin_v1_l',
                 help="backbone preset (swin_v1_l/b/s/t, pvt_v2_b0/b1/b2/b5), or 'tiny' / "
                 "'micro' (CPU smoke runs)")
  p.add_argument('--sizes', default='1024', help='comma list of N or HxW (multiples of 32)')
  p.add_argument('--batch_sizes', default='1', help='comma list of batch sizes')
  p.add_argument('--dtypes', default='float32,bfloat16',
                 help='compute dtypes (float32, bfloat16, float16); parameters stay float32')
  p.add_argument('--modes', default='infer,train', help='infer, train or both')
  p.add_argument('--repeats', type=int, default=10, help='timed calls per row (median)')
  p.add_argument('--warmup', type=int, default=2, help='untimed calls per row (the first '
                 'compiles)')
  p.add_argument('--remat', action='store_true', help='also time the train step with the '
                 'backbone and decoder blocks rematerialized (model.remat)')
  p.add_argument('--skip_timed_rows', action='store_true',
                 help='no timed JAX rows (e.g. only --max_batch_search)')
  p.add_argument('--remat_policy', default='',
                 help="what remat may still save: a jax.checkpoint_policies name (default '': "
                 'nothing; dots_saveable, dots_with_no_batch_dims_saveable, ...)')
  p.add_argument('--attention', default='sdpa',
                 help="comma list of Swin window-attention paths: sdpa (default: as the official "
                 "fused SDPA, i.e. cudnn on a GPU in bf16/fp16, else xla), einsum (the reference), "
                 "xla (jax.nn.dot_product_attention), cudnn (its fused cuDNN kernel; GPU, "
                 "bf16/fp16)")
  p.add_argument('--peak_tflops', type=float, default=None,
                 help='device peak for MFU; default from the device kind (H200: 790 bf16 '
                 'measured, 395 tf32; H100: 989 / 494; A100: 312 / 156); none on CPU')
  p.add_argument('--max_batch_search', action='store_true',
                 help='find the largest train batch that fits (GPU/TPU; with and without remat)')
  p.add_argument('--max_batch_limit', type=int, default=256, help='upper bound of the search')
  p.add_argument('--max_batch_tries', type=int, default=0,
                 help='at most this many compiles per search (0: no bound); the result is then '
                 'a range when the search stops early')
  p.add_argument('--max_batch_start', type=int, default=1, help='first batch the search tries')
  p.add_argument('--max_batch_remat', default='both', choices=('both', 'on', 'off'),
                 help='search with remat on, off or both')
  p.add_argument('--max_batch_cpu_bytes', type=int, default=0,
                 help="dry runs: run the search on CPU against this many bytes (XLA's memory "
                 'estimate of each compiled step)')
  p.add_argument('--jsonl', default='', help='append each row to this file as one JSON line as '
                 'soon as it is measured')
  p.add_argument('--official_preset', default='',
                 help='preset of the official model rows (default: --preset; the official code '
                 "has no 'tiny')")
  p.add_argument('--torch_deform_standin', action='store_true',
                 help="where torchvision's deform_conv2d cannot run (CPU torch with a CUDA "
                 'torchvision, or none), give the official model the pure-torch DCN of '
                 'tests/torch_reference.py (dry runs; its rows say so)')
  p.add_argument('--torch-official', '--torch_official', dest='torch_official', default='',
                 help='checkout of the official BiRefNet repo to time side by side')
  p.add_argument('--torch_modes', default='eager,compile', help='eager and/or compile')
  p.add_argument('--no_deform_conv', action='store_true',
                 help='skip the rows of tools/bench_deform_conv.py')
  p.add_argument('--fast_compile', action='store_true',
                 help='compile with XLA backend optimizations off (smoke tests on CPU: faster '
                 'compiles, unrepresentative timings)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default='', help='write all rows and the device description here')
  return p


# ----------------------------------------------------------------------------------------------
# Device facts


def device_info():
  dev = jax.devices()[0]
  return dict(platform=dev.platform, device_kind=dev.device_kind, device_count=jax.device_count(),
              jax_version=jax.__version__, xla_flags=os.environ.get('XLA_FLAGS', ''))


def default_peak_tflops(device_kind, dtype):
  kind = device_kind.lower()
  for name, table in PEAK_TFLOPS.items():
    if name in kind:
      return table.get(dtype)
  return None


def peak_source(device_kind):
  kind = device_kind.lower()
  return next((src for name, src in PEAK_SOURCE.items() if name in kind), None)


class RowWriter:
  """Prints a one-line summary of each row as it is measured and appends it to ``path`` (one
  JSON line, flushed) when a path is given."""

  def __init__(self, path=''):
    self.path = path
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def __call__(self, row):
    if os.environ.get('BENCH_MODEL_STEP'):
      row.setdefault('step', os.environ['BENCH_MODEL_STEP'])
    ms = row.get('median_ms')
    mfu = row.get('mfu')
    print(f"  {row.get('impl')} {row.get('mode', '')} {row.get('size', '')} "
          f"B={row.get('batch', '')} {row.get('dtype', '')} {row.get('attention', '-')} "
          f"remat={row.get('remat', '-')}: "
          + (f'{ms:.1f} ms' if ms is not None else '-')
          + (f', MFU {mfu:.1%}' if mfu else '') + f" ({row.get('status')})", flush=True)
    if self.path:
      with open(self.path, 'a') as f:
        f.write(json.dumps(row, default=str) + '\n')
        f.flush()


def device_peak_bytes():
  """Peak bytes in use on the first device since the process started, or None (CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  return stats.get('peak_bytes_in_use')


def device_bytes_limit():
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  return stats.get('bytes_limit')


def compiled_costs(compiled, lowered=None):
  """(flops, memory estimate in bytes) of a compiled program; None where unknown."""
  flops = None
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
      cost = cost[0] if cost else None
    if cost:
      flops = cost.get('flops')
  except Exception:  # pylint: disable=broad-except
    pass
  if not flops and lowered is not None:
    try:  # the unoptimized HLO's count (some backends do not count custom calls)
      cost = lowered.cost_analysis()
      if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
      flops = cost.get('flops') if cost else None
    except Exception:  # pylint: disable=broad-except
      pass
  mem = None
  try:
    m = compiled.memory_analysis()
    if m is not None:
      mem = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  return (float(flops) if flops else None), mem


FAST_COMPILE_OPTIONS = {'xla_backend_optimization_level': 0,
                        'xla_llvm_disable_expensive_passes': True}


def compile_lowered(lowered, args):
  if getattr(args, 'fast_compile', False):
    return lowered.compile(compiler_options=FAST_COMPILE_OPTIONS)
  return lowered.compile()


def is_oom(error):
  text = str(error)
  return any(s in text for s in ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory',
                                 'OOM', 'Resource exhausted'))


# ----------------------------------------------------------------------------------------------
# JAX rows


def _time_calls(call, warmup, repeats, wait=jax.block_until_ready):
  """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones; ``wait(call())`` ends
  a call (it blocks until the device is done)."""
  for _ in range(warmup):
    wait(call())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    wait(call())
    times.append(time.perf_counter() - start)
  return times


def _random_batch(size, batch, seed):
  rng = np.random.default_rng(seed)
  h, w = size
  images = rng.standard_normal((batch, h, w, 3), dtype=np.float32)
  masks = (rng.random((batch, h, w, 1)) > 0.5).astype(np.float32)
  return jnp.asarray(images), jnp.asarray(masks)


def init_variables(model, images, seed):
  """Random variables of the model's shapes, without compiling or running ``model.init``.

  Speed does not depend on the values, and ``model.init`` costs a whole compilation (or minutes
  of op-by-op dispatch on CPU). Kernels ~ N(0, 1/fan_in) keep activations and the loss finite;
  norms start at scale 1 / bias 0 and BatchNorm statistics at mean 0 / var 1, as ``init`` does.
  """
  shapes = jax.eval_shape(lambda x: model.init({'params': jax.random.PRNGKey(0)}, x,
                                               train=False), images[:1])
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], 'key', str(path[-1]))
    if name in ('scale', 'var'):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean'):
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = max(1, int(np.prod(leaf.shape[:-1]))) if len(leaf.shape) > 1 else 1
    values = rng.standard_normal(leaf.shape, dtype=np.float32) / np.sqrt(fan_in)
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def train_step_and_state(model, variables, batch):
  """The training loop's own step (``train.make_train_step``: the official loss at the DIS5K
  lambdas, AdamW at the official lr for ``batch``), jitted with the state donated as train.py
  does, and its initial state. The step is ``(state, {'image', 'mask'}, lambdas) ->
  (state, metrics)``; see ``train_call``."""
  tx, schedule = optim.make_optimizer(optim.optimizer_config(), steps_per_epoch=1000,
                                      lr=optim.official_learning_rate('DIS5K', batch))
  step = jax.jit(train.make_train_step(model, tx, schedule, base_rng=jax.random.PRNGKey(0),
                                       deterministic=False, use_class_labels=False),
                 donate_argnums=0)
  return step, TrainState.create(variables, tx)


def train_args(images, masks):
  """The step's (batch, lambdas) arguments after the state."""
  lambdas = {k: jnp.float32(v) for k, v in losses.pixel_lambdas('DIS5K').items() if v != 0}
  return dict(image=images, mask=masks), lambdas


def _set_throughput(row, flops, peak_tflops):
  """gflops / tflops_per_s / mfu of a timed row from its analytic ``flops`` per call."""
  if not flops or not row.get('median_ms'):
    return
  row['gflops'] = flops / 1e9
  row['tflops_per_s'] = flops / (row['median_ms'] / 1e3) / 1e12
  if peak_tflops:
    row['mfu'] = row['tflops_per_s'] / peak_tflops
    row['peak_tflops'] = peak_tflops


def _finish_row(row, times, flops, mem, peak_tflops, xla_flops=None):
  median = statistics.median(times)
  row.update(median_ms=median * 1e3, min_ms=min(times) * 1e3,
             images_per_s=row['batch'] / median,
             compiled_mem_gib=None if mem is None else mem / 2**30)
  if xla_flops:
    row['xla_gflops'] = xla_flops / 1e9
  _set_throughput(row, flops, peak_tflops)
  peak = device_peak_bytes()
  row['peak_mem_gib'] = None if peak is None else peak / 2**30
  return row


def bench_jax(args, cfg, mode, size, batch, peak_tflops=None):
  """One row: 'infer' or 'train' of the model ``cfg`` (its dtype, its remat) for (size, batch);
  errors become the row's status."""
  from birefnet_jax.models.birefnet import BiRefNet  # pylint: disable=import-outside-toplevel
  row = dict(impl='jax', preset=args.preset, mode=mode, size=f'{size[0]}x{size[1]}', batch=batch,
             dtype=cfg.dtype, remat=('-' if mode == 'infer' else bool(cfg.remat)),
             remat_policy=cfg.remat_policy or 'nothing', attention=cfg.attention, status='ok')
  try:
    model = BiRefNet(cfg)
    images, masks = _random_batch(size, batch, args.seed)
    variables = init_variables(model, images, args.seed)
    start = time.perf_counter()
    if mode == 'infer':
      fn = jax.jit(lambda v, x: model.apply(v, x))
      lowered = fn.lower(variables, images)
      compiled = compile_lowered(lowered, args)
      call = lambda: compiled(variables, images)
    else:
      step, state = train_step_and_state(model, variables, batch)
      del variables
      step_args = train_args(images, masks)
      lowered = step.lower(state, *step_args)
      compiled = compile_lowered(lowered, args)
      holder = [state]

      def call():
        holder[0], metrics = compiled(holder[0], *step_args)
        return metrics['loss']

    row['compile_s'] = time.perf_counter() - start
    xla_flops, mem = compiled_costs(compiled, lowered)
    times = _time_calls(call, args.warmup, args.repeats)
    if mode == 'train':
      loss = float(call())
      row['loss'] = loss
      if not math.isfinite(loss):
        row['status'] = 'non-finite loss'
    return _finish_row(row, times, model_flops(cfg, mode, size, batch), mem, peak_tflops,
                       xla_flops)
  except Exception as e:  # pylint: disable=broad-except
    row['status'] = ('OOM' if is_oom(e) else 'error') + f': {type(e).__name__}: {str(e)[:300]}'
    return row
  finally:
    gc.collect()


def _try_train_batch(args, cfg, size, batch, bytes_limit):
  """True if one train step of ``batch`` compiles, fits and runs."""
  from birefnet_jax.models.birefnet import BiRefNet  # pylint: disable=import-outside-toplevel
  try:
    model = BiRefNet(cfg)
    images, masks = _random_batch(size, batch, args.seed)
    step, state = train_step_and_state(model, init_variables(model, images, args.seed), batch)
    step_args = train_args(images, masks)
    compiled = compile_lowered(step.lower(state, *step_args), args)
    _, mem = compiled_costs(compiled)
    if mem is not None and bytes_limit and mem > bytes_limit:
      return False  # does not fit by XLA's own estimate: skip running it
    state, metrics = compiled(state, *step_args)
    jax.block_until_ready(metrics['loss'])
    return True
  except Exception as e:  # pylint: disable=broad-except
    if is_oom(e):
      return False
    raise
  finally:
    jax.clear_caches()
    gc.collect()


def next_search_batch(good, bad, last, limit):
  """The next batch of the max-batch search, or None when it is settled: double from the last
  batch that fit until one fails, halve from a first failure, then bisect."""
  if bad is None:
    nxt = last * 2
    return nxt if nxt <= limit else None
  if good == 0:
    return bad // 2 if bad > 1 else None
  return (good + bad) // 2 if bad - good > 1 else None


def max_batch_search(args, cfg, size, try_batch=None, bytes_limit=None):
  """Largest train batch of the model ``cfg`` that fits: doubling from ``--max_batch_start``
  (halving if that fails), then bisection; at most ``--max_batch_tries`` compiles when set.
  ``max_batch`` is the largest batch seen to fit (0: none) and ``first_oom`` the smallest that
  did not (None: none failed)."""
  remat = bool(cfg.remat)
  if bytes_limit is None:
    bytes_limit = device_bytes_limit()
  if try_batch is None:
    try_batch = lambda b: _try_train_batch(args, cfg, size, b, bytes_limit)
  good, bad = 0, None
  batch = max(1, min(getattr(args, 'max_batch_start', 1), args.max_batch_limit))
  tries = getattr(args, 'max_batch_tries', 0) or None
  tried = []
  while batch is not None and (tries is None or len(tried) < tries):
    start = time.perf_counter()
    ok = try_batch(batch)
    tried.append((batch, ok))
    print(f'  max batch search (remat={remat}): batch {batch}: {"fits" if ok else "OOM"} '
          f'({time.perf_counter() - start:.0f} s)', flush=True)
    if ok:
      good = batch
    else:
      bad = batch
    batch = next_search_batch(good, bad, batch, args.max_batch_limit)
  settled = batch is None
  return dict(preset=args.preset, size=f'{size[0]}x{size[1]}', dtype=cfg.dtype, remat=remat,
              max_batch=good, first_oom=bad, settled=settled,
              hit_limit=bad is None and settled, tried=tried)


# ----------------------------------------------------------------------------------------------
# The official PyTorch model


class OfficialUnavailable(Exception):
  pass


def _official_lateral_channels(preset, mul_scl_ipt, cxt_num):
  bb = config_lib.backbone_config(preset)
  lateral = [c * (2 if mul_scl_ipt == 'cat' else 1)
             for c in reversed(config_lib.backbone_channels(bb))]
  cxt = lateral[1:][::-1][-cxt_num:] if cxt_num else []
  return lateral, cxt


def load_official(official_dir, preset):
  """Imports the official ``BiRefNet`` class from ``official_dir`` with ``Config().bb = preset``.

  Returns (BiRefNet class, loss module). Raises OfficialUnavailable with a clear message.
  """
  official_dir = os.path.abspath(official_dir)
  for f in ('config.py', 'loss.py', os.path.join('models', 'birefnet.py')):
    if not os.path.isfile(os.path.join(official_dir, f)):
      raise OfficialUnavailable(f'{official_dir} is not a checkout of the official BiRefNet repo '
                                f'({f} is missing)')
  if preset in SMALL_PRESETS:
    raise OfficialUnavailable(f"--torch-official needs an official preset, not {preset!r} (the "
                              'official decoder widths are literals; see --official_preset)')
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise OfficialUnavailable(f'PyTorch is not installed ({e})') from None
  missing = []
  for module_name, attribute in OFFICIAL_DEPENDENCIES:
    name = module_name + (f'.{attribute}' if attribute else '')
    try:
      module = importlib.import_module(module_name)
      if attribute:
        getattr(module, attribute)
    except Exception as e:  # pylint: disable=broad-except
      missing.append(f'{name} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ""})')
  if missing:
    raise OfficialUnavailable('the official code needs packages that are missing or do not load: '
                              + '; '.join(missing))
  if official_dir not in sys.path:
    sys.path.insert(0, official_dir)
  try:
    official_config = importlib.import_module('config')
    if not getattr(official_config, '_bench_patched', False):
      base = official_config.Config

      class PresetConfig(base):
        """The official Config with ``bb`` (and the widths that follow from it) replaced."""
        bench_preset = preset

        def __init__(self):
          super().__init__()
          self.bb = PresetConfig.bench_preset
          self.lateral_channels_in_collection, self.cxt = _official_lateral_channels(
              self.bb, self.mul_scl_ipt, self.cxt_num)
          self.freeze_bb = False

      official_config.Config = PresetConfig
      official_config._bench_patched = True  # pylint: disable=protected-access
    official_config.Config.bench_preset = preset
    birefnet_module = importlib.import_module('models.birefnet')
    loss_module = importlib.import_module('loss')
  except Exception as e:  # pylint: disable=broad-except
    raise OfficialUnavailable(f'importing the official model from {official_dir} failed: '
                              f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'
                              ) from None
  return birefnet_module.BiRefNet, loss_module


def _torch_sync(torch, device):
  if device.type == 'cuda':
    torch.cuda.synchronize()


def official_train_step(torch, model, optimizer, loss_module, scaler, autocast_ctx):
  """The official ``_train_batch``: forward under autocast, losses in float32, AdamW step."""
  pix_loss = loss_module.PixLoss()
  bce = torch.nn.BCELoss()
  F = torch.nn.functional

  def step(images, gts):
    optimizer.zero_grad(set_to_none=True)
    with autocast_ctx():
      scaled_preds, _ = model(images)
    (gdt_preds, gdt_labels), scaled_preds = scaled_preds
    loss_gdt = 0.
    for pred, label in zip(gdt_preds, gdt_labels):
      pred = F.interpolate(pred.float(), size=label.shape[2:], mode='bilinear',
                           align_corners=True).sigmoid()
      loss_gdt = loss_gdt + bce(pred, label.float().sigmoid())
    loss_pix, _ = pix_loss([p.float() for p in scaled_preds], gts.clamp(0, 1), pix_loss_lambda=1.0)
    loss = loss_pix + loss_gdt
    if scaler is not None:
      scaler.scale(loss).backward()
      scaler.step(optimizer)
      scaler.update()
    else:
      loss.backward()
      optimizer.step()
    return loss

  return step


class _StubName(type):
  """A stand-in class whose every attribute is another stand-in (``InterpolationMode.BILINEAR``)."""

  def __getattr__(cls, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return _StubName(name, (), {})


def _install_torchvision_stub(deform_conv2d):
  """Stand-in ``torchvision`` modules (any submodule, any name) with the pure-torch
  ``deform_conv2d``, for dry runs where torchvision cannot be imported at all."""
  import importlib.abc  # pylint: disable=import-outside-toplevel
  import importlib.machinery  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  class StubModule(types.ModuleType):

    def __getattr__(self, name):
      if name.startswith('__'):
        raise AttributeError(name)
      return _StubName(name, (torch.nn.Module,), {})

  class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):

    def find_spec(self, fullname, path=None, target=None):
      del path, target
      if fullname == 'torchvision' or fullname.startswith('torchvision.'):
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
      return None

    def create_module(self, spec):
      module = StubModule(spec.name)
      module.__path__ = []
      return module

    def exec_module(self, module):
      if module.__name__ == 'torchvision.ops':
        module.deform_conv2d = deform_conv2d

  for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
    del sys.modules[name]
  sys.meta_path.insert(0, Finder())


def install_deform_standin():
  """Where torchvision's ``deform_conv2d`` cannot run, puts the pure-torch DCN of
  tests/torch_reference.py in its place (before the official code imports it). Returns None if
  torchvision's op runs, else a note for the rows."""
  import torch  # pylint: disable=import-outside-toplevel
  try:
    from torchvision.ops import deform_conv2d  # pylint: disable=import-outside-toplevel
    deform_conv2d(torch.zeros(1, 1, 3, 3), torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 1, 1),
                  mask=torch.ones(1, 1, 3, 3))
    return None
  except Exception as e:  # pylint: disable=broad-except
    why = f'{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ""}'
  sys.path.insert(0, os.path.join(os.path.dirname(TOOLS_DIR), 'tests'))
  from torch_reference import deform_conv2d  # pylint: disable=import-outside-toplevel
  try:
    import torchvision.ops  # pylint: disable=import-outside-toplevel
    torchvision.ops.deform_conv2d = deform_conv2d
  except Exception:  # pylint: disable=broad-except
    # torchvision does not even import (its CUDA build's ops against a CPU torch): the official
    # code needs only deform_conv2d from it (the VGG / ResNet constructors are never called for
    # Swin/PVT); timm imports more names at import time. Stand-in modules give those names.
    _install_torchvision_stub(deform_conv2d)
    why += '; torchvision replaced by stand-in modules'
  return f"stand-in deform op (pure torch; torchvision's does not run: {why})"


def bench_torch_rows(args, sizes, batches, dtypes, modes, on_row=None, peak_for=None):
  """Rows for the official model; one 'skipped'/'error' row when it cannot run. ``on_row`` is
  called with each row as soon as it is measured."""
  rows = []
  on_row = on_row or (lambda row: None)
  preset = getattr(args, 'official_preset', '') or args.preset
  standin = None
  if getattr(args, 'torch_deform_standin', False):
    try:
      standin = install_deform_standin()
    except Exception as e:  # pylint: disable=broad-except
      standin = None
      print(f'torch-official: no deform stand-in: {type(e).__name__}: {e}', file=sys.stderr)
  try:
    birefnet_cls, loss_module = load_official(args.torch_official, preset)
  except OfficialUnavailable as e:
    msg = f'torch-official unavailable: {e}'
    print(msg, file=sys.stderr)
    row = dict(impl='torch-official', preset=preset, status=f'skipped: {e}')
    on_row(row)
    return [row]
  import torch  # pylint: disable=import-outside-toplevel
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  # As the official train.py / inference.py (precisionHigh): TF32 matmuls in float32, like
  # JAX's default precision on GPU.
  torch.set_float32_matmul_precision('high')
  torch_modes = csv(args.torch_modes)
  for size in sizes:
    for batch in batches:
      for dtype in dtypes:
        for torch_mode in torch_modes:
          for mode in modes:
            row = dict(impl=f'torch-{torch_mode}', preset=preset, mode=mode,
                       size=f'{size[0]}x{size[1]}', batch=batch, dtype=dtype,
                       attention='sdpa (official)', remat='-', status='ok')
            rows.append(row)
            if device.type == 'cpu' and dtype != 'float32':
              row['status'] = 'skipped: autocast only timed on CUDA (CPU: float32)'
              on_row(row)
              continue
            if mode == 'train' and batch == 1:
              # Config.batch_size (8) decides at import whether the official decoder has
              # BatchNorm; torch cannot train BatchNorm2d on the 1x1 ASPP pool of one image.
              row['status'] = ('skipped: the official BatchNorm2d on the 1x1 ASPP pool cannot '
                               'train on one image')
              on_row(row)
              continue
            try:
              _bench_torch_one(torch, device, birefnet_cls, loss_module, row, size, batch, dtype,
                               torch_mode, mode, args)
              if standin:
                row['status'] = f'ok ({standin})'
              cfg = config_lib.model_config(preset)
              _set_throughput(row, model_flops(cfg, mode, size, batch),
                              peak_for(dtype) if peak_for else None)
            except Exception as e:  # pylint: disable=broad-except
              oom = 'out of memory' in str(e).lower()
              row['status'] = (('OOM' if oom else 'error')
                               + f': {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}')
              if not oom and os.environ.get('BENCH_MODEL_DEBUG'):
                traceback.print_exc()
            finally:
              gc.collect()
              if device.type == 'cuda':
                torch.cuda.empty_cache()
            on_row(row)
  return rows


def _bench_torch_one(torch, device, birefnet_cls, loss_module, row, size, batch, dtype,
                     torch_mode, mode, args):
  torch.manual_seed(args.seed)
  model = birefnet_cls(bb_pretrained=False).to(device)
  amp_dtype = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
  if amp_dtype is None:
    autocast_ctx = contextlib.nullcontext
  else:
    autocast_ctx = lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)
  gen = torch.Generator().manual_seed(args.seed)
  images = torch.randn(batch, 3, *size, generator=gen).to(device)
  gts = (torch.rand(batch, 1, *size, generator=gen) > 0.5).float().to(device)
  if torch_mode == 'compile':
    # A fresh dynamo cache per row: otherwise rows of other shapes/modes recompile into one cache
    # (dynamic shapes after the first change; eager fallback after 8 recompiles).
    torch._dynamo.reset()  # pylint: disable=protected-access
    net = torch.compile(model)
  else:
    net = model
  if mode == 'infer':
    model.eval()

    def call():
      with torch.inference_mode(), autocast_ctx():
        return net(images)[-1].sigmoid()
  else:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4 * math.sqrt(batch / 4),
                                  weight_decay=1e-2)
    scaler = (torch.amp.GradScaler(device.type)
              if amp_dtype == torch.float16 and device.type == 'cuda' else None)
    call = official_train_step(torch, net, optimizer, loss_module, scaler, autocast_ctx)
    call = (lambda step=call: step(images, gts))
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  last = {}

  def wait(out):
    last['out'] = out
    _torch_sync(torch, device)

  start = time.perf_counter()
  wait(call())  # the first call compiles under torch.compile (eager: just the first call)
  row['compile_s'] = time.perf_counter() - start
  times = _time_calls(call, max(args.warmup - 1, 0), args.repeats, wait)
  if mode == 'train':
    row['loss'] = float(last['out'].detach())
  median = statistics.median(times)
  row.update(median_ms=median * 1e3, min_ms=min(times) * 1e3, images_per_s=batch / median)
  if device.type == 'cuda':
    row['peak_mem_gib'] = torch.cuda.max_memory_allocated() / 2**30


# ----------------------------------------------------------------------------------------------
# Deformable convolution micro-benchmark (another tool)


def deform_conv_rows(args, sizes, cfg):
  """Rows of tools/bench_deform_conv.py's ``benchmark_rows()`` for the decoder's largest
  ASPPDeformable (decoder_block1 at H/4 x W/4 of the first size, dec_inter_channels ->
  aspp_planes, k = 1, 3, 7), batch 1, float32, next to a plain conv of that shape."""
  path = os.path.join(TOOLS_DIR, 'bench_deform_conv.py')
  if not os.path.isfile(path):
    return [], 'tools/bench_deform_conv.py not present'
  try:
    spec = importlib.util.spec_from_file_location('bench_deform_conv', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    return [], f'importing tools/bench_deform_conv.py failed: {type(e).__name__}: {e}'
  if not callable(getattr(module, 'benchmark_rows', None)):
    return [], 'tools/bench_deform_conv.py has no benchmark_rows()'
  try:
    rows = module.benchmark_rows(sizes=(sizes[0][0] // 4,), channels=int(cfg.dec_inter_channels),
                                 out=int(cfg.aspp_planes), kernels=(1, 3, 7),
                                 dtypes=('float32',), repeats=args.repeats, seed=args.seed)
  except Exception as e:  # pylint: disable=broad-except
    return [], f'bench_deform_conv failed: {type(e).__name__}: {e}'
  for r in rows:
    r['impl'] = f"{r['impl']}{r['kernel']}x{r['kernel']} {r['channels']}"
    r['remat'] = '-'
  return rows, None


# ----------------------------------------------------------------------------------------------
# Output


def _cell(row, key, fmt):
  value = row.get(key)
  if value is None or value == '':
    model_row = row.get('impl') == 'jax' or row.get('impl', '').startswith('torch-')
    return 'n/a' if key in ('peak_mem_gib', 'mfu') and model_row and row.get('median_ms') else ''
  try:
    return fmt.format(value)
  except (ValueError, TypeError):
    return str(value)


def format_table(rows):
  header = [title for _, title, _ in TABLE_COLUMNS]
  body = [[_cell(r, key, fmt) for key, _, fmt in TABLE_COLUMNS] for r in rows]
  widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
            for i, h in enumerate(header)]
  widths[-1] = len(header[-1])  # status is free text: do not pad the other lines for it
  lines = ['  '.join(h.ljust(w) for h, w in zip(header, widths))]
  lines.append('  '.join('-' * w for w in widths))
  for b in body:
    lines.append('  '.join(c.ljust(w) for c, w in zip(b, widths)).rstrip())
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
  """Runs the benchmarks of ``argv`` (sys.argv[1:] if None); prints the table, returns the
  results dict (also written to --json)."""
  args = build_parser().parse_args(argv)
  sizes = [parse_size(s) for s in csv(args.sizes)]
  batches = [int(b) for b in csv(args.batch_sizes)]
  dtypes = csv(args.dtypes)
  modes = csv(args.modes)
  attentions = csv(args.attention)
  for a in attentions:
    if a not in ATTENTION_CHOICES:
      raise SystemExit(f'bench_model: unknown attention {a!r} in --attention '
                       f'{ATTENTION_CHOICES}')
  for d in dtypes:
    if d not in ('float32', 'bfloat16', 'float16'):
      raise SystemExit(f'bench_model: unknown dtype {d!r} in --dtypes')
  for m in modes:
    if m not in ('infer', 'train'):
      raise SystemExit(f'bench_model: unknown mode {m!r} in --modes (infer, train)')
  if args.preset not in SMALL_PRESETS:
    config_lib.backbone_config(args.preset)  # fails early on an unknown preset
  try:
    checkpoint_policy(args.remat_policy)
  except ValueError as e:
    raise SystemExit(f'bench_model: --remat_policy: {e}') from None
  if args.max_batch_search:
    # Before JAX starts its backend: let the search use nearly all of the device memory.
    os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')

  if args.official_preset and args.official_preset not in SMALL_PRESETS:
    config_lib.backbone_config(args.official_preset)

  rows = []
  notes = []
  emit = RowWriter(args.jsonl)

  def torch_peak_for(dtype):
    """Peak for the official rows, from torch's device name (asking JAX would start its
    backend, which preallocates most of the GPU memory before torch has run)."""
    if args.peak_tflops:
      return args.peak_tflops
    try:
      import torch  # pylint: disable=import-outside-toplevel
      if torch.cuda.is_available():
        return default_peak_tflops(torch.cuda.get_device_name(0), dtype)
    except ImportError:
      pass
    return None

  # The official model first, before JAX preallocates most of the GPU memory.
  torch_rows = (bench_torch_rows(args, sizes, batches, dtypes, modes, on_row=emit,
                                 peak_for=torch_peak_for)
                if args.torch_official else [])
  if args.torch_official:
    try:
      import torch  # pylint: disable=import-outside-toplevel
      if torch.cuda.is_available():
        torch.cuda.empty_cache()
    except ImportError:
      pass

  info = device_info()
  if info['platform'] == 'cpu':
    warnings.filterwarnings('ignore', message='Some donated buffers were not usable')

  def peak_for(dtype):
    if args.peak_tflops:
      return args.peak_tflops
    return default_peak_tflops(info['device_kind'], dtype)

  for size in sizes:
    for batch in batches:
      for dtype in dtypes:
        for attention in attentions:
          for mode in modes:
            if args.skip_timed_rows:
              continue
            for remat in ((False, True) if mode == 'train' and args.remat else (False,)):
              cfg = make_model_config(args.preset, dtype, remat, args.remat_policy, attention)
              row = bench_jax(args, cfg, mode, size, batch, peak_for(dtype))
              if attention != row['attention']:
                row['attention'] = f"{attention}->{row['attention']}"
              rows.append(row)
              emit(row)
  rows.extend(torch_rows)

  if not args.no_deform_conv:
    dc_rows, why = deform_conv_rows(args, sizes, make_model_config(args.preset, 'float32'))
    rows.extend(dc_rows)
    for r in dc_rows:
      emit(r)
    if why:
      notes.append(f'deform conv rows skipped: {why}')

  max_batch = []
  if args.max_batch_search:
    cpu_limit = args.max_batch_cpu_bytes
    if info['platform'] == 'cpu' and not cpu_limit:
      notes.append('max batch search skipped: it needs a GPU/TPU (no device memory limit on CPU)')
    else:
      bytes_limit = None
      if info['platform'] == 'cpu':
        # Dry runs: the search's code path on CPU against a made-up limit, judged by XLA's
        # memory estimate of each compiled step.
        bytes_limit = int(cpu_limit)
        notes.append(f'max batch search on CPU against --max_batch_cpu_bytes={cpu_limit} '
                     "(XLA's memory estimate)")
      remats = {'both': (False, True), 'on': (True,), 'off': (False,)}[args.max_batch_remat]
      for size in sizes:
        for dtype in dtypes:
          for remat in remats:
            cfg = make_model_config(args.preset, dtype, remat, args.remat_policy, attentions[0])
            found = max_batch_search(args, cfg, size, bytes_limit=bytes_limit)
            max_batch.append(found)
            emit(dict(impl='jax', preset=args.preset, mode='max_batch', size=found['size'],
                      batch=found['max_batch'], dtype=dtype, attention=cfg.attention,
                      remat=remat, first_oom=found['first_oom'], tried=found['tried'],
                      status=('ok' if found['settled'] else
                              f"ok (stopped after {len(found['tried'])} compiles: fits "
                              f"{found['max_batch']}, " + (
                                  f"OOM at {found['first_oom']})" if found['first_oom']
                                  else 'no OOM seen)'))))

  print()
  print(f"BiRefNet {args.preset} on {info['device_kind']} ({info['platform']}), jax "
        f"{info['jax_version']}; median of {args.repeats} calls after {args.warmup} warm-up")
  if info['xla_flags']:
    print(f"XLA_FLAGS={info['xla_flags']}")
  print(format_table(rows))
  for r in max_batch:
    bound = '' if r['settled'] else f" (search stopped; OOM at {r['first_oom']})"
    print(f"max train batch {r['preset']} {r['size']} {r['dtype']} remat={r['remat']}: "
          f"{r['max_batch']}{' (search limit reached)' if r['hit_limit'] else ''}{bound}")
  peak_default = peak_for('bfloat16')
  if not peak_default:
    notes.append('MFU n/a: no peak TFLOPS known for this device (give --peak_tflops)')
  else:
    source = 'given' if args.peak_tflops else peak_source(info['device_kind'])
    notes.append(f'MFU: analytic FLOPs (birefnet_jax.flops) / peak {peak_default:g} TFLOP/s '
                 f'bf16 ({source}); "xla GFLOP" is XLA\'s own count (deformable convs '
                 'undercounted)')
  if info['platform'] == 'cpu':
    notes.append('peak device memory n/a on CPU; "XLA mem" is the compiled program\'s estimate')
  if args.fast_compile:
    notes.append('--fast_compile: XLA backend optimizations were off; timings are not '
                 'representative')
  for n in notes:
    print(f'note: {n}')

  results = dict(device=info, args=vars(args), rows=rows, max_batch=max_batch, notes=notes)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1, default=str)
    print(f'wrote {args.json}')
  return results


if __name__ == '__main__':
  main()

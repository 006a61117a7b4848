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
``--repeats`` calls is reported. The train step is self-contained (it does not use
``birefnet_jax.train``): forward in train mode with mutable batch_stats and Dropout/DropPath on,
the official losses (``losses.total_loss``), gradients, the official AdamW update
(``optim.make_optimizer``) and a donated state, as one XLA program.

Other columns: FLOPs of the compiled program (XLA cost analysis) and MFU against ``--peak_tflops``
(default from the device kind; none on CPU); the compiled program's own memory estimate
(arguments + outputs - aliased + temporaries, per config and available on every backend) and the
device's peak bytes in use (GPU/TPU only; a process-wide high-water mark, so run one config per
process for a clean per-config figure).

``--remat`` also times the train step with the model's remat switch on (``model.remat``: every
backbone block and decoder block recomputed in the backward pass); ``--remat_policy`` picks what
may still be saved (``model.remat_policy``, a ``jax.checkpoint_policies`` name).
``--max_batch_search`` (GPU/TPU) finds the largest train batch that fits, by doubling then
bisection, with and without remat. For the most memory, start with
``XLA_PYTHON_CLIENT_MEM_FRACTION=.95`` (the tool sets that default for the search).

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
import optax

from birefnet_jax import losses, optim
from birefnet_jax.models import config as config_lib
from birefnet_jax.models.layers import checkpoint_policy
from birefnet_jax.models.swin import ATTENTION_IMPLEMENTATIONS

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))

# Dense peak TFLOPS by device kind and compute dtype. float32 on NVIDIA GPUs runs matmuls and
# convolutions as TF32 under JAX's default precision, hence the TF32 figure.
PEAK_TFLOPS = {
    'h100': {'bfloat16': 989.0, 'float16': 989.0, 'float32': 494.0},
    'h200': {'bfloat16': 989.0, 'float16': 989.0, 'float32': 494.0},
    'a100': {'bfloat16': 312.0, 'float16': 312.0, 'float32': 156.0},
}

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
    ('gflops', 'GFLOP', '{:.1f}'), ('tflops_per_s', 'TFLOP/s', '{:.3g}'), ('mfu', 'MFU', '{:.1%}'),
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


def make_model_config(preset, dtype, remat=False, remat_policy='', attention='einsum'):
  cfg = (tiny_model_config(dtype) if preset == 'tiny'
         else config_lib.model_config(preset, dtype=dtype))
  cfg.remat = bool(remat)
  cfg.remat_policy = remat_policy if remat else ''
  cfg.attention = attention
  return cfg


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
                 help="backbone preset (swin_v1_l/b/s/t, pvt_v2_b0/b1/b2/b5) or 'tiny'")
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
  p.add_argument('--remat_policy', default='',
                 help="what remat may still save: a jax.checkpoint_policies name (default '': "
                 'nothing; dots_saveable, dots_with_no_batch_dims_saveable, ...)')
  p.add_argument('--attention', default='einsum',
                 help="comma list of Swin window-attention paths: einsum (default), xla "
                 "(jax.nn.dot_product_attention), cudnn (its fused cuDNN kernel; GPU, bf16/fp16)")
  p.add_argument('--peak_tflops', type=float, default=None,
                 help='device peak for MFU; default from the device kind (H100/H200: 989 bf16, '
                 '494 tf32; A100: 312 / 156); none on CPU')
  p.add_argument('--max_batch_search', action='store_true',
                 help='find the largest train batch that fits (GPU/TPU; with and without remat)')
  p.add_argument('--max_batch_limit', type=int, default=256, help='upper bound of the search')
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


def make_train_step(model, tx):
  """One official train step as a function ``(state, images, masks, rng) -> (state, loss)``."""

  def step(state, images, masks, rng):
    dropout_rng, drop_path_rng = jax.random.split(rng)

    def loss_fn(params):
      outs, updates = model.apply({'params': params, 'batch_stats': state['batch_stats']}, images,
                                  train=True, mutable=['batch_stats'],
                                  rngs={'dropout': dropout_rng, 'drop_path': drop_path_rng})
      loss, _ = losses.total_loss(outs, masks)
      return loss, updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    return dict(params=params, batch_stats=batch_stats, opt_state=opt_state), loss

  return jax.jit(step, donate_argnums=0)


def train_step_and_state(model, variables, batch):
  """The jitted official train step for global ``batch`` and its initial state (AdamW)."""
  tx, _ = optim.make_optimizer(optim.optimizer_config(global_batch_size=batch),
                               steps_per_epoch=1000)
  state = dict(params=variables['params'], batch_stats=variables['batch_stats'],
               opt_state=tx.init(variables['params']))
  return make_train_step(model, tx), state


def _finish_row(row, times, flops, mem, peak_tflops):
  median = statistics.median(times)
  row.update(median_ms=median * 1e3, min_ms=min(times) * 1e3,
             images_per_s=row['batch'] / median,
             compiled_mem_gib=None if mem is None else mem / 2**30)
  if flops:
    row['gflops'] = flops / 1e9
    row['tflops_per_s'] = flops / median / 1e12
    if peak_tflops:
      row['mfu'] = row['tflops_per_s'] / peak_tflops
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
      rng = jax.random.PRNGKey(args.seed + 1)
      lowered = step.lower(state, images, masks, rng)
      compiled = compile_lowered(lowered, args)
      holder = [state]

      def call():
        holder[0], loss = compiled(holder[0], images, masks, rng)
        return loss

    row['compile_s'] = time.perf_counter() - start
    flops, mem = compiled_costs(compiled, lowered)
    times = _time_calls(call, args.warmup, args.repeats)
    if mode == 'train':
      loss = float(call())
      row['loss'] = loss
      if not math.isfinite(loss):
        row['status'] = 'non-finite loss'
    return _finish_row(row, times, flops, mem, peak_tflops)
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
    rng = jax.random.PRNGKey(args.seed)
    compiled = compile_lowered(step.lower(state, images, masks, rng), args)
    _, mem = compiled_costs(compiled)
    if mem is not None and bytes_limit and mem > bytes_limit:
      return False  # does not fit by XLA's own estimate: skip running it
    state, loss = compiled(state, images, masks, rng)
    jax.block_until_ready(loss)
    return True
  except Exception as e:  # pylint: disable=broad-except
    if is_oom(e):
      return False
    raise
  finally:
    jax.clear_caches()
    gc.collect()


def max_batch_search(args, cfg, size):
  """Largest train batch of the model ``cfg`` that fits: doubling from 1, then bisection."""
  remat = bool(cfg.remat)
  bytes_limit = device_bytes_limit()
  good, bad = 0, None
  batch = 1
  tried = []
  while batch <= args.max_batch_limit:
    ok = _try_train_batch(args, cfg, size, batch, bytes_limit)
    tried.append((batch, ok))
    print(f'  max batch search (remat={remat}): batch {batch}: {"fits" if ok else "OOM"}',
          flush=True)
    if not ok:
      bad = batch
      break
    good = batch
    batch *= 2
  while bad is not None and bad - good > 1:
    mid = (good + bad) // 2
    ok = _try_train_batch(args, cfg, size, mid, bytes_limit)
    tried.append((mid, ok))
    print(f'  max batch search (remat={remat}): batch {mid}: {"fits" if ok else "OOM"}',
          flush=True)
    if ok:
      good = mid
    else:
      bad = mid
  return dict(preset=args.preset, size=f'{size[0]}x{size[1]}', dtype=cfg.dtype, remat=remat,
              max_batch=good, hit_limit=bad is None, tried=tried)


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
  if preset == 'tiny':
    raise OfficialUnavailable("--torch-official needs an official preset, not 'tiny' (the "
                              'official decoder widths are literals)')
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


def bench_torch_rows(args, sizes, batches, dtypes, modes):
  """Rows for the official model; one 'skipped'/'error' row when it cannot run."""
  rows = []
  try:
    birefnet_cls, loss_module = load_official(args.torch_official, args.preset)
  except OfficialUnavailable as e:
    msg = f'torch-official unavailable: {e}'
    print(msg, file=sys.stderr)
    return [dict(impl='torch-official', preset=args.preset, status=f'skipped: {e}')]
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
            row = dict(impl=f'torch-{torch_mode}', preset=args.preset, mode=mode,
                       size=f'{size[0]}x{size[1]}', batch=batch, dtype=dtype,
                       remat='-', status='ok')
            rows.append(row)
            if device.type == 'cpu' and dtype != 'float32':
              row['status'] = 'skipped: autocast only timed on CUDA (CPU: float32)'
              continue
            if mode == 'train' and batch == 1:
              # Config.batch_size (8) decides at import whether the official decoder has
              # BatchNorm; torch cannot train BatchNorm2d on the 1x1 ASPP pool of one image.
              row['status'] = ('skipped: the official BatchNorm2d on the 1x1 ASPP pool cannot '
                               'train on one image')
              continue
            try:
              _bench_torch_one(torch, device, birefnet_cls, loss_module, row, size, batch, dtype,
                               torch_mode, mode, args)
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


def _attach_torch_flops(rows, peak_for_dtype):
  """Official rows get the JAX program's FLOPs of the same (mode, size, batch, dtype)."""
  flops = {(r['mode'], r['size'], r['batch'], r['dtype']): r['gflops'] for r in rows
           if r.get('impl') == 'jax' and r.get('gflops') and r.get('remat') in ('-', False)}
  for r in rows:
    if r.get('impl', '').startswith('torch') and r.get('median_ms'):
      g = flops.get((r['mode'], r['size'], r['batch'], r['dtype']))
      if g:
        r['gflops'] = g
        r['tflops_per_s'] = g / 1e3 / (r['median_ms'] / 1e3)
        peak = peak_for_dtype(r['dtype'])
        if peak:
          r['mfu'] = r['tflops_per_s'] / peak


# ----------------------------------------------------------------------------------------------
# Deformable convolution micro-benchmark (another tool)


def deform_conv_rows(args, sizes, cfg):
  """Rows of tools/bench_deform_conv.py: its ``benchmark_rows()`` when it has one, else its
  ``jax_timings`` on one 3x3 deformable conv of the decoder's shape (ASPPDeformable at H/8 x W/8,
  dec_inter_channels -> aspp_planes), batch 1, float32, next to a plain conv of that shape."""
  path = os.path.join(TOOLS_DIR, 'bench_deform_conv.py')
  if not os.path.isfile(path):
    return [], 'tools/bench_deform_conv.py not present'
  try:
    spec = importlib.util.spec_from_file_location('bench_deform_conv', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    return [], f'importing tools/bench_deform_conv.py failed: {type(e).__name__}: {e}'
  rows = []
  try:
    if callable(getattr(module, 'benchmark_rows', None)):
      for r in module.benchmark_rows():
        r = dict(r)
        r.setdefault('impl', 'deform_conv')
        r.setdefault('status', 'ok')
        rows.append(r)
      return rows, None
    if not callable(getattr(module, 'jax_timings', None)):
      return [], 'tools/bench_deform_conv.py exposes neither benchmark_rows() nor jax_timings()'
    rng = np.random.default_rng(args.seed)
    c, o, k = int(cfg.dec_inter_channels), int(cfg.aspp_planes), 3
    for size in sizes[:1]:
      h, w = size[0] // 8, size[1] // 8
      x = jnp.asarray(rng.standard_normal((1, h, w, c)), jnp.float32)
      offset = jnp.asarray(rng.normal(scale=2.0, size=(1, h, w, 2 * k * k)), jnp.float32)
      mask = jnp.asarray(rng.uniform(0, 2, size=(1, h, w, k * k)), jnp.float32)
      kernel = jnp.asarray(rng.normal(scale=(k * k * c) ** -0.5, size=(k, k, c, o)), jnp.float32)
      probe = jnp.asarray(rng.standard_normal((1, h, w, o)), jnp.float32)
      t = module.jax_timings(x, offset, mask, kernel, probe, k // 2, args.repeats)
      shape = f'{h}x{w}'
      for mode, deform, plain in (('fwd', t['deform_fwd'], t['conv_fwd']),
                                  ('fwd+bwd', t['deform_fwd_bwd'], t['conv_fwd_bwd'])):
        rows.append(dict(impl=f'jax-deform{k}x{k} {c}->{o}', mode=mode, size=shape, batch=1,
                         dtype='float32', remat='-', median_ms=deform,
                         status=f'ok (plain conv: {plain:.2f} ms, x{deform / plain:.1f})'))
    return rows, None
  except Exception as e:  # pylint: disable=broad-except
    return rows, f'bench_deform_conv failed: {type(e).__name__}: {e}'


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
    if a not in ATTENTION_IMPLEMENTATIONS:
      raise SystemExit(f'bench_model: unknown attention {a!r} in --attention '
                       f'{ATTENTION_IMPLEMENTATIONS}')
  for d in dtypes:
    if d not in ('float32', 'bfloat16', 'float16'):
      raise SystemExit(f'bench_model: unknown dtype {d!r} in --dtypes')
  for m in modes:
    if m not in ('infer', 'train'):
      raise SystemExit(f'bench_model: unknown mode {m!r} in --modes (infer, train)')
  if args.preset != 'tiny':
    config_lib.backbone_config(args.preset)  # fails early on an unknown preset
  try:
    checkpoint_policy(args.remat_policy)
  except ValueError as e:
    raise SystemExit(f'bench_model: --remat_policy: {e}') from None
  if args.max_batch_search:
    # Before JAX starts its backend: let the search use nearly all of the device memory.
    os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')

  rows = []
  notes = []
  # The official model first, before JAX preallocates most of the GPU memory.
  torch_rows = (bench_torch_rows(args, sizes, batches, dtypes, modes)
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
            for remat in ((False, True) if mode == 'train' and args.remat else (False,)):
              cfg = make_model_config(args.preset, dtype, remat, args.remat_policy, attention)
              row = bench_jax(args, cfg, mode, size, batch, peak_for(dtype))
              rows.append(row)
              print(f"  {row['impl']} {mode} {row['size']} B={batch} {dtype} {attention} "
                    f"remat={row['remat']}: {row.get('median_ms', float('nan')):.1f} ms "
                    f"({row['status']})", flush=True)
  rows.extend(torch_rows)
  _attach_torch_flops(rows, peak_for)

  if not args.no_deform_conv:
    dc_rows, why = deform_conv_rows(args, sizes, make_model_config(args.preset, 'float32'))
    rows.extend(dc_rows)
    if why:
      notes.append(f'deform conv rows skipped: {why}')

  max_batch = []
  if args.max_batch_search:
    if info['platform'] == 'cpu':
      notes.append('max batch search skipped: it needs a GPU/TPU (no device memory limit on CPU)')
    else:
      for size in sizes:
        for dtype in dtypes:
          for remat in (False, True):
            cfg = make_model_config(args.preset, dtype, remat, args.remat_policy, attentions[0])
            max_batch.append(max_batch_search(args, cfg, size))

  print()
  print(f"BiRefNet {args.preset} on {info['device_kind']} ({info['platform']}), jax "
        f"{info['jax_version']}; median of {args.repeats} calls after {args.warmup} warm-up")
  if info['xla_flags']:
    print(f"XLA_FLAGS={info['xla_flags']}")
  print(format_table(rows))
  for r in max_batch:
    print(f"max train batch {r['preset']} {r['size']} {r['dtype']} remat={r['remat']}: "
          f"{r['max_batch']}{' (search limit reached)' if r['hit_limit'] else ''}")
  peak_default = peak_for('bfloat16')
  if not peak_default:
    notes.append('MFU n/a: no peak TFLOPS known for this device (give --peak_tflops)')
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

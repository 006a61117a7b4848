"""The steps of tools/gpu_session.sh, one per process (the script runs each under its own timeout).

  python tools/gpu_session.py env       --out DIR [--dry-run]   # versions, GPU, scatter-add probe
  python tools/gpu_session.py deform    --out DIR [--dry-run]   # deformable conv vs torchvision
  python tools/gpu_session.py infer     --out DIR [--dry-run]   # SwinL 1024² bf16 inference
  python tools/gpu_session.py train     --out DIR [--dry-run]   # SwinL 1024² bf16 train step
  python tools/gpu_session.py max_batch --out DIR [--dry-run]   # largest train batch, <= 3 compiles
  python tools/gpu_session.py step_end  --out DIR --step NAME --rc RC --seconds S
  python tools/gpu_session.py table     --out DIR               # DIR/table.md from DIR/rows.jsonl

Every measured row is appended to DIR/rows.jsonl (one JSON object per line, with its ``step``) as
soon as it is measured; ``table`` turns them into a Markdown table. ``--dry-run`` runs the same
code on CPU with the small ``micro`` model at 64² (the official model at swin_v1_t where torch,
the official code and its packages are there), so that the GPU session cannot fail on a typo.
"""

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, 'tools')
sys.path.insert(0, ROOT)
sys.path.insert(0, TOOLS)

ROWS = 'rows.jsonl'
TABLE = 'table.md'
STEPS = ('env', 'deform', 'infer', 'train', 'max_batch')


def official_dir():
  return os.environ.get('BIREFNET_OFFICIAL', os.path.join(ROOT, '.official'))


class Rows:
  """Appends rows of one step to DIR/rows.jsonl, flushed one by one."""

  def __init__(self, out, step):
    self.path = os.path.join(out, ROWS)
    self.step = step
    os.makedirs(out, exist_ok=True)

  def __call__(self, row):
    row = dict(step=self.step, **{k: v for k, v in row.items() if k != 'step'})
    with open(self.path, 'a') as f:
      f.write(json.dumps(row, default=str) + '\n')
      f.flush()


def read_rows(out):
  path = os.path.join(out, ROWS)
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line:
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError:
            rows.append(dict(step='?', status=f'unreadable line: {line[:80]}'))
  return rows


# ----------------------------------------------------------------------------------------------
# Step 1: environment


def _version(module_name):
  try:
    module = importlib.import_module(module_name)
    return getattr(module, '__version__', 'installed')
  except Exception as e:  # pylint: disable=broad-except
    return f'missing ({type(e).__name__})'


def _nvidia_smi():
  try:
    out = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                          '--format=csv,noheader'], capture_output=True, text=True, timeout=20)
    return out.stdout.strip() or out.stderr.strip()[:200]
  except Exception as e:  # pylint: disable=broad-except
    return f'n/a ({type(e).__name__})'


def scatter_add_probe(seconds, updates, bins):
  """Median ms of a float32 scatter-add of ``updates`` values into ``bins`` bins (contended: many
  updates per address) and into ``updates`` bins (a permutation: no contention), each timed for
  about ``seconds`` / 2. jax-ml/jax#38806: on affected jaxlibs the contended case is orders of
  magnitude slower on an NVIDIA GPU (a CAS loop instead of a native atomic add)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  values = jnp.asarray(rng.standard_normal(updates), jnp.float32)
  results = {}
  for name, n_bins, index in (
      ('contended', bins, rng.integers(0, bins, updates)),
      ('uncontended', updates, rng.permutation(updates))):
    index = jnp.asarray(index, jnp.int32)
    fn = jax.jit(lambda v, i, n=n_bins: jnp.zeros(n, jnp.float32).at[i].add(v))
    jax.block_until_ready(fn(values, index))
    times = []
    end = time.perf_counter() + seconds / 2
    while time.perf_counter() < end or not times:
      start = time.perf_counter()
      jax.block_until_ready(fn(values, index))
      times.append(time.perf_counter() - start)
    times.sort()
    results[name] = 1e3 * times[len(times) // 2]
  return results


def step_env(args, emit):
  info = dict(python=platform.python_version(), machine=platform.machine(),
              nvidia_smi=_nvidia_smi())
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'ml_collections', 'grain',
               'numpy', 'torch', 'torchvision', 'timm', 'kornia', 'einops', 'cv2'):
    info[name] = _version(name)
  try:
    import torch  # pylint: disable=import-outside-toplevel
    info['torch_cuda'] = torch.version.cuda
    info['torch_cudnn'] = torch.backends.cudnn.version()
    info['torch_gpu'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'
  except Exception as e:  # pylint: disable=broad-except
    info['torch_cuda'] = f'n/a ({type(e).__name__})'
  import jax  # pylint: disable=import-outside-toplevel
  import birefnet_jax  # pylint: disable=import-outside-toplevel,unused-import  (XLA workarounds)
  dev = jax.devices()[0]
  info.update(jax_platform=dev.platform, jax_device_kind=dev.device_kind,
              xla_flags=os.environ.get('XLA_FLAGS', ''))
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=import-outside-toplevel
    info['jax_cudnn'] = cuda_versions.cudnn_get_version() if cuda_versions else 'n/a'
  except Exception as e:  # pylint: disable=broad-except
    info['jax_cudnn'] = f'n/a ({type(e).__name__})'
  # The official code's imports, checked now rather than in the middle of a timed step.
  import bench_model  # pylint: disable=import-outside-toplevel
  try:
    if args.dry_run:
      bench_model.install_deform_standin()
    bench_model.load_official(official_dir(), 'swin_v1_t')
    info['official'] = f'loads from {official_dir()}'
  except bench_model.OfficialUnavailable as e:
    info['official'] = f'unavailable: {e}'
  except Exception as e:  # pylint: disable=broad-except
    info['official'] = f'unavailable: {type(e).__name__}: {e}'
  commit_file = os.path.join(official_dir(), 'COMMIT')
  if os.path.exists(commit_file):
    info['official_commit'] = open(commit_file).read().strip()
  emit(dict(impl='env', status='ok', **info))
  print(json.dumps(info, indent=1, default=str), flush=True)

  seconds, updates, bins = (1.0, 1 << 16, 256) if args.dry_run else (5.0, 1 << 22, 4096)
  row = dict(impl='scatter-add probe', mode='f32 scatter-add', dtype='float32',
             size=f'{updates} updates into {bins} bins', status='ok')
  try:
    t = scatter_add_probe(seconds, updates, bins)
    ratio = t['contended'] / t['uncontended']
    row.update(median_ms=t['contended'], uncontended_ms=t['uncontended'], ratio=ratio,
               status=(f"ok: contended {t['contended']:.2f} ms, uncontended "
                       f"{t['uncontended']:.2f} ms (x{ratio:.1f})"
                       + ('; jax#38806 likely present' if ratio > 20 and dev.platform == 'gpu'
                          else '')))
  except Exception as e:  # pylint: disable=broad-except
    row['status'] = f'error: {type(e).__name__}: {str(e)[:200]}'
  emit(row)
  print(row['status'], flush=True)


# ----------------------------------------------------------------------------------------------
# Steps 2-5


def step_deform(args, emit):
  import bench_deform_conv  # pylint: disable=import-outside-toplevel
  if args.dry_run:
    kwargs = dict(sizes=(16,), channels=8, out=16, repeats=2)
  else:
    kwargs = dict(sizes=(256,), channels=64, out=256, repeats=10)

  def on_row(row):
    emit(row)
    print(f"  {row['size']} k={row['kernel']} {row['impl']} {row['mode']} {row['dtype']}: "
          f"{row.get('median_ms', float('nan')):.2f} ms ({row['status']})", flush=True)

  bench_deform_conv.benchmark_rows(kernels=(1, 3, 7), dtypes=('float32', 'bfloat16'),
                                   torch=True, on_row=on_row, **kwargs)


def model_args(args, extra):
  """bench_model arguments shared by the model steps; the dry run swaps in the CPU sizes."""
  if args.dry_run:
    common = ['--preset=micro', '--sizes=64', '--dtypes=float32', '--repeats=2', '--warmup=1',
              '--fast_compile', '--official_preset=swin_v1_t', '--torch_deform_standin']
  else:
    common = ['--preset=swin_v1_l', '--sizes=1024', '--dtypes=bfloat16', '--repeats=5',
              '--warmup=1']
  return common + ['--no_deform_conv', '--torch_modes=eager', '--jsonl', args.jsonl,
                   f'--torch-official={official_dir()}'] + extra


def step_infer(args, emit):
  del emit  # bench_model writes the rows (--jsonl)
  import bench_model  # pylint: disable=import-outside-toplevel
  batches = '2' if args.dry_run else '1,4'
  bench_model.main(model_args(args, ['--modes=infer', f'--batch_sizes={batches}',
                                     '--attention=einsum,sdpa']))


def step_train(args, emit):
  del emit
  import bench_model  # pylint: disable=import-outside-toplevel
  extra = ['--modes=train', '--attention=sdpa']
  if args.dry_run:
    # One train compile on CPU (remat on is the same code with the model's flag on; remat off
    # compiles faster, and the max-batch step finds this program in JAX's disk cache).
    extra += ['--batch_sizes=2']
  else:
    extra += ['--batch_sizes=2,4', '--remat']
  bench_model.main(model_args(args, extra))


def max_batch_guess(rows, bytes_limit, default=16):
  """A first batch for the search from the train step's rows with remat: XLA's memory estimate
  at two batch sizes gives bytes per image and a fixed part (parameters, optimizer state); the
  guess is the batch that fills ~85 % of ``bytes_limit``. With one row, memory is taken as
  proportional to the batch (an overestimate per image: the guess errs low)."""
  mem = {}
  for r in rows:
    if (r.get('step') == 'train' and r.get('impl') == 'jax' and r.get('remat') is True
        and r.get('status') == 'ok' and (r.get('compiled_mem_gib') or r.get('peak_mem_gib'))):
      mem[r['batch']] = (r.get('compiled_mem_gib') or r['peak_mem_gib']) * 2**30
  if not mem or not bytes_limit:
    return default
  batches = sorted(mem)
  if len(batches) >= 2 and mem[batches[-1]] > mem[batches[0]]:
    per_image = (mem[batches[-1]] - mem[batches[0]]) / (batches[-1] - batches[0])
    fixed = max(0.0, mem[batches[0]] - per_image * batches[0])
  else:
    per_image, fixed = mem[batches[0]] / batches[0], 0.0
  return max(2, int((0.85 * bytes_limit - fixed) / per_image))


def step_max_batch(args, emit):
  del emit
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')
  import bench_model  # pylint: disable=import-outside-toplevel
  if args.dry_run:
    # Batch 2 without remat: the train step's program, from JAX's disk cache.
    extra = ['--max_batch_start=2', '--max_batch_tries=1', '--max_batch_cpu_bytes=8000000000',
             '--batch_sizes=2', '--max_batch_remat=off']
  else:
    guess = max_batch_guess(read_rows(args.out), bench_model.device_bytes_limit())
    extra = [f'--max_batch_start={guess}', '--max_batch_tries=3', '--batch_sizes=2',
             '--max_batch_remat=on']
  bench_model.main(model_args(args, ['--modes=train', '--max_batch_search', '--attention=sdpa',
                                     '--torch-official=', '--skip_timed_rows'] + extra))


def step_end(args, emit):
  """The shell's record of a step: its exit status and seconds (124/137: timed out)."""
  status = (f'ok ({args.seconds:.0f} s)' if args.rc == 0 else
            'skipped: no time left in the session' if args.rc == 125 else
            f'timeout after {args.seconds:.0f} s (rows measured before it are kept)'
            if args.rc in (124, 137) else f'exit status {args.rc}')
  emit(dict(impl='step', mode=args.step, seconds=args.seconds, rc=args.rc, status=status))


# ----------------------------------------------------------------------------------------------
# Table

COLUMNS = (('step', 'step', '{}'), ('impl', 'impl', '{}'), ('mode', 'mode', '{}'),
           ('size', 'size', '{}'), ('batch', 'B', '{}'), ('kernel', 'k', '{}'),
           ('dtype', 'dtype', '{}'), ('attention', 'attn', '{}'), ('remat', 'remat', '{}'),
           ('median_ms', 'ms', '{:.2f}'), ('images_per_s', 'img/s', '{:.2f}'),
           ('gflops', 'GFLOP', '{:.4g}'), ('xla_gflops', 'xla GFLOP', '{:.4g}'),
           ('tflops_per_s', 'TFLOP/s', '{:.3g}'), ('mfu', 'MFU', '{:.1%}'),
           ('peak_mem_gib', 'peak GiB', '{:.1f}'), ('compile_s', 'compile s', '{:.1f}'),
           ('status', 'status', '{}'))
ENV_KEYS = ('nvidia_smi', 'jax_device_kind', 'python', 'jax', 'jaxlib', 'flax', 'optax',
            'ml_collections', 'grain', 'torch',
            'torchvision', 'torch_cuda', 'torch_cudnn', 'jax_cudnn', 'timm', 'kornia', 'xla_flags',
            'official', 'official_commit')


def _cell(row, key, fmt):
  value = row.get(key)
  if value is None or value == '':
    return ''
  try:
    text = fmt.format(value)
  except (ValueError, TypeError):
    text = str(value)
  return text.replace('|', '/').replace('\n', ' ')


def markdown_table(rows):
  lines = []
  for r in rows:
    if r.get('impl') == 'env':
      lines.append('Environment: ' + '; '.join(
          f'{k} {r[k]}' for k in ENV_KEYS if r.get(k) not in (None, '')))
      lines.append('')
  body = [r for r in rows if r.get('impl') != 'env']
  lines.append('| ' + ' | '.join(title for _, title, _ in COLUMNS) + ' |')
  lines.append('|' + '---|' * len(COLUMNS))
  for r in body:
    lines.append('| ' + ' | '.join(_cell(r, key, fmt) for key, _, fmt in COLUMNS) + ' |')
  return '\n'.join(lines) + '\n'


def step_table(args, emit):
  del emit
  rows = read_rows(args.out)
  text = markdown_table(rows)
  with open(os.path.join(args.out, TABLE), 'w') as f:
    f.write(text)
  print(text, flush=True)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('step', choices=STEPS + ('step_end', 'table'))
  p.add_argument('--out', required=True)
  p.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true')
  p.add_argument('--step', dest='ended_step', default='')
  p.add_argument('--rc', type=int, default=0)
  p.add_argument('--seconds', type=float, default=0.0)
  args = p.parse_args(argv)
  args.out = os.path.abspath(args.out)
  args.jsonl = os.path.join(args.out, ROWS)
  if args.step == 'step_end':
    args.step = args.ended_step
    return step_end(args, Rows(args.out, args.step))
  if args.dry_run:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
  steps = dict(env=step_env, deform=step_deform, infer=step_infer, train=step_train,
               max_batch=step_max_batch, table=step_table)
  if args.step in STEPS and args.step not in ('env', 'deform'):
    # bench_model writes these rows itself, tagged by step.
    os.environ['BENCH_MODEL_STEP'] = args.step
  return steps[args.step](args, Rows(args.out, args.step))


if __name__ == '__main__':
  main()

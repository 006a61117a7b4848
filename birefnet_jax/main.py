"""Command line of training:

  python -m birefnet_jax.main --config configs/quickstart.py --workdir runs/quick
  python -m birefnet_jax.main --config configs/dis.py --workdir runs/dis \\
      --config.data.root=/data --config.init_from=converted/swin_l_imagenet --config.total_steps=1000
  python -m birefnet_jax.main --config configs/dis.py:backbone=swin_v1_t,size=512 --workdir runs/t \\
      --config.data.root=/data      # a recipe's variant (birefnet_jax/recipes.py)

Rerunning with the same --workdir resumes from its latest checkpoint.

Multi-process (multi-host) runs: one process per host (or per GPU), all started with the same
flags and the same --workdir on a shared file system (see launch/). Each process calls
``jax.distributed.initialize`` first, with its parameters taken from, in this order:
  --coordinator_address / --num_processes / --process_id,
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
  SLURM (srun with more than one task) or Open MPI (mpirun with more than one rank).
A single process (none of these) does not initialize anything.
"""

import difflib
import logging as std_logging
import os
import re
import runpy
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from birefnet_jax.errors import UserError, report

config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics.jsonl, TensorBoard.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
flags.DEFINE_integer('process_id', None, 'Index of this process (multi-process runs).')
flags.DEFINE_integer('initialization_timeout', 300, 'Seconds a process waits for all the others '
                     'to join (multi-process runs); then it fails.')
flags.DEFINE_bool('compilation_cache', True, 'Keep compiled programs in WORKDIR/jax_cache '
                  '(single-process runs, unless JAX_COMPILATION_CACHE_DIR is set).')
flags.mark_flags_as_required(['config', 'workdir'])

FLAGS = flags.FLAGS


# ------------------------------------------------------------------------------------------
# Multi-process set-up.
# ------------------------------------------------------------------------------------------

def distributed_params(coordinator_address=None, num_processes=None, process_id=None,
                       environ=None):
  """The ``jax.distributed.initialize`` arguments of this process; None for a single process.

  We work them out ourselves (rather than letting jax detect the cluster) because jax's SLURM /
  Open MPI detection restricts every process to the one GPU of its local rank, which is wrong
  for the usual one-process-per-node launch: there each process drives all GPUs of its node.
  With several processes per node, each gets the GPU of its local rank unless the launcher
  already gave it exactly one (CUDA_VISIBLE_DEVICES).
  """
  env = os.environ if environ is None else environ
  coordinator_address = coordinator_address or env.get('JAX_COORDINATOR_ADDRESS') or None
  if num_processes is None and env.get('JAX_NUM_PROCESSES'):
    num_processes = int(env['JAX_NUM_PROCESSES'])
  if process_id is None and env.get('JAX_PROCESS_ID'):
    process_id = int(env['JAX_PROCESS_ID'])

  if num_processes is not None or process_id is not None:   # explicit
    if None in (coordinator_address, num_processes, process_id):
      raise app.UsageError('--coordinator_address, --num_processes and --process_id (or '
                           'JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) go '
                           'together')
    return dict(coordinator_address=coordinator_address, num_processes=int(num_processes),
                process_id=int(process_id), local_device_ids=None)

  slurm_tasks = int(env.get('SLURM_STEP_NUM_TASKS', env.get('SLURM_NTASKS', '1')))
  ompi_size = int(env.get('OMPI_COMM_WORLD_SIZE', '1'))
  if 'SLURM_JOB_ID' in env and 'SLURM_PROCID' in env and slurm_tasks > 1:
    per_node = _slurm_tasks_per_node(env.get('SLURM_STEP_TASKS_PER_NODE',
                                             env.get('SLURM_TASKS_PER_NODE', '1')))
    return dict(coordinator_address=coordinator_address or _slurm_coordinator(env),
                num_processes=slurm_tasks, process_id=int(env['SLURM_PROCID']),
                local_device_ids=_local_devices(per_node, int(env.get('SLURM_LOCALID', 0)), env))
  if ompi_size > 1:
    per_node = int(env.get('OMPI_COMM_WORLD_LOCAL_SIZE', '1'))
    return dict(coordinator_address=coordinator_address or _ompi_coordinator(env),
                num_processes=ompi_size, process_id=int(env['OMPI_COMM_WORLD_RANK']),
                local_device_ids=_local_devices(
                    per_node, int(env.get('OMPI_COMM_WORLD_LOCAL_RANK', 0)), env))
  if coordinator_address and 'JAX_COORDINATOR_ADDRESS' not in env:
    raise app.UsageError('--coordinator_address needs --num_processes and --process_id')
  return None


def _local_devices(tasks_per_node, local_rank, env):
  """None (all visible devices) or [the local rank's GPU] when several processes share a node."""
  if tasks_per_node <= 1:
    return None
  visible = [d for d in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  if len(visible) == 1:   # the launcher already bound this process to one GPU
    return None
  return [local_rank]


def _slurm_tasks_per_node(spec):
  """Largest task count per node in a SLURM spec such as '8(x2),4' or '1(x16)'."""
  counts = [int(m.group(1)) for m in re.finditer(r'(\d+)(\(x\d+\))?', spec)]
  return max(counts, default=1)


def _slurm_coordinator(env):
  """First host of the step's node list, on the port jax itself would pick for this job."""
  nodes = env.get('SLURM_STEP_NODELIST', env.get('SLURM_JOB_NODELIST', ''))
  match = re.match(r'([^,\[]+)(\[([^\],-]+))?', nodes)
  if not match:
    raise app.UsageError(f'cannot read the first host of the SLURM node list {nodes!r}: set '
                         'JAX_COORDINATOR_ADDRESS=host:port')
  host = match.group(1) + (match.group(3) or '')
  port = env.get('JAX_COORDINATOR_PORT') or str(int(env['SLURM_JOB_ID']) % 4096 + 61440)
  return f'{host}:{port}'


def _ompi_coordinator(env):
  """Address of mpirun's host (from OMPI_MCA_orte_hnp_uri, Open MPI <= 4), as jax does."""
  uri = env.get('OMPI_MCA_orte_hnp_uri', '')
  match = re.search(r'tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]', uri)
  if not match:
    raise app.UsageError('cannot tell the coordinator of this Open MPI job: pass '
                         '-x JAX_COORDINATOR_ADDRESS=host:port to mpirun (see launch/mpirun.sh)')
  host = next(g for g in match.groups() if g is not None)
  port = env.get('JAX_COORDINATOR_PORT') or str(int(uri.split('.', 1)[0]) % 4096 + 61440)
  return f'{host}:{port}'


class _ProcessTag(std_logging.Filter):
  """Prefixes every absl log record with '[process i] ' (warnings of all processes interleave)."""

  def __init__(self, index):
    super().__init__()
    self.tag = f'[process {index}] '

  def filter(self, record):
    if isinstance(record.msg, str) and not record.msg.startswith(self.tag):
      record.msg = self.tag + record.msg
    return True


def maybe_initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
                                 initialization_timeout=300):
  """Calls ``jax.distributed.initialize`` for multi-process runs; a no-op for a single process.

  Must run before any jax computation. Returns whether this is a multi-process run.
  """
  params = distributed_params(coordinator_address, num_processes, process_id)
  if params is None:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  # 'deactivate': our parameters are complete; jax's detection would rebind the GPUs.
  jax.distributed.initialize(**params, cluster_detection_method='deactivate',
                             initialization_timeout=int(initialization_timeout))
  # On absl's logger (orbax and our warnings) and on absl's handler (other Python loggers).
  tag = _ProcessTag(jax.process_index())
  logging.get_absl_logger().addFilter(tag)
  logging.get_absl_handler().addFilter(tag)
  return True


# ------------------------------------------------------------------------------------------
# User errors: one line, no traceback.
# ------------------------------------------------------------------------------------------

def _flag_value(argv, name):
  """The value of ``--name=V`` or ``--name V`` in argv (the last one), or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _config_overrides(argv):
  """The dotted field names of the --config.FIELD=V (and --[no]config.FIELD) arguments."""
  fields = []
  for arg in argv:
    match = re.match(r'--(?:no)?config\.([^=]+)', arg)
    if match:
      fields.append(match.group(1))
  return fields


def _field_names(config, prefix=''):
  """Every dotted field name of a ConfigDict, nested ones included."""
  names = []
  for key, value in config.items():
    names.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      names += _field_names(value, f'{prefix}{key}.')
  return names


def unknown_config_field(argv):
  """A UserError for the first --config.FIELD override that the config file does not have,
  listing the closest field names; None when every override names a field."""
  spec = _flag_value(argv, 'config')
  if not spec:
    return None
  path, _, arg = spec.partition(':')
  try:
    get_config = runpy.run_path(path)['get_config']
    config = get_config(arg) if arg else get_config()
  except Exception:  # pylint: disable=broad-except  (ml_collections reports a bad file itself)
    return None
  known = set(_field_names(config))
  for field in _config_overrides(argv):
    if field not in known:
      return _unknown_field_error(field, known, path)
  return None


def _unknown_field_error(field, known, path):
  """The first unknown part of ``field`` (a.b.c), with the closest names beside it."""
  parts = field.split('.')
  depth = next(i for i in range(len(parts)) if '.'.join(parts[:i + 1]) not in known)
  parent = '.'.join(parts[:depth])
  siblings = sorted(k.split('.')[-1] for k in known
                    if k.count('.') == depth and k.startswith(parent + '.' if parent else ''))
  close = difflib.get_close_matches(parts[depth], siblings, n=3, cutoff=0.6)
  prefix = parent + '.' if parent else ''
  if not parent and parts[0] in FLAGS:   # e.g. --config.workdir for --workdir
    hint = f'--{parts[0]} is a flag of its own, not a config field: pass --{parts[0]}=...'
  elif close:
    hint = f'did you mean {" or ".join("--config." + prefix + c for c in close)}?'
  else:
    hint = f'the fields of {parent or "the config"}: {", ".join(siblings)}'
  return UserError(f'--config.{field}: {path} has no field {prefix + parts[depth]!r}', hint)


def parse_flags(argv):
  """absl's flag parsing (its own errors print a usage line), with unknown --config.FIELD
  overrides (ml_collections raises AttributeError/KeyError from deep inside) and a config
  file's UserError (a bad variant) in one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except UserError as e:   # from the config file, e.g. a bad variant (configs/dis.py:size=500)
    sys.exit(report(e))
  except (AttributeError, KeyError):
    error = unknown_config_field(argv)
    if error is None:
      raise
    sys.exit(report(error))


def check_config(config):
  """Checks what would otherwise fail only after start-up (or at the first validation):
  the global batch splits over the devices, and the data folders exist. Raises UserError."""
  from birefnet_jax import sharding, train  # pylint: disable=g-import-not-at-top
  from birefnet_jax.data import sources  # pylint: disable=g-import-not-at-top
  sharding.local_batch_size(train.global_batch_size(config))
  sources.check_folders(config.data)
  if config.data.get('size_buckets') is not None:
    from birefnet_jax.data import buckets  # pylint: disable=g-import-not-at-top
    try:
      buckets.check_buckets(config.data.size_buckets, config.data.dynamic_size)
    except ValueError as e:
      raise UserError(str(e), 'data.size_buckets: (height, width) pairs, multiples of 32, '
                      'inside data.dynamic_size') from None


def _leave(status, multi_process):
  """Exits; a failing process of a multi-process run leaves at once (see below)."""
  sys.stdout.flush()
  sys.stderr.flush()
  if multi_process:
    # A normal exit waits in jax.distributed's shutdown barrier for the other processes, which
    # wait in a collective for this one. Leaving makes the launcher (srun --kill-on-bad-exit,
    # launch/local.sh) or jax's heartbeat stop them.
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # orbax logs every save at INFO; keep absl at WARNING (progress goes to stdout).
  logging.set_verbosity(logging.WARNING)
  multi_process = maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                               FLAGS.process_id, FLAGS.initialization_timeout)
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.compilation_cache and not multi_process and not jax.config.jax_compilation_cache_dir:
    # A restarted run (resume) then loads its compiled steps instead of compiling them again.
    # Not by default with several processes: only process 0 writes the cache and the keys differ
    # per process, so after a restart process 0 runs a cached program while the others compile
    # theirs anew, and on CPU (gloo) such a pair of programs was seen to deadlock in the first
    # step. JAX_COMPILATION_CACHE_DIR still opts in.
    jax.config.update('jax_compilation_cache_dir',
                      os.path.join(os.path.abspath(FLAGS.workdir), 'jax_cache'))
  from birefnet_jax import train  # pylint: disable=g-import-not-at-top
  status = 0
  try:
    check_config(FLAGS.config)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except UserError as e:   # a mistake in the request: one line, no traceback
    status = report(e)
  except Exception:  # pylint: disable=broad-except
    if not multi_process:
      raise
    logging.exception('training failed')
    status = 1
  if status:
    # Out of the except block, so that the error and the frames its traceback holds are released
    # before the process exits.
    _leave(status, multi_process)


if __name__ == '__main__':
  # Under app.run the absl flags are parsed, which grain's worker processes need.
  app.run(main, flags_parser=parse_flags)

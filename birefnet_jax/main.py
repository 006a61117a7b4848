"""Command line of training:

  python -m birefnet_jax.main --config configs/quickstart.py --workdir runs/quick
  python -m birefnet_jax.main --config configs/dis.py --workdir runs/dis \\
      --config.data.root=/data --config.init_from=converted/swin_l_imagenet --config.total_steps=1000

Rerunning with the same --workdir resumes from its latest checkpoint.

Multi-process (multi-host) runs: one process per host (or per GPU), all started with the same
flags and the same --workdir on a shared file system (see launch/). Each process calls
``jax.distributed.initialize`` first, with its parameters taken from, in this order:
  --coordinator_address / --num_processes / --process_id,
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
  SLURM (srun with more than one task) or Open MPI (mpirun with more than one rank).
A single process (none of these) does not initialize anything.
"""

import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

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
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except Exception:  # pylint: disable=broad-except
    if not multi_process:
      raise
    # A failing process must leave at once: a normal exit waits in jax.distributed's shutdown
    # barrier for the other processes, which wait in a collective for this one. Leaving makes
    # the launcher (srun --kill-on-bad-exit, launch/local.sh) or jax's heartbeat stop them.
    logging.exception('training failed')
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access


if __name__ == '__main__':
  # Under app.run the absl flags are parsed, which grain's worker processes need.
  app.run(main)

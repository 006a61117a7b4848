"""Command line of training:

  python -m birefnet_jax.main --config configs/quickstart.py --workdir runs/quick
  python -m birefnet_jax.main --config configs/dis.py --workdir runs/dis \\
      --config.data.root=/data --config.init_from=converted/swin_l_imagenet --config.total_steps=1000

Rerunning with the same --workdir resumes from its latest checkpoint. Multi-process runs call
``maybe_initialize_distributed`` first (explicit flags, or a cluster environment jax knows).
"""

import os

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
flags.DEFINE_bool('compilation_cache', True, 'Keep compiled programs in WORKDIR/jax_cache '
                  '(unless JAX_COMPILATION_CACHE_DIR is set).')
flags.mark_flags_as_required(['config', 'workdir'])

FLAGS = flags.FLAGS

# Environment variables by which a cluster scheduler tells jax.distributed about the job
# (jax's own cluster detection reads them when initialize() gets no arguments).
_CLUSTER_ENV = ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES',
                'JAX_COORDINATOR_ADDRESS', 'MEGASCALE_COORDINATOR_ADDRESS')


# ------------------------------------------------------------------------------------------
# MULTI-HOST: the one place where a multi-process run is set up. Kept minimal on purpose;
# refined later (cluster-specific launch, timeouts, local device selection).
# ------------------------------------------------------------------------------------------
def maybe_initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """Calls ``jax.distributed.initialize`` for multi-process runs; a no-op for a single process.

  Explicit flags win; otherwise a recognised cluster environment (SLURM with more than one task,
  Open MPI, Cloud TPU, ...) lets jax detect everything itself. Must run before any jax
  computation.
  """
  import jax  # pylint: disable=g-import-not-at-top
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError('--coordinator_address, --num_processes and --process_id go together')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True
  slurm_single = os.environ.get('SLURM_NTASKS', '1') == '1' and 'SLURM_JOB_ID' in os.environ
  if any(k in os.environ for k in _CLUSTER_ENV) and not slurm_single:
    jax.distributed.initialize()
    return True
  return False


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # orbax logs every save at INFO; keep absl at WARNING (progress goes to stdout).
  logging.set_verbosity(logging.WARNING)
  maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.compilation_cache and not jax.config.jax_compilation_cache_dir:
    # A restarted run (resume) then loads its compiled steps instead of compiling them again.
    jax.config.update('jax_compilation_cache_dir', os.path.join(FLAGS.workdir, 'jax_cache'))
  from birefnet_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  # Under app.run the absl flags are parsed, which grain's worker processes need.
  app.run(main)

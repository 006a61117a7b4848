"""A light stand-in for the trainer in tests of the multi-process set-up (no model, no compile).

Joins the jax.distributed job exactly as birefnet_jax.main does
(``main.maybe_initialize_distributed``: flags, JAX_* variables or a SLURM / Open MPI
environment), prints what it joined, logs an absl warning, then:

  --mode=ok    all processes pass a cross-process barrier and exit 0;
  --mode=fail  process --fail_process dies with status 3 (``os._exit``: no clean-up, as a crash
               or an OOM kill) while the others wait in a barrier that can only complete if it
               stays: without a launcher that stops everyone they would wait for jax's timeouts.
"""

import argparse
import os
import time


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--coordinator_address', default=None)
  parser.add_argument('--num_processes', type=int, default=None)
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--mode', choices=('ok', 'fail'), default='ok')
  parser.add_argument('--fail_process', type=int, default=1)
  args = parser.parse_args()

  from absl import logging  # pylint: disable=g-import-not-at-top
  from birefnet_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  joined = main_lib.maybe_initialize_distributed(args.coordinator_address, args.num_processes,
                                                 args.process_id, initialization_timeout=60)
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  print(f'joined={joined}: process {jax.process_index()} of {jax.process_count()}, '
        f'{jax.local_device_count()} local of {jax.device_count()} devices', flush=True)
  logging.warning('a warning of this process')
  if args.mode == 'fail' and jax.process_index() == args.fail_process:
    time.sleep(1)   # let the others reach the barrier first
    print('failing on purpose', flush=True)
    os._exit(3)  # pylint: disable=protected-access
  multihost_utils.sync_global_devices('all processes here')
  print('barrier passed', flush=True)


if __name__ == '__main__':
  main()

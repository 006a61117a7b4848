"""Prepares a task's tensorflow-datasets ArrayRecord files from the official folder layout.

  python -m birefnet_jax.data.tfds_builders --task DIS5K --root /data/dis --data_dir ~/tfds

then train with data.source='tfds', data.tfds_data_dir=~/tfds. The command line only: the
builders, ``prepare`` and the data source that training reads are in data/tfds_datasets.py.
"""

import argparse
import sys

from birefnet_jax.data import tfds_datasets
from birefnet_jax.errors import exits_on_user_error


@exits_on_user_error
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--task', required=True, choices=sorted(tfds_datasets.BUILDERS))
  parser.add_argument('--root', required=True, help='folder holding TASK/DATASET/{im,gt}')
  parser.add_argument('--data_dir', required=True, help='where to write the tfds files')
  parser.add_argument('--on_bad_file', default='error', choices=('error', 'skip'))
  args = parser.parse_args(argv)
  builder = tfds_datasets.prepare(args.task, args.root, args.data_dir, args.on_bad_file)
  print({name: split.num_examples for name, split in builder.info.splits.items()})
  return 0


if __name__ == '__main__':
  sys.exit(main())

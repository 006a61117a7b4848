r"""Writes the validation images of a training config as files: image and ground-truth PNGs.

  python -m birefnet_jax.data.write_examples --config configs/quickstart.py --output demo

writes ``demo/im/NAME.png`` and ``demo/gt/NAME.png`` for every example of the config's validation
set (with several sets: ``demo/SET/{im,gt}``), exactly the pixels the run validates on, so that
``predict`` on ``demo/im`` and ``evaluate`` against ``demo/gt`` reproduce the run's validation.
Any data source works (the built-in synthetic set, folders, tfds); ``--config.x=y`` overrides as
in training. Existing files are never replaced: the command stops before writing anything.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('output', None, 'Folder to write im/ and gt/ into.')
flags.DEFINE_integer('max_examples', -1, 'Write at most this many examples per set (-1: all).')
flags.mark_flags_as_required(['config', 'output'])

FLAGS = flags.FLAGS


def validation_files(data_cfg, output: str, max_examples: int = -1):
  """[(set name, example index, image path, mask path)] that ``write`` would write."""
  from birefnet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  sets = pipeline.val_set_names(data_cfg)
  if not sets:
    raise ValueError('the config names no validation set (data.val_sets is empty)')
  planned = []
  for name in sets:
    base = output if len(sets) == 1 else os.path.join(output, name)
    source = pipeline.eval_source(data_cfg, name)
    count = len(source) if max_examples < 0 else min(max_examples, len(source))
    for index in range(count):
      stem = os.path.splitext(os.path.basename(str(source[index].get('name', f'{index:06d}'))))[0]
      planned.append((name, index, os.path.join(base, 'im', stem + '.png'),
                      os.path.join(base, 'gt', stem + '.png')))
  return planned


def write(data_cfg, output: str, max_examples: int = -1) -> int:
  """Writes the validation examples as PNGs; returns how many. Refuses to replace files."""
  from birefnet_jax import image_io  # pylint: disable=g-import-not-at-top
  from birefnet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  planned = validation_files(data_cfg, output, max_examples)
  existing = [p for _, _, im, gt in planned for p in (im, gt) if os.path.exists(p)]
  if existing:
    raise FileExistsError(f'{len(existing)} files exist already, e.g. {existing[0]}; choose '
                          'another --output (nothing was written)')
  sources = {}
  for name, index, image_path, mask_path in planned:
    if name not in sources:
      sources[name] = pipeline.eval_source(data_cfg, name)
    record = sources[name][index]
    image, mask = pipeline.load_record(record, None, mask_size_mismatch='resize', index=index)
    image_io.write_png(image_path, image)
    image_io.write_png(mask_path, mask)
  return len(planned)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    count = write(FLAGS.config.data, FLAGS.output, FLAGS.max_examples)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {count} validation images and their masks to {FLAGS.output} '
        f'({os.path.join(FLAGS.output, "im")}, {os.path.join(FLAGS.output, "gt")})')
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))

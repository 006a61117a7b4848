"""Input pipeline throughput: images/s per worker process with the full official augmentation.

  python tools/bench_input.py --size=1024 --workers=0,2 --source=folder
  python tools/bench_input.py --source=folder --root=/data/dis --task=DIS5K --train_sets=DIS-TR

Without --root, a synthetic DIS-like set (JPEG images, PNG masks of --file_size) is written to a
temporary folder first, so the figure includes JPEG/PNG decoding and the initial resize, as in
training on DIS5K. --source=synthetic renders examples on the fly instead (no decoding).
Also prints a per-stage breakdown for one example, in this process.
"""

import os
import tempfile
import time

from absl import app, flags
import numpy as np

from birefnet_jax.data import augment, decode, pipeline
from birefnet_jax.data.config import data_config
from birefnet_jax.data.synthetic import write_official_layout

FLAGS = flags.FLAGS
flags.DEFINE_integer('size', 1024, 'training size (square)')
flags.DEFINE_list('workers', ['0', '2'], 'grain worker counts to measure (0 = in-process)')
flags.DEFINE_enum('source', 'folder', ['folder', 'synthetic'], 'where examples come from')
flags.DEFINE_string('root', '', 'official-layout root; empty: write a synthetic set')
flags.DEFINE_string('task', 'DIS5K', 'task folder under root')
flags.DEFINE_string('train_sets', 'DIS-TR', 'data sets joined with +')
flags.DEFINE_integer('file_size', 1536, 'side of the synthetic files written (DIS5K images are '
                     'mostly 2-6 MP; the initial resize brings them to --size)')
flags.DEFINE_integer('num_files', 12, 'synthetic files to write')
flags.DEFINE_integer('batch', 4, 'batch size')
flags.DEFINE_integer('batches', 8, 'batches timed per setting (after warm-up)')
flags.DEFINE_integer('read_threads', 1, 'threads per process (1: one image at a time)')


def _time(fn, repeats=3):
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  return (time.perf_counter() - start) / repeats * 1e3, out


def stage_breakdown(record, size):
  """Milliseconds per stage for one example, in this process."""
  rng = np.random.default_rng(0)
  ms, (image, mask) = _time(lambda: decode.read_pair(record['image_path'], record['mask_path']))
  print(f'  decode image+mask ({image.shape[1]}x{image.shape[0]}): {ms:7.1f} ms')
  ms, (image, mask) = _time(lambda: (decode.resize_linear(image, size),
                                     decode.resize_linear(mask, size)))
  print(f'  cv2 resize to {size[1]}x{size[0]}:        {ms:7.1f} ms')
  for name, fn in (('flip', lambda: augment.flip(image, mask)),
                   ('rotate (p=0.2 in training)', lambda: augment.rotate(image, mask, 7)),
                   ('enhance x4', lambda: augment.enhance(image, 1.2, 0.8, 1.5, 2.0)),
                   ('pepper', lambda: augment.random_pepper(image, rng)),
                   ('normalize image + mask', lambda: (augment.normalize_image(image),
                                                       augment.mask_to_float(mask)))):
    ms, _ = _time(fn)
    print(f'  {name:28s}{ms:7.1f} ms')


def main(argv):
  del argv
  size = (FLAGS.size, FLAGS.size)
  with tempfile.TemporaryDirectory() as tmp:
    root = FLAGS.root
    if FLAGS.source == 'folder' and not root:
      root = tmp
      t0 = time.perf_counter()
      write_official_layout(root, FLAGS.task, {FLAGS.train_sets: FLAGS.num_files},
                            image_size=(FLAGS.file_size, FLAGS.file_size))
      print(f'wrote {FLAGS.num_files} synthetic {FLAGS.file_size}^2 JPEG/PNG pairs in '
            f'{time.perf_counter() - t0:.1f} s')
    overrides = dict(source=FLAGS.source, root=root, task=FLAGS.task,
                     train_sets=FLAGS.train_sets, image_size=size, read_threads=FLAGS.read_threads,
                     synthetic_train_examples=max(FLAGS.num_files, FLAGS.batch))
    if FLAGS.source == 'folder':
      cfg = data_config(**overrides)
      print('per-stage cost of one example:')
      stage_breakdown(pipeline.train_source(cfg)[0], size)
    for workers in (int(w) for w in FLAGS.workers):
      cfg = data_config(**overrides, num_workers=workers)
      it = pipeline.train_iterator(cfg, local_batch_size=FLAGS.batch, seed=0)
      t0 = time.perf_counter()
      next(it)  # worker start-up and the first batch
      startup = time.perf_counter() - t0
      t0 = time.perf_counter()
      for _ in range(FLAGS.batches):
        next(it)
      seconds = time.perf_counter() - t0
      images = FLAGS.batches * FLAGS.batch
      processes = max(workers, 1)
      print(f'{FLAGS.source} {size[0]}x{size[1]} full augmentation, workers={workers}, '
            f'read_threads={FLAGS.read_threads}: {images / seconds:6.2f} images/s total, '
            f'{images / seconds / processes:6.2f} images/s per process '
            f'(first batch {startup:.1f} s; {os.cpu_count()} CPU cores here)')
      del it


if __name__ == '__main__':
  app.run(main)

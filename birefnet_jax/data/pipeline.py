"""grain input pipelines: the training iterator and the evaluation examples.

Training (per process):
  MapDataset.range(N).seed(seed).shuffle().repeat(None)
    .map(LoadExample)        decode + resize to image_size with cv2 INTER_LINEAR (official order)
    [.random_map(SynthesizeBackground)]   background_color_synthesis: a flat background colour
    .random_map(Augment)     official flip / rotate / enhance / pepper with grain's rng
    [process_index::process_count]   this process's share of the global stream
    .map(ToModelInputs)      ImageNet normalization, mask to [0, 1]
    .batch(b, drop_remainder=True).to_iter_dataset().mp_prefetch(workers)
The shuffle is reseeded every epoch by repeat(); every process uses the same permutation and
takes a disjoint slice of it. Random draws depend only on (seed, element index), so the batches
are the same for any number of workers, and the iterator state (get_state / set_state, or
orbax's grain.checkpoint.CheckpointSave / CheckpointRestore) resumes exactly.

With dynamic_size the examples keep their original size through augmentation and each batch is
resized to one random size (multiples of 32) with Pillow's antialiased bilinear, as the official
custom_collate_fn does with torchvision Resize. With data.size_buckets the size is one of the
buckets, drawn as the official code draws a size restricted to them (data/buckets.py).

With background_color_synthesis the augmentation is reduced to flips, as the official config
(``preproc_methods[:1]``): only 'flip', if data.augmentations has it, is applied.
"""

import zlib

import grain
import numpy as np
from absl import logging

from birefnet_jax.data import augment as augment_lib
from birefnet_jax.data import background
from birefnet_jax.data import buckets as buckets_lib
from birefnet_jax.data import decode
from birefnet_jax.data import sources
from birefnet_jax.data.synthetic import SyntheticDataset

# Bad files met in this process with on_bad_file='skip' (each grain worker counts its own).
_SKIPPED = {'count': 0}
MAX_CONSECUTIVE_BAD = 32


def skipped_count():
  """Number of bad examples replaced in this process since start."""
  return _SKIPPED['count']


def _describe(record, index):
  if 'image_path' in record:
    return f'{record["image_path"]} / {record["mask_path"]}'
  return f'example {index} ({_as_str(record.get("name", ""))})'


def _as_str(name):
  return name.decode() if isinstance(name, bytes) else str(name)


def load_record(record, image_size, mask_size_mismatch='error', index=None):
  """A source record (file paths, or decoded arrays) -> uint8 image (h,w,3) and mask (h,w).

  image_size=None keeps the original size (dynamic_size); otherwise both are resized with
  cv2 INTER_LINEAR, first thing after reading, as the official loader.
  """
  if 'image_path' in record:
    image, mask = decode.read_pair(record['image_path'], record['mask_path'], mask_size_mismatch)
  else:
    image, mask = np.asarray(record['image']), np.asarray(record['mask'])
    if mask.ndim == 3:
      mask = mask[..., 0]
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, -1)
    if mask_size_mismatch == 'error':
      name = _describe(record, index)
      decode.check_same_size(image, mask, name, name)
  if image_size is not None:
    image = decode.resize_linear(image, image_size)
    mask = decode.resize_linear(mask, image_size)
  return image, mask


class LoadExample(grain.transforms.Map):
  """Example index -> {'image': uint8, 'mask': uint8, 'class_label': int32}.

  A bad example raises an error naming its files (on_bad_file='error'), or is replaced by the
  next good one with a counted warning (on_bad_file='skip'), so an epoch never gets shorter
  and a worker never dies on an unreadable file.
  """

  def __init__(self, source, image_size, on_bad_file='error', mask_size_mismatch='error'):
    if on_bad_file not in ('error', 'skip'):
      raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
    self.source = source
    self.image_size = None if image_size is None else tuple(image_size)
    self.on_bad_file = on_bad_file
    self.mask_size_mismatch = mask_size_mismatch

  def _load(self, index):
    record = self.source[index]
    try:
      image, mask = load_record(record, self.image_size, self.mask_size_mismatch, index)
    except decode.ImageDecodeError:
      raise
    except Exception as e:  # name the files whatever went wrong
      raise decode.ImageDecodeError(f'{_describe(record, index)}: {e}') from e
    return dict(image=image, mask=mask, class_label=np.int32(record.get('class_label', -1)))

  def map(self, index):
    index = int(index)
    for attempt in range(MAX_CONSECUTIVE_BAD):
      candidate = (index + attempt) % len(self.source)
      try:
        return self._load(candidate)
      except (decode.ImageDecodeError, OSError) as e:
        if self.on_bad_file == 'error':
          raise
        _SKIPPED['count'] += 1
        logging.warning('Skipping bad example (%d skipped so far in this process), using the '
                        'next one instead: %s', _SKIPPED['count'], e)
    raise decode.ImageDecodeError(
        f'{MAX_CONSECUTIVE_BAD} consecutive bad examples from index {index} of {self.source!r}')


class Augment(grain.transforms.RandomMap):
  """Official training augmentation with the rng grain derives from (seed, index)."""

  def __init__(self, methods, image_size):
    self.methods = tuple(methods)
    self.image_size = None if image_size is None else tuple(image_size)

  def random_map(self, example, rng):
    image, mask = augment_lib.augment(example['image'], example['mask'], rng, self.methods)
    if 'crop' in self.methods and self.image_size is not None:
      # The official crop changes the size and its default collate would then fail; we bring
      # the crop back to the training size (cv2 INTER_LINEAR, like the initial resize).
      image = decode.resize_linear(image, self.image_size)
      mask = decode.resize_linear(mask, self.image_size)
    return dict(example, image=image, mask=mask)


class SynthesizeBackground(grain.transforms.RandomMap):
  """The official background-colour synthesis (data/background.py) on a uint8 example."""

  def random_map(self, example, rng):
    return dict(example, image=background.synthesize_background(example['image'],
                                                                example['mask'], rng))


def training_augmentations(cfg):
  """The augmentation methods training applies: data.augmentations, reduced to flips when
  background_color_synthesis is on (official ``preproc_methods[:4 if not bcs else 1]``)."""
  methods = tuple(cfg.augmentations)
  if cfg.get('background_color_synthesis', False):
    methods = tuple(m for m in methods if m == 'flip')
  return methods


class ToModelInputs(grain.transforms.Map):
  """uint8 example -> float32 normalized image (h,w,3), float32 mask (h,w,1) in [0, 1]."""

  def map(self, example):
    return dict(image=augment_lib.normalize_image(example['image']),
                mask=augment_lib.mask_to_float(example['mask']),
                class_label=np.int32(example['class_label']))


class DynamicSizeBatch(grain.transforms.RandomMap):
  """A list of examples -> one batch resized to a random size (official dynamic_size)."""

  def __init__(self, dynamic_size, size_buckets=None):
    self.dynamic_size = tuple(tuple(r) for r in dynamic_size)
    self.buckets = None
    if size_buckets is not None:
      self.buckets = buckets_lib.check_buckets(size_buckets, self.dynamic_size)
      self.probabilities = buckets_lib.bucket_probabilities(self.buckets, self.dynamic_size)

  def random_map(self, examples, rng):
    if self.buckets is None:
      size = augment_lib.random_dynamic_size(self.dynamic_size, rng)
    else:
      size = buckets_lib.random_bucket(self.buckets, self.probabilities, rng)
    images, masks = [], []
    for ex in examples:
      image, mask = augment_lib.resize_pil_bilinear(ex['image'], ex['mask'], size)
      images.append(augment_lib.normalize_image(image))
      masks.append(augment_lib.mask_to_float(mask))
    return dict(image=np.stack(images), mask=np.stack(masks),
                class_label=np.asarray([ex['class_label'] for ex in examples], np.int32))


def _synthetic_seed(cfg, dataset_name):
  if dataset_name is None:
    return int(cfg.synthetic_seed)
  return (int(cfg.synthetic_seed) * 1_000_003 + zlib.crc32(dataset_name.encode())) % 2**31


def train_source(cfg):
  """Random-access source of the training set named by the data config."""
  if cfg.source == 'folder':
    return sources.train_files(cfg)
  if cfg.source == 'synthetic':
    return SyntheticDataset(cfg.synthetic_train_examples, cfg.image_size,
                            _synthetic_seed(cfg, None), cfg.synthetic_difficulty)
  if cfg.source == 'tfds':
    from birefnet_jax.data import tfds_datasets  # pylint: disable=g-import-not-at-top
    return tfds_datasets.data_source(cfg, cfg.train_sets)
  raise ValueError(f"data.source must be 'folder', 'synthetic' or 'tfds', got {cfg.source!r}")


def _check_image_size(size):
  if len(size) != 2 or any(int(s) <= 0 or int(s) % 32 for s in size):
    raise ValueError(f'data.image_size must be (height, width), multiples of 32; got {size}')


def train_dataset(cfg, *, local_batch_size, seed, process_index=0, process_count=1):
  """The training MapDataset of one process (infinite, batched), before prefetching."""
  if cfg.dynamic_size is None:
    _check_image_size(cfg.image_size)
  size_buckets = cfg.get('size_buckets', None)
  if size_buckets is not None:   # checked before any data is read
    buckets_lib.check_buckets(size_buckets, cfg.dynamic_size)
  source = train_source(cfg)
  per_process = len(source) // process_count
  if per_process < local_batch_size:
    raise ValueError(f'{source!r} has {len(source)} examples: {per_process} per process, fewer '
                     f'than the local batch size {local_batch_size}')
  load_size = None if cfg.dynamic_size is not None else tuple(cfg.image_size)
  ds = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat(None)
  ds = ds.map(LoadExample(source, load_size, cfg.on_bad_file, cfg.mask_size_mismatch))
  if cfg.get('background_color_synthesis', False):
    ds = ds.random_map(SynthesizeBackground())
  if cfg.augment:
    ds = ds.random_map(Augment(training_augmentations(cfg), load_size))
  # Shard after the random map (the maps are lazy: a process only loads its own examples), so an
  # example's augmentation draws follow its index in the global stream: the same global batches
  # whatever the number of processes, and no two processes repeat each other's draws.
  ds = ds[process_index::process_count]
  if cfg.dynamic_size is None:
    ds = ds.map(ToModelInputs()).batch(local_batch_size, drop_remainder=True)
  else:
    ds = ds.batch(local_batch_size, drop_remainder=True, batch_fn=list)
    ds = ds.random_map(DynamicSizeBatch(cfg.dynamic_size, size_buckets))
  return ds


def train_iterator(cfg, *, local_batch_size, seed, process_index=0, process_count=1):
  """Checkpointable iterator of this process's batches (see the module docstring).

  Yields {'image': (b,H,W,3) float32, 'mask': (b,H,W,1) float32, 'class_label': (b,) int32}.
  With num_workers > 0 the work runs in grain worker processes (absl flags must be parsed:
  run under absl.app.run, or call flags.FLAGS.mark_as_parsed()).
  """
  ds = train_dataset(cfg, local_batch_size=local_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                            prefetch_buffer_size=cfg.read_prefetch))
  if cfg.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.num_workers, per_worker_buffer_size=cfg.per_worker_buffer_size))
  return iter(it)


# The comma-separated data.val_sets as a list (parsed in one place, sources.val_set_names).
val_set_names = sources.val_set_names


def eval_source(cfg, dataset_name):
  """Random-access source of one evaluation set."""
  if cfg.source == 'folder':
    return sources.eval_files(cfg, dataset_name)
  if cfg.source == 'synthetic':
    return SyntheticDataset(cfg.synthetic_val_examples, cfg.image_size,
                            _synthetic_seed(cfg, dataset_name or 'val'), cfg.synthetic_difficulty)
  if cfg.source == 'tfds':
    from birefnet_jax.data import tfds_datasets  # pylint: disable=g-import-not-at-top
    return tfds_datasets.data_source(cfg, dataset_name)
  raise ValueError(f"data.source must be 'folder', 'synthetic' or 'tfds', got {cfg.source!r}")


def eval_examples(cfg, dataset_name):
  """Yields the examples of one evaluation set in a fixed order, without augmentation.

  Each: {'name': GT file name, 'image': (H,W,3) float32 normalized at data.image_size
  (cv2 INTER_LINEAR, as official inference), 'mask_uint8': (H0,W0) uint8 original GT,
  'dataset': dataset_name}. The mask may differ in size from its image: predictions are
  compared at the GT's size, as official. Bad files: error naming the file, or with
  on_bad_file='skip' a counted warning and the example is left out.
  """
  _check_image_size(cfg.image_size)
  source = eval_source(cfg, dataset_name)
  for index in range(len(source)):
    try:
      record = source[index]
      image, mask = load_record(record, None, mask_size_mismatch='resize', index=index)
    except Exception as e:  # pylint: disable=broad-except
      if cfg.on_bad_file == 'error':
        if isinstance(e, (decode.ImageDecodeError, FileNotFoundError)):
          raise
        raise decode.ImageDecodeError(f'example {index} of {source!r}: {e}') from e
      _SKIPPED['count'] += 1
      logging.warning('Skipping bad evaluation example (%d skipped so far): %s',
                      _SKIPPED['count'], e)
      continue
    image = decode.resize_linear(image, tuple(cfg.image_size))
    yield dict(name=_as_str(record.get('name', f'{index:06d}.png')),
               image=augment_lib.normalize_image(image),
               mask_uint8=np.ascontiguousarray(mask), dataset=dataset_name)

"""tensorflow-datasets builders `dis5k`, `hrsod`, `cod` over the official folder layouts.

Nothing is downloaded: the manual dir is ROOT/TASK of the official layout (e.g.
/data/dis/DIS5K holding DIS-TR, DIS-VD, DIS-TE1..4, each with im/ and gt/). Every data set
folder found there becomes a split of the same name ('DIS-TR', 'TR-DUTS', ...). Records are
written as ArrayRecord and read back with `tfds.data_source` / `builder.as_data_source()`,
random access, without TensorFlow (installing TensorFlow is not needed for any of this).

This is the library (the builders, ``prepare``, and ``data_source`` that data/pipeline.py reads
through); the command line that prepares a task is data/tfds_builders.py. Prepare once:
  python -m birefnet_jax.data.tfds_builders --task DIS5K --root /data/dis --data_dir ~/tfds
(or ``tfds_datasets.prepare(task, root, data_dir)``), then train with data.source='tfds',
data.tfds_data_dir=~/tfds.

Pixels: tfds decodes stored bytes with cv2.imdecode(IMREAD_UNCHANGED), which ignores EXIF
orientation and does not convert 16-bit, grayscale or CMYK files the way our decoder (the
official cv2.imread path, decode.py) does. So each file's original bytes are stored only when
tfds would decode them to exactly our pixels; otherwise our decoded pixels are stored as a
lossless PNG. Reading back therefore gives the same arrays as the folder source.
"""

import os

import cv2
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from birefnet_jax.data import decode
from birefnet_jax.data import sources
from birefnet_jax.data.config import OFFICIAL_DATASETS

BUILDER_NAMES = {'DIS5K': 'dis5k', 'HRSOD': 'hrsod', 'COD': 'cod'}


def _tfds_view(data, channels):
  """What tfds' numpy decoder makes of encoded bytes (cv2 IMREAD_UNCHANGED, BGR->RGB)."""
  array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
  if array is None or array.dtype != np.uint8:
    return None
  if channels == 3 and array.ndim == 3 and array.shape[2] == 3:
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
  if channels == 1 and array.ndim == 2:
    return array
  return None


def _encoded(path, channels):
  """The file's own bytes when tfds decodes them to our pixels, else our pixels as a PNG."""
  data = decode.read_bytes(path)
  if channels == 3:
    ours = decode.decode_image_bytes(data, os.fspath(path))
  else:
    ours = decode.decode_mask_bytes(data, os.fspath(path))
  view = _tfds_view(data, channels)
  if view is not None and np.array_equal(view, ours):
    return data.tobytes()
  return cv2.imencode('.png', cv2.cvtColor(ours, cv2.COLOR_RGB2BGR) if channels == 3
                      else ours)[1].tobytes()


def encoded_image(path):
  """Bytes to store for an image so that tfds decodes them to decode.read_image(path)."""
  return _encoded(path, 3)


def encoded_mask(path):
  """Bytes to store for a mask so that tfds decodes them to decode.read_mask(path)."""
  return _encoded(path, 1)


class _OfficialLayoutBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared by the three builders: one split per data set folder of ROOT/TASK."""

  TASK = ''
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Official BiRefNet folder layout, images paired with GT by stem.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place the data set in the official BiRefNet layout and pass ROOT/TASK as manual_dir: '
      'ROOT/TASK/DATASET/im/* (images) and ROOT/TASK/DATASET/gt/* (masks, same file stems).')
  on_bad_file = 'error'  # 'skip' leaves out images without a mask (counted warning)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds 4.9.10 looks the builder's package up through `importlib_resources`, a backport it
    # does not install (ModuleNotFoundError for any builder inside a package); this file's
    # path is all tfds needs (to look for an absent checksums file).
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'{self.TASK} in the official BiRefNet layout (image, soft GT mask).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'mask': tfds.features.Image(shape=(None, None, 1)),
            'name': tfds.features.Text(),  # the GT file name
            'class_label': tfds.features.Scalar(dtype=np.int32),  # DIS5K id or -1
        }),
        homepage='https://github.com/ZhengPeng7/BiRefNet')

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    known = OFFICIAL_DATASETS.get(self.TASK, ())
    present = sorted(d for d in os.listdir(manual_dir)
                     if os.path.isdir(os.path.join(manual_dir, d, 'im')))
    names = [d for d in known if d in present] + [d for d in present if d not in known]
    if not names:
      raise sources.MissingDataError(
          f'no data set folders with im/ and gt/ under {manual_dir} (expected e.g. '
          f'{", ".join(known)}); pass --root such that ROOT/{self.TASK} holds them')
    return {name: self._generate_examples(os.path.join(manual_dir, name), name)
            for name in names}

  def _generate_examples(self, folder, dataset):
    records, _ = sources.pair_folder(os.path.join(folder, 'im'), os.path.join(folder, 'gt'),
                                     dataset, self.on_bad_file)
    for record in records:
      yield record['name'], dict(image=encoded_image(record['image_path']),
                                 mask=encoded_mask(record['mask_path']),
                                 name=record['name'], class_label=record['class_label'])


class Dis5k(_OfficialLayoutBuilder):
  """DIS5K: DIS-TR, DIS-VD, DIS-TE1..4."""
  TASK = 'DIS5K'


class Hrsod(_OfficialLayoutBuilder):
  """HRSOD task folders: TR-DUTS, TR-HRSOD, TR-UHRSD, DAVIS-S, TE-*, DUT-OMRON."""
  TASK = 'HRSOD'


class Cod(_OfficialLayoutBuilder):
  """COD task folders: TR-COD10K, TR-CAMO, CHAMELEON, NC4K, TE-CAMO, TE-COD10K."""
  TASK = 'COD'


BUILDERS = {'DIS5K': Dis5k, 'HRSOD': Hrsod, 'COD': Cod}


def builder_for(task, data_dir):
  if task not in BUILDERS:
    raise ValueError(f'no tfds builder for task {task!r}; tasks: {sorted(BUILDERS)}')
  return BUILDERS[task](data_dir=os.fspath(data_dir), file_format='array_record')


def prepare(task, root, data_dir, on_bad_file='error'):
  """Builds the ArrayRecord files of ROOT/TASK into data_dir; returns the builder."""
  manual_dir = os.path.join(os.fspath(root), task)
  if not os.path.isdir(manual_dir):
    raise sources.MissingDataError(f'{task} not found: looked at {manual_dir}; pass the root '
                                   f'holding {task}/DATASET/{{im,gt}}')
  builder = builder_for(task, data_dir)
  builder.on_bad_file = on_bad_file
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


class _NamedSource:
  """A tfds data source whose 'name' field comes back as str."""

  def __init__(self, data_source, description):
    self.data_source = data_source
    self.description = description

  def __len__(self):
    return len(self.data_source)

  def __getitem__(self, index):
    record = dict(self.data_source[index])
    if isinstance(record.get('name'), bytes):
      record['name'] = record['name'].decode()
    return record

  def __repr__(self):
    return f'tfds({self.description}, {len(self)} examples)'


def data_source(cfg, datasets):
  """Random-access source of the '+'-joined data sets, read from the prepared tfds files."""
  if not cfg.tfds_data_dir:
    raise sources.MissingDataError(
        "data.source='tfds' needs data.tfds_data_dir (where python -m birefnet_jax.data.tfds_builders wrote it)")
  builder = builder_for(cfg.task, cfg.tfds_data_dir)
  if not builder.is_prepared():
    raise sources.MissingDataError(
        f'tfds data set {builder.name} not prepared: looked at {builder.data_dir}; run '
        f'python -m birefnet_jax.data.tfds_builders --task {cfg.task} --root DATA_ROOT '
        f'--data_dir {cfg.tfds_data_dir} (or set data.tfds_data_dir)')
  names = [d.strip() for d in datasets.split('+') if d.strip()]
  missing = [d for d in names if d not in builder.info.splits]
  if missing or not names:
    raise sources.MissingDataError(
        f'splits {missing or datasets!r} not in {builder.data_dir} (has '
        f'{", ".join(builder.info.splits)}); set data.train_sets / data.val_sets')
  split = '+'.join(names)
  return _NamedSource(builder.as_data_source(split=split), f'{builder.name}:{split}')

"""Where examples live on disk: the official benchmark layouts and plain folders.

Official layout (dataset.py): ROOT/TASK/DATASET/im/* images and ROOT/TASK/DATASET/gt/* masks,
paired by file stem (`x.jpg` <-> `x.png`); several datasets joined with '+' ('TR-DUTS+TR-HRSOD')
form one training set. Tasks: DIS5K (DIS-TR, DIS-VD, DIS-TE1..4), HRSOD, COD, General.
A plain folder is any folder of images plus a folder of masks, paired the same way.

Sources here hold only file names (cheap to pickle into grain workers); decoding happens in
pipeline.py. An image without a mask is an error naming the file, or with on_bad_file='skip' a
counted warning and the image is left out.
"""

import os

from absl import logging

from birefnet_jax.data.classes import class_label_from_filename
from birefnet_jax.data.decode import IMAGE_EXTENSIONS, has_image_extension
from birefnet_jax.errors import UserError

# The official lookup tries '.png' first, then '.jpg' (then upper-case spellings); the other
# extensions after them, in IMAGE_EXTENSIONS order.
MASK_EXTENSION_PREFERENCE = ('.png', '.jpg') + tuple(
    e for e in IMAGE_EXTENSIONS if e not in ('.png', '.jpg'))


class MissingDataError(UserError, FileNotFoundError):
  """A data set folder that is not there (a user error: the command line reports it in one
  line)."""


class PairedFiles:
  """Random-access source of image/mask file records (len / getitem), for grain.

  Each record is a dict: image_path, mask_path, name (the GT file name, under which the
  official code saves predictions), dataset, class_label (official DIS5K id, or -1).
  """

  def __init__(self, records, description, num_skipped=0):
    self.records = list(records)
    self.description = description
    self.num_skipped = num_skipped  # images left out for lack of a mask (on_bad_file='skip')

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return dict(self.records[index])

  def __repr__(self):
    return f'PairedFiles({self.description}, {len(self)} pairs)'


def list_images(folder):
  """Image files of a folder (not recursive), sorted by name."""
  return sorted(f for f in os.listdir(folder)
                if has_image_extension(f) and not f.startswith('.')
                and os.path.isfile(os.path.join(folder, f)))


def _masks_by_stem(mask_dir):
  """stem -> mask file name, preferring .png then .jpg as the official lookup does."""
  rank = {ext: i for i, ext in enumerate(MASK_EXTENSION_PREFERENCE)}
  chosen = {}
  for f in list_images(mask_dir):
    stem, ext = os.path.splitext(f)
    if stem not in chosen or rank[ext.lower()] < rank[os.path.splitext(chosen[stem])[1].lower()]:
      chosen[stem] = f
  return chosen


def pair_folder(image_dir, mask_dir, dataset='', on_bad_file='error'):
  """Pairs every image of image_dir with the mask of the same stem in mask_dir.

  Returns (records, num_skipped). Masks without an image are ignored.
  """
  if on_bad_file not in ('error', 'skip'):
    raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
  masks = _masks_by_stem(mask_dir)
  records, missing = [], []
  for f in list_images(image_dir):
    stem = os.path.splitext(f)[0]
    image_path = os.path.join(image_dir, f)
    if stem not in masks:
      if on_bad_file == 'error':
        raise MissingDataError(
            f'image {image_path} has no mask: looked for {stem}.* in {mask_dir}',
            hint="set data.on_bad_file='skip' (tfds_builders: --on_bad_file skip) to leave "
                 'such images out, with a count')
      missing.append(image_path)
      continue
    mask_path = os.path.join(mask_dir, masks[stem])
    records.append(dict(image_path=image_path, mask_path=mask_path, name=masks[stem],
                        dataset=dataset, class_label=class_label_from_filename(mask_path)))
  if missing:
    logging.warning('Skipped %d images without a mask in %s (first: %s)', len(missing),
                    mask_dir, missing[0])
  return records, len(missing)


def _require_dir(path, what, field):
  if not os.path.isdir(path):
    raise MissingDataError(f'{what} not found: looked at {path}; set {field}')


def official_dataset_dir(root, task, dataset):
  return os.path.join(root, task, dataset) if task else os.path.join(root, dataset)


def dataset_folders(root, task, datasets, *, image_subdir='im', mask_subdir='gt',
                    field='data.train_sets'):
  """[(name, image folder, mask folder)] of the '+'-joined ``datasets`` under ROOT/TASK;
  MissingDataError naming the first folder that is not there."""
  if not root:
    raise MissingDataError(
        'no data root given: set data.root (data_config(root=...)) to the folder holding '
        f'{task or "TASK"}/DATASET/{image_subdir},{mask_subdir}, or use '
        "data.source='synthetic'")
  _require_dir(root, 'data root', 'data.root')
  names = [d.strip() for d in datasets.split('+') if d.strip()]
  if not names:
    raise MissingDataError(f'no data set named: set {field} (e.g. "DIS-TR" or "TR-DUTS+TR-HRSOD")')
  folders = []
  for name in names:
    base = official_dataset_dir(root, task, name)
    if not os.path.isdir(base):
      parent = os.path.dirname(base)
      present = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
      raise MissingDataError(
          f'data set {name!r} not found: looked at {base}; set {field} to data sets present '
          f'under {parent} ({", ".join(present) or "none"}), or data.root / data.task')
    image_dir, mask_dir = os.path.join(base, image_subdir), os.path.join(base, mask_subdir)
    _require_dir(image_dir, f'image folder of {name!r}', 'data.image_subdir')
    _require_dir(mask_dir, f'mask folder of {name!r}', 'data.mask_subdir')
    folders.append((name, image_dir, mask_dir))
  return folders


def official_layout(root, task, datasets, *, image_subdir='im', mask_subdir='gt',
                    on_bad_file='error', field='data.train_sets'):
  """PairedFiles over ROOT/TASK/D/{im,gt} for every D of the '+'-joined `datasets`."""
  records, skipped = [], 0
  for name, image_dir, mask_dir in dataset_folders(root, task, datasets, image_subdir=image_subdir,
                                                   mask_subdir=mask_subdir, field=field):
    found, n = pair_folder(image_dir, mask_dir, name, on_bad_file)
    if not found:
      raise MissingDataError(f'data set {name!r} has no image/mask pairs: looked at {image_dir}')
    records += found
    skipped += n
  return PairedFiles(records, f'{root}/{task}/{datasets}', skipped)


def plain_folder(image_dir, mask_dir, *, dataset='folder', on_bad_file='error'):
  """PairedFiles over a user's folder of images and folder of masks."""
  _require_dir(image_dir, 'image folder', 'data.image_dir')
  _require_dir(mask_dir, 'mask folder', 'data.mask_dir')
  records, skipped = pair_folder(image_dir, mask_dir, dataset, on_bad_file)
  if not records:
    raise MissingDataError(f'no image/mask pairs: looked at {image_dir} and {mask_dir}')
  return PairedFiles(records, f'{image_dir} + {mask_dir}', skipped)


def train_files(cfg):
  """PairedFiles of the training set named by a data config (source='folder')."""
  if cfg.image_dir:
    return plain_folder(cfg.image_dir, cfg.mask_dir, on_bad_file=cfg.on_bad_file)
  return official_layout(cfg.root, cfg.task, cfg.train_sets, image_subdir=cfg.image_subdir,
                         mask_subdir=cfg.mask_subdir, on_bad_file=cfg.on_bad_file,
                         field='data.train_sets')


def eval_files(cfg, dataset_name):
  """PairedFiles of one evaluation set (a name under root/task; 'folder' = image_dir)."""
  if cfg.image_dir and dataset_name in (None, '', 'folder'):
    return plain_folder(cfg.image_dir, cfg.mask_dir, on_bad_file=cfg.on_bad_file)
  return official_layout(cfg.root, cfg.task, dataset_name, image_subdir=cfg.image_subdir,
                         mask_subdir=cfg.mask_subdir, on_bad_file=cfg.on_bad_file,
                         field='data.val_sets')


def val_set_names(cfg):
  """The comma-separated data.val_sets as a list (``pipeline.val_set_names`` is this)."""
  return [n.strip() for n in cfg.val_sets.split(',') if n.strip()]


def check_folders(cfg):
  """Checks, before any model is built, that the folders a 'folder' data config names exist:
  the training set's and every validation set's (a missing validation set would otherwise
  only fail at the first validation). Raises MissingDataError naming what is missing."""
  if cfg.source != 'folder':
    return
  if cfg.image_dir:
    _require_dir(cfg.image_dir, 'image folder', 'data.image_dir')
    _require_dir(cfg.mask_dir, 'mask folder', 'data.mask_dir')
  else:
    dataset_folders(cfg.root, cfg.task, cfg.train_sets, image_subdir=cfg.image_subdir,
                    mask_subdir=cfg.mask_subdir, field='data.train_sets')
  for name in val_set_names(cfg):
    if cfg.image_dir and name == 'folder':
      continue
    dataset_folders(cfg.root, cfg.task, name, image_subdir=cfg.image_subdir,
                    mask_subdir=cfg.mask_subdir, field='data.val_sets')

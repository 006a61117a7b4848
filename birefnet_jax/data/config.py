"""The data side's settings, as an ml_collections ConfigDict.

Defaults are the official DIS5K ones (config.py of ZhengPeng7/BiRefNet): DIS-TR for training,
DIS-VD for validation, 1024x1024, flip/enhance/rotate/pepper augmentation (crop off).
Sizes here are (height, width); the official config writes (width, height).
"""

import ml_collections

# Dataset folders of the official benchmark layouts ROOT/TASK/DATASET/{im,gt}.
OFFICIAL_DATASETS = {
    'DIS5K': ('DIS-TR', 'DIS-VD', 'DIS-TE1', 'DIS-TE2', 'DIS-TE3', 'DIS-TE4'),
    'HRSOD': ('TR-DUTS', 'TR-HRSOD', 'TR-UHRSD', 'DAVIS-S', 'TE-HRSOD', 'TE-UHRSD', 'DUT-OMRON',
              'TE-DUTS'),
    'COD': ('TR-COD10K', 'TR-CAMO', 'CHAMELEON', 'NC4K', 'TE-CAMO', 'TE-COD10K'),
}

# Official training / validation sets per task (config.py `training_set` and `testsets`).
OFFICIAL_SETS = {
    'DIS5K': ('DIS-TR', 'DIS-VD'),
    'COD': ('TR-COD10K+TR-CAMO', 'CHAMELEON,NC4K,TE-CAMO,TE-COD10K'),
    'HRSOD': ('TR-HRSOD+TR-UHRSD', 'DAVIS-S,TE-HRSOD,TE-UHRSD,DUT-OMRON,TE-DUTS'),
    'General': ('', 'DIS-VD,TE-P3M-500-NP'),
    'General-2K': ('', 'DIS-VD,TE-P3M-500-NP'),
    'Matting': ('', 'TE-P3M-500-NP,TE-AM-2k'),
}

# ImageNet statistics of torchvision's Normalize in dataset.py.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Official `preproc_methods`: ['flip', 'enhance', 'rotate', 'pepper', 'crop'][:4].
OFFICIAL_AUGMENTATIONS = ('flip', 'enhance', 'rotate', 'pepper')


def data_config(**overrides):
  """Returns the data ConfigDict; keyword overrides replace fields (unknown keys fail)."""
  task = overrides.get('task', 'DIS5K')
  train_sets, val_sets = OFFICIAL_SETS.get(task, ('', ''))
  cfg = ml_collections.ConfigDict(dict(
      # Where examples come from: 'folder' (official layout or a plain folder), 'synthetic'
      # (the built-in DIS-like set, nothing on disk), 'tfds' (builders in tfds_datasets.py).
      source='folder',
      # Official layout: root/task/DATASET/{image_subdir,mask_subdir}; datasets joined with '+'
      # train as one (as the official `training_set`); val_sets is comma-separated.
      root='',
      task=task,
      train_sets=train_sets,
      val_sets=val_sets,
      image_subdir='im',
      mask_subdir='gt',
      # A plain folder of images (+ a folder of masks, paired by file stem). When image_dir is
      # set, source='folder' trains on it instead of the official layout.
      image_dir='',
      mask_dir='',
      # Network input (height, width); multiples of 32.
      image_size=(1024, 1024),
      # Per-batch random size ((h_min, h_max), (w_min, w_max)), floored to multiples of 32, as
      # the official `dynamic_size` (None: fixed image_size).
      dynamic_size=None,
      # With dynamic_size: a small set of (height, width) buckets, multiples of 32. Each batch
      # takes one of them, drawn as the official code draws its size restricted to the buckets
      # (data/buckets.py), so training compiles once per bucket instead of once per size
      # (~65^2 possible sizes in the official range). None: any size of the range.
      size_buckets=None,
      # The official background_color_synthesis: training images get a flat background colour
      # through their mask (data/background.py) and the augmentation is reduced to flips.
      background_color_synthesis=False,
      augment=True,
      augmentations=OFFICIAL_AUGMENTATIONS,  # add 'crop' for the official (disabled) crop
      # Bad files (unreadable image, mask missing, mask size != image size): 'error' stops with
      # the file named; 'skip' logs a counted warning and uses the next good example instead.
      on_bad_file='error',
      # Mask whose size differs from its image: 'error', or 'resize' both to image_size
      # independently, which is what the official code silently does.
      mask_size_mismatch='error',
      # grain: 0 workers = in-process; per_worker_buffer_size batches prefetched per worker.
      num_workers=4,
      per_worker_buffer_size=2,
      # Threads per process (each worker, or the main process with 0 workers) computing whole
      # batches, and how many batches they may run ahead. grain's defaults (16 threads, 500
      # elements ahead) are meant for small records: with 1024^2 batches they would hold
      # gigabytes per process. 0 threads = compute each batch when it is asked for.
      read_threads=2,
      read_prefetch=2,
      # source='synthetic'
      synthetic_train_examples=1000,
      synthetic_val_examples=32,
      synthetic_seed=0,
      # 'dis' (thin structures on busy scenes) or 'easy' (thick, high-contrast, plain scenes).
      synthetic_difficulty='dis',
      # source='tfds': prepared by python -m birefnet_jax.data.tfds_builders into tfds_data_dir.
      tfds_data_dir='',
  ))
  for key, value in overrides.items():
    if key not in cfg:
      raise KeyError(f'data_config has no field {key!r}; fields: {sorted(cfg.keys())}')
    # ConfigDict refuses None -> tuple and the reverse; replace such fields whole.
    if key in ('dynamic_size', 'size_buckets') or cfg[key] is None or value is None:
      with cfg.ignore_type():
        cfg[key] = value
    else:
      cfg[key] = value
  return cfg

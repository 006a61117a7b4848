"""The one function that builds a training config, and the variants a config file accepts.

Every config file (configs/*.py) is ``recipe(...)`` plus its own overrides, so the top-level
schema is written once, here. The official recipe (config.py, train.py, train.sh of
ZhengPeng7/BiRefNet; see docs §8):
  Swin-L backbone (ImageNet-initialized), 1024x1024, batch 8 per GPU (drop_last), AdamW
  (wd 1e-2, betas 0.9/0.999, eps 1e-8) at lr = base * sqrt(8 / 4) with base 1e-4 (DIS5K) or 1e-5
  (other tasks), constant (MultiStepLR milestone 1e5 is never reached), bf16 autocast, no
  clipping / accumulation / warmup; epochs 500 DIS5K, 150 COD and HRSOD, 200 General; the loss
  weights decay in the last 40 (DIS5K) / 20 (others) epochs; checkpoints every 5 epochs in the
  last 50 (validation is a separate script there).

The practical-use tasks (configs/general_2k.py, matting.py, hr.py, dynamic.py) are this recipe
with the official task's numbers (config.py ``task``, ``size``, ``lambdas_pix_last``,
``finetune_last_epochs``, ``dynamic_size``; train.sh epochs): General-2K at 2560x1440 for 250
epochs, Matting with bce 30 / iou 0 / ssim 10 / mae 100 and a 10-epoch finetune, HR (General or,
with ``task=Matting``, Matting) at 2048x2048, dynamic sizes 256..2304 on shape buckets.

Choices of this port (documented where they differ):
  - lr = base * sqrt(global_batch / 4) on the *global* batch of the run (resolved at start-up:
    1.414e-4 for DIS5K at batch 8). The official code applies the formula to the per-GPU batch,
    so its N-GPU runs keep 1.414e-4 with an N x larger batch: pass --config.optim.lr=1.414e-4
    to reproduce that;
  - BatchNorm sees the global batch (XLA reduces across devices); official DDP has per-GPU BN;
  - validation runs inside the training job every 5 epochs (official: offline after training),
    and checkpoints keep the latest 2 plus the best by S-measure on the first validation set.

Variants, in big_vision's style: ``--config configs/dis.py:backbone=swin_v1_t,size=512`` calls
``get_config('backbone=swin_v1_t,size=512')``, which ``parse_arg`` reads (see VARIANTS); a
variant overrides the config file's own defaults (``configs/hr.py:task=Matting,size=1024``).
"""

import ml_collections

from birefnet_jax import losses
from birefnet_jax import optim
from birefnet_jax.data.config import data_config
from birefnet_jax.errors import UserError
from birefnet_jax.models.config import DINO_V3_PRESETS, PVT_PRESETS, SWIN_PRESETS, model_config

BATCH_PER_DEVICE = 8

# What ``configs/<task>.py:KEY=VALUE,...`` may choose, with what each value means.
VARIANTS = {
    'backbone': 'a backbone preset: ' + ', '.join(list(SWIN_PRESETS) + list(PVT_PRESETS)
                                                  + list(DINO_V3_PRESETS)),
    'size': 'the training resolution, N (N x N) or WxH, multiples of 32',
    'epochs': 'the number of training epochs (default: the official number for the task)',
    'task': 'the official task whose recipe to use (loss weights, lr, epochs, finetune, '
            'validation sets): ' + ', '.join(losses.TASKS),
}


def recipe(task: str, *, backbone: str = 'swin_v1_l', image_size=(1024, 1024), epochs=None,
           arg: str = '') -> ml_collections.ConfigDict:
  """The top-level training config: the official recipe for ``task`` ('DIS5K', 'HRSOD', 'COD',
  'General', ...) on ``backbone`` at ``image_size`` (height, width)."""
  config = ml_collections.ConfigDict()
  config.arg = arg or ''                     # the variant string the config file was given
  # The task, in one field: it picks the official loss weights, the lr rule and the data folder
  # (config.data.task is a reference to this field, not a copy: overriding either changes both).
  config.task = task
  config.epochs = optim.official_epochs(task) if epochs is None else int(epochs)

  config.model = model_config(backbone, dtype='bfloat16')   # bf16 compute, float32 params

  # Data: the official folder layout ROOT/TASK/DATASET/{im,gt}; set --config.data.root. The
  # General task trains on a union of many public sets (docs §11): name yours with
  # --config.data.train_sets='A+B+...'.
  config.data = data_config(task=task, image_size=tuple(image_size))
  config.data.task = config.get_ref('task')

  # lr None: the official formula for the task on the run's global batch (train.py).
  config.optim = optim.optimizer_config()

  config.finetune_last_epochs = losses.finetune_last_epochs(task)   # negative: last N epochs
  config.seed = 7                            # official rand_seed
  config.batch_size = -1                     # global batch; -1: batch_size_per_device x devices
  config.batch_size_per_device = BATCH_PER_DEVICE
  config.steps_per_epoch = -1                # -1: training set size // global batch
  config.total_steps = -1                    # -1: epochs x steps_per_epoch; N > 0 shortens
  config.deterministic = False               # True turns Dropout / DropPath off
  config.fsdp = 1                            # > 1 shards big params / optimizer state
  config.init_from = ''                      # converted checkpoint or a training workdir

  config.log_every = 50
  config.eval_every = -1                     # steps; eval_every_epochs wins when > 0
  config.eval_every_epochs = 5
  config.eval_at_end = True                  # also validate after the last step
  config.eval_batch_size_per_device = 1      # official batch_size_valid = 1
  config.max_eval_images = -1
  config.num_sample_images = 4
  config.ckpt_every = -1                     # steps; ckpt_every_epochs wins when > 0
  config.ckpt_every_epochs = 5
  config.keep_checkpoints = 2
  config.best_metric = 'Sm'                  # '' keeps no best checkpoint
  config.best_mode = 'max'
  return config


def task_recipe(task: str, arg=None, **defaults) -> ml_collections.ConfigDict:
  """``recipe(task, **defaults)`` with the variant ``arg`` ('backbone=...,size=...,epochs=...,
  task=...') applied over them."""
  chosen = dict(defaults, task=task)
  chosen.update(parse_arg(arg))
  return recipe(chosen.pop('task'), arg=arg or '', **chosen)


def parse_arg(arg) -> dict:
  """'backbone=swin_v1_t,size=512' -> recipe() keywords; a bad key or value is a UserError."""
  chosen = {}
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    key, value = key.strip(), value.strip()
    if not sep or key not in VARIANTS:
      raise UserError(f'config variant {item!r}: expected KEY=VALUE with KEY one of '
                      f'{", ".join(VARIANTS)}',
                      'e.g. --config configs/dis.py:backbone=swin_v1_t,size=512; ' +
                      '; '.join(f'{k}: {v}' for k, v in VARIANTS.items()))
    if key == 'backbone':
      if value not in SWIN_PRESETS and value not in PVT_PRESETS and value not in DINO_V3_PRESETS:
        raise UserError(f'config variant backbone={value}: unknown backbone', VARIANTS['backbone'])
      chosen['backbone'] = value
    elif key == 'size':
      chosen['image_size'] = _parse_size(value)
    elif key == 'task':
      if value not in losses.TASKS:
        raise UserError(f'config variant task={value}: unknown task', VARIANTS['task'])
      chosen['task'] = value
    else:
      if not value.isdigit() or int(value) < 1:
        raise UserError(f'config variant epochs={value}: expected a positive integer')
      chosen['epochs'] = int(value)
  return chosen


def _parse_size(value: str):
  """'512' -> (512, 512); '2560x1440' (W x H, as --resolution of predict) -> (1440, 2560)."""
  parts = value.lower().split('x')
  if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise UserError(f'config variant size={value}: expected N or WxH', VARIANTS['size'])
  width, height = int(parts[0]), int(parts[-1])
  if width % 32 or height % 32:
    raise UserError(f'config variant size={value}: width and height must be multiples of 32')
  return (height, width)

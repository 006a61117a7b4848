"""The official training recipe shared by configs/dis.py, hrsod.py, cod.py and general.py.

Official (config.py, train.py, train.sh of ZhengPeng7/BiRefNet; see docs §8):
  Swin-L backbone (ImageNet-initialized), 1024x1024, batch 8 per GPU (drop_last), AdamW
  (wd 1e-2, betas 0.9/0.999, eps 1e-8) at lr = base * sqrt(8 / 4) with base 1e-4 (DIS5K) or 1e-5
  (other tasks), constant (MultiStepLR milestone 1e5 is never reached), bf16 autocast, no
  clipping / accumulation / warmup; epochs 500 DIS5K, 150 COD and HRSOD, 200 General; the loss
  weights decay in the last 40 (DIS5K) / 20 (others) epochs; checkpoints every 5 epochs in the
  last 50 (validation is a separate script there).

Choices of this port (documented where they differ):
  - lr = base * sqrt(global_batch / 4) on the *global* batch of the run (resolved at start-up:
    1.414e-4 for DIS5K at batch 8). The official code applies the formula to the per-GPU batch,
    so its N-GPU runs keep 1.414e-4 with an N x larger batch: pass --config.optim.lr=1.414e-4
    to reproduce that;
  - BatchNorm sees the global batch (XLA reduces across devices); official DDP has per-GPU BN;
  - validation runs inside the training job every 5 epochs (official: offline after training),
    and checkpoints keep the latest 2 plus the best by S-measure on the first validation set.
"""

import ml_collections

from birefnet_jax import losses
from birefnet_jax import optim
from birefnet_jax.data.config import data_config
from birefnet_jax.models.config import model_config

BATCH_PER_DEVICE = 8


def recipe(task: str, *, backbone: str = 'swin_v1_l', image_size=(1024, 1024), epochs=None,
           arg: str | None = None) -> ml_collections.ConfigDict:
  """The official recipe for ``task`` ('DIS5K', 'HRSOD', 'COD', 'General')."""
  epochs = optim.official_epochs(task) if epochs is None else epochs
  config = ml_collections.ConfigDict()
  config.arg = arg or ''

  config.model = model_config(backbone, dtype='bfloat16')   # bf16 compute, float32 params

  # Data: the official folder layout ROOT/TASK/DATASET/{im,gt}; set --config.data.root. The
  # General task trains on a union of many public sets (docs §11): name yours with
  # --config.data.train_sets='A+B+...'.
  config.data = data_config(task=task, image_size=tuple(image_size))

  config.optim = optim.optimizer_config(
      task=task, lr=None, epochs=epochs)
  # None: the official formula on the global batch; a float type so --config.optim.lr=X works.
  config.optim.lr = ml_collections.config_dict.placeholder(float)

  config.loss_task = task                    # which official loss lambdas (General: + MAE x100)
  config.finetune_last_epochs = losses.finetune_last_epochs(task)   # negative: last N epochs
  config.seed = 7                            # official rand_seed
  config.batch_size = -1                     # global batch; -1: batch_size_per_device x devices
  config.batch_size_per_device = BATCH_PER_DEVICE
  config.epochs = epochs
  config.steps_per_epoch = -1                # -1: training set size // global batch
  config.total_steps = -1                    # -1: epochs x steps_per_epoch; N > 0 shortens
  config.deterministic = False               # True turns Dropout / DropPath off
  config.fsdp = 1                            # > 1 shards big params / optimizer state
  config.init_from = ''                      # converted checkpoint: a BiRefNet or an ImageNet backbone

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
  config.best_metric = 'Sm'
  config.best_mode = 'max'
  return config

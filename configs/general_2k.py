"""Official BiRefNet recipe for the General-2K task (see birefnet_jax/recipes.py).

Official numbers (config.py, train.sh at 25cb930): task 'General-2K', size 2560x1440 (W x H),
the General loss weights (bce 30, iou 0.5, ssim 10, mae 100), lr 1e-5 * sqrt(batch / 4),
250 epochs, loss finetune in the last 20, checkpoints every 2 epochs in the last 30 (train.sh
val_last=30, step=2). config.py's default backbone is Swin-L; the released BiRefNet_lite-2K is
Swin-T: --config configs/general_2k.py:backbone=swin_v1_t.

  python -m birefnet_jax.main --config configs/general_2k.py --workdir W --config.data.root=DATA \
      --config.data.train_sets='A+B+...' [--config.init_from=CONVERTED_SWIN_L_IMAGENET]
"""

from birefnet_jax import recipes


def get_config(arg=None):
  config = recipes.task_recipe('General-2K', arg, image_size=(1440, 2560))
  config.ckpt_every_epochs = 2               # official step=2 (5 for the other tasks)
  return config

"""Official BiRefNet recipe for the Matting task (see birefnet_jax/recipes.py).

Official numbers (config.py, train.sh at 25cb930): task 'Matting', 1024x1024, loss weights
(lambdas_pix_last) bce 30, iou 0, ssim 10, mae 100 (a regression target: soft alpha mattes),
lr 1e-5 * sqrt(batch / 4), 150 epochs, loss finetune in the last 10 (mse and ssim x 0.9 per
epoch, mae kept), validation on TE-P3M-500-NP and TE-AM-2k. The released BiRefNet_HR-matting
is this task at 2048x2048: --config configs/hr.py:task=Matting.

  python -m birefnet_jax.main --config configs/matting.py --workdir W --config.data.root=DATA \
      --config.data.train_sets='A+B+...' [--config.init_from=CONVERTED_SWIN_L_IMAGENET]
"""

from birefnet_jax import recipes


def get_config(arg=None):
  return recipes.task_recipe('Matting', arg)

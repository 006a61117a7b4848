"""The BiRefNet_HR training setup: the official General recipe at 2048x2048
(see birefnet_jax/recipes.py).

Official numbers (README release notes at 25cb930; config.py): BiRefNet_HR (2025-02-01) is
the General task (bce 30, iou 0.5, ssim 10, mae 100; lr 1e-5 * sqrt(batch / 4); 200 epochs,
finetune in the last 20) trained at 2048x2048, Swin-L, on 4 H200 for about 3 weeks;
BiRefNet_HR-matting (2025-02-12) is the Matting task at 2048x2048:
--config configs/hr.py:task=Matting. The release notes give no other change.

  python -m birefnet_jax.main --config configs/hr.py --workdir W --config.data.root=DATA \
      --config.data.train_sets='A+B+...' [--config.init_from=CONVERTED_SWIN_L_IMAGENET]
"""

from birefnet_jax import recipes


def get_config(arg=None):
  return recipes.task_recipe('General', arg, image_size=(2048, 2048))

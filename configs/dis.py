"""Official BiRefNet recipe for the DIS5K task (see birefnet_jax/recipes.py).

  python -m birefnet_jax.main --config configs/dis.py --workdir W --config.data.root=DATA \
      [--config.init_from=CONVERTED_SWIN_L_IMAGENET] [--config.total_steps=N]

Variants: --config configs/dis.py:backbone=swin_v1_t,size=512,epochs=N (any of the three).
"""

from birefnet_jax import recipes


def get_config(arg=None):
  return recipes.task_recipe('DIS5K', arg)

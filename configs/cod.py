"""Official BiRefNet recipe for the COD task (see birefnet_jax/recipes.py).

  python -m birefnet_jax.main --config configs/cod.py --workdir W --config.data.root=DATA \
      [--config.init_from=CONVERTED_SWIN_L_IMAGENET] [--config.total_steps=N]

Variants: --config configs/cod.py:backbone=swin_v1_t,size=512,epochs=N (any of the three).
"""

from birefnet_jax import recipes


def get_config(arg=None):
  return recipes.task_recipe('COD', arg)

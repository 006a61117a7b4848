"""The BiRefNet_dynamic training setup: the official General recipe with dynamic_size, on shape
buckets (see birefnet_jax/recipes.py and birefnet_jax/data/buckets.py).

Official numbers (config.py, dataset.py custom_collate_fn; README release note 2025-03-31):
dynamic_size ((512 - 256, 2048 + 256), (512 - 256, 2048 + 256)), i.e. each batch gets its own
width and height, each randint(256, 2304) // 32 * 32; the examples keep their original size
until the batch is resized (PIL bilinear, antialiased). Inference and validation stay at
config.size, 1024x1024. The General loss weights, lr, 200 epochs (the released weights are
epoch 174).

Ours: the batch size is one of 16 buckets, heights and widths in {512, 1024, 1536, 2048},
drawn with the official probabilities restricted to them, so the train step compiles 16 times
instead of for each of the 65 x 65 official sizes. Other buckets:
--config.data.size_buckets (tuple of (height, width)); None: every official size.

  python -m birefnet_jax.main --config configs/dynamic.py --workdir W --config.data.root=DATA \
      --config.data.train_sets='A+B+...' [--config.init_from=CONVERTED_SWIN_L_IMAGENET]
"""

from birefnet_jax import recipes

OFFICIAL_DYNAMIC_SIZE = ((512 - 256, 2048 + 256), (512 - 256, 2048 + 256))   # (h, w) ranges
BUCKET_SIDES = (512, 1024, 1536, 2048)


def get_config(arg=None):
  config = recipes.task_recipe('General', arg)
  config.data.dynamic_size = OFFICIAL_DYNAMIC_SIZE
  config.data.size_buckets = tuple((h, w) for h in BUCKET_SIDES for w in BUCKET_SIDES)
  return config

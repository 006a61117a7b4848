"""Input data: official folder layouts, robust decoding, the official augmentation, a synthetic
DIS-like set, grain pipelines and tfds builders.

  from birefnet_jax.data.config import data_config
  from birefnet_jax.data.pipeline import train_iterator, eval_examples
  from birefnet_jax.data.synthetic import SyntheticDataset
"""

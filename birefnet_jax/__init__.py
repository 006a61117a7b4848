"""BiRefNet in JAX/Flax."""

__version__ = '0.1.0'


def load_converted(directory):
  """``model, variables = load_converted(DST)`` for a directory written by the converter."""
  from birefnet_jax.convert.convert import load_converted as _load  # pylint: disable=g-import-not-at-top
  return _load(directory)

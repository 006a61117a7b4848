"""BiRefNet in JAX/Flax."""

from birefnet_jax import xla_workarounds as _xla_workarounds

__version__ = '0.1.0'

# Before any JAX computation: XLA reads its flags once (see xla_workarounds: GPU scatter-adds).
_xla_workarounds.enable_native_gpu_atomics()


def load_converted(directory):
  """``model, variables = load_converted(DST)`` for a directory written by the converter."""
  from birefnet_jax.convert.convert import load_converted as _load  # pylint: disable=g-import-not-at-top
  return _load(directory)

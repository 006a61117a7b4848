"""Shared by the tests that train the tiny quickstart model: its config (from
configs/quickstart.py's get_config(), model reduced), numpy-drawn variables (nothing compiled),
and the XLA flags that make its compilation quick."""

from pathlib import Path
import importlib.util

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# XLA's CPU optimizations off: compiling is most of the time of these short runs.
FAST_XLA = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'

# The reduced quickstart model of tests/test_multihost.py: one backbone pass, no InRef, no
# context features (the rest of the quickstart architecture kept). As main's flags:
MODEL_FLAGS = ('--config.model.mul_scl_ipt=', '--config.model.dec_ipt=False',
               '--config.model.cxt_num=0')


def quickstart_config(tiny=True):
  """configs/quickstart.py's get_config(), with the reduced model when ``tiny``."""
  # Loaded by path: configs/ on sys.path would let configs/dis.py shadow the stdlib's dis.
  spec = importlib.util.spec_from_file_location('quickstart_config', ROOT / 'configs/quickstart.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if tiny:
    config.model.mul_scl_ipt = ''
    config.model.dec_ipt = False
    config.model.cxt_num = 0
  return config


def random_variables(model_config, seed):
  """{(collection, *path): float32 array} for the model of ``model_config``, drawn with numpy
  (shapes from jax.eval_shape: nothing is compiled): kernels ~ N(0, 1/fan_in), small biases,
  norm scales ~1, BatchNorm running statistics in [1e3, 2e3] (far from the model's own init,
  mean 0 and var 1, so that where they come from shows)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from birefnet_jax.convert import names  # pylint: disable=g-import-not-at-top
  from birefnet_jax.models.birefnet import BiRefNet  # pylint: disable=g-import-not-at-top
  model = BiRefNet(model_config)
  shapes = names.flatten(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32), train=False)))
  rng = np.random.default_rng(seed)
  variables = {}
  for path, struct in shapes.items():
    shape = tuple(struct.shape)
    if path[0] == 'batch_stats':
      value = rng.uniform(1e3, 2e3, shape)
    elif path[-1] == 'kernel':
      value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
    elif path[-1] == 'scale':
      value = 1 + rng.normal(0, 0.05, shape)
    else:   # biases, Swin's relative position bias tables
      value = rng.normal(0, 0.02, shape)
    variables[path] = value.astype(np.float32)
  return variables

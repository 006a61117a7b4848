"""Reading official checkpoints into ``{key: np.ndarray}`` (safetensors without torch)."""

import os

import numpy as np

from birefnet_jax.convert.names import strip_wrapper_prefixes

NESTING_KEYS = ('model', 'state_dict', 'model_state_dict', 'module')


def _tensor_to_numpy(value):
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, 'detach'):  # a torch tensor
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` (torch) state dict.

  A torch checkpoint may nest the weights under 'model' or 'state_dict' and may carry the
  ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) prefixes; both are removed here.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such checkpoint file')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    raw = load_file(path)
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'{path}: reading a .pth checkpoint needs PyTorch '
                        "(pip install 'birefnet_jax[torch]'); .safetensors files need no torch") from e
    try:
      raw = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{path}: not a readable torch checkpoint ({e})') from e
  raw = unnest(raw, path)
  state_dict = {}
  for key, value in raw.items():
    stripped = strip_wrapper_prefixes(key)
    if stripped in state_dict:
      raise ValueError(f'{path}: key {key!r} collides with another key after removing prefixes')
    state_dict[stripped] = _tensor_to_numpy(value)
  return state_dict


def unnest(raw, path: str = '<checkpoint>') -> dict:
  """Finds the state dict inside a training checkpoint ({'model': sd, 'optimizer': ...})."""
  for _ in range(3):
    if not isinstance(raw, dict):
      raise ValueError(f'{path}: expected a state dict (a mapping of names to tensors), '
                       f'got {type(raw).__name__}')
    if all(hasattr(v, 'shape') for v in raw.values()):
      return raw
    for key in NESTING_KEYS:
      if key in raw and isinstance(raw[key], dict):
        raw = raw[key]
        break
    else:
      # Keep only tensors: a training checkpoint can carry epoch counters and such.
      tensors = {k: v for k, v in raw.items() if hasattr(v, 'shape')}
      if tensors:
        return tensors
      raise ValueError(f'{path}: found no tensors (top-level keys: {sorted(raw)[:10]})')
  return raw

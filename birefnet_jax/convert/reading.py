"""Reading official checkpoints into ``{key: np.ndarray}`` (safetensors without torch)."""

import os
import struct
import warnings

import numpy as np

from birefnet_jax.convert.names import strip_wrapper_prefixes
from birefnet_jax.errors import UserError

NESTING_KEYS = ('model', 'state_dict', 'model_state_dict', 'module')
# A safetensors header longer than this is not one (the official files have ~100 KB headers).
_MAX_SAFETENSORS_HEADER = 100 * 2**20
_SAFE_HINT = ('give the official .safetensors or .pth weights file, or save a state dict with '
              'torch.save(model.state_dict(), path)')


class UnreadableCheckpointError(UserError, ValueError):
  """A file that is not a checkpoint we can read safely; the message says what it is."""


def checkpoint_format(path: str) -> str:
  """'safetensors' or 'torch', from the file's first bytes, whatever its name ends with."""
  with open(path, 'rb') as f:
    head = f.read(16)
  if not head:
    raise UnreadableCheckpointError(f'{path}: empty file (0 bytes), not a checkpoint',
                                    'the download or copy may have failed; fetch it again')
  if head[:4] == b'PK\x03\x04':   # torch.save's zip format (torch >= 1.6)
    return 'torch'
  if len(head) >= 9 and head[8:9] == b'{':   # u64 header length, then the JSON header
    (header_length,) = struct.unpack('<Q', head[:8])
    if header_length <= _MAX_SAFETENSORS_HEADER:
      return 'safetensors'
  if head[:1] == b'\x80':   # a pickle (torch's legacy format)
    return 'torch'
  raise UnreadableCheckpointError(
      f'{path}: not a checkpoint: neither a safetensors nor a torch file (it starts with '
      f'{head[:12]!r})', _SAFE_HINT)


def _read_safetensors(path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError and friends)
    raise UnreadableCheckpointError(
        f'{path}: not a readable safetensors file, truncated or corrupt ({e})',
        'the download or copy may have been cut short; fetch it again') from None


def _torch_failure(path, error) -> UnreadableCheckpointError:
  """A message for torch.load's failure that never advises weights_only=False (a full unpickle
  runs whatever code the file holds)."""
  text = str(error)
  if 'Weights only load failed' in text:
    detail = text.split('WeightsUnpickler error:', 1)[-1].strip().splitlines()
    detail = detail[0].strip() if detail and 'WeightsUnpickler' in text else 'unsupported content'
    return UnreadableCheckpointError(
        f'{path}: holds Python objects besides tensors, which a safe load refuses ({detail})',
        'we only load torch files as plain tensors (loading anything else can run code from '
        'the file); ' + _SAFE_HINT)
  if 'zip archive' in text:
    return UnreadableCheckpointError(
        f'{path}: not a readable torch checkpoint: truncated or corrupt zip archive',
        'the download or copy may have been cut short; fetch it again')
  first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  return UnreadableCheckpointError(
      f'{path}: not a readable torch checkpoint ({type(error).__name__}: {first_line})',
      _SAFE_HINT)


def _read_torch(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UnreadableCheckpointError(
        f'{path}: reading a torch checkpoint needs PyTorch',
        "pip install 'birefnet_jax[torch]'; .safetensors files need no torch") from None
  try:
    with warnings.catch_warnings():   # e.g. "Detected pickle protocol 4": noise before our error
      warnings.simplefilter('ignore', UserWarning)
      return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise _torch_failure(path, e) from None


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

  The format is told by the file's first bytes, not its name (a safetensors file named ``.pth``
  is read as safetensors). Torch files are loaded with ``weights_only=True`` only.

  A torch checkpoint may nest the weights under 'model' or 'state_dict' and may carry the
  ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) prefixes; both are removed here.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such checkpoint file')
  if os.path.isdir(path):
    raise UnreadableCheckpointError(f'{path}: a folder, not a checkpoint file', _SAFE_HINT)
  if checkpoint_format(path) == 'safetensors':
    raw = _read_safetensors(path)
  else:
    raw = _read_torch(path)
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

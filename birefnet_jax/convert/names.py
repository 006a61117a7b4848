"""The one naming rule between official PyTorch state-dict keys and our Flax variables.

Flax module names mirror the official module names, with a list index joined to the name before
it by ``_``::

    bb.layers.2.blocks.17.attn.qkv.weight     -> params/bb/layers_2/blocks_17/attn/qkv/kernel
    decoder.gdt_convs_4.1.running_var          -> batch_stats/decoder/gdt_convs_4_1/var
    squeeze_module.0.dec_att.aspp_deforms.1... -> params/squeeze_module_0/dec_att/aspp_deforms_1/...

Leaves: a 4-D ``weight`` is a conv kernel (OIHW -> HWIO), a 2-D ``weight`` a Dense kernel
((out, in) -> (in, out)), a 1-D ``weight`` a norm ``scale``; ``bias`` stays; BatchNorm
``running_mean`` / ``running_var`` go to ``batch_stats`` as ``mean`` / ``var``. The buffers
``num_batches_tracked`` and ``relative_position_index`` carry no information the model needs
(the index is regenerated and checked by the converter).
"""

import numpy as np

WRAPPER_PREFIXES = ('module.', '_orig_mod.')
DROPPED_BUFFERS = ('num_batches_tracked', 'relative_position_index')


def strip_wrapper_prefixes(key: str) -> str:
  """Removes DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes, in any nesting."""
  changed = True
  while changed:
    changed = False
    for prefix in WRAPPER_PREFIXES:
      if key.startswith(prefix):
        key = key[len(prefix):]
        changed = True
  return key


def module_path(torch_module_key: str) -> tuple[str, ...]:
  """'decoder.gdt_convs_4.0' -> ('decoder', 'gdt_convs_4_0')."""
  out: list[str] = []
  for part in torch_module_key.split('.'):
    if part.isdigit() and out:
      out[-1] = f'{out[-1]}_{part}'
    else:
      out.append(part)
  return tuple(out)


def torch_to_flax(key: str, value: np.ndarray):
  """Maps one state-dict entry to ``(collection, path, array)``, or None for dropped buffers."""
  module, _, leaf = key.rpartition('.')
  if leaf in DROPPED_BUFFERS:
    return None
  path = module_path(module)
  if leaf == 'weight':
    if value.ndim == 4:
      return 'params', path + ('kernel',), np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
      return 'params', path + ('kernel',), np.transpose(value, (1, 0))
    if value.ndim == 1:
      return 'params', path + ('scale',), value
    raise ValueError(f'{key}: a weight of unexpected rank {value.ndim} (shape {value.shape})')
  if leaf == 'bias':
    return 'params', path + ('bias',), value
  if leaf == 'running_mean':
    return 'batch_stats', path + ('mean',), value
  if leaf == 'running_var':
    return 'batch_stats', path + ('var',), value
  return 'params', path + (leaf,), value


def to_torch_layout(key: str, value: np.ndarray) -> np.ndarray:
  """The inverse array transform of :func:`torch_to_flax` for the entry ``key`` (e.g. gradients)."""
  leaf = key.rpartition('.')[2]
  if leaf == 'weight' and value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  if leaf == 'weight' and value.ndim == 2:
    return np.transpose(value, (1, 0))
  return value


def nest(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
  """{('a', 'b'): x} -> {'a': {'b': x}}."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
  out = {}
  for name, value in tree.items():
    if isinstance(value, dict) or hasattr(value, 'items'):
      out.update(flatten(dict(value), prefix + (name,)))
    else:
      out[prefix + (name,)] = value
  return out

"""Official PyTorch state dict -> (model config, Flax variables), checked 1:1 against the model."""

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from birefnet_jax import writing
from birefnet_jax.convert import infer, names
from birefnet_jax.convert.reading import read_state_dict
from birefnet_jax.errors import UserError

CONFIG_FILE = 'model_config.json'
VARIABLES_DIR = 'variables'
BACKBONE_MARKER = 'BACKBONE_ONLY'
# Everything the converter writes at the top of DST. --overwrite replaces a folder only when it
# holds these and nothing else (see ``check_destination``).
CONVERTER_ENTRIES = (CONFIG_FILE, VARIABLES_DIR, BACKBONE_MARKER)


class CheckpointMismatchError(ValueError):
  """A checkpoint does not map 1:1 onto the model; the message lists the differences."""


def abstract_variables(cfg, height: int = 64, width: int = 64):
  """Shapes and dtypes of the model's variables, without allocating them."""
  from birefnet_jax.models.birefnet import BiRefNet  # pylint: disable=g-import-not-at-top
  model = BiRefNet(cfg)
  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)


def _format_list(title, items, limit=40):
  items = sorted(items)
  shown = '\n    '.join(items[:limit])
  more = f'\n    ... and {len(items) - limit} more' if len(items) > limit else ''
  return f'  {title} ({len(items)}):\n    {shown}{more}'


def map_state_dict(state_dict, expected, *, source='checkpoint', key_prefix='', allow_missing=(),
                   materialize=True):
  """Maps torch entries onto the flat expected Flax tree {(collection, *path): ShapeDtypeStruct}.

  Returns (flat variables, ignored keys); ``materialize=False`` only checks names and shapes
  (the arrays stay views, e.g. of zero-stride stand-ins of a manifest). Raises CheckpointMismatchError listing missing,
  unexpected and mis-shaped entries.
  """
  flat, unexpected, mis_shaped, ignored = {}, [], [], []
  for key, value in state_dict.items():
    mapped = names.torch_to_flax(key, np.asarray(value))
    if mapped is None:
      ignored.append(key)
      continue
    collection, path, array = mapped
    full = (collection,) + path
    if full not in expected:
      unexpected.append(key_prefix + key)
      continue
    if tuple(array.shape) != tuple(expected[full].shape):
      mis_shaped.append(f'{key_prefix}{key}: checkpoint {tuple(value.shape)} -> {tuple(array.shape)}, '
                        f'model expects {tuple(expected[full].shape)} at {"/".join(full)}')
      continue
    if materialize and np.issubdtype(array.dtype, np.floating):
      array = np.ascontiguousarray(array, dtype=np.float32)
    flat[full] = array
  missing = ['/'.join(p) for p in expected if p not in flat and not any(
      '/'.join(p).startswith(a) for a in allow_missing)]
  if missing or unexpected or mis_shaped:
    parts = [f'{source} does not match the model 1:1:']
    if missing:
      parts.append(_format_list('missing (in the model, not in the checkpoint)', missing))
    if unexpected:
      parts.append(_format_list('unexpected (in the checkpoint, not in the model)', unexpected))
    if mis_shaped:
      parts.append(_format_list('shape mismatch', mis_shaped))
    raise CheckpointMismatchError('\n'.join(parts))
  return flat, ignored


def _check_relative_position_index(state_dict, cfg, source):
  from birefnet_jax.models.swin import relative_position_index  # pylint: disable=g-import-not-at-top
  if cfg.backbone.family != 'swin':
    return
  expected = np.asarray(relative_position_index(cfg.backbone.window_size))
  for key, value in state_dict.items():
    if key.endswith('relative_position_index') and not np.array_equal(np.asarray(value), expected):
      raise CheckpointMismatchError(f'{source}: {key} differs from the index of window size '
                                    f'{cfg.backbone.window_size}')


def convert_state_dict(state_dict, *, inref_order: str = 'current', source: str = 'checkpoint',
                       pvt_heads=infer.PVT_DEFAULT_HEADS, dino_heads=None, dino_out_indices=None):
  """Full official BiRefNet state dict -> (model config, {'params', 'batch_stats'} of numpy).

  ``dino_heads`` / ``dino_out_indices``: a DINOv3 backbone's head count and out indices, which
  no tensor shape shows (default: those of the official preset of the same widths).
  """
  state_dict = {names.strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
  cfg = infer.infer_model_config(state_dict, inref_order=inref_order, pvt_heads=pvt_heads,
                                 dino_heads=dino_heads, dino_out_indices=dino_out_indices)
  expected = names.flatten(abstract_variables(cfg))
  flat, _ = map_state_dict(state_dict, expected, source=source)
  _check_relative_position_index(state_dict, cfg, source)
  variables = names.nest(flat)
  variables.setdefault('batch_stats', {})
  return cfg, variables


def _classifier_only(key: str) -> bool:
  """Keys of ImageNet classification checkpoints that a segmentation backbone has no use for."""
  return (key.startswith(('head.', 'norm.', 'fc.', 'pre_logits.')) or key == 'absolute_pos_embed'
          or key.endswith(('attn_mask', 'relative_position_index', 'num_batches_tracked')))


def convert_backbone_state_dict(state_dict, *, source: str = 'checkpoint',
                                pvt_heads=infer.PVT_DEFAULT_HEADS, dino_heads=None,
                                dino_out_indices=None):
  """Official Swin/PVTv2 ImageNet weights, or timm DINOv3 weights (bare timm keys or those of
  the features_only model, ``model.*``) -> (backbone config, {'params': {'bb': ...}}, ignored).

  Extra classification keys (head.*, the final norm, attn_mask buffers) are ignored and reported.
  The per-stage output norms norm0..3 (Swin) that the ImageNet files lack keep their identity
  initialization, as in the official ``load_weights``; they are reported as missing.
  """
  state_dict = {names.strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
  if any(k.startswith('bb.') for k in state_dict):
    state_dict = {k[3:]: v for k, v in state_dict.items() if k.startswith('bb.')}
  dino = 'cls_token' in state_dict or 'model.cls_token' in state_dict
  if dino:   # compare timm's own names, then nest them under the features_only wrapper's `model`
    state_dict = {k[len('model.'):] if k.startswith('model.') else k: v
                  for k, v in state_dict.items()}
  ignored = sorted(k for k in state_dict if _classifier_only(k) or (dino and k.startswith('rope.')))
  kept = {k: v for k, v in state_dict.items() if k not in ignored}
  if dino:
    kept = {f'model.{k}': v for k, v in kept.items()}
  bb_cfg = infer.infer_backbone(kept, '', pvt_heads, dino_heads, dino_out_indices)
  from birefnet_jax.models.birefnet import build_backbone  # pylint: disable=g-import-not-at-top
  backbone = build_backbone(bb_cfg, None, name=None)
  abstract = jax.eval_shape(lambda x: backbone.init(jax.random.PRNGKey(0), x),
                            jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  expected = names.flatten(abstract)
  norms = tuple(f'params/norm{s}' for s in range(5))
  flat, _ = map_state_dict(kept, expected, source=source, allow_missing=norms)
  missing = sorted('/'.join(p) for p in expected if p not in flat)
  params = names.nest({p[1:]: v for p, v in flat.items()})
  return bb_cfg, {'params': {'bb': params}}, {'ignored': ignored, 'missing': missing}


def config_to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=_json_value)


def _json_value(value):
  """Numpy scalars (a width computed from tensor shapes) as Python numbers, tuples as lists."""
  if isinstance(value, np.generic):
    return value.item()
  return list(value)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  from birefnet_jax.models import config as config_lib  # pylint: disable=g-import-not-at-top
  data = json.loads(text)
  cfg = config_lib.model_config('swin_v1_l')
  backbone = data.pop('backbone')
  family = backbone.get('family')
  if family == 'swin':
    cfg.backbone = config_lib.swin_config(backbone['embed_dim'], backbone['depths'],
                                          backbone['num_heads'], backbone['window_size'],
                                          backbone.get('drop_path_rate', 0.2))
  elif family == 'pvt_v2':
    cfg.backbone = config_lib.pvt_config(backbone['embed_dims'], backbone['num_heads'],
                                         backbone['mlp_ratios'], backbone['depths'],
                                         backbone['sr_ratios'], backbone.get('drop_path_rate', 0.1))
  elif family == 'dino_v3':
    cfg.backbone = config_lib.dino_v3_config(
        backbone['embed_dim'], backbone['depth'], backbone['num_heads'], backbone['mlp_hidden'],
        backbone['swiglu'], backbone['out_indices'], timm_name=backbone.get('timm_name', ''))
    for key in ('num_reg_tokens', 'rope_temperature'):
      if key in backbone:
        cfg.backbone[key] = backbone[key]
  else:
    raise ValueError(f'unknown backbone family {family!r} in the model config')
  for key in ('mlp_ratio', 'patch_size'):
    if key in backbone:
      cfg.backbone[key] = backbone[key]
  unknown = sorted(set(data) - set(cfg.keys()))
  if unknown:
    raise ValueError(f'unknown model config fields {unknown}')
  cfg.update(data)
  return cfg


def is_converter_output(directory: str) -> bool:
  """Whether ``directory`` is a folder the converter wrote: ``model_config.json`` (a file) and
  ``variables/`` (a folder), optionally ``BACKBONE_ONLY``, and nothing else; or empty."""
  entries = set(os.listdir(directory))
  if not entries:
    return True
  return (entries <= set(CONVERTER_ENTRIES)
          and os.path.isfile(os.path.join(directory, CONFIG_FILE))
          and os.path.isdir(os.path.join(directory, VARIABLES_DIR)))


def check_destination(directory: str, overwrite: bool = False):
  """Raises a UserError unless the converter may write ``directory``: it does not exist, or it
  is an earlier converter output (or an empty folder) and ``overwrite`` is set; and its parent
  is a folder we can write in. Nothing else is ever replaced."""
  directory = os.path.abspath(os.fspath(directory))
  if os.path.islink(directory):
    raise UserError(f'DST {directory} is a symbolic link; the converter replaces only a folder '
                    'it wrote', 'choose a new DST')
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise UserError(f'DST {directory} is a file; the converter writes a folder, and '
                    '--overwrite never replaces a file', 'choose a new DST')
  if os.path.isdir(directory):
    if not is_converter_output(directory):
      foreign = sorted(set(os.listdir(directory)) - set(CONVERTER_ENTRIES)) or sorted(
          os.listdir(directory))
      shown = ', '.join(foreign[:5]) + (', ...' if len(foreign) > 5 else '')
      raise UserError(f'DST {directory} exists and is not a converter output (it holds '
                      f'{shown}); the converter never replaces it, even with --overwrite',
                      'choose a new DST (a converter output holds only model_config.json, '
                      'variables/ and BACKBONE_ONLY)')
    if not overwrite:
      raise UserError(f'DST {directory} exists', 'pass --overwrite to replace it')
  writing.check_can_create_in(os.path.dirname(directory), f'DST {directory}')


def save_converted(directory: str, cfg, variables, *, overwrite: bool = False,
                   extra_files=None):
  """Writes ``directory/variables`` (orbax), ``directory/model_config.json`` and
  ``extra_files`` ({name: text}) into a folder beside it, then renames that into place: DST is
  complete or absent. An existing DST is replaced only if ``check_destination`` allows it."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  check_destination(directory, overwrite)
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  staging = writing.make_staging_folder(directory)
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(staging, VARIABLES_DIR), jax.tree.map(np.asarray, variables))
    checkpointer.wait_until_finished()
    for name, text in {CONFIG_FILE: config_to_json(cfg), **(extra_files or {})}.items():
      with open(os.path.join(staging, name), 'w') as f:
        f.write(text)
    _replace_folder(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _replace_folder(staging: str, directory: str):
  """Moves ``staging`` to ``directory``; an earlier converter output there (checked again now,
  just before) is moved aside first and deleted only once the new one is in place."""
  if not os.path.exists(directory):
    os.replace(staging, directory)
    return
  if os.path.islink(directory) or not os.path.isdir(directory) or not is_converter_output(
      directory):
    raise UserError(f'DST {directory} changed while converting and is no longer a converter '
                    'output; left as it is')
  old = tempfile.mkdtemp(prefix='.' + os.path.basename(directory) + '.old.',
                         dir=os.path.dirname(directory))
  os.rmdir(old)   # only its unique name is wanted
  os.replace(directory, old)
  os.replace(staging, directory)
  shutil.rmtree(old)


def load_converted(directory: str):
  """(model, variables) from a directory written by ``save_converted`` / the converter tool."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from birefnet_jax.models.birefnet import BiRefNet  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  if os.path.exists(os.path.join(directory, BACKBONE_MARKER)):
    raise ValueError(f'{directory} holds only backbone weights (from an ImageNet checkpoint): use '
                     'it to initialize training (config.init_from), not for inference')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{directory}: no {CONFIG_FILE}; not a converted BiRefNet checkpoint '
                            '(make one with tools/convert_torch_weights.py)')
  with open(config_path) as f:
    cfg = config_from_json(f.read())
  model = BiRefNet(cfg)
  expected = abstract_variables(cfg)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), expected)
  variables = ocp.StandardCheckpointer().restore(os.path.join(directory, VARIABLES_DIR), abstract)
  return model, variables


def convert_file(src: str, dst: str | None = None, *, inref_order: str = 'current',
                 overwrite: bool = False, backbone_only: bool | None = None,
                 dino_heads=None, dino_out_indices=None):
  """Reads ``src``, converts (full model or backbone), optionally writes ``dst``.

  ``dino_heads`` / ``dino_out_indices``: see ``convert_state_dict`` (full models only).
  """
  if dst is not None:   # before the (long) reading and converting
    check_destination(dst, overwrite)
  state_dict = read_state_dict(src)
  if backbone_only is None:
    stripped = [names.strip_wrapper_prefixes(k) for k in state_dict]
    backbone_only = not any(k.startswith('decoder.') for k in stripped)
  if backbone_only:
    bb_cfg, variables, report = convert_backbone_state_dict(state_dict, source=src)
    from birefnet_jax.models import config as config_lib  # pylint: disable=g-import-not-at-top
    cfg = config_lib.model_config('swin_v1_l')
    cfg.backbone = bb_cfg
  else:
    cfg, variables = convert_state_dict(state_dict, inref_order=inref_order, source=src,
                                        dino_heads=dino_heads, dino_out_indices=dino_out_indices)
    report = {'ignored': [], 'missing': []}
  if dst is not None:
    marker = {BACKBONE_MARKER: 'This checkpoint holds only backbone weights (params/bb), for '
                               'initializing training.\n'} if backbone_only else None
    save_converted(dst, cfg, variables, overwrite=overwrite, extra_files=marker)
  return cfg, variables, backbone_only, report


def load_converted_backbone(directory: str):
  """(backbone config, {'params': {'bb': ...}}) from a backbone-only converter output."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    cfg = config_from_json(f.read())
  variables = ocp.StandardCheckpointer().restore(os.path.join(directory, VARIABLES_DIR))
  return cfg.backbone, {'params': {'bb': variables['params']['bb']}}

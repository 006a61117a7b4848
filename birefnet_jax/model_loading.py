"""One loader for every place a model's weights can come from.

A *checkpoint* here is either
  - a converter output (``tools/convert_torch_weights.py``): ``DIR/model_config.json`` +
    ``DIR/variables/`` (a whole BiRefNet, or an ImageNet backbone marked ``BACKBONE_ONLY``), or
  - a training workdir (``python -m birefnet_jax.main --workdir W``): ``W/model_config.json``
    (the converter's format), ``W/config.json`` (the whole training config) and the orbax
    checkpoints in ``W/checkpoints/<step>``.

``load(path)`` gives the model, its inference variables and the resolution it was trained at
(the training resolution for a workdir; None for a converter output). A workdir's checkpoint is
the best one by the run's validation metric by default, else the latest; ``step='latest'`` or a
step number chooses another. ``load_init_variables`` + ``merge_pretrained`` are what
``config.init_from`` uses to start a run from any of them.
"""

import dataclasses
import json
import os
from typing import Optional, Union

import jax
import numpy as np

from birefnet_jax.convert import hub, names, releases
from birefnet_jax.convert.convert import (CONFIG_FILE, VARIABLES_DIR, config_from_json,
                                          load_converted, load_converted_backbone)

TRAINING_CONFIG_FILE = 'config.json'   # the training run's whole config (W/config.json)
CHECKPOINTS_DIR = 'checkpoints'        # W/checkpoints/<step>


@dataclasses.dataclass
class Loaded:
  model: object                               # birefnet_jax.models.birefnet.BiRefNet
  variables: dict                             # {'params': ..., 'batch_stats': ...}
  resolution: Optional[tuple[int, int]]       # (height, width) trained at; None: unknown
  description: str                            # what was loaded, for messages


def is_converter_output(path: str) -> bool:
  return os.path.isdir(os.path.join(path, VARIABLES_DIR))


def is_training_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, CHECKPOINTS_DIR))


def _training_config(workdir: str) -> dict:
  path = os.path.join(workdir, TRAINING_CONFIG_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _complete_steps(checkpoints_dir: str) -> list[int]:
  """Steps whose checkpoint was completely written (orbax renames a step's temporary directory
  to the bare number only when it is complete)."""
  if not os.path.isdir(checkpoints_dir):
    return []
  return sorted(int(d) for d in os.listdir(checkpoints_dir)
                if d.isdigit() and os.path.isdir(os.path.join(checkpoints_dir, d)))


def _best_step(checkpoints_dir: str, steps: list[int], metric: str, mode: str) -> Optional[int]:
  """The step whose saved validation ``metric`` is best, or None when none has it (the
  metrics are those the run saved with each validated checkpoint)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(checkpoints_dir)   # saves and deletes nothing unless asked
  try:
    scored = []
    for step in steps:
      metrics = manager.metrics(step) or {}
      if metric in metrics and np.isfinite(float(metrics[metric])):
        scored.append((float(metrics[metric]), step))
  finally:
    manager.close()
  if not scored:
    return None
  # Ties go to the later step, as orbax's own ranking.
  return (max(scored) if mode == 'max' else min(scored, key=lambda s: (s[0], -s[1])))[1]


def choose_step(workdir: str, step: Union[str, int, None] = 'best') -> tuple[int, str]:
  """(step, why) of the checkpoint to load from a training workdir.

  ``'best'`` (or None): the best by the run's ``best_metric`` among the validated checkpoints,
  else the latest; ``'latest'``; or a step number that must exist.
  """
  checkpoints_dir = os.path.join(workdir, CHECKPOINTS_DIR)
  steps = _complete_steps(checkpoints_dir)
  if not steps:
    raise FileNotFoundError(f'{workdir}: training workdir without a complete checkpoint in '
                            f'{checkpoints_dir} (has the run saved one yet?)')
  step = 'best' if step is None else step
  if str(step).isdigit():
    if int(step) not in steps:
      raise FileNotFoundError(f'{workdir}: no checkpoint of step {int(step)}; saved steps: '
                              f'{", ".join(map(str, steps))}')
    return int(step), 'as asked'
  if step == 'latest':
    return steps[-1], 'latest'
  if step != 'best':
    raise ValueError(f"checkpoint step must be 'best', 'latest' or a step number, got {step!r}")
  config = _training_config(workdir)
  metric = config.get('best_metric')
  if metric:
    best = _best_step(checkpoints_dir, steps, metric, config.get('best_mode', 'max'))
    if best is not None:
      return best, f'best {metric}'
  return steps[-1], 'latest (no validated checkpoint)'


def _restore_state(checkpoint_dir: str):
  """The train state saved in one orbax step directory, as nested dicts of numpy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  restored = checkpointer.restore(
      checkpoint_dir, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  checkpointer.close()
  return restored['state']


def _variables_of_state(state) -> dict:
  get = (lambda k: state[k]) if isinstance(state, dict) else (lambda k: getattr(state, k))
  variables = {'params': get('params')}
  batch_stats = get('batch_stats')
  if batch_stats:
    variables['batch_stats'] = batch_stats
  return variables


def load_workdir(workdir: str, step: Union[str, int, None] = 'best') -> Loaded:
  from birefnet_jax.models.birefnet import BiRefNet  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{workdir}: training workdir without {CONFIG_FILE}; cannot rebuild '
                            'the model')
  with open(config_path) as f:
    cfg = config_from_json(f.read())
  chosen, why = choose_step(workdir, step)
  state = _restore_state(os.path.join(workdir, CHECKPOINTS_DIR, str(chosen)))
  size = _training_config(workdir).get('data', {}).get('image_size')
  resolution = (int(size[0]), int(size[1])) if size else None
  return Loaded(BiRefNet(cfg), _variables_of_state(state), resolution,
                f'{workdir} (step {chosen}, {why})')


def load_release(name: str) -> Loaded:
  """An official release by its Hub name ('ZhengPeng7/BiRefNet_lite[@revision]'): downloaded and
  converted on first use into the cache (``convert.hub``), loaded from there after that, with
  the release's training resolution."""
  repo_id, revision = hub.parse_hub_name(name)
  folder = hub.converted_release(repo_id, revision)
  model, variables = load_converted(folder)
  release = releases.find_release(repo_id)
  return Loaded(model, variables, release.resolution, f'{name} ({folder})')


def load(path: str, step: Union[str, int, None] = None) -> Loaded:
  """The model and inference variables of a converter output, a training workdir, or an
  official release named by its Hub repo id (``load_release``)."""
  if not os.path.exists(os.fspath(path)) and hub.parse_hub_name(os.fspath(path)):
    if step not in (None, 'best', 'latest'):
      raise ValueError(f'{path} is an official release (one set of weights): --step does not '
                       'apply')
    return load_release(os.fspath(path))
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such checkpoint directory')
  if is_converter_output(path):
    if step not in (None, 'best', 'latest'):
      raise ValueError(f'{path} is a converter output (one set of weights): --step does not '
                       'apply')
    model, variables = load_converted(path)
    return Loaded(model, variables, None, path)
  if is_training_workdir(path):
    return load_workdir(path, step)
  raise FileNotFoundError(
      f'{path}: neither a converted checkpoint ({CONFIG_FILE} + {VARIABLES_DIR}/, from '
      f'tools/convert_torch_weights.py) nor a training workdir ({CONFIG_FILE} + '
      f'{CHECKPOINTS_DIR}/, from python -m birefnet_jax.main)')


def load_model(path: str, step: Union[str, int, None] = None):
  """``(model, variables)`` of a converter output or a training workdir (see ``load``)."""
  loaded = load(path, step)
  return loaded.model, loaded.variables


# ----------------------------------------------------------------------------------------------
# Starting a run from existing weights (config.init_from).
# ----------------------------------------------------------------------------------------------

def load_init_variables(path: str):
  """Variables to start training from: a converted BiRefNet, a converted ImageNet backbone
  (``params/bb`` only), or a training workdir (its best checkpoint, else its latest)."""
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(os.path.join(path, 'BACKBONE_ONLY')):
    _, variables = load_converted_backbone(path)
    return variables
  return load(path).variables


def merge_pretrained(variables, loaded, source: str, log=print):
  """Copies the leaves of ``loaded`` whose path and shape exist in ``variables``.

  Returns the merged tree and a report (missing / unexpected / shape-mismatched paths), so a
  converted backbone fills ``params/bb`` and leaves the decoder at its random initialization.
  """
  want = names.flatten(variables)
  have = names.flatten(loaded)
  merged, mismatched = {}, []
  for path, value in want.items():
    if path in have and tuple(have[path].shape) == tuple(value.shape):
      merged[path] = np.asarray(have[path], dtype=value.dtype)
    else:
      if path in have:
        mismatched.append(f'{"/".join(path)}: {tuple(have[path].shape)} vs model '
                          f'{tuple(value.shape)}')
      merged[path] = value
  missing = sorted('/'.join(p) for p in want if p not in have)
  unexpected = sorted('/'.join(p) for p in have if p not in want)
  loaded_count = len(want) - len(missing) - len(mismatched)
  log(f'init_from {source}: loaded {loaded_count}/{len(want)} arrays; missing {len(missing)}, '
      f'unexpected {len(unexpected)}, shape mismatch {len(mismatched)}')
  for title, items in (('missing (kept random)', missing), ('unexpected (ignored)', unexpected),
                       ('shape mismatch (kept random)', mismatched)):
    if items:
      shown = ', '.join(items[:12]) + (f', ... (+{len(items) - 12})' if len(items) > 12 else '')
      log(f'  {title}: {shown}')
  return names.nest(merged), dict(missing=missing, unexpected=unexpected, mismatched=mismatched)

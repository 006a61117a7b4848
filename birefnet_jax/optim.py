"""Optimizer and learning-rate schedules of the official BiRefNet recipe, plus common options.

Official (train.py, config.py): ``AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)`` over
*all* parameters (no no-decay groups: norms, biases and Swin's bias tables decay too),
``lr = base * sqrt(batch_size / 4)`` with base 1e-4 for DIS5K and 1e-5 otherwise, and
``MultiStepLR(milestones=[1e5], gamma=0.5)`` stepped once per epoch - i.e. a constant lr.
No warmup, clipping or gradient accumulation; they are options here (off by default).

Schedules are functions of the optimizer update count (0 for the first update), i.e. they count
*optimizer updates*; with gradient accumulation ``steps_per_epoch`` must be given in updates.
"""

import math
from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ('step', 'cosine', 'constant')

_BASE_LR = {'DIS5K': 1e-4, 'COD': 1e-5, 'HRSOD': 1e-5, 'General': 1e-5, 'General-2K': 1e-5,
            'Matting': 1e-5}
# train.sh epochs per task.
_EPOCHS = {'DIS5K': 500, 'COD': 150, 'HRSOD': 150, 'General': 200, 'General-2K': 250,
           'Matting': 150}


def official_learning_rate(task: str = 'DIS5K', global_batch_size: int = 8) -> float:
  """``config.lr``: 1e-4 (DIS5K) or 1e-5 (other tasks) times sqrt(batch / 4).

  The official code scales by its per-process batch (8, not multiplied by the number of GPUs);
  with one data-parallel replica that is the global batch.
  """
  if task not in _BASE_LR:
    raise ValueError(f'optim.official_learning_rate: unknown task {task!r}; expected one of '
                     f'{tuple(_BASE_LR)}')
  if global_batch_size <= 0:
    raise ValueError(f'optim.official_learning_rate: batch size must be > 0, got '
                     f'{global_batch_size}')
  return _BASE_LR[task] * math.sqrt(global_batch_size / 4)


def official_epochs(task: str = 'DIS5K') -> int:
  """Training epochs of train.sh for ``task``."""
  if task not in _EPOCHS:
    raise ValueError(f'optim.official_epochs: unknown task {task!r}; expected one of '
                     f'{tuple(_EPOCHS)}')
  return _EPOCHS[task]


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
  """Optimizer settings; the defaults are the official recipe's.

  Fields:
    lr: peak learning rate; None -> the official rule, ``official_learning_rate(task, global
      batch)``, which train.py resolves from the run's task and batch.
    schedule: 'step' (MultiStepLR per epoch), 'cosine' (to ``cosine_final_ratio * lr`` at the
      end of training) or 'constant'.
    decay_epochs, decay_rate: MultiStepLR milestones (epochs; a negative entry N means
      ``epochs + N + 1``, as train.py) and gamma. Official: (1e5,), 0.5 -> constant lr.
    warmup_steps: linear warmup over this many optimizer updates (0: none); multiplies the
      schedule, the first update uses lr / warmup_steps.
    clip_grad_norm: clip the (accumulated) gradient to this global norm (None/0: no clipping).
    grad_accum_steps: average the gradients of this many micro-steps per update (optax.MultiSteps).
    weight_decay, b1, b2, eps: AdamW (decoupled decay, applied to every parameter).
  The number of epochs (for negative ``decay_epochs`` and 'cosine') is the run's, passed to
  ``make_optimizer``.
  """
  cfg = ml_collections.ConfigDict(dict(
      lr=ml_collections.config_dict.placeholder(float),
      schedule='step',
      decay_epochs=(100000,),
      decay_rate=0.5,
      cosine_final_ratio=0.0,
      warmup_steps=0,
      clip_grad_norm=ml_collections.config_dict.placeholder(float),
      grad_accum_steps=1,
      weight_decay=1e-2,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
  ))
  for key, value in overrides.items():
    if key not in cfg:
      raise ValueError(f'optim.optimizer_config: unknown field {key!r}; fields: '
                       f'{sorted(cfg.keys())}')
    cfg[key] = value
  return cfg


def milestone_epochs(decay_epochs, epochs: int) -> Tuple[float, ...]:
  """train.py's milestones: ``lde if lde > 0 else epochs + lde + 1``."""
  return tuple(float(m) if m > 0 else float(epochs + m + 1) for m in decay_epochs)


def make_schedule(cfg, steps_per_epoch: int, *, epochs=None, lr=None) -> Callable:
  """The learning rate as a function of the optimizer update count (jnp-traceable).

  ``lr`` (default ``cfg.lr``) is the peak; ``epochs`` is needed by 'cosine' and by negative
  ``decay_epochs``.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f'optim.make_schedule: steps_per_epoch must be > 0, got {steps_per_epoch}')
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f'optim: unknown schedule {cfg.schedule!r}; expected one of {SCHEDULES}')
  peak = cfg.lr if lr is None else lr
  if peak is None:
    raise ValueError('optim: no learning rate: set optim.lr, or pass the official one '
                     '(official_learning_rate(task, global_batch_size))')
  peak = float(peak)
  warmup = int(cfg.warmup_steps or 0)
  if warmup < 0:
    raise ValueError(f'optim: warmup_steps must be >= 0, got {warmup}')

  def needs_epochs():
    if epochs is None:
      raise ValueError(f'optim: the {cfg.schedule!r} schedule with decay_epochs '
                       f'{tuple(cfg.decay_epochs)} needs the number of epochs')
    return int(epochs)

  if cfg.schedule == 'step':
    # MultiStepLR is stepped at the end of every epoch: during the epoch after `e` complete
    # epochs the lr is peak * gamma ** #{milestones m <= e}.
    milestones = jnp.asarray(milestone_epochs(
        cfg.decay_epochs, needs_epochs() if min(cfg.decay_epochs) <= 0 else 0))
    gamma = float(cfg.decay_rate)

    def main(step):
      epochs_done = jnp.floor_divide(step, steps_per_epoch)
      n_decays = jnp.sum(milestones <= epochs_done)
      return peak * jnp.power(gamma, n_decays)
  elif cfg.schedule == 'cosine':
    total = needs_epochs() * steps_per_epoch
    decay_steps = max(total - warmup, 1)
    floor = float(cfg.cosine_final_ratio)

    def main(step):
      progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
      return peak * (floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
  else:
    def main(step):
      return jnp.full((), peak)

  def schedule(step):
    step = jnp.asarray(step)
    lr = main(step)
    if warmup > 0:
      lr = lr * jnp.minimum(1.0, (step + 1) / warmup)
    return lr.astype(jnp.float32)

  return schedule


FROZEN, TRAINED = 'frozen', 'trained'


def freeze_top_level(tx, frozen: tuple[str, ...]):
  """``tx`` on every parameter except the top-level subtrees named in ``frozen`` (e.g. 'bb'),
  which get zero updates and no optimizer state: no AdamW step, no weight decay. The official
  ``freeze_bb`` sets ``requires_grad = False`` on the backbone, which torch's AdamW then skips."""
  frozen = tuple(frozen)
  if not frozen:
    return tx

  def labels(params):
    return {name: jax.tree.map(lambda _, n=name: FROZEN if n in frozen else TRAINED, subtree)
            for name, subtree in params.items()}
  return optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()}, labels)


def make_optimizer(opt_cfg, steps_per_epoch: int, *, epochs=None, lr=None, frozen=()):
  """``(optax.GradientTransformation, schedule_fn)`` for ``opt_cfg`` (see ``optimizer_config``);
  ``steps_per_epoch`` counts optimizer updates, ``epochs`` and ``lr`` as in ``make_schedule``;
  ``frozen`` names top-level parameter subtrees the optimizer leaves as they are ('bb' for a
  frozen backbone, see ``freeze_top_level``).

  The chain is [clip by global norm] -> AdamW(schedule), wrapped in ``optax.MultiSteps`` when
  ``grad_accum_steps > 1`` (the clipping then sees the averaged gradient). ``optax.adamw``
  applies the decoupled decay ``-lr * wd * p`` on every parameter, which is torch's AdamW
  ``p * (1 - lr * wd)`` up to rounding.
  """
  schedule = make_schedule(opt_cfg, steps_per_epoch, epochs=epochs, lr=lr)
  parts = []
  if opt_cfg.clip_grad_norm:
    if opt_cfg.clip_grad_norm < 0:
      raise ValueError(f'optim: clip_grad_norm must be > 0, got {opt_cfg.clip_grad_norm}')
    parts.append(optax.clip_by_global_norm(float(opt_cfg.clip_grad_norm)))
  parts.append(optax.adamw(learning_rate=schedule, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2),
                           eps=float(opt_cfg.eps), weight_decay=float(opt_cfg.weight_decay)))
  tx = parts[0] if len(parts) == 1 else optax.chain(*parts)
  tx = freeze_top_level(tx, frozen)
  accum = int(opt_cfg.grad_accum_steps or 1)
  if accum < 1:
    raise ValueError(f'optim: grad_accum_steps must be >= 1, got {accum}')
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
  return tx, schedule

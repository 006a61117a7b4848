"""Checkpoints of a training run: orbax ``CheckpointManager`` with the data iterator inside.

A checkpoint of step s holds (one orbax item each):

  state      the train state after s steps (params, batch_stats, opt_state, step), saved
             asynchronously (device -> host copy before ``save`` returns, writing in background);
  data_iter  the grain iterator's state after the s batches it has produced (one JSON file per
             process), so that a restarted run sees exactly the batches an uninterrupted one sees;
  meta       a small JSON (config of the run, wall time) for humans.

Kept: the latest ``keep`` checkpoints, plus the best one by a validation metric. orbax's
``max_to_keep`` together with ``best_fn`` would keep the N *best* and delete the newest, so the
retention is an explicit ``AnyPreservationPolicy([LatestN, BestN])``; checkpoints saved without
metrics (between validations) are kept only by ``LatestN``.

orbax writes a step to a temporary directory and renames it when complete, so a run killed
(even with kill -9) in the middle of a save resumes from the previous complete checkpoint.
"""

import logging as std_logging
import signal
import threading
import time
from typing import Any, Optional

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from birefnet_jax.errors import UserError


class _DropUnrankedSaveWarning(std_logging.Filter):
  """orbax warns on every save without metrics when a best metric is tracked; between
  validations that is what we do on purpose."""

  def filter(self, record):
    return 'did not provide metrics' not in record.getMessage()


_UNRANKED_FILTER = _DropUnrankedSaveWarning()


class CheckpointSaveError(UserError):
  """A checkpoint could not be written: training must not go on without it. The command line
  reports it in one line (no traceback) and exits 1."""

  def __init__(self, message: str):
    super().__init__(message, 'fix the cause (disk space, permissions, the path) and run the same '
                     'command again: it resumes from the last complete checkpoint')


def _cause(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0] if len(text) < 2000 else text[:2000]


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs in ``directory``."""

  def __init__(self, directory: str, *, keep: int = 2, best_metric: Optional[str] = None,
               best_mode: str = 'max', async_save: bool = True):
    if best_mode not in ('max', 'min'):
      raise ValueError(f"checkpoint best_mode must be 'max' or 'min', got {best_mode!r}")
    if keep < 1:
      raise ValueError(f'checkpoint keep must be >= 1 (the latest is needed to resume), got {keep}')
    self.best_metric = best_metric
    logging.get_absl_logger().addFilter(_UNRANKED_FILTER)
    keep_policies = [policies.LatestN(n=keep)]
    best_fn = None
    if best_metric:
      best_fn = lambda metrics: float(metrics[best_metric])
      keep_policies.append(policies.BestN(get_metric_fn=best_fn, reverse=(best_mode == 'min'),
                                          n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep_policies),
        # best_fn also has to be set, else best_step() answers the latest step.
        best_fn=best_fn, best_mode=best_mode,
        enable_async_checkpointing=async_save,
        create=True)
    self.directory = directory
    self.manager = ocp.CheckpointManager(directory, options=options)
    self._unchecked_step = None   # the step of a background save not yet known to be complete

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self.manager.best_step() if self.best_metric else None

  def save(self, step: int, state, data_iter=None, *, metrics: Optional[dict] = None,
           meta: Optional[dict] = None) -> bool:
    """Starts saving ``state`` (and the iterator position) as checkpoint ``step``.

    Returns once the arrays are copied off the devices: the caller may donate ``state`` to the
    next train step right away. ``metrics`` (validation results) rank the checkpoint for the
    best-checkpoint retention; they must contain ``best_metric`` when given.
    """
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      raise ValueError(f'checkpoint metrics {sorted(metrics)} lack the best_metric '
                       f'{self.best_metric!r}')
    items = dict(state=ocp.args.StandardSave(state),
                 meta=ocp.args.JsonSave(dict(meta or {}, step=int(step), time=time.time())))
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
    self._wait_checked()   # orbax would wait for the previous save anyway; this names its failure
    try:
      saved = self.manager.save(int(step), args=ocp.args.Composite(**items),
                                metrics=None if metrics is None else
                                {k: float(v) for k, v in metrics.items()},
                                force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(f'could not save the checkpoint of step {step} in '
                                f'{self.directory}: {_cause(e)}') from e
    self._unchecked_step = int(step)
    return saved

  def raise_if_failed(self):
    """Raises ``CheckpointSaveError`` if a background save has failed; never blocks on a save
    still running. Cheap: the loop calls it every step, so a failed save stops the run within a
    step of the failure becoming known."""
    if self._unchecked_step is not None and not self.manager.is_saving_in_progress():
      self._wait_checked()

  def _wait_checked(self):
    step, self._unchecked_step = self._unchecked_step, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      where = f'step {step}' if step is not None else 'a step'
      raise CheckpointSaveError(f'the checkpoint of {where} could not be written to '
                                f'{self.directory}: {_cause(e)}') from e

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores checkpoint ``step`` into the structure (and shardings) of ``abstract_state``.

    ``abstract_state``: a pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` set (the arrays
    are placed as the shardings say, whatever the mesh of the run that saved them).
    ``data_iter`` (a grain iterator) is moved to the saved position in place.
    """
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    return restored['state']

  def wait(self):
    """Blocks until the background writes of earlier saves are complete; raises
    ``CheckpointSaveError`` if one failed."""
    self._wait_checked()

  def close(self):
    try:
      self._wait_checked()
    finally:
      self.manager.close()


def abstract_like(state, shardings=None):
  """``jax.ShapeDtypeStruct`` tree of ``state`` (with ``shardings`` when given)."""
  if shardings is None:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


class PreemptionFlag:
  """Turns SIGTERM (what schedulers send before killing a job) into a stop the loop polls.

  The loop then saves a checkpoint at the current step and exits cleanly. Single process: a
  Python handler sets a flag; a second SIGTERM falls back to the previous handler (handlers are
  only installable from the main thread). Several processes: all of them must save (orbax saves
  are collective) and stop at the *same* step, though each host gets its signal at a different
  step, or only some hosts get one. jax.distributed's preemption service (its own SIGTERM
  handler, installed by ``jax.distributed.initialize``) agrees on that step; no Python handler
  is installed then, as it would replace jax's.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}
    self._agreed = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
    if not self._agreed and threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after ``step``: call it once per step, on every process."""
    if self._agreed:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def _handle(self, signum, frame):
    del frame
    if self._event.is_set():  # second signal: stop waiting for the loop
      self.restore_handlers()
      signal.raise_signal(signum)
      return
    logging.warning('received signal %d: will save a checkpoint and stop', signum)
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def restore_handlers(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

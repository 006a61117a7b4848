"""Checkpointer: retention (latest N + best by a metric), restore of state and data position,
and SIGTERM -> flag."""

import os
import signal
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from birefnet_jax import checkpoint, sharding
from birefnet_jax.train_state import TrainState


def make_state(value=0.0):
  params = {'w': jnp.full((4, 8), value, jnp.float32), 'b': jnp.arange(3, dtype=jnp.float32)}
  return TrainState.create({'params': params, 'batch_stats': {'mean': jnp.ones(3)}},
                           optax.adamw(1e-3))


def data_iterator():
  return iter(grain.MapDataset.range(100).seed(3).shuffle().batch(4).to_iter_dataset())


def test_keeps_latest_and_best(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, best_metric='Sm', best_mode='max')
  scores = {2: 0.3, 4: 0.9, 6: 0.5, 8: 0.4, 10: 0.2}   # validated steps; odd steps: no metrics
  state = make_state()
  for step in range(1, 11):
    metrics = {'Sm': scores[step]} if step in scores else None
    ckpt.save(step, state, metrics=metrics)
  ckpt.wait()
  # Latest two (9, 10) and the best validated one (4, Sm 0.9); the newest is never deleted.
  assert ckpt.manager.all_steps() == [4, 9, 10]
  assert ckpt.best_step() == 4
  assert ckpt.latest_step() == 10
  ckpt.close()


def test_best_by_a_metric_to_minimize(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, best_metric='MAE', best_mode='min')
  for step, mae in ((1, 0.2), (2, 0.05), (3, 0.1), (4, 0.3)):
    ckpt.save(step, make_state(), metrics={'MAE': mae})
  ckpt.wait()
  assert ckpt.manager.all_steps() == [2, 4]
  assert ckpt.best_step() == 2
  with pytest.raises(ValueError, match='best_metric'):
    ckpt.save(5, make_state(), metrics={'Sm': 0.5})
  ckpt.close()


def test_restore_state_and_data_position(tmp_path):
  it = data_iterator()
  for _ in range(3):
    next(it)
  state = make_state(1.5).replace(step=jnp.asarray(3, jnp.int32))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(3, state, it)
  expected_next = [next(it) for _ in range(2)]   # the iterator moves on after the save
  ckpt.close()

  mesh = sharding.make_mesh()
  abstract = jax.eval_shape(make_state)
  shardings = sharding.state_shardings(mesh, abstract)
  fresh_it = data_iterator()
  restored = checkpoint.Checkpointer(str(tmp_path), keep=2).restore(
      3, checkpoint.abstract_like(abstract, shardings), fresh_it)
  assert isinstance(restored, TrainState)
  assert int(restored.step) == 3
  np.testing.assert_array_equal(np.asarray(restored.params['w']), np.full((4, 8), 1.5))
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
  for want in expected_next:
    np.testing.assert_array_equal(next(fresh_it), want)


def test_sigterm_sets_the_flag_and_handlers_are_restored():
  previous = signal.getsignal(signal.SIGTERM)
  flag = checkpoint.PreemptionFlag()
  try:
    assert not flag.is_set()
    os.kill(os.getpid(), signal.SIGTERM)   # handled: the test process keeps running
    assert flag.is_set()
  finally:
    flag.restore_handlers()
  assert signal.getsignal(signal.SIGTERM) == previous


def test_a_failed_background_save_stops_the_caller(tmp_path, monkeypatch):
  """orbax writes in a background thread and only logs a failure there; the Checkpointer must
  raise it to the training loop, naming the step, the folder and the cause. Here the write fails
  as it did for a relative --workdir (orbax refuses relative paths in its writer thread)."""
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoint.Checkpointer('relative/checkpoints', keep=2)
  ckpt.save(3, make_state())
  with pytest.raises(checkpoint.CheckpointSaveError,
                     match=r'checkpoint of step 3 could not be written to relative/checkpoints: '
                           r'Checkpoint path should be absolute'):
    for _ in range(3000):   # the loop polls once per step; polling never blocks on a save
      ckpt.raise_if_failed()
      time.sleep(0.01)
  assert ckpt.latest_step() is None
  ckpt.close()   # the failure was reported once; nothing else is pending


def test_closing_reports_a_failed_last_save(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoint.Checkpointer('relative/checkpoints', keep=2)
  ckpt.save(5, make_state())
  with pytest.raises(checkpoint.CheckpointSaveError, match='step 5'):
    ckpt.close()

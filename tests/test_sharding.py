"""The mesh, the FSDP rule, global batch assembly, and the sharded train step: one step on 4
(forced CPU) devices, data-parallel and data x fsdp, equals the step on 1 device.

The multi-device runs live in subprocesses (the device count is fixed when jax starts); this file
is also the worker script: ``python tests/test_sharding.py NDEV FSDP MODEL OUT.npz``.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# The worker: one train step of a small model on NDEV devices, results to an npz.
# ----------------------------------------------------------------------------------------------

def tiny_model():
  """A stand-in with the BiRefNet output contract: BatchNorm, Dropout, 4 scales, OutRef outputs."""
  import flax.linen as nn
  import jax.numpy as jnp
  from birefnet_jax.models.layers import BatchNorm
  from birefnet_jax.models.resize import resize_bilinear_align_corners as resize

  class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False, deterministic=None):
      deterministic = (not train) if deterministic is None else deterministic
      h = nn.Conv(16, (3, 3))(x)
      h = nn.relu(BatchNorm()(h, train))
      h = nn.Dropout(0.3)(h, deterministic=deterministic)
      feats, logits = h, []
      for stride in (32, 16, 8):
        f = nn.avg_pool(feats, (stride, stride), (stride, stride))
        f = nn.relu(BatchNorm()(nn.Conv(8, (3, 3))(f), train))
        logits.append(nn.Conv(1, (1, 1))(f))
      final = nn.Conv(1, (1, 1))(h)
      if not (train or self.is_initializing()):
        return final
      size = x.shape[1:3]
      gdt = [nn.Conv(1, (1, 1))(jnp.tanh(m)) for m in logits]
      labels = [jnp.mean(x, -1, keepdims=True) * resize(m, size) for m in logits]
      return dict(scaled_logits=logits + [final], gdt_preds=gdt, gdt_labels=labels,
                  class_logits=None)

  return TinyNet()


def run_worker(ndev: int, fsdp: int, model_kind: str, out: str):
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={ndev}'
  import jax
  jax.config.update('jax_default_matmul_precision', 'highest')
  import jax.numpy as jnp
  import optax
  from birefnet_jax import losses, sharding, train
  from birefnet_jax.train_state import TrainState
  assert jax.device_count() == ndev

  if model_kind == 'tiny':
    model, size, min_size = tiny_model(), 64, 64   # min_size: let the FSDP rule split small arrays
  else:  # the quickstart BiRefNet
    from birefnet_jax.models.birefnet import BiRefNet
    import importlib.util  # configs/ must not go on sys.path: configs/dis.py would shadow dis
    spec = importlib.util.spec_from_file_location('quickstart_config', ROOT / 'configs/quickstart.py')
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    cfg = quickstart.get_config()
    model, size, min_size = BiRefNet(cfg.model), 64, 2**12

  rng = np.random.default_rng(0)
  batch = dict(image=rng.normal(size=(4, size, size, 3)).astype(np.float32),
               mask=(rng.uniform(size=(4, size, size, 1)) > 0.6).astype(np.float32))
  # SGD: the update is lr * gradient, so the parameters after the step compare the gradients.
  tx = optax.sgd(0.1)
  mesh = sharding.make_mesh(fsdp)
  variables = model.init({'params': jax.random.key(1)}, jnp.zeros((1, size, size, 3)))
  state = TrainState.create(variables, tx)
  state_sharding = sharding.state_shardings(mesh, jax.eval_shape(lambda: state), min_size=min_size)
  state = jax.device_put(state, state_sharding)
  lambdas = {k: v for k, v in losses.pixel_lambdas('DIS5K').items() if v}
  step = jax.jit(train.make_train_step(model, tx, lambda s: jnp.float32(0.1),
                                       base_rng=jax.random.key(2), deterministic=False,
                                       use_class_labels=False),
                 in_shardings=(state_sharding, sharding.batch_sharding(mesh),
                               sharding.replicated(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
  gbatch = sharding.global_batch(batch, sharding.batch_sharding(mesh))
  assert gbatch['image'].sharding.spec == sharding.batch_sharding(mesh).spec
  new_state, metrics = step(state, gbatch, sharding.put_replicated(lambdas, mesh))
  split = [k for k, s in zip(jax.tree_util.tree_leaves_with_path(new_state.params),
                             jax.tree.leaves(new_state.params))
           if s.sharding.spec != jax.sharding.PartitionSpec()]
  flat = {}
  for prefix, tree in (('params', new_state.params), ('batch_stats', new_state.batch_stats)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      flat[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
  for k, v in metrics.items():
    flat['metric/' + k] = np.asarray(v)
  flat['num_split_params'] = np.asarray(len(split))
  np.savez(out, **flat)


def step_results(tmp_path, ndev, fsdp, model_kind):
  out = tmp_path / f'{model_kind}_{ndev}_{fsdp}.npz'
  pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH')) if p)
  env = dict(os.environ, PYTHONPATH=pythonpath, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, __file__, str(ndev), str(fsdp), model_kind, str(out)],
                        env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return dict(np.load(out))


def assert_same_step(one, many):
  assert set(one) == set(many)
  np.testing.assert_allclose(many['metric/loss'], one['metric/loss'], rtol=2e-6)
  for k in one:
    if k.startswith(('params', 'batch_stats')):
      # float32 reductions in another order: noise relative to the array's scale.
      scale = max(1.0, float(np.abs(one[k]).max()))
      np.testing.assert_allclose(many[k], one[k], rtol=0, atol=2e-5 * scale, err_msg=k)


# ----------------------------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------------------------

def test_fsdp_rule_splits_the_largest_divisible_dim_of_big_arrays():
  from jax.sharding import PartitionSpec as P
  from birefnet_jax import sharding
  assert sharding.fsdp_spec((3, 3, 64, 128), 4, min_size=100) == P(None, None, None, 'fsdp')
  assert sharding.fsdp_spec((6, 10), 4, min_size=10) == P()           # nothing divisible
  assert sharding.fsdp_spec((512, 6), 2, min_size=10) == P('fsdp', None)
  assert sharding.fsdp_spec((128, 128), 4, min_size=10**6) == P()     # small: replicated
  assert sharding.fsdp_spec((128, 128), 1, min_size=1) == P()         # no fsdp axis


def test_mesh_axes_are_auto_and_cover_all_devices():
  import jax
  from birefnet_jax import sharding
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data', 'fsdp')
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert mesh.devices.size == jax.device_count()
  with pytest.raises(ValueError, match='fsdp'):
    sharding.make_mesh(jax.device_count() + 1)


def test_global_batch_from_process_local_numpy():
  from birefnet_jax import sharding
  mesh = sharding.make_mesh()
  local = {'image': np.arange(24, dtype=np.float32).reshape(2, 3, 4)}
  batch = sharding.global_batch(local, sharding.batch_sharding(mesh))
  np.testing.assert_array_equal(np.asarray(batch['image']), local['image'])
  assert batch['image'].sharding == sharding.batch_sharding(mesh)


def test_sharded_step_equals_single_device_step_tiny(tmp_path):
  one = step_results(tmp_path, 1, 1, 'tiny')
  data_parallel = step_results(tmp_path, 4, 1, 'tiny')
  fsdp = step_results(tmp_path, 4, 2, 'tiny')
  assert fsdp['num_split_params'] > 0, 'the fsdp run split no parameter: the test shows nothing'
  assert_same_step(one, data_parallel)
  assert_same_step(one, fsdp)
  # The step did something: parameters moved by lr * gradient (not all zero).
  assert float(one['metric/grad_norm']) > 0


@pytest.mark.skipif(not os.environ.get('BIREFNET_SLOW_TESTS'),
                    reason='slow (3 compilations of the BiRefNet step): set BIREFNET_SLOW_TESTS=1')
def test_sharded_step_equals_single_device_step_quickstart_birefnet(tmp_path):
  one = step_results(tmp_path, 1, 1, 'quickstart')
  assert_same_step(one, step_results(tmp_path, 4, 1, 'quickstart'))
  fsdp = step_results(tmp_path, 4, 2, 'quickstart')
  assert fsdp['num_split_params'] > 0
  assert_same_step(one, fsdp)


if __name__ == '__main__':
  run_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])

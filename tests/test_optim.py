"""AdamW against the official train-step fixtures; schedules, accumulation and clipping."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import reference
from birefnet_jax import optim

jax.config.update('jax_default_matmul_precision', 'highest')

TRAIN_STEP_VARIANTS = ('swin_w12_tiny', 'swin_w7_tiny_cls')


@pytest.mark.parametrize('variant', TRAIN_STEP_VARIANTS)
def test_one_adamw_step_matches_torch(variant):
  step = load_file(str(reference.path(f'{variant}.train_step.safetensors')))
  info = json.loads(reference.path(f'{variant}.train_step.json').read_text())
  weights = load_file(str(reference.path(f'{variant}.safetensors')))
  hp = info['optimizer']
  assert hp['betas'] == [0.9, 0.999] and hp['eps'] == 1e-8 and hp['weight_decay'] == 0.01
  # The fixture's lr is the official DIS5K rule with batch 8.
  assert math.isclose(optim.official_learning_rate('DIS5K', 8), hp['lr'], rel_tol=1e-15)

  grads = {k[len('grad/'):]: v for k, v in step.items() if k.startswith('grad/')}
  params = {name: weights[name] for name in grads}
  assert len(params) == hp['num_params']
  cfg = optim.optimizer_config()          # the official recipe: nothing overridden
  tx, schedule = optim.make_optimizer(cfg, steps_per_epoch=100,
                                      lr=optim.official_learning_rate('DIS5K', 8))
  assert math.isclose(float(schedule(0)), hp['lr'], rel_tol=1e-7)
  # AdamW without clipping is elementwise: one step on all parameters raveled into a single
  # vector is the same computation, and compiles once instead of once per tensor shape.
  names = sorted(params)
  flat_params = jnp.asarray(np.concatenate([params[k].ravel() for k in names]))
  flat_grads = jnp.asarray(np.concatenate([grads[k].ravel() for k in names]))
  updates, _ = jax.jit(tx.update)(flat_grads, tx.init(flat_params), flat_params)
  flat_after = np.asarray(optax.apply_updates(flat_params, updates))
  ends = np.cumsum([params[k].size for k in names])
  after = {k: a.reshape(params[k].shape)
           for k, a in zip(names, np.split(flat_after, ends[:-1]))}

  tolerances = info['tolerances']['after_isolated']
  assert set(tolerances) == set(params)
  for name, atol in tolerances.items():
    np.testing.assert_allclose(np.asarray(after[name]), step[f'after/{name}'], rtol=0, atol=atol,
                               err_msg=name)


def test_weight_decay_applies_to_every_parameter():
  # A zero gradient leaves only the decoupled decay: p * (1 - lr * wd), biases and norms included.
  params = {'conv.bias': jnp.array([1.0, -2.0]), 'norm.scale': jnp.array([0.5])}
  tx, _ = optim.make_optimizer(optim.optimizer_config(lr=0.1), steps_per_epoch=1)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  after = optax.apply_updates(params, updates)
  for name in params:
    np.testing.assert_allclose(np.asarray(after[name]), np.asarray(params[name]) * (1 - 0.1 * 0.01),
                               rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------

def test_official_learning_rates():
  assert math.isclose(optim.official_learning_rate('DIS5K', 8), 1e-4 * math.sqrt(2))
  assert math.isclose(optim.official_learning_rate('HRSOD', 16), 2e-5)
  assert math.isclose(optim.official_learning_rate('COD', 4), 1e-5)
  assert math.isclose(optim.official_learning_rate('General', 36), 3e-5)
  with pytest.raises(ValueError, match='unknown task'):
    optim.official_learning_rate('dis5k', 8)


def test_official_step_schedule_is_constant():
  lr = optim.official_learning_rate('DIS5K', 8)
  _, schedule = optim.make_optimizer(optim.optimizer_config(), steps_per_epoch=50, epochs=500,
                                     lr=lr)
  for step in (0, 1, 49, 50, 500 * 50 - 1):
    assert math.isclose(float(schedule(step)), lr, rel_tol=1e-7)


@pytest.mark.parametrize('decay_epochs', [(2, 5), (-3,), (1e5,)])
def test_step_schedule_matches_torch_multisteplr(decay_epochs):
  torch = pytest.importorskip('torch')
  epochs, steps_per_epoch, lr = 10, 3, 0.1
  cfg = optim.optimizer_config(lr=lr, decay_epochs=decay_epochs, decay_rate=0.5)
  _, schedule = optim.make_optimizer(cfg, steps_per_epoch, epochs=epochs)
  # train.py: MultiStepLR over milestones `lde if lde > 0 else epochs + lde + 1`, stepped once
  # at the end of every epoch.
  parameter = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.AdamW([parameter], lr=lr)
  sched = torch.optim.lr_scheduler.MultiStepLR(
      opt, milestones=[m if m > 0 else epochs + m + 1 for m in decay_epochs], gamma=0.5)
  for epoch in range(epochs):
    expected = opt.param_groups[0]['lr']
    for i in range(steps_per_epoch):
      step = epoch * steps_per_epoch + i
      assert math.isclose(float(schedule(step)), expected, rel_tol=1e-6), (epoch, i)
    opt.step()
    sched.step()


def test_cosine_schedule_with_warmup():
  cfg = optim.optimizer_config(lr=1.0, schedule='cosine', warmup_steps=10,
                               cosine_final_ratio=0.1)
  _, schedule = optim.make_optimizer(cfg, steps_per_epoch=10, epochs=11)  # 110 steps, 100 decay
  expected = {
      0: 0.1,                   # warmup: lr * (step + 1) / warmup_steps
      4: 0.5,
      9: 1.0,
      10: 1.0,                  # cosine starts at the peak
      60: 0.1 + 0.9 * 0.5,      # half way
      35: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)),
      110: 0.1,                 # end of training, and after it
      500: 0.1,
  }
  for step, lr in expected.items():
    assert math.isclose(float(schedule(step)), lr, rel_tol=1e-6, abs_tol=1e-7), step


def test_warmup_on_the_step_schedule():
  cfg = optim.optimizer_config(lr=2.0, warmup_steps=4, schedule='constant')
  _, schedule = optim.make_optimizer(cfg, steps_per_epoch=10)
  assert [float(schedule(s)) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_bad_config_fails_clearly():
  with pytest.raises(ValueError, match='unknown field'):
    optim.optimizer_config(learning_rate=1e-4)
  with pytest.raises(ValueError, match='unknown schedule'):
    optim.make_optimizer(optim.optimizer_config(lr=0.1, schedule='linear'), 10)
  with pytest.raises(ValueError, match='no learning rate'):
    optim.make_optimizer(optim.optimizer_config(), 10)      # lr None and none passed
  with pytest.raises(ValueError, match='needs the number of epochs'):
    optim.make_optimizer(optim.optimizer_config(lr=0.1, schedule='cosine'), 10)


# ----------------------------------------------------------------------------------------------
# Gradient accumulation and clipping
# ----------------------------------------------------------------------------------------------

def random_tree(seed, scale=1.0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {'w': scale * jax.random.normal(k1, (4, 3)), 'b': scale * jax.random.normal(k2, (3,))}


def test_grad_accumulation_equals_one_step_on_the_mean_gradient():
  n = 3
  params = random_tree(0)
  accumulating, _ = optim.make_optimizer(optim.optimizer_config(lr=0.01, grad_accum_steps=n), 5)
  plain, _ = optim.make_optimizer(optim.optimizer_config(lr=0.01), 5)
  acc_params, acc_state = params, accumulating.init(params)
  ref_params, ref_state = params, plain.init(params)
  for update in range(2):        # two full updates: the Adam state must advance once per update
    micro = [random_tree(10 * update + i + 1) for i in range(n)]
    for i, g in enumerate(micro):
      before = acc_params
      updates, acc_state = accumulating.update(g, acc_state, acc_params)
      acc_params = optax.apply_updates(acc_params, updates)
      if i < n - 1:              # no parameter change until the last micro-step
        jax.tree.map(np.testing.assert_array_equal, acc_params, before)
    mean = jax.tree.map(lambda *gs: sum(gs) / n, *micro)
    updates, ref_state = plain.update(mean, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 acc_params, ref_params)


def test_clipping_bounds_the_gradient_adam_sees():
  clip = 0.5
  params = random_tree(0)
  clipped, _ = optim.make_optimizer(optim.optimizer_config(lr=0.01, clip_grad_norm=clip), 5)
  plain, _ = optim.make_optimizer(optim.optimizer_config(lr=0.01), 5)
  big, small = random_tree(1, scale=100.0), random_tree(2, scale=0.01)
  assert optax.tree.norm(big) > 100 * clip and optax.tree.norm(small) < clip

  # Adam's first moment after one step is (1 - b1) * g: its norm shows the clipped gradient.
  _, state = clipped.update(big, clipped.init(params), params)
  mu = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)][0].mu
  np.testing.assert_allclose(float(optax.tree.norm(mu)), (1 - 0.9) * clip, rtol=1e-5)

  # Two steps with clipping == two steps without it on the gradients rescaled to norm `clip`.
  def run(tx, grads):
    p, s = params, tx.init(params)
    for g in grads:
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
    return p

  rescaled = jax.tree.map(lambda g: g * clip / optax.tree.norm(big), big)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               run(clipped, [big, small]), run(plain, [rescaled, small]))
  # Without clipping the result differs (the big gradient dominates Adam's moments).
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                      run(plain, [big, small]), run(clipped, [big, small]))
  assert max(jax.tree.leaves(diff)) > 1e-4

"""Training variants through the loop's step function (birefnet_jax.train.make_train_step):
gradient accumulation against the large batch, and a bfloat16 train step of the whole model.

The steps are computed in a fresh process with XLA's CPU optimizations off (compiling is most of
the time: with them on, the accumulation test used 7.9 min of CPU instead of 2-2.5), which writes
the arrays to an .npz; the assertions run here.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from tiny_model import FAST_XLA, ROOT, quickstart_config, random_variables


def compute_in_subprocess(function, out, timeout=900):
  """Runs ``function(out)`` of this module in a fresh CPU process with FAST_XLA; returns the
  arrays it saved to ``out`` (.npz)."""
  pythonpath = os.pathsep.join(
      p for p in (str(ROOT), str(ROOT / 'tests'), os.environ.get('PYTHONPATH')) if p)
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_'))}
  env.update(PYTHONPATH=pythonpath, JAX_PLATFORMS='cpu', XLA_FLAGS=FAST_XLA)
  code = f'import test_train_variants as t; t.{function}({str(out)!r})'
  proc = subprocess.run([sys.executable, '-c', code], env=env, cwd=str(ROOT),
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  with np.load(out) as data:
    return dict(data)


def flat_vector(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)])


# ----------------------------------------------------------------------------------------------
# Gradient accumulation.
# ----------------------------------------------------------------------------------------------

B, K = 4, 2            # big batch, accumulation steps (micro-batches of B // K)
UPDATES = 2
ACCUM_LR = 1e-3
MEASURED_GRAD = 5e-7   # see the test's docstring


def accumulation_config():
  config = quickstart_config()        # the tiny model
  config.model.batch_norm = False    # see the test's docstring
  config.data.image_size = (64, 64)
  config.data.augment = False
  config.data.num_workers = 0
  config.data.synthetic_train_examples = 16
  config.deterministic = True
  config.optim.lr = ACCUM_LR
  config.optim.warmup_steps = 2       # lr / 2, then lr
  config.optim.clip_grad_norm = 1.0   # active: the gradient norms here are ~40-50
  return config


def loop_batches(config, size, count):
  """The first ``count`` batches of the training loop's iterator at batch size ``size``."""
  from birefnet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.train_iterator(config.data, local_batch_size=size, seed=int(config.seed))
  batches = [next(it) for _ in range(count)]
  it.close()
  return [{k: np.array(b[k]) for k in ('image', 'mask')} for b in batches]


def compute_accumulation(out):
  """UPDATES updates of batch B, and UPDATES * K micro-steps of B / K with grad_accum_steps=K,
  from the same init; saves gradients, lrs and parameters."""
  import jax  # pylint: disable=g-import-not-at-top
  from birefnet_jax import losses, optim, train  # pylint: disable=g-import-not-at-top
  from birefnet_jax.convert import names  # pylint: disable=g-import-not-at-top
  from birefnet_jax.models.birefnet import BiRefNet  # pylint: disable=g-import-not-at-top
  from birefnet_jax.train_state import TrainState  # pylint: disable=g-import-not-at-top

  config = accumulation_config()
  big = loop_batches(config, B, UPDATES)
  micro = [{k: v[i * (B // K):(i + 1) * (B // K)] for k, v in batch.items()}
           for batch in big for i in range(K)]
  model = BiRefNet(config.model)
  variables = names.nest(random_variables(config.model, seed=0))

  def make(accum):
    opt = config.optim.copy_and_resolve_references()
    opt.grad_accum_steps = accum
    tx, schedule = optim.make_optimizer(opt, steps_per_epoch=4,   # in updates, as train.py
                                        epochs=config.epochs)
    step = jax.jit(train.make_train_step(model, tx, schedule, base_rng=jax.random.key(1),
                                         deterministic=True, use_class_labels=False,
                                         grad_accum_steps=accum, return_grads=True))
    return TrainState.create(variables, tx), step

  official = {k: np.float32(v) for k, v in losses.pixel_lambdas('DIS5K').items() if v}
  results = dict(has_batch_stats=np.bool_(bool(variables.get('batch_stats'))),
                 iou_lambda=official['iou'], p0=flat_vector(variables['params']))
  state, step = make(1)
  for u, batch in enumerate(big):
    state, metrics = step(state, batch, dict(official, iou=official['iou'] / K))
    results[f'big_grads_{u}'] = flat_vector(metrics['grads'])
    results[f'big_lr_{u}'] = np.float32(metrics['lr'])
  results['big_params'] = flat_vector(state.params)

  state, step = make(K)
  for i, batch in enumerate(micro):
    state, metrics = step(state, batch, official)
    results[f'micro_grads_{i}'] = flat_vector(metrics['grads'])
    results[f'micro_lr_{i}'] = np.float32(metrics['lr'])
    results[f'micro_params_{i}'] = flat_vector(state.params)
  np.savez(out, **results)


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
  """K accumulated micro-batches of B/K give the update of one batch of B (optim's
  optax.MultiSteps: gradients averaged, then clip + AdamW once; the lr schedule counts updates).

  Where they are equal, and why:
  - data: the loop's iterator batches one example stream, so its batches of B/K, K at a time,
    are its batches of B (checked below); the steps are fed those batches;
  - no BatchNorm (model.batch_norm=False): its batch statistics differ per micro-batch;
    LayerNorm (Swin) is per example. Dropout / drop-path off (deterministic);
  - the loss: every term is a mean over the batch's pixels except the official IoU loss, which
    is a SUM over the batch's examples. Averaging K micro-batch gradients therefore weights the
    IoU term by 1/K relative to the big batch (as the official DDP does across GPUs, each
    summing IoU over its own batch). So K micro-steps with the official lambdas equal one big
    step whose IoU lambda is divided by K; that is what is asserted. (So through the loop,
    whose lambdas come from the config, a run of batch B/K with grad_accum_steps=K trains
    with 1/K of the IoU weight of a run of batch B.)

  Tolerances: two updates (so that Adam's second moment and the clipping see both gradients;
  warmup makes their lrs differ, 0.5 lr then lr, so an update applied at the wrong micro-step
  or with the wrong count shows), gradient norms ~40-50 clipped to 1. Measured on this machine:
  - the average of the K micro-batch gradients vs the big-batch gradient: global relative L2
    2.3e-7 and 4.7e-7 (float32 summation order); asserted <= 20 * MEASURED_GRAD (5e-7);
  - the parameters after the 2 updates: the elements' changes agree to float32 rounding except
    where Adam's normalized step (~lr * sign(g)) is sensitive to a rounding-level gradient
    difference: 0.02% of the elements differ by more than 1e-3 * lr, the largest by 0.02-0.05
    lr (two runs).
    Asserted: at most 0.1% of the elements differ by more than 1e-3 * lr, none by more than
    4 lr (two full sign flips). An update at every micro-step fails the no-update check; an
    update from a single micro-batch's gradient has the other sign in ~20% of the elements
    (measured on these gradients), i.e. ~2 lr off there.
  """
  config = accumulation_config()
  # The loop's batches: B/K-sized ones, K at a time, are its B-sized ones.
  big = loop_batches(config, B, UPDATES)
  micro = loop_batches(config, B // K, UPDATES * K)
  for u, batch in enumerate(big):
    for key in ('image', 'mask'):
      np.testing.assert_array_equal(
          np.concatenate([m[key] for m in micro[u * K:(u + 1) * K]]), batch[key])
  assert not np.array_equal(big[0]['image'], big[1]['image'])

  r = compute_in_subprocess('compute_accumulation', tmp_path / 'accumulation.npz')
  assert not r['has_batch_stats'] and r['iou_lambda'] > 0
  # No update before the K-th micro-step.
  for i in range(UPDATES * K):
    if (i + 1) % K:
      previous = r['p0'] if i < K else r[f'micro_params_{i - 1}']
      np.testing.assert_array_equal(r[f'micro_params_{i}'], previous)
  # Each micro-step logs the lr of the update it contributes to.
  for i in range(UPDATES * K):
    assert r[f'micro_lr_{i}'] == r[f'big_lr_{i // K}'], i
  # The averaged micro-batch gradients are the big-batch ones (IoU weighted as said above), and
  # the clipping is active (a norm above 1).
  for u in range(UPDATES):
    assert np.linalg.norm(r[f'big_grads_{u}']) > 2.0, np.linalg.norm(r[f'big_grads_{u}'])
    mean = np.mean([r[f'micro_grads_{u * K + j}'] for j in range(K)], axis=0)
    want = r[f'big_grads_{u}']
    rel = np.linalg.norm(mean - want) / np.linalg.norm(want)
    assert rel <= 20 * MEASURED_GRAD, (u, rel)

  got, want, p0 = r[f'micro_params_{UPDATES * K - 1}'], r['big_params'], r['p0']
  assert np.median(np.abs(want - p0)) > 0.5 * ACCUM_LR, 'the updates did not happen'
  diff = np.abs(got - want)
  off = diff > 1e-3 * ACCUM_LR
  assert off.mean() <= 1e-3, (off.mean(), diff.max() / ACCUM_LR)
  assert diff.max() <= 4 * ACCUM_LR * (1 + 1e-3), diff.max() / ACCUM_LR


# ----------------------------------------------------------------------------------------------
# A bfloat16 train step of the whole model.
# ----------------------------------------------------------------------------------------------

BF16_VARIANT = 'swin_w12_tiny'
# Parameters nearest the loss (the prediction heads): their gradients pass through few layers.
HEADS = ('decoder/conv_out1_0', 'decoder/conv_ms_spvn_2', 'decoder/conv_ms_spvn_3',
         'decoder/conv_ms_spvn_4', 'decoder/gdt_convs_pred_2_0', 'decoder/gdt_convs_pred_3_0',
         'decoder/gdt_convs_pred_4_0', 'decoder/ipt_blk1')


def compute_bf16_step(out):
  """One train step of the golden fixture model (converted official weights, the fixture's
  batch, official DIS5K losses, BatchNorm on batch statistics, dropout off) with the model's
  compute dtype float32 and bfloat16 (the recipes' default); saves losses, gradients and the
  parameters after the step."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  import reference  # pylint: disable=g-import-not-at-top
  from birefnet_jax import losses, optim, train  # pylint: disable=g-import-not-at-top
  from birefnet_jax.convert.convert import convert_state_dict  # pylint: disable=g-import-not-at-top
  from birefnet_jax.models.birefnet import BiRefNet  # pylint: disable=g-import-not-at-top
  from birefnet_jax.train_state import TrainState  # pylint: disable=g-import-not-at-top

  cfg, variables = convert_state_dict(load_file(str(reference.path(f'{BF16_VARIANT}.safetensors'))))
  io = reference.io(BF16_VARIANT)
  batch = dict(image=jnp.asarray(reference.nhwc(io['input'])),
               mask=jnp.asarray(reference.nhwc(io['gt'])))
  lambdas = {k: jnp.float32(v) for k, v in losses.pixel_lambdas('DIS5K').items() if v}
  config = quickstart_config()
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=1, epochs=config.epochs)
  results = {}
  for dtype in ('float32', 'bfloat16'):
    model_cfg = cfg.copy_and_resolve_references()
    model_cfg.dtype = dtype
    step = jax.jit(train.make_train_step(BiRefNet(model_cfg), tx, schedule,
                                         base_rng=jax.random.key(0), deterministic=True,
                                         use_class_labels=False, return_grads=True))
    state, metrics = step(TrainState.create(jax.tree.map(jnp.asarray, variables), tx), batch,
                          lambdas)
    for name in ('loss', 'loss_pix', 'loss_gdt'):
      results[f'{dtype}/{name}'] = np.float32(metrics[name])
    for path, leaf in jax.tree_util.tree_leaves_with_path(metrics['grads']):
      name = '/'.join(str(getattr(k, 'key', k)) for k in path)
      results[f'{dtype}/grad/{name}'] = np.asarray(leaf, np.float32)
    results[f'{dtype}/params_after'] = flat_vector(state.params)
    results[f'{dtype}/stats_after'] = flat_vector(state.batch_stats)
  np.savez(out, **results)


@pytest.mark.skipif(not os.environ.get('BIREFNET_SLOW_TESTS'),
                    reason='slow (two compilations of the whole model, ~5-15 min on a 2-core '
                           'CPU): set BIREFNET_SLOW_TESTS=1')
def test_bfloat16_train_step_is_close_to_float32(tmp_path):
  """One train step of the whole fixture model in bfloat16 vs float32: everything finite, the
  loss close, the gradient close where bfloat16 can be.

  Measured on this machine (CPU, XLA optimizations off; bf16 vs f32, relative):
    loss 2.7e-3, loss_pix 2.7e-3, loss_gdt 1.6e-3 (single loss terms up to 1.5e-2);
    gradients: near the loss (HEADS) relative L2 0.02-0.18 per module; through the network
    they lose most of their precision: relative L2 0.3-1.0 per module, 0.87 over all
    parameters, cosine 0.53 with the float32 gradient.
  The last is not a bf16 defect of this port: this fixture model (random weights, BatchNorm on
  2 examples) amplifies rounding errors ~4e4-fold: its own float32 gradient is 2.3e-3 (relative
  L2) from the float64 one (the fixture's noise floor), and bfloat16 rounds 2^16 times coarser
  than float32.
  Tolerances (about 2-4x the measured values): loss and its two parts 1e-2; each HEADS module's
  gradient relative L2 <= 0.35; over all parameters cosine >= 0.25 and relative L2 <= 1.3 (a
  zero, random or wrongly scaled gradient fails these).
  """
  r = compute_in_subprocess('compute_bf16_step', tmp_path / 'bf16.npz', timeout=1800)
  for key, value in r.items():
    assert np.all(np.isfinite(value)), key
  for name in ('loss', 'loss_pix', 'loss_gdt'):
    want, got = r[f'float32/{name}'], r[f'bfloat16/{name}']
    assert abs(got - want) <= 1e-2 * abs(want), (name, got, want)
  names = [k[len('float32/grad/'):] for k in r if k.startswith('float32/grad/')]
  assert names and sorted(names) == sorted(k[len('bfloat16/grad/'):] for k in r
                                           if k.startswith('bfloat16/grad/'))
  for head in HEADS:
    members = [n for n in names if n.startswith(head + '/')]
    assert members, head
    want = np.concatenate([r[f'float32/grad/{n}'].ravel() for n in members])
    got = np.concatenate([r[f'bfloat16/grad/{n}'].ravel() for n in members])
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel <= 0.35, (head, rel)
  want = np.concatenate([r[f'float32/grad/{n}'].ravel() for n in names])
  got = np.concatenate([r[f'bfloat16/grad/{n}'].ravel() for n in names])
  cosine = float(want @ got / (np.linalg.norm(want) * np.linalg.norm(got)))
  rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
  assert cosine >= 0.25 and rel <= 1.3, (cosine, rel)

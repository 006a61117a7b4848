"""The official losses against the PyTorch fixtures (float32 and float64), plus their gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from birefnet_jax import losses

jax.config.update('jax_default_matmul_precision', 'highest')

PIX_LEVELS = ('m4', 'm3', 'm2', 'final')
GDT_LEVELS = (4, 3, 2)


def model_outputs(arrays, dtype):
  """The stored torch train-mode outputs (NCHW) as the model's NHWC output dict."""
  def nhwc(name):
    return jnp.asarray(reference.nhwc(arrays[name]).astype(dtype))
  return dict(
      scaled_logits=[nhwc(f'train_{level}_logits') for level in PIX_LEVELS],
      gdt_preds=[nhwc(f'train_gdt_pred_{k}') for k in GDT_LEVELS],
      gdt_labels=[nhwc(f'train_gdt_label_{k}') for k in GDT_LEVELS],
      class_logits=(jnp.asarray(arrays['train_class_logits'].astype(dtype))
                    if 'train_class_logits' in arrays.files else None))


def fixture_loss_names(arrays):
  return [k for k in arrays.files if k.startswith('loss_')]


def check_losses(terms, arrays, atols):
  names = fixture_loss_names(arrays)
  assert names, 'fixture has no loss_* entries'
  missing = [k for k in names if k not in terms]
  assert not missing, f'loss terms not produced: {missing}'
  for name in names:
    np.testing.assert_allclose(np.asarray(terms[name]), arrays[name], rtol=0, atol=atols[name],
                               err_msg=name)


# ----------------------------------------------------------------------------------------------
# Float32 fixtures
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant', reference.VARIANTS)
def test_losses_match_official_float32(variant):
  io = reference.io(variant)
  labels = io['class_labels'] if 'class_labels' in io.files else None
  loss, terms = jax.jit(losses.total_loss)(model_outputs(io, np.float32),
                                           jnp.asarray(reference.nhwc(io['gt'])), labels)
  assert loss.dtype == jnp.float32
  check_losses(terms, io, reference.tolerances(variant)['losses'])
  np.testing.assert_array_equal(np.asarray(loss), np.asarray(terms['loss_total']))
  if labels is None:
    assert float(terms['loss_cls']) == 0.0


@pytest.mark.parametrize('variant', reference.VARIANTS)
def test_laplacian_gdt_gt_matches_kornia(variant):
  io = reference.io(variant)
  got = losses.laplacian_gdt_gt(jnp.asarray(reference.nhwc(io['input'])))
  assert got.shape == reference.nhwc(io['train_gdt_gt']).shape
  np.testing.assert_allclose(np.asarray(got), reference.nhwc(io['train_gdt_gt']), rtol=0,
                             atol=reference.tolerances(variant)['arrays']['train_gdt_gt'])


def test_pixel_lambdas_are_the_fixture_lambdas():
  io = reference.io('swin_w12_tiny')
  for name, value in losses.pixel_lambdas('DIS5K').items():
    assert value == float(io[f'lambda_pix_{name}']), name
  assert losses.CLS_LAMBDA == float(io['lambda_cls_ce'])
  assert losses.GDT_LAMBDA == float(io['lambda_gdt'])


# ----------------------------------------------------------------------------------------------
# Float64 fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize('variant', reference.F64_VARIANTS)
def test_losses_match_official_float64(x64, variant):
  io = reference.io(variant)
  ref = np.load(reference.path(f'{variant}.f64.npz'))
  labels = io['class_labels'] if 'class_labels' in io.files else None
  gt = jnp.asarray(reference.nhwc(io['gt']).astype(np.float64))
  loss, terms = jax.jit(losses.total_loss)(model_outputs(ref, np.float64), gt, labels)
  assert loss.dtype == jnp.float64
  check_losses(terms, ref, reference.tolerances_f64(variant)['losses'])

  gdt_gt = losses.laplacian_gdt_gt(jnp.asarray(reference.nhwc(io['input']).astype(np.float64)))
  np.testing.assert_allclose(np.asarray(gdt_gt), reference.nhwc(ref['train_gdt_gt']), rtol=0,
                             atol=reference.tolerances_f64(variant)['arrays']['train_gdt_gt'])


def test_ssim_window_is_the_official_float32_window():
  stored = np.load(reference.path('swin_w12_tiny.f64.npz'))['ssim_window']
  np.testing.assert_array_equal(losses.ssim_window(np.float64), stored)
  # Not the exactly computed window: the float32 construction is what the official run used.
  g = np.exp(-(np.arange(11) - 5.0) ** 2 / 4.5)
  exact = np.outer(g / g.sum(), g / g.sum())
  assert 0 < np.abs(stored - exact).max() < 1e-7


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------

def small_outputs(key, dtype, size=32, classes=None, scale=3.0):
  keys = jax.random.split(key, 12)
  b = 2
  shapes = [(b, size // 8, size // 8, 1), (b, size // 4, size // 4, 1),
            (b, size // 2, size // 2, 1), (b, size, size, 1)]
  outs = dict(
      scaled_logits=[scale * jax.random.normal(k, s, dtype) for k, s in zip(keys[:4], shapes)],
      gdt_preds=[scale * jax.random.normal(k, s, dtype) for k, s in zip(keys[4:7], shapes[:3])],
      gdt_labels=[scale * jax.random.normal(k, shapes[3], dtype) for k in keys[7:10]],
      class_logits=None if classes is None else jax.random.normal(keys[10], (b, classes), dtype))
  gt = jax.random.uniform(keys[11], shapes[3], dtype, -0.2, 1.2)   # clamped inside the loss
  return outs, gt


def test_total_loss_gradient_matches_finite_differences(x64):
  outs, gt = small_outputs(jax.random.PRNGKey(0), jnp.float64, classes=5)
  labels = jnp.array([3, 1])

  f = jax.jit(lambda o: losses.total_loss(o, gt, labels)[0])
  grads = jax.jit(jax.grad(f))(outs)
  direction = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(a.size), a.shape,
                                                       a.dtype), outs)
  h = 1e-6
  plus = f(jax.tree.map(lambda a, d: a + h * d, outs, direction))
  minus = f(jax.tree.map(lambda a, d: a - h * d, outs, direction))
  numeric = (plus - minus) / (2 * h)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads),
                                                jax.tree.leaves(direction)))
  np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-7)


def test_gdt_label_is_not_detached():
  io = reference.io('swin_w12_tiny')
  outs = model_outputs(io, np.float32)

  def gdt(labels):
    return losses.gdt_loss(outs['gdt_preds'], labels)[0]

  grads = jax.jit(jax.grad(gdt))(outs['gdt_labels'])
  for k, g in zip(GDT_LEVELS, grads):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), k
    assert np.abs(g).max() > 0, f'd loss_gdt / d gdt_label_{k} is zero: label was detached'

  # And the total loss's gradient reaches every logit map.
  gt = jnp.asarray(reference.nhwc(io['gt']))
  total_grads = jax.jit(jax.grad(lambda o: losses.total_loss(o, gt)[0]))(outs)
  for g in jax.tree.leaves(total_grads):
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).max() > 0


def test_saturated_sigmoids_keep_the_loss_and_gradients_finite():
  outs, gt = small_outputs(jax.random.PRNGKey(1), jnp.float32, scale=60.0)
  assert float(jnp.max(jax.nn.sigmoid(outs['scaled_logits'][-1]))) == 1.0   # exactly saturated
  (loss, terms), grads = jax.jit(jax.value_and_grad(losses.total_loss, has_aux=True))(outs, gt)
  assert np.isfinite(float(loss))
  # Each BCE term is bounded by the clamp of the logs at -100.
  assert 0 < float(terms['loss_pix_final_bce_raw']) <= 100.0
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))


def test_losses_of_bfloat16_logits_run_in_float32():
  outs, gt = small_outputs(jax.random.PRNGKey(5), jnp.float32)
  half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), outs)
  widened = jax.tree.map(lambda a: a.astype(jnp.float32), half)
  f = jax.jit(losses.total_loss)
  loss_half, _ = f(half, gt)
  loss_widened, _ = f(widened, gt)
  assert loss_half.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(loss_half), np.asarray(loss_widened))


def test_bce_gradients_are_torchs(x64):
  # torch: d/dp = (p - t) / max(p (1 - p), 1e-12) / N, d/dt = (log(1 - p) - log p) / N.
  p = jnp.array([0.3, 0.9, 1e-3, 0.5])
  t = jnp.array([0.2, 0.5, 0.9, 0.5])
  gp, gt = jax.grad(losses.bce_loss, argnums=(0, 1))(p, t)
  pn, tn = np.asarray(p), np.asarray(t)
  np.testing.assert_allclose(np.asarray(gp), (pn - tn) / (pn * (1 - pn)) / 4, rtol=1e-14)
  np.testing.assert_allclose(np.asarray(gt), (np.log1p(-pn) - np.log(pn)) / 4, rtol=1e-13)
  # Exactly saturated predictions: torch's finite 1e-12 floor.
  gp = jax.grad(losses.bce_loss)(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(np.asarray(gp), [0.5e12, -0.5e12], rtol=1e-14)


# ----------------------------------------------------------------------------------------------
# Pieces against independent numpy references
# ----------------------------------------------------------------------------------------------

def test_cross_entropy_and_class_loss():
  logits = np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0], [2.0, 2.0, 2.0]], np.float32)
  labels = np.array([1, 2, -1])      # -1: unknown class, left out of the mean

  def nll(row, label):
    return math.log(sum(math.exp(v) for v in row)) - row[label]

  expected = (nll(logits[0], 1) + nll(logits[1], 2)) / 2
  np.testing.assert_allclose(float(losses.cross_entropy(jnp.asarray(logits), labels)), expected,
                             rtol=1e-6)
  outs, gt = small_outputs(jax.random.PRNGKey(2), jnp.float32, classes=3)
  with pytest.raises(ValueError, match='class_labels'):
    losses.total_loss(outs, gt)


def test_iou_is_summed_over_the_batch():
  p = np.random.default_rng(0).uniform(size=(3, 8, 8, 1))
  t = np.random.default_rng(1).uniform(size=(3, 8, 8, 1))
  per_sample = [1 - (p[b] * t[b]).sum() / (t[b].sum() + p[b].sum() - (p[b] * t[b]).sum())
                for b in range(3)]
  np.testing.assert_allclose(float(losses.iou_loss(jnp.asarray(p, jnp.float32),
                                                   jnp.asarray(t, jnp.float32))),
                             sum(per_sample), rtol=1e-6)


def test_mae_and_mse_terms_for_general_lambdas():
  outs, gt = small_outputs(jax.random.PRNGKey(3), jnp.float32)
  gt = jnp.clip(gt, 0, 1)
  final = [outs['scaled_logits'][-1]]
  _, terms = losses.pixel_loss(final, gt, losses.pixel_lambdas('General'))
  p = np.asarray(jax.nn.sigmoid(final[0]))
  g = np.asarray(gt)
  np.testing.assert_allclose(float(terms['loss_pix_final_mae_raw']), np.abs(p - g).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(terms['loss_pix_final_mae']), 100 * np.abs(p - g).mean(),
                             rtol=1e-5)
  assert 'loss_pix_final_mse_raw' not in terms     # lambda 0: not instantiated, as official
  _, terms = losses.pixel_loss(final, gt, dict(mse=2.0))
  np.testing.assert_allclose(float(terms['loss_pix_final_mse']), 2 * ((p - g) ** 2).mean(),
                             rtol=1e-5)


def test_bad_inputs_fail_clearly():
  outs, gt = small_outputs(jax.random.PRNGKey(4), jnp.float32)
  with pytest.raises(ValueError, match='gt must be'):
    losses.total_loss(outs, gt[..., 0])
  with pytest.raises(ValueError, match='not implemented'):
    losses.total_loss(outs, gt, lambdas=dict(bce=30.0, structure=5.0))
  with pytest.raises(ValueError, match='unknown task'):
    losses.pixel_lambdas('dis')


# ----------------------------------------------------------------------------------------------
# Finetune lambdas (train.py: cumulative in-place decay at the start of every finetune epoch)
# ----------------------------------------------------------------------------------------------

def test_finetune_window_of_dis5k():
  dis, cod = losses.finetune_last_epochs('DIS5K'), losses.finetune_last_epochs('COD')
  assert (dis, cod) == (-40, -20)
  assert losses.finetune_epochs_started(460, 500, dis) == 0
  assert losses.finetune_epochs_started(461, 500, dis) == 1
  assert losses.finetune_epochs_started(500, 500, dis) == 40
  assert losses.finetune_epochs_started(131, 150, cod) == 1
  assert losses.finetune_epochs_started(150, 150, 0) == 0     # no window (the quickstart)


@pytest.mark.parametrize('k, expected', [
    (0, dict(bce=30.0, iou=0.5, ssim=10.0, mae=0.0, mse=0.0)),
    (1, dict(bce=0.0, iou=0.25, ssim=10.0, mae=0.0, mse=0.0)),
    (2, dict(bce=0.0, iou=0.125, ssim=10.0, mae=0.0, mse=0.0)),
    (10, dict(bce=0.0, iou=0.5 / 1024, ssim=10.0, mae=0.0, mse=0.0)),
])
def test_finetune_lambdas_dis5k(k, expected):
  assert losses.finetune_lambdas(losses.pixel_lambdas('DIS5K'), k, 'DIS5K') == expected


def test_finetune_lambdas_general_and_matting():
  general = losses.finetune_lambdas(losses.pixel_lambdas('General'), 3, 'General')
  assert general['bce'] == 0.0 and general['ssim'] == 10.0
  np.testing.assert_allclose(general['iou'], 0.5 ** 4)
  np.testing.assert_allclose(general['mae'], 100 * 0.9 ** 3)
  matting = losses.finetune_lambdas(losses.pixel_lambdas('Matting'), 2, 'Matting')
  assert matting['bce'] == 30.0 and matting['mae'] == 100.0 and matting['mse'] == 0.0
  np.testing.assert_allclose(matting['ssim'], 10 * 0.81)
  # The base dict is not modified (pure function, unlike the official in-place update).
  base = losses.pixel_lambdas('DIS5K')
  losses.finetune_lambdas(base, 5, 'DIS5K')
  assert base == losses.pixel_lambdas('DIS5K')

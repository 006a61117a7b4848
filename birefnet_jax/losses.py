"""The official BiRefNet training losses (``loss.py`` + ``train.py``), as pure jnp functions.

Everything is NHWC and differentiable under ``jit``/``grad``. The total is

    loss = loss_pix + loss_cls + 1.0 * loss_gdt

- ``loss_pix``: the pixel criteria (DIS5K: BCE x30, IoU x0.5, SSIM x10) applied with equal weight
  to every supervised scale ``[m4, m3, m2, final]``; logits are upsampled to the GT size with
  align_corners bilinear *before* the sigmoid. The GT is clamped to [0, 1].
- ``loss_gdt``: OutRef gradient loss, ``BCE(sigmoid(up(gdt_pred_k)), sigmoid(gdt_label_k))``
  summed over k = 4, 3, 2. The label (``laplacian * up(m_k)``) is *not* detached, as in the
  official code: the loss also trains ``m_k`` through the BCE target.
- ``loss_cls``: ``5.0 * cross_entropy`` when the model has the auxiliary class head.

Parity notes (official quirks reproduced on purpose):
- BCE is on probabilities with each log clamped at -100 (``nn.BCELoss``), not BCE-with-logits.
  Its gradients are those of torch's autograd: d/dp = (p - t) / max(p (1 - p), 1e-12), which stays
  finite where float32 sigmoid saturates to exactly 0 or 1; d/dt = log(1 - p) - log(p) with the
  clamped logs (torch returns -logit(p), i.e. +-inf at p in {0, 1}; we keep it finite there).
- IoU is summed (not averaged) over the batch and has no epsilon.
- SSIM uses the official float32 Gaussian window even in a float64 computation, zero padding 5
  and ``sigma^2 = E[x^2] - mu^2`` without clamping.
"""

import math
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# The OutRef gradient label is computed by the model (models/gdt.py); ``losses.laplacian_gdt_gt``
# stays importable here beside the gradient loss that consumes it.
from birefnet_jax.models.gdt import laplacian_gdt_gt  # pylint: disable=unused-import
from birefnet_jax.models.resize import resize_bilinear_align_corners

# Names of the supervised scales in the order the model returns them (fixture names).
PIX_LEVELS = ('m4', 'm3', 'm2', 'final')
# OutRef levels in the order the model returns them (decoder levels 4, 3, 2).
GDT_LEVELS = (4, 3, 2)
# Criteria in the order ``PixLoss`` instantiates them (sets the summation order of loss_pix).
PIX_CRITERIA = ('bce', 'iou', 'ssim', 'mae', 'mse')
# Official criteria this port does not implement (all zero in every official task).
_UNSUPPORTED_CRITERIA = ('iou_patch', 'triplet', 'reg', 'cnt', 'structure')

CLS_LAMBDA = 5.0          # config.lambdas_cls['ce']
GDT_LAMBDA = 1.0          # train.py: loss + loss_gdt * 1.0
TASKS = ('DIS5K', 'COD', 'HRSOD', 'General', 'General-2K', 'Matting')

_BCE_LOG_FLOOR = -100.0   # torch clamps each log of BCELoss at -100
_BCE_GRAD_EPS = 1e-12     # torch's binary_cross_entropy_backward denominator floor
_SSIM_WINDOW_SIZE = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = 0.01 ** 2
_SSIM_C2 = 0.03 ** 2


# ----------------------------------------------------------------------------------------------
# Lambdas
# ----------------------------------------------------------------------------------------------

def pixel_lambdas(task: str = 'DIS5K') -> dict:
  """Official ``config.lambdas_pix_last`` of ``task`` (criteria this port implements).

  Zero entries are kept so that every task has the same keys; a zero lambda skips its criterion.
  """
  if task not in TASKS:
    raise ValueError(f'losses.pixel_lambdas: unknown task {task!r}; expected one of {TASKS}')
  if task == 'Matting':
    return dict(bce=30.0, iou=0.0, ssim=10.0, mae=100.0, mse=0.0)
  if task in ('General', 'General-2K'):
    return dict(bce=30.0, iou=0.5, ssim=10.0, mae=100.0, mse=0.0)
  return dict(bce=30.0, iou=0.5, ssim=10.0, mae=0.0, mse=0.0)   # DIS5K, COD, HRSOD


def finetune_last_epochs(task: str = 'DIS5K') -> int:
  """Official ``config.finetune_last_epochs`` (negative: the last N epochs are the finetune)."""
  table = {'DIS5K': -40, 'COD': -20, 'HRSOD': -20, 'General': -20, 'General-2K': -20,
           'Matting': -10}
  if task not in table:
    raise ValueError(f'losses.finetune_last_epochs: unknown task {task!r}; expected one of {TASKS}')
  return table[task]


def finetune_epochs_started(epoch: int, total_epochs: int, last_epochs: int) -> int:
  """How many finetune epochs have started by 1-based ``epoch`` (0 before the finetune window).

  ``last_epochs`` is ``config.finetune_last_epochs`` (negative: the last N epochs; 0 or more: no
  window). train.py enters the finetune branch when ``epoch > epochs + finetune_last_epochs``:
  with 500 DIS5K epochs (-40), epoch 461 is the first finetune epoch (returns 1), epoch 500
  returns 40.
  """
  if last_epochs >= 0:
    return 0
  return max(0, epoch - (total_epochs + last_epochs))


def finetune_lambdas(base: Mapping[str, float], epochs_into_finetune: int,
                     task: str = 'DIS5K') -> dict:
  """Pixel lambdas after ``epochs_into_finetune`` finetune epochs have started.

  train.py multiplies its lambdas in place at the start of every finetune epoch, so the decay is
  cumulative: after k epochs, non-Matting tasks have bce * 0, iou * 0.5**k, mae * 0.9**k, ssim
  unchanged; Matting has mse * 0.9**k, ssim * 0.9**k, mae unchanged.

  This is a pure function of k on purpose. The official in-place update restarts from the base
  lambdas when a run is resumed inside the window (the lambdas live in the loss object, not in
  the checkpoint); here a resumed run gets the value an uninterrupted run would have.
  """
  if epochs_into_finetune < 0:
    raise ValueError('losses.finetune_lambdas: epochs_into_finetune must be >= 0, got '
                     f'{epochs_into_finetune}')
  if task not in TASKS:
    raise ValueError(f'losses.finetune_lambdas: unknown task {task!r}; expected one of {TASKS}')
  k = int(epochs_into_finetune)
  out = dict(base)
  if k == 0:
    return out
  if task == 'Matting':
    factors = dict(mae=1.0, mse=0.9, ssim=0.9)
  else:
    factors = dict(bce=0.0, ssim=1.0, iou=0.5, mae=0.9)
  for name, factor in factors.items():
    if name in out:
      # Repeated multiplication, like the official loop (0.5**k is exact either way).
      value = out[name]
      for _ in range(k):
        value = value * factor
      out[name] = value
  return out


# ----------------------------------------------------------------------------------------------
# Criteria on probabilities (NHWC)
# ----------------------------------------------------------------------------------------------

def _clamped_log(x):
  return jnp.maximum(jnp.log(x), _BCE_LOG_FLOOR)


@jax.custom_vjp
def _bce_elementwise_sum(p, t):
  # -(t log p + (1 - t) log(1 - p)), written as torch's kernel does: (t - 1) log(1-p) - t log p.
  return jnp.sum((t - 1) * _clamped_log(1 - p) - t * _clamped_log(p))


def _bce_fwd(p, t):
  return _bce_elementwise_sum(p, t), (p, t)


def _bce_bwd(residuals, g):
  p, t = residuals
  # torch's binary_cross_entropy_backward: finite even where p is exactly 0 or 1.
  grad_p = g * (p - t) / jnp.maximum((1 - p) * p, jnp.asarray(_BCE_GRAD_EPS, p.dtype))
  # torch's target gradient is -logit(p); with clamped logs it stays finite at p in {0, 1}.
  grad_t = g * (_clamped_log(1 - p) - _clamped_log(p))
  return grad_p, grad_t


_bce_elementwise_sum.defvjp(_bce_fwd, _bce_bwd)


def bce_loss(p, t):
  """``nn.BCELoss()`` (mean) on probabilities ``p`` against targets ``t`` (same shape)."""
  if p.shape != t.shape:
    raise ValueError(f'losses.bce_loss: shapes differ: prediction {p.shape}, target {t.shape}')
  return _bce_elementwise_sum(p, t.astype(p.dtype)) / p.size


def iou_loss(p, t):
  """Official ``IoULoss``: sum over the batch of ``1 - sum(p t) / (sum t + sum p - sum(p t))``."""
  axes = tuple(range(1, p.ndim))
  inter = jnp.sum(t * p, axis=axes)
  union = jnp.sum(t, axis=axes) + jnp.sum(p, axis=axes) - inter
  return jnp.sum(1 - inter / union)


def ssim_window(dtype=jnp.float32) -> np.ndarray:
  """The official 11x11 SSIM window, built in float32 exactly as ``loss.create_window``.

  ``torch.Tensor([exp(...)])`` rounds the 1-D Gaussian to float32; torch's float32 sum of the 11
  taps is the correctly rounded sum (numpy's pairwise float32 sum is 1 ulp lower), the
  normalisation and the outer product are float32. The official float64 run uses this float32
  window upcast (``type_as``); an exact float64 window moves the SSIM terms by ~3e-6.
  """
  half = _SSIM_WINDOW_SIZE // 2
  g = np.array([math.exp(-(i - half) ** 2 / float(2 * _SSIM_SIGMA ** 2))
                for i in range(_SSIM_WINDOW_SIZE)], dtype=np.float32)
  s = np.float32(np.sum(g.astype(np.float64)))
  g = (g / s).astype(np.float32)
  window = np.outer(g, g).astype(np.float32)
  return window.astype(np.dtype(dtype))


def _windowed_means(stack, window):
  """Depthwise 11x11 correlation with zero padding 5 of every channel of NHWC ``stack``."""
  channels = stack.shape[-1]
  kernel = jnp.broadcast_to(window[:, :, None, None],
                            window.shape + (1, channels)).astype(stack.dtype)
  pad = _SSIM_WINDOW_SIZE // 2
  return lax.conv_general_dilated(
      stack, kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels,
      precision=lax.Precision.HIGHEST)


def ssim_loss(p, t):
  """Official ``SSIMLoss``: ``(1 - ssim) / 2``, ssim averaged over all pixels and channels."""
  if p.shape != t.shape:
    raise ValueError(f'losses.ssim_loss: shapes differ: prediction {p.shape}, target {t.shape}')
  t = t.astype(p.dtype)
  c = p.shape[-1]
  window = jnp.asarray(ssim_window(p.dtype))
  # One grouped conv for the five windowed moments (channel blocks of size c).
  moments = _windowed_means(jnp.concatenate([p, t, p * p, t * t, p * t], axis=-1), window)
  mu1, mu2, e11, e22, e12 = (moments[..., i * c:(i + 1) * c] for i in range(5))
  mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
  sigma1_sq = e11 - mu1_sq
  sigma2_sq = e22 - mu2_sq
  sigma12 = e12 - mu1_mu2
  ssim_map = (((2 * mu1_mu2 + _SSIM_C1) * (2 * sigma12 + _SSIM_C2))
              / ((mu1_sq + mu2_sq + _SSIM_C1) * (sigma1_sq + sigma2_sq + _SSIM_C2)))
  return 1 - (1 + jnp.mean(ssim_map)) / 2


def mae_loss(p, t):
  """``nn.L1Loss()`` (mean)."""
  return jnp.mean(jnp.abs(p - t.astype(p.dtype)))


def mse_loss(p, t):
  """``nn.MSELoss()`` (mean)."""
  return jnp.mean(jnp.square(p - t.astype(p.dtype)))


_CRITERIA = dict(bce=bce_loss, iou=iou_loss, ssim=ssim_loss, mae=mae_loss, mse=mse_loss)


def cross_entropy(logits, labels):
  """``nn.CrossEntropyLoss()`` (mean over the batch) of (B, K) logits and (B,) int labels.

  Labels < 0 (the data pipeline's "unknown class") are left out of the mean; torch would raise.
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  valid = labels >= 0
  picked = jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
  n_valid = jnp.sum(valid)
  total = -jnp.sum(jnp.where(valid, picked, 0))
  return jnp.where(n_valid > 0, total / jnp.maximum(n_valid, 1), 0).astype(logits.dtype)


# ----------------------------------------------------------------------------------------------
# Combined losses
# ----------------------------------------------------------------------------------------------

def _probabilities_at(logits, size):
  """Sigmoid of ``logits`` upsampled (align_corners bilinear, on logits) to ``size``."""
  if logits.shape[1:3] != tuple(size):
    logits = resize_bilinear_align_corners(logits, size)
  return jax.nn.sigmoid(logits)


def _is_static_zero(value) -> bool:
  return isinstance(value, (int, float)) and value == 0


def _check_lambdas(lambdas: Mapping[str, float]):
  for name, value in lambdas.items():
    if name in _UNSUPPORTED_CRITERIA:
      if not _is_static_zero(value):
        raise ValueError(f'losses: pixel criterion {name!r} is not implemented (official lambda '
                         'is 0 in every task); set it to 0 or drop it')
    elif name not in _CRITERIA:
      raise ValueError(f'losses: unknown pixel criterion {name!r}; expected some of '
                       f'{PIX_CRITERIA}')


def pixel_loss(scaled_logits: Sequence, gt, lambdas: Optional[Mapping[str, float]] = None):
  """Official ``PixLoss`` over the supervised scales; returns ``(loss_pix, terms)``.

  ``scaled_logits``: logits [m4, m3, m2, final] (NHWC, 1 channel); ``gt`` (B, H, W, 1) already
  clamped to [0, 1]. A criterion with a static (Python) zero lambda is skipped, like the
  official code which does not instantiate it; traced lambdas are always evaluated.
  """
  lambdas = pixel_lambdas('DIS5K') if lambdas is None else lambdas
  _check_lambdas(lambdas)
  active = [c for c in PIX_CRITERIA if c in lambdas and not _is_static_zero(lambdas[c])]
  if len(scaled_logits) == len(PIX_LEVELS):
    level_names = PIX_LEVELS
  else:
    level_names = tuple(f'level{i}' for i in range(len(scaled_logits) - 1)) + ('final',)
  terms = {}
  loss = jnp.zeros((), gt.dtype)
  dict_terms = {c: jnp.zeros((), gt.dtype) for c in active}
  size = gt.shape[1:3]
  for level, logits in zip(level_names, scaled_logits):
    if logits.ndim != 4 or logits.shape[-1] != 1 or logits.shape[0] != gt.shape[0]:
      raise ValueError(f'losses.pixel_loss: level {level} logits have shape {logits.shape}; '
                       f'expected (B, h, w, 1) with B = {gt.shape[0]} (NHWC)')
    p = _probabilities_at(logits, size)
    for c in active:
      raw = _CRITERIA[c](p, gt)
      weighted = raw * lambdas[c]   # official: criterion * lambda * pix_loss_lambda (1.0)
      terms[f'loss_pix_{level}_{c}_raw'] = raw
      terms[f'loss_pix_{level}_{c}'] = weighted
      loss = loss + weighted
      dict_terms[c] = dict_terms[c] + weighted / len(scaled_logits)
  terms['loss_pix'] = loss
  for c in active:
    terms[f'loss_dict_pix_{c}'] = dict_terms[c]
  return loss, terms


def gdt_loss(gdt_preds: Sequence, gdt_labels: Sequence):
  """OutRef gradient loss; returns ``(loss_gdt, terms)``. Labels are used undetached."""
  if len(gdt_preds) != len(gdt_labels):
    raise ValueError(f'losses.gdt_loss: {len(gdt_preds)} predictions but {len(gdt_labels)} labels')
  names = GDT_LEVELS if len(gdt_preds) == len(GDT_LEVELS) else range(len(gdt_preds))
  terms = {}
  loss = None
  for k, pred, label in zip(names, gdt_preds, gdt_labels):
    p = _probabilities_at(pred, label.shape[1:3])
    term = bce_loss(p, jax.nn.sigmoid(label))
    terms[f'loss_gdt_{k}'] = term
    loss = term if loss is None else term + loss   # train.py's accumulation order
  terms['loss_gdt'] = loss
  return loss, terms


def total_loss(outs: Mapping, gt, class_labels=None, lambdas: Optional[Mapping[str, float]] = None):
  """The official training loss of one batch; returns ``(loss, terms)``.

  ``outs``: the model's train-mode dict (``scaled_logits``, optionally ``gdt_preds`` /
  ``gdt_labels`` and ``class_logits``); ``gt`` (B, H, W, 1) masks (clamped to [0, 1] here);
  ``class_labels`` (B,) ints, required when ``outs['class_logits']`` is not None; ``lambdas``:
  pixel lambdas (default: official DIS5K, see ``pixel_lambdas`` / ``finetune_lambdas``).
  ``terms`` uses the fixture names (``loss_pix_m4_bce_raw``, ..., ``loss_total``).
  """
  if gt.ndim != 4 or gt.shape[-1] != 1:
    raise ValueError(f'losses.total_loss: gt must be (B, H, W, 1), got shape {gt.shape}')
  class_logits = outs.get('class_logits')
  if class_logits is not None and class_labels is None:
    raise ValueError('losses.total_loss: the model has a class head (outs["class_logits"]) but '
                     'no class_labels were given')
  # Losses run in float32 at least (as official under bf16 autocast, where accelerate returns
  # float32 outputs); float64 stays float64.
  dtype = jnp.promote_types(outs['scaled_logits'][-1].dtype, jnp.float32)
  outs = dict(outs)
  for key in ('scaled_logits', 'gdt_preds', 'gdt_labels', 'class_logits'):
    if outs.get(key) is not None:
      outs[key] = jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), outs[key])
  class_logits = outs.get('class_logits')
  gt = jnp.clip(gt.astype(dtype), 0, 1)
  loss_pix, terms = pixel_loss(outs['scaled_logits'], gt, lambdas)

  if class_logits is None:
    loss_cls = jnp.zeros((), dtype)
  else:
    loss_cls = cross_entropy(class_logits, class_labels) * CLS_LAMBDA
  terms['loss_cls'] = loss_cls

  loss = loss_pix + loss_cls
  if outs.get('gdt_preds'):   # OutRef off: no gradient predictions, no gradient loss
    loss_gdt, gdt_terms = gdt_loss(outs['gdt_preds'], outs['gdt_labels'])
    terms.update(gdt_terms)
    loss = loss + loss_gdt * GDT_LAMBDA
  else:
    terms['loss_gdt'] = jnp.zeros((), dtype)
  terms['loss_total'] = loss
  return loss, terms

"""Training BiRefNet: one flat loop, read top to bottom (big_vision style).

  config -> mesh -> data iterator -> model init (random / converted weights) -> optimizer
  -> jitted train step -> [resume from the workdir's checkpoint] -> loop:
       step; every log_every: progress line, W/metrics.jsonl, TensorBoard;
       every eval_every: validation (birefnet_jax.metrics), samples to TensorBoard;
       every ckpt_every and after each validation: checkpoint (async).

Determinism: the batch of step s depends only on (seed, s) through the checkpointed grain
iterator, dropout / drop-path keys are folded from s, and the finetune loss weights are a
function of s, so a run killed at any point and restarted from its last checkpoint logs the
same losses as one that was never interrupted.
"""

import contextlib
import itertools
import json
import os
import time
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from birefnet_jax import checkpoint as checkpoint_lib
from birefnet_jax import image_io
from birefnet_jax import inference
from birefnet_jax import losses
from birefnet_jax import model_loading
from birefnet_jax import optim
from birefnet_jax import sharding
from birefnet_jax.convert.convert import config_to_json
from birefnet_jax.data.config import IMAGENET_MEAN, IMAGENET_STD
from birefnet_jax.models import config as config_lib
from birefnet_jax.train_state import TrainState


# ----------------------------------------------------------------------------------------------
# Small helpers (everything the loop calls that is not one line).
# ----------------------------------------------------------------------------------------------

def log(message: str):
  """Progress output of process 0 (stdout: absl INFO is muted, orbax is too chatty there)."""
  if jax.process_index() == 0:
    print(f'[{time.strftime("%H:%M:%S")}] {message}', flush=True)


def global_batch_size(config) -> int:
  """config.batch_size, or batch_size_per_device x devices when it is -1."""
  if config.batch_size > 0:
    return int(config.batch_size)
  return int(config.batch_size_per_device) * jax.device_count()


def frozen_subtrees(model_config) -> tuple[str, ...]:
  """Top-level parameter subtrees the optimizer leaves alone: ('bb',) for a frozen backbone
  (``model.freeze_backbone``; None = official rule, DINOv3 frozen)."""
  return ('bb',) if config_lib.backbone_frozen(model_config) else ()


def peak_learning_rate(config, batch_size: int) -> float:
  """config.optim.lr, or (None) the official rule for config.task on the global batch."""
  if config.optim.lr is not None:
    return float(config.optim.lr)
  return optim.official_learning_rate(config.task, batch_size)


def resolve_schedule(config, num_train_examples: Optional[int], batch_size: int):
  """(steps_per_epoch, epochs, total_steps) of the run.

  An epoch is ``num_train_examples // batch_size`` steps (drop_last, as the official loader)
  unless ``config.steps_per_epoch`` fixes it; ``config.total_steps > 0`` shortens (or
  lengthens) the run without changing what an epoch is, so lr / finetune schedules keep their
  meaning.
  """
  steps_per_epoch = int(config.steps_per_epoch)
  if steps_per_epoch <= 0:
    if not num_train_examples:
      raise ValueError('cannot tell the training set size: set config.steps_per_epoch')
    steps_per_epoch = max(1, num_train_examples // batch_size)
  epochs = int(config.epochs)
  total_steps = int(config.total_steps)
  if total_steps <= 0:
    total_steps = epochs * steps_per_epoch
  return steps_per_epoch, epochs, total_steps


def loss_lambdas(config, step: int, steps_per_epoch: int, epochs: int,
                 data_parallel: int = 1) -> dict:
  """Pixel-loss lambdas for ``step``: the official ones, decayed in the last N epochs.

  Criteria whose official lambda is 0 are left out (the loss skips them statically); the others
  are passed to the step as traced scalars, so the decay never recompiles the step.

  ``data_parallel``: the number of devices the global batch is split over. The official IoU loss
  is a *sum* over each GPU's own batch (the other terms are means) and DDP averages the GPUs'
  gradients, so on N GPUs it weighs ``sum over the global batch / N``. Our step computes one loss
  over the whole global batch, so the IoU lambda is divided by the device count: N devices train
  as the official code does on N GPUs with the same per-device batch (1 device: unchanged).
  """
  if data_parallel < 1:
    raise ValueError(f'train.loss_lambdas: data_parallel must be >= 1, got {data_parallel}')
  base = {k: v for k, v in losses.pixel_lambdas(config.task).items() if v != 0}
  epoch = step // steps_per_epoch + 1          # 1-based, as the official loop
  started = losses.finetune_epochs_started(epoch, epochs, int(config.finetune_last_epochs))
  lambdas = losses.finetune_lambdas(base, started, config.task) if started else base
  if 'iou' in lambdas and data_parallel > 1:
    lambdas = dict(lambdas, iou=lambdas['iou'] / data_parallel)
  return lambdas


def denormalize(image: np.ndarray) -> np.ndarray:
  rgb = image * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
  return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def sample_panel(image, gt_uint8, pred_uint8, max_width: int = 768) -> np.ndarray:
  """[image | GT | prediction] at the GT's size, for TensorBoard (HWC uint8)."""
  import cv2  # pylint: disable=g-import-not-at-top
  h, w = gt_uint8.shape
  rgb = cv2.resize(denormalize(image), (w, h), interpolation=cv2.INTER_LINEAR)
  gray = lambda m: np.repeat(m[:, :, None], 3, axis=2)
  panel = np.concatenate([rgb, gray(gt_uint8), gray(pred_uint8)], axis=1)
  if panel.shape[1] > max_width:
    scale = max_width / panel.shape[1]
    panel = cv2.resize(panel, (max_width, max(1, int(round(panel.shape[0] * scale)))),
                       interpolation=cv2.INTER_AREA)
  return panel


def sample_grid(panels) -> np.ndarray:
  """The sample panels stacked top to bottom (narrower ones padded on the right), HWC uint8."""
  width = max(p.shape[1] for p in panels)
  rows = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in panels]
  return np.concatenate(rows, axis=0)


def write_run_files(workdir: str, config):
  """W/config.json (the whole training config) and W/model_config.json (the model, in the
  converter's format): predict, export and init_from rebuild the model from them."""
  with open(os.path.join(workdir, model_loading.TRAINING_CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, model_loading.CONFIG_FILE), 'w') as f:
    f.write(config_to_json(config.model))


# Metrics shown in the progress log and the final table, in the DIS tables' order.
SHOWN_METRICS = ('Sm', 'maxFm', 'wFm', 'MAE', 'meanEm', 'HCE')


def metrics_table(results: dict) -> str:
  """{'set/metric': value} -> a small text table, one row per validation set."""
  sets = list(dict.fromkeys(k.split('/')[0] for k in results))
  header = ['set'] + [m for m in SHOWN_METRICS if any(f'{s}/{m}' in results for s in sets)]
  rows = [header]
  for name in sets:
    rows.append([name] + [f'{results[f"{name}/{m}"]:.4f}' if f'{name}/{m}' in results else ''
                          for m in header[1:]])
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def next_commands(workdir: str, config) -> str:
  """What to run next on one's own images, with this run's workdir."""
  height, width = config.data.image_size
  shown = os.path.relpath(workdir) if not os.path.relpath(workdir).startswith('..') else workdir
  return '\n'.join([
      'Next, on your own images:',
      f'  python -m birefnet_jax.predict --checkpoint {shown} --input photos/ --output masks/',
      f'  python -m birefnet_jax.evaluate --pred_dir masks/ --gt_dir ground_truth/',
      f'  python -m birefnet_jax.export --checkpoint {shown} --output model.jaxexport',
      f'(the best checkpoint by validation {config.best_metric or "(none: latest)"}, at the '
      f'training resolution {width}x{height}; --step latest|N picks another)'])


class MetricsWriter:
  """W/metrics.jsonl (one JSON object per line) + TensorBoard, written by process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.tb = None
    if self.enabled:
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:
        logging.warning('tensorboardX is not installed: no TensorBoard output')

  def write(self, step: int, kind: str, values: dict):
    if not self.enabled:
      return
    record = dict(step=int(step), kind=kind, **{k: _to_json(v) for k, v in values.items()})
    self.jsonl.write(json.dumps(record) + '\n')
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
          self.tb.add_scalar(f'{kind}/{k}', float(v), step)
      self.tb.flush()

  def images(self, step: int, tag: str, panels):
    if self.enabled and self.tb is not None:
      for i, panel in enumerate(panels):
        self.tb.add_image(f'{tag}/{i}', panel, step, dataformats='HWC')
      self.tb.flush()

  def close(self):
    if self.enabled:
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()


def _to_json(v):
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  if isinstance(v, np.ndarray):
    return v.tolist()
  return v


# ----------------------------------------------------------------------------------------------
# The step functions.
# ----------------------------------------------------------------------------------------------

def make_train_step(model, tx, lr_schedule, *, base_rng, deterministic: bool,
                    use_class_labels: bool, grad_accum_steps: int = 1, return_grads: bool = False):
  """train_step(state, batch, lambdas) -> (state, metrics); pure, to be jitted.

  ``lambdas``: the pixel-loss weights as (traced) scalars, see ``loss_lambdas``.
  ``return_grads`` adds the gradients to the metrics (tests compare them with the official ones).
  """

  def train_step(state: TrainState, batch, lambdas):
    # Dropout / drop-path randomness is a function of the step: identical after a resume.
    step_rng = jax.random.fold_in(base_rng, state.step)
    rngs = {'dropout': jax.random.fold_in(step_rng, 0), 'drop_path': jax.random.fold_in(step_rng, 1)}

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      outs, updates = model.apply(variables, batch['image'], train=True,
                                  deterministic=deterministic, mutable=['batch_stats'], rngs=rngs)
      class_labels = batch['class_label'] if use_class_labels else None
      loss, terms = losses.total_loss(outs, batch['mask'], class_labels=class_labels,
                                      lambdas=lambdas)
      return loss, (terms, updates.get('batch_stats', {}))

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    metrics = dict(terms, loss=loss, grad_norm=_global_norm(grads),
                   lr=lr_schedule(state.step // grad_accum_steps))
    if return_grads:
      metrics['grads'] = grads
    return new_state, metrics

  return train_step


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_predict_fn(model):
  """predict(state, images) -> sigmoid probabilities (B, H, W) float32 (eval mode)."""

  def predict(state: TrainState, images):
    return inference.model_probabilities(model, state.variables, images)[..., 0]

  return predict


# ----------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------

def evaluate(predict, state, config, mesh, *, num_samples: int = 0):
  """Validation on every set of ``config.data.val_sets``, as the official evaluation.

  Predictions at the network size are resized back to each GT's size with align_corners
  bilinear, truncated to uint8, and scored with ``birefnet_jax.metrics.MetricAccumulator``
  (every metric of ``evaluate``, mBA and BIoU included).
  Every process feeds its share of each batch; the (replicated) output is scored on process 0.
  Returns ({'<set>/<metric>': value}, [sample panels]).
  """
  from birefnet_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from birefnet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batch_size = int(config.eval_batch_size_per_device) * jax.device_count()
  local = batch_size // jax.process_count()
  lo = jax.process_index() * local
  in_sharding = sharding.batch_sharding(mesh)
  results, panels = {}, []
  compiled = False
  val_sets = pipeline.val_set_names(config.data)
  limit = int(config.max_eval_images)
  for set_name in val_sets:
    accumulator = metrics_lib.MetricAccumulator()
    examples = pipeline.eval_examples(config.data, set_name)
    if limit > 0:
      examples = itertools.islice(examples, limit)
    examples = iter(examples)
    while True:
      chunk = list(itertools.islice(examples, batch_size))
      if not chunk:
        break
      images = np.stack([e['image'] for e in chunk]).astype(np.float32)
      if len(chunk) < batch_size:   # pad the last batch; padded rows are dropped below
        pad = np.zeros((batch_size - len(chunk),) + images.shape[1:], images.dtype)
        images = np.concatenate([images, pad])
      batch = sharding.global_batch(images[lo:lo + local], in_sharding)
      if not compiled:   # processes start predicting together
        sharding.compile_everywhere(predict, state, batch)
        compiled = True
      probs = predict(state, batch)
      if jax.process_index() != 0:
        continue
      probs = np.asarray(jax.device_get(probs))[:len(chunk)]
      for prob, example in zip(probs, chunk):
        gt = example['mask_uint8']
        pred = inference.probabilities_to_mask(prob, gt.shape)
        accumulator.update(pred, gt, name=example.get('name'))
        if len(panels) < num_samples and set_name == val_sets[0]:
          panels.append(sample_panel(example['image'], gt, pred))
    if jax.process_index() == 0:
      for k, v in accumulator.result().items():
        if v is not None:   # mBA when no GT of the set has a boundary (empty or full masks)
          results[f'{set_name}/{k}'] = float(v)
  return results, panels


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from ``workdir`` if it holds a checkpoint); returns the last metrics."""
  from birefnet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from birefnet_jax.models.birefnet import BiRefNet  # pylint: disable=g-import-not-at-top
  # Plain values from here on (config.data.task is a reference to config.task).
  config = config.copy_and_resolve_references()
  # orbax and tensorstore need absolute paths; a relative --workdir is relative to here.
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    write_run_files(workdir, config)

  # Mesh: every device of every process; the batch is split over all of them.
  mesh = sharding.make_mesh(int(config.fsdp))
  batch_size = global_batch_size(config)
  local_batch = sharding.local_batch_size(batch_size)
  log(f'{jax.device_count()} devices ({jax.devices()[0].platform}), {jax.process_count()} '
      f'process(es), mesh {dict(mesh.shape)}; global batch {batch_size}')

  # Input pipeline: this process's shard of every global batch, checkpointable.
  train_iter = pipeline.train_iterator(config.data, local_batch_size=local_batch,
                                       seed=int(config.seed), process_index=jax.process_index(),
                                       process_count=jax.process_count())
  num_train = (len(pipeline.train_source(config.data))
               if int(config.steps_per_epoch) <= 0 else None)
  steps_per_epoch, epochs, total_steps = resolve_schedule(config, num_train, batch_size)
  eval_every = _every(config, 'eval_every', steps_per_epoch)
  ckpt_every = _every(config, 'ckpt_every', steps_per_epoch)
  log(f'{num_train if num_train else "?"} training examples, {steps_per_epoch} steps/epoch, '
      f'{epochs} epochs; training for {total_steps} steps (validation every {eval_every}, '
      f'checkpoint every {ckpt_every})')

  # Model and optimizer.
  model = BiRefNet(config.model)
  accum = int(config.optim.grad_accum_steps)
  tx, lr_schedule = optim.make_optimizer(config.optim, max(1, steps_per_epoch // accum),
                                         epochs=epochs,
                                         lr=peak_learning_rate(config, batch_size),
                                         frozen=frozen_subtrees(config.model))

  rng = jax.random.key(int(config.seed))
  init_rng, train_rng = jax.random.split(rng)
  # Parameters do not depend on the input size: initialize on a small image.
  dummy = jnp.zeros((1, 64, 64, 3), jnp.float32)

  def init_state(rng):
    return TrainState.create(model.init({'params': rng}, dummy, train=False), tx)

  abstract_state = jax.eval_shape(init_state, init_rng)
  state_sharding = sharding.state_shardings(mesh, abstract_state)
  repl = sharding.replicated(mesh)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
  log(f'model: {config.model.backbone.family} backbone'
      f'{" (frozen)" if frozen_subtrees(config.model) else ""}, {n_params / 1e6:.2f} M parameters, '
      f'compute dtype {config.model.dtype}')

  # Checkpoints: resume from the workdir when it has one.
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                     keep=int(config.keep_checkpoints),
                                     best_metric=config.best_metric or None,
                                     best_mode=config.best_mode)
  start_step = ckpt.latest_step()
  if start_step is not None and start_step >= total_steps:
    log(f'this run is already complete: {workdir} holds the checkpoint of step {start_step} '
        f'(total_steps {total_steps}); nothing to do. To train on, raise --config.total_steps '
        '(or --config.epochs); to start afresh, use another --workdir.')
    log(next_commands(workdir, config))
    ckpt.close()
    train_iter.close()
    return dict(step=start_step, last_validation=None, already_complete=True)
  if start_step is not None:
    state = ckpt.restore(start_step, checkpoint_lib.abstract_like(abstract_state, state_sharding),
                         train_iter)
    log(f'resumed from the checkpoint of step {start_step}')
  elif config.init_from:
    random_vars = jax.device_get(jax.jit(
        lambda r: model.init({'params': r}, dummy, train=False))(init_rng))
    variables, _ = model_loading.merge_pretrained(
        random_vars, model_loading.load_init_variables(config.init_from), config.init_from,
        log=log)
    state = jax.jit(lambda v: TrainState.create(v, tx), out_shardings=state_sharding)(variables)
  else:
    state = jax.jit(init_state, out_shardings=state_sharding)(init_rng)
  start_step = int(start_step or 0)

  # The compiled steps. The state is donated: updated in place on the devices.
  train_step = jax.jit(
      make_train_step(model, tx, lr_schedule, base_rng=train_rng,
                      deterministic=bool(config.deterministic),
                      use_class_labels=bool(config.model.auxiliary_classification),
                      grad_accum_steps=accum),
      in_shardings=(state_sharding, sharding.batch_sharding(mesh), repl),
      out_shardings=(state_sharding, repl), donate_argnums=(0,))
  predict = jax.jit(make_predict_fn(model),
                    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                    out_shardings=repl)
  accumulate = jax.jit(lambda acc, m: jax.tree.map(jnp.add, acc, m))

  writer = MetricsWriter(workdir)
  preempted = checkpoint_lib.PreemptionFlag()
  batch_keys = ('image', 'mask', 'class_label')

  def run_validation(step):
    t0 = time.time()
    results, panels = evaluate(predict, state, config, mesh,
                               num_samples=int(config.num_sample_images))
    results = jax.tree.map(float, results)
    writer.write(step, 'val', dict(results, eval_seconds=time.time() - t0))
    writer.images(step, 'val_samples', panels)
    if panels and jax.process_index() == 0:
      image_io.write_png(os.path.join(workdir, 'samples', f'step_{step}.png'), sample_grid(panels))
    shown = ', '.join(f'{k} {v:.4f}' for k, v in results.items()
                      if k.split('/')[-1] in SHOWN_METRICS)
    log(f'validation at step {step} ({time.time() - t0:.1f}s): {shown}')
    last_results.clear()
    last_results.update(results, step=step)
    # The checkpoint ranks by the best_metric of the first validation set (scored on process 0;
    # every process needs it, the ranking must agree).
    best = config.best_metric
    if not best:
      return {}
    first_set = pipeline.val_set_names(config.data)[0]
    value = np.float32(results.get(f'{first_set}/{best}', np.nan))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      value = multihost_utils.broadcast_one_to_all(value)
    return {best: float(value)}

  # The loop. Host syncs only at log / validation / checkpoint steps.
  last_results = {}   # the latest validation's {'set/metric': value, 'step': step}
  lambdas_host, lambdas_dev = None, None
  metric_sum, metric_count = None, 0
  timer_step, timer_t = start_step, time.time()
  # Training input shapes met so far: each compiles the train step once (dynamic_size draws
  # a new shape per batch; size_buckets bound them).
  train_shapes = set()
  size_buckets = config.data.get('size_buckets', None)
  last_val = None
  log_every = int(config.log_every)
  step = start_step
  try:
    for step in range(start_step + 1, total_steps + 1):
      lambdas = loss_lambdas(config, step - 1, steps_per_epoch, epochs,
                             data_parallel=jax.device_count())
      if lambdas != lambdas_host:   # changes once per finetune epoch: a tiny transfer
        lambdas_host = lambdas
        lambdas_dev = sharding.put_replicated({k: np.float32(v) for k, v in lambdas.items()}, mesh)
      ckpt.raise_if_failed()   # a failed background save stops the run here
      local = next(train_iter)
      batch = sharding.global_batch({k: local[k] for k in batch_keys if k in local},
                                    sharding.batch_sharding(mesh))
      shape = tuple(local['image'].shape[1:3])
      new_shape = shape not in train_shapes
      train_shapes.add(shape)
      t_call = time.time()
      if step == start_step + 1:   # processes start the first step together
        sharding.compile_everywhere(train_step, state, batch, lambdas_dev)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = train_step(state, batch, lambdas_dev)
      if new_shape:   # the call returns once compiled (the step itself runs asynchronously)
        log(f'step {step}: training shape {shape[0]}x{shape[1]} (HxW) compiled in '
            f'{time.time() - t_call:.1f}s; {len(train_shapes)} compiled shape(s)'
            + (f' of {len(size_buckets)} buckets' if size_buckets else ''))
      metric_sum = metrics if metric_sum is None else accumulate(metric_sum, metrics)
      metric_count += 1
      stop = preempted.should_stop(step)   # on every process at the same step

      if step == start_step + 1:
        jax.block_until_ready(metrics)   # compile time does not belong in steps/s
        log(f'step {step}: first step done (compilation included) in {time.time() - timer_t:.1f}s')
        timer_step, timer_t = step, time.time()

      is_last = step == total_steps
      if step % log_every == 0 or is_last or stop:
        values = {k: float(v) / metric_count for k, v in jax.device_get(metric_sum).items()}
        values['lr'] = float(jax.device_get(metrics['lr']))
        metric_sum, metric_count = None, 0
        now = time.time()
        steps_per_sec = (step - timer_step) / max(now - timer_t, 1e-9) if step > timer_step else 0.0
        timer_step, timer_t = step, now
        values.update(steps_per_sec=steps_per_sec, images_per_sec=steps_per_sec * batch_size,
                      epoch=step / steps_per_epoch)
        writer.write(step, 'train', values)
        eta = (total_steps - step) / steps_per_sec if steps_per_sec else float('nan')
        log(f'step {step}/{total_steps} | loss {values["loss"]:.4f} (pix {values["loss_pix"]:.4f}, '
            f'gdt {values["loss_gdt"]:.4f}) | lr {values["lr"]:.3g} | {steps_per_sec:.2f} steps/s, '
            f'{steps_per_sec * batch_size:.1f} img/s | ETA {_duration(eta)}')

      validated = None   # the ranking metric of this step's validation, if one ran
      if ((eval_every > 0 and step % eval_every == 0)
          or (is_last and config.eval_at_end)):
        validated = run_validation(step)
        last_val = validated
      if ((ckpt_every > 0 and step % ckpt_every == 0) or validated is not None or is_last
          or stop):
        ckpt.save(step, state, train_iter, metrics=validated or None,
                  meta=dict(total_steps=total_steps))
      if stop:
        log(f'stopping at step {step} after SIGTERM (checkpoint saved)')
        break
  except BaseException:
    # An error (a bad file, a failed save, Ctrl-C) stops the run: release the last batch and
    # close the input pipeline, let a save in flight finish, and report the error itself, not one
    # from the clean-up. (grain may still leave one batch's shared memory to Python's resource
    # tracker on this path; see test_user_errors.py.)
    local = batch = None
    with contextlib.suppress(Exception):
      ckpt.close()
    train_iter.close()
    raise

  # The last batch lives in grain's shared memory (and, on CPU, in device arrays that alias it):
  # release it before the iterator stops, so that grain unlinks every block (no "leaked
  # shared_memory objects" at exit).
  local = batch = None
  ckpt.close()   # waits for the last save; raises CheckpointSaveError if it failed
  train_iter.close()
  writer.close()
  preempted.restore_handlers()
  if last_results:
    val_step = last_results.pop('step')
    log(f'final validation (step {val_step}):\n{metrics_table(last_results)}')
    if int(config.num_sample_images):
      log(f'sample predictions (image | ground truth | prediction): '
          f'{os.path.join(workdir, "samples", f"step_{val_step}.png")}')
  log(f'checkpoints: {os.path.join(workdir, "checkpoints")}; metrics: '
      f'{os.path.join(workdir, "metrics.jsonl")}; TensorBoard: tensorboard --logdir {workdir}')
  log(next_commands(workdir, config))
  return dict(step=step, last_validation=last_val)


def _every(config, name: str, steps_per_epoch: int) -> int:
  """``config.<name>_epochs`` x steps_per_epoch when > 0, else ``config.<name>`` (steps; <= 0: never)."""
  epochs = float(config[f'{name}_epochs'])
  if epochs > 0:
    return max(1, int(round(epochs * steps_per_epoch)))
  return int(config[name])


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'

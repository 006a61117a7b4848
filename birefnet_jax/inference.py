r"""Inference as a library: load a checkpoint, preprocess, run batched by shape, postprocess to
masks and RGBA cut-outs. ``python -m birefnet_jax.predict`` and ``export`` are command lines over
it, and the trainer's validation uses its postprocessing.

  loaded = inference.load(DST)          # a converter output or a training workdir
  predictor = inference.Predictor(loaded.model, loaded.variables, batch_size=4)
  masks = predictor.predict(images)     # uint8 RGB arrays -> uint8 masks at their sizes

Pipeline, as the official ``inference.py``:
  cv2 decode (BGR -> RGB) -> cv2.resize INTER_LINEAR to the resolution -> /255 -> ImageNet normalize
  -> model -> sigmoid -> align-corners bilinear resize to the original size -> x255, truncated.
Resolutions are width x height, as the official ``--resolution``; ``original`` keeps each
image's size floored to a multiple of 32 (the official code does the same flooring, with PIL
bicubic instead of cv2 linear resizing).

Batching: images are grouped by their model input shape; each shape compiles once (jit cache);
a last partial batch is padded to the batch size so that it reuses the compiled function.
Reading/resizing and postprocessing/writing run in threads, overlapping the model.
"""

import collections
import concurrent.futures
import itertools
import os
import sys
import time
from typing import Optional

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from birefnet_jax import image_io
from birefnet_jax import model_loading
from birefnet_jax.data import augment
from birefnet_jax.errors import UserError
from birefnet_jax.models.resize import resize_bilinear_align_corners_np
from birefnet_jax.models.swin import ATTENTION_IMPLEMENTATIONS

DEFAULT_RESOLUTION = '1024x1024'
DTYPES = ('float32', 'bfloat16', 'float16')


# ---------------------------------------------------------------------------------------------
# Loading.

def load(checkpoint, step=None) -> model_loading.Loaded:
  """``model_loading.load`` for a command line: a missing or unreadable checkpoint is a
  UserError (one line, no traceback)."""
  try:
    return model_loading.load(checkpoint, step)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None


def add_checkpoint_arguments(parser):
  """``--checkpoint`` and ``--step``, what ``load`` reads, for the command lines over it."""
  parser.add_argument('--checkpoint', required=True,
                      help='converted checkpoint directory, training workdir, or an official '
                           'release by its Hugging Face Hub name (e.g. ZhengPeng7/BiRefNet_lite, '
                           'downloaded and converted once into a cache)')
  parser.add_argument('--step', default=None,
                      help="a training workdir's checkpoint: 'best' (default: best by the run's "
                           "validation metric, else the latest), 'latest' or a step number")


# ---------------------------------------------------------------------------------------------
# Sizes.

def parse_resolution(text: str) -> Optional[tuple[int, int]]:
  """'WxH' -> (height, width); 'original' -> None. Sizes must be positive multiples of 32."""
  text = str(text).strip().lower()
  if text in ('original', 'none', ''):
    return None
  parts = text.split('x')
  try:
    width, height = (int(p) for p in parts)
  except ValueError:
    raise ValueError(f"resolution must be 'WxH' (e.g. 1024x1024) or 'original', got {text!r}")
  if width <= 0 or height <= 0 or width % 32 or height % 32:
    raise ValueError(f'resolution {width}x{height}: width and height must be positive multiples '
                     'of 32 (BiRefNet cuts its input into 32x32-aligned patches)')
  return height, width


def default_resolution(loaded) -> tuple[int, int]:
  """(height, width) to run a loaded checkpoint at when none is asked for: the resolution a
  training workdir was trained at, else the official 1024x1024."""
  return loaded.resolution or parse_resolution(DEFAULT_RESOLUTION)


def model_input_size(image_hw, resolution_hw):
  """The (height, width) the model sees for an image of size ``image_hw``."""
  if resolution_hw is not None:
    return tuple(resolution_hw)
  return tuple(max(32, s // 32 * 32) for s in image_hw)


# ---------------------------------------------------------------------------------------------
# Postprocessing (host side, numpy).

def probabilities_to_mask(probabilities, size_hw):
  """(h, w) float32 probabilities -> (H, W) uint8 mask: align-corners bilinear to ``size_hw``
  (width first, then height, as torch), then x255 truncated (torch's ``mul(255).byte()``).

  Done on the host: output sizes vary from image to image, and a jitted resize would compile
  once per distinct original size.
  """
  p = resize_bilinear_align_corners_np(np.asarray(probabilities, np.float32), size_hw)
  return (np.clip(p, 0, 1) * np.float32(255)).astype(np.uint8)  # the cast truncates


def _blur_fusion(image, foreground, background, alpha, r):
  """One step of blur-fusion foreground estimation (official ``image_proc.py``, CPU version:
  ``cv2.blur`` box filter, (r, r) kernel, reflect-101 borders). Arrays float32, alpha (H,W,1).
  Returns (foreground estimate clipped to [0, 1], blurred background)."""
  blurred_alpha = cv2.blur(alpha, (r, r))[:, :, None]
  blurred_fg = cv2.blur(foreground * alpha, (r, r)) / (blurred_alpha + 1e-5)
  blurred_bg = cv2.blur(background * (1 - alpha), (r, r)) / ((1 - blurred_alpha) + 1e-5)
  estimate = blurred_fg + alpha * (image - alpha * blurred_fg - (1 - alpha) * blurred_bg)
  return np.clip(estimate, 0, 1), blurred_bg


def refine_foreground(image, mask, r: int = 90):
  """Foreground colours for a cut-out: the official ``refine_foreground`` (fast foreground
  estimation by blur fusion, Forte & Pitie / Photoroom): a pass with radius ``r`` (90) from the
  image itself, then a pass with radius 6 from the first estimate. It removes the background
  colour bleeding into soft edges. image (H,W,3) uint8 RGB, mask (H,W) uint8 -> (H,W,3) uint8
  (truncated, as the official code)."""
  if image.shape[:2] != mask.shape[:2]:
    raise ValueError(f'refine_foreground: mask {mask.shape[:2]} and image {image.shape[:2]} '
                     'differ in size')
  image = image.astype(np.float32) / np.float32(255)
  alpha = (mask.astype(np.float32) / np.float32(255))[:, :, None]
  foreground, blurred_bg = _blur_fusion(image, image, image, alpha, r)
  foreground, _ = _blur_fusion(image, foreground, blurred_bg, alpha, 6)
  return (foreground * np.float32(255)).astype(np.uint8)


def cutout(image, mask, refine: bool = False):
  """RGBA uint8: the image's colours (refined foreground if ``refine``) with the mask as alpha."""
  rgb = refine_foreground(image, mask) if refine else image
  return np.concatenate([rgb, mask[:, :, None]], axis=-1)


# ---------------------------------------------------------------------------------------------
# The model.

def with_inference_options(model, dtype: Optional[str], attention: Optional[str] = None):
  """The same model computing in ``dtype`` ('float32', 'bfloat16' or 'float16'; None: as
  configured), with Swin window attention ``attention`` ('einsum', 'xla' or 'cudnn'; None: as
  configured). Parameters stay float32. With a reduced dtype the convolutions and matmuls run in
  it while LayerNorm, softmax, BatchNorm arithmetic, the deformable sampling and Swin's residual
  stream stay float32, as under the official torch autocast (fp16 in the official tutorials,
  bf16 in the official inference.py)."""
  changes = {}
  if dtype is not None and dtype != model.cfg.get('dtype', 'float32'):
    if dtype not in DTYPES:
      raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
    changes['dtype'] = dtype
  if attention is not None and attention != model.cfg.get('attention', 'einsum'):
    if attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f'attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}')
    changes['attention'] = attention
  if not changes:
    return model
  cfg = model.cfg.copy_and_resolve_references()
  cfg.update(changes)
  return type(model)(cfg)


# BatchNorm name -> the layer before it, whose output channels it scales (models/decoder_blocks.py,
# models/aspp.py, the decoder's OutRef convs).
_BATCH_NORM_INPUTS = {'bn_in': ('conv_in',), 'bn_out': ('conv_out',), 'bn1': ('conv1',),
                      'bn': ('atrous_conv', 'regular_conv'),
                      'global_avg_pool_2': ('global_avg_pool_1',)}


def _batch_norm_input(name):
  if name in _BATCH_NORM_INPUTS:
    return _BATCH_NORM_INPUTS[name]
  if name.startswith('gdt_convs_') and name.endswith('_1'):      # gdt_convs_{level}_1
    return (name[:-1] + '0',)
  return None


def fold_batch_norms(variables, epsilon: float = 1e-5):
  """Eval-mode BatchNorms folded into the conv before each: kernel * s and bias * s + t for
  s = scale / sqrt(var + eps), t = bias - mean * s (computed in float64 on the host).

  Returns new variables for the same model in eval mode: a folded BatchNorm keeps only
  ``batch_stats/.../folded_shift`` (``layers.BatchNorm`` then adds it, or nothing when it went
  into the conv's bias: an empty array). Every BatchNorm of BiRefNet follows a conv
  (``_BATCH_NORM_INPUTS``); one that does not is left as it is. Training must use the unfolded
  variables.
  """
  params = jax.tree.map(np.asarray, variables['params'])
  stats = jax.tree.map(np.asarray, variables.get('batch_stats', {}))

  def walk(p, st):
    p, st = dict(p), dict(st)
    for name in list(st):
      entry = st[name]
      if not isinstance(entry, dict):
        continue
      source = _batch_norm_input(name)
      if 'mean' in entry and 'var' in entry and name in p and source:
        layer = p
        for key in source:
          layer = layer.get(key, {}) if isinstance(layer, dict) else {}
        if 'kernel' in layer:
          bn = p.pop(name)
          var, mean = entry['var'].astype(np.float64), entry['mean'].astype(np.float64)
          s = bn['scale'].astype(np.float64) / np.sqrt(var + epsilon)
          t = bn['bias'].astype(np.float64) - mean * s
          layer = dict(layer)
          kernel = layer['kernel']
          layer['kernel'] = (kernel.astype(np.float64) * s).astype(kernel.dtype)
          if 'bias' in layer:
            layer['bias'] = (layer['bias'].astype(np.float64) * s + t).astype(layer['bias'].dtype)
            shift = np.zeros((0,), kernel.dtype)
          else:
            shift = t.astype(kernel.dtype)
          parent = p
          for key in source[:-1]:
            parent[key] = dict(parent[key])
            parent = parent[key]
          parent[source[-1]] = layer
          st[name] = {'folded_shift': shift}
          continue
      if name in p and isinstance(p[name], dict):
        p[name], st[name] = walk(p[name], entry)
    return p, st

  params, stats = walk(params, stats)
  return dict(variables, params=params, batch_stats=stats)


def cast_kernels(variables, dtype):
  """Every conv/dense ``kernel`` in ``dtype`` (e.g. bfloat16), once, for a model computing in
  that dtype (it would cast them on every call); norms, biases and BatchNorm statistics stay as
  they are (float32), as under torch autocast."""
  def cast(path, leaf):
    name = getattr(path[-1], 'key', None)
    return leaf.astype(dtype) if name == 'kernel' else leaf
  return jax.tree_util.tree_map_with_path(cast, variables)


def inference_variables(model, variables):
  """What the predictor keeps on the device for ``model``: BatchNorms folded, and the kernels in
  the compute dtype when it is a low-precision one."""
  variables = fold_batch_norms(variables)
  dtype = model.cfg.get('dtype', 'float32')
  if dtype not in (None, 'float32', 'float64'):
    variables = cast_kernels(variables, jnp.dtype(dtype))
  return variables


def model_probabilities(model, variables, images):
  """Normalized images (B, H, W, 3) -> probabilities (B, H, W, 1) float32: the sigmoid of the
  final logits, computed in float32 (the predictor's forward pass and the exported function)."""
  return jax.nn.sigmoid(model.apply(variables, images).astype(jnp.float32))


_FORWARD_CACHE = {}


def _jitted_probabilities(model):
  """``jit(variables, images -> probabilities (B, H, W))`` shared by equal models, so that a new
  ``Predictor`` (or ``predict_images`` call) of the same model reuses its compilations."""
  key = (type(model), model.cfg.to_json(sort_keys=True))
  if key not in _FORWARD_CACHE:
    def probabilities(variables, images):
      return model_probabilities(model, variables, images)[..., 0]
    _FORWARD_CACHE[key] = jax.jit(probabilities)
  return _FORWARD_CACHE[key]


class Predictor:
  """Holds the model and its weights on the device and the jitted forward pass.

  ``predictor(batch)`` maps normalized images (B, H, W, 3) float32 to probabilities (B, H, W)
  float32 (sigmoid of the final logits); it compiles once per input shape. ``predict(images)``
  is the whole pipeline for in-memory uint8 RGB images.
  """

  def __init__(self, model, variables, *, resolution=DEFAULT_RESOLUTION, batch_size: int = 1,
               dtype: Optional[str] = None, attention: Optional[str] = None):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    self.model = with_inference_options(model, dtype, attention)
    self.variables = jax.device_put(inference_variables(self.model, variables))
    self.resolution = (parse_resolution(resolution) if isinstance(resolution, str) or
                       resolution is None else tuple(resolution))
    self.batch_size = batch_size
    self._forward = _jitted_probabilities(self.model)

  def __call__(self, images):
    """Normalized (B, H, W, 3) -> probabilities (B, H, W), asynchronously (a jax.Array)."""
    return self._forward(self.variables, images)

  def preprocess(self, image):
    """uint8 RGB (H, W, 3) -> normalized float32 at the model input size."""
    size = model_input_size(image.shape[:2], self.resolution)
    return augment.normalize_image(image_io.resize_linear(image, size))

  def predict(self, images):
    """uint8 RGB images (any sizes) -> uint8 masks at their sizes, in order."""
    records = ((i, image.shape[:2], self.preprocess(_check_rgb(image, i)))
               for i, image in enumerate(images))
    masks = [None] * len(images)
    for index, size, probabilities in run_batches(self, records, self.batch_size):
      masks[index] = probabilities_to_mask(probabilities, size)
    return masks


def _check_rgb(image, index):
  if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
          and image.shape[-1] == 3):
    raise ValueError(f'image {index}: expected a uint8 RGB array (H, W, 3), got '
                     f'{getattr(image, "dtype", type(image))} {getattr(image, "shape", "")}')
  return image


def predict_images(model, variables, images, resolution=DEFAULT_RESOLUTION, batch_size: int = 1,
                   dtype: Optional[str] = None):
  """uint8 RGB images -> uint8 masks at each image's size (see ``Predictor``)."""
  return Predictor(model, variables, resolution=resolution, batch_size=batch_size,
                   dtype=dtype).predict(images)


def run_batches(forward, records, batch_size: int, max_waiting: Optional[int] = None):
  """Runs ``forward`` on batches of equal-shape inputs; yields ``(key, size, probabilities)``.

  records: iterable of ``(key, original size, normalized input (h, w, 3))``. Inputs wait in one
  bucket per shape until ``batch_size`` of them are there; when more than ``max_waiting`` wait in
  all (many distinct shapes with ``original`` resolution), the oldest bucket goes out early.
  Partial batches are padded with zeros to ``batch_size`` (one compiled shape). The next batch is
  dispatched before the previous result is fetched, so the host overlaps the device.
  """
  max_waiting = max_waiting or 2 * batch_size
  buckets = collections.OrderedDict()   # input shape -> [records]
  pending = None

  def dispatch(entries):
    x = np.stack([e[2] for e in entries])
    if len(entries) < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - len(entries),) + x.shape[1:], x.dtype)])
    return entries, forward(x)

  def collect(job):
    entries, out = job
    out = np.asarray(out)
    if not np.isfinite(out).all():   # e.g. an activation beyond float16's range (65504)
      raise UserError('the model gave non-finite probabilities (NaN)',
                      'with --dtype float16 an activation may have left float16\'s range: use '
                      '--dtype bfloat16 or float32')
    for entry, probabilities in zip(entries, out):
      yield entry[0], entry[1], probabilities

  def flush(shape):
    nonlocal pending
    job = dispatch(buckets.pop(shape))
    if pending is not None:
      yield from collect(pending)
    pending = job

  for record in records:
    shape = record[2].shape
    buckets.setdefault(shape, []).append(record)
    if len(buckets[shape]) == batch_size:
      yield from flush(shape)
    elif sum(len(b) for b in buckets.values()) > max_waiting:
      yield from flush(next(iter(buckets)))
  while buckets:
    yield from flush(next(iter(buckets)))
  if pending is not None:
    yield from collect(pending)


# ---------------------------------------------------------------------------------------------
# Files.

def _prefetch(function, items, workers: int, lookahead: int):
  """``map(function, items)`` in threads, in order, with at most ``lookahead`` in flight."""
  items = iter(items)
  with concurrent.futures.ThreadPoolExecutor(workers) as executor:
    queue = collections.deque(executor.submit(function, x) for x in itertools.islice(items, lookahead))
    while queue:
      result = queue.popleft().result()
      for x in itertools.islice(items, 1):
        queue.append(executor.submit(function, x))
      yield result


def plan_outputs(files, output_dir, cutout_dir=None):
  """``[(path, mask output, cutout output or None)]``; raises ValueError on name collisions."""
  plan, owner = [], {}
  for path, relative in files:
    stem = os.path.splitext(relative)[0]
    outputs = [os.path.join(output_dir, stem + '.png')]
    outputs.append(os.path.join(cutout_dir, stem + '.png') if cutout_dir else None)
    for out in filter(None, outputs):
      key = os.path.normcase(os.path.abspath(out))
      if key in owner:
        raise ValueError(f'{owner[key]} and {path} would both be written to {out}; rename one '
                         'of them or predict them in separate runs')
      owner[key] = path
    plan.append((path, *outputs))
  return plan


class _Progress:
  """One status line (images done, images/s), rewritten in place on a terminal."""

  def __init__(self, total, stream=sys.stderr):
    self.total, self.stream, self.done = total, stream, 0
    self.start = self.last = time.perf_counter()
    self.tty = hasattr(stream, 'isatty') and stream.isatty()

  def update(self, n=1, final=False):
    self.done += n
    now = time.perf_counter()
    if not final and now - self.last < (0.5 if self.tty else 10.0):
      return
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    line = f'{self.done}/{self.total} images, {rate:.2f} images/s'
    if self.tty:
      self.stream.write('\r' + line + ('\n' if final else ''))
    else:
      self.stream.write(line + '\n')
    self.stream.flush()


def predict_files(predictor, plan, *, refine: bool = False, workers: int = 4, progress=True):
  """Predicts and writes every ``(path, mask output, cutout output)`` of ``plan``.

  Returns ``(number written, [(path, reason) skipped])``.
  """
  skipped = []
  meter = _Progress(len(plan)) if progress else None

  def read(item):
    """-> (item, image kept for the cut-out, original size, model input, unreadable reason)."""
    image, reason = image_io.try_read_image(item[0])
    note = image_io.animation_note(item[0]) if image is not None else None
    if note:
      print(f'warning: {note}', file=sys.stderr)
    if image is None:
      return item, None, None, None, reason
    return item, image if item[2] else None, image.shape[:2], predictor.preprocess(image), None

  def records():
    lookahead = 2 * predictor.batch_size + workers
    for item, image, size, x, reason in _prefetch(read, plan, workers, lookahead):
      if reason is not None:
        skipped.append((item[0], reason))
        print(f'warning: skipping unreadable {reason}', file=sys.stderr)
        if meter:
          meter.update()
        continue
      yield (item, image), size, x

  def write(key, size, probabilities):
    (path, mask_out, cutout_out), image = key
    mask = probabilities_to_mask(probabilities, size)
    image_io.write_png(mask_out, mask)
    if cutout_out:
      image_io.write_png(cutout_out, cutout(image, mask, refine))
    return path

  written = 0
  with concurrent.futures.ThreadPoolExecutor(workers) as executor:
    writing = collections.deque()
    for key, size, probabilities in run_batches(predictor, records(), predictor.batch_size):
      writing.append(executor.submit(write, key, size, probabilities))
      while len(writing) > 2 * workers or (writing and writing[0].done()):
        writing.popleft().result()
        written += 1
        if meter:
          meter.update()
    for job in writing:
      job.result()
      written += 1
      if meter:
        meter.update()
  if meter:
    meter.update(0, final=True)
  return written, skipped


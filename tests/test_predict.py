"""The predict command line and the inference API: reading odd files, batching, official
post-processing, no silent overwrites, cut-outs; masks checked against an independent
model.apply computation."""

import os

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from birefnet_jax import image_io, inference, load_converted, predict
from birefnet_jax.convert import convert_file
from birefnet_jax.models.resize import resize_bilinear_align_corners

import reference

REFERENCE = reference.REFERENCE
FIXTURE = 'swin_w7_tiny_cls.safetensors'
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


# ------------------------------------------------------------------------------------------
# Fixtures: a converted tiny model and a folder of awkward image files.

@pytest.fixture(scope='session')
def converted(tmp_path_factory):
  dst = tmp_path_factory.mktemp('predict_model') / 'tiny'
  convert_file(str(REFERENCE / FIXTURE), str(dst))
  return str(dst)


@pytest.fixture(scope='session')
def model_and_variables(converted):
  return load_converted(converted)


def _smooth_image(height, width, seed):
  """A photo-like RGB image (smooth gradients + a blob) so that JPEG keeps it recognizable."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
  blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.1 * height * width))
  channels = [np.clip(255 * (a * yy / height + b * xx / width + c * blob), 0, 255)
              for a, b, c in rng.uniform(0, 1, size=(3, 3))]
  return np.stack(channels, -1).astype(np.uint8)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """Mixed inputs; returns (folder, {relative path: expected RGB uint8 or None if unreadable})."""
  root = tmp_path_factory.mktemp('inputs')
  (root / 'sub').mkdir()
  expected = {}
  rgb = _smooth_image(64, 96, 0)
  cv2.imwrite(str(root / 'photo.jpg'), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
  expected['photo.jpg'] = cv2.cvtColor(cv2.imread(str(root / 'photo.jpg')), cv2.COLOR_BGR2RGB)
  gray = _smooth_image(100, 70, 1)[..., 0]
  cv2.imwrite(str(root / 'sub' / 'gray.png'), gray)
  expected[os.path.join('sub', 'gray.png')] = np.repeat(gray[..., None], 3, -1)
  rgba = np.concatenate([_smooth_image(70, 100, 2), _smooth_image(70, 100, 3)[..., :1]], -1)
  Image.fromarray(rgba, 'RGBA').save(root / 'rgba.png')
  expected['rgba.png'] = rgba[..., :3]   # alpha dropped, as cv2.imread does
  deep = (_smooth_image(64, 96, 4).astype(np.uint16) * 257 + 3).astype(np.uint16)
  cv2.imwrite(str(root / 'sub' / 'deep16.png'), cv2.cvtColor(deep, cv2.COLOR_RGB2BGR))
  expected[os.path.join('sub', 'deep16.png')] = (deep >> 8).astype(np.uint8)
  palette = np.random.default_rng(5).integers(0, 256, (256, 3), dtype=np.uint8)
  indices = (_smooth_image(50, 80, 6)[..., 1] // 32).astype(np.uint8)
  p_image = Image.fromarray(indices, 'P')
  p_image.putpalette(palette.reshape(-1).tolist())
  p_image.save(root / 'palette.png')
  expected['palette.png'] = palette[indices]
  (root / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not really a JPEG' * 3)
  expected['broken.jpg'] = None
  (root / 'notes.txt').write_text('not an image, ignored by extension')
  return root, expected


def normalize_reference(image_uint8, size_hw):
  """Official preprocessing, written out independently: cv2 INTER_LINEAR, /255, ImageNet."""
  h, w = size_hw
  resized = cv2.resize(image_uint8, (w, h), interpolation=cv2.INTER_LINEAR)
  return ((resized.astype(np.float32) / 255 - MEAN) / STD).astype(np.float32)


_REFERENCE_FORWARD = {}


def mask_reference(model, variables, image_uint8, size_hw):
  """model.apply on the preprocessed image, sigmoid, align-corners resize, x255 truncated."""
  x = normalize_reference(image_uint8, size_hw)[None]
  if id(model) not in _REFERENCE_FORWARD:   # compile once per model, not once per call
    _REFERENCE_FORWARD[id(model)] = (model, jax.jit(model.apply))
  logits = _REFERENCE_FORWARD[id(model)][1](variables, x)
  probabilities = jax.nn.sigmoid(logits)
  resized = resize_bilinear_align_corners(probabilities, image_uint8.shape[:2])
  return np.floor(np.asarray(resized)[0, :, :, 0] * 255).astype(np.uint8)


def assert_masks_match(mask, reference):
  """Equal up to float noise: the batched, jitted forward may move a value across a
  truncation step by one level on a few pixels (rounding instead of truncating would change
  about half of them, a wrong resize far more)."""
  assert mask.shape == reference.shape and mask.dtype == np.uint8
  diff = np.abs(mask.astype(int) - reference.astype(int))
  assert diff.max() <= 1, diff.max()
  assert np.mean(diff > 0) < 0.01, np.mean(diff > 0)


def box_blur_reference(x, r):
  """cv2.blur's (r, r) mean with its anchor (r // 2 before, r - 1 - r // 2 after) and
  reflect-101 borders, via padded cumulative sums in float64."""
  before, after = r // 2, r - 1 - r // 2
  pad = [(before, after), (before, after)] + [(0, 0)] * (x.ndim - 2)
  p = np.pad(x.astype(np.float64), pad, mode='reflect')
  c = np.pad(np.cumsum(np.cumsum(p, 0), 1), [(1, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))
  return (c[r:, r:] - c[:-r, r:] - c[r:, :-r] + c[:-r, :-r]) / (r * r)


def refine_reference(image, mask):
  """Blur-fusion foreground estimation (r=90 then r=6), from the formulas of the paper/official."""
  image = image.astype(np.float64) / 255
  alpha = mask.astype(np.float64)[..., None] / 255

  def step(fg, bg, r):
    blurred_alpha = box_blur_reference(alpha[..., 0], r)[..., None]
    blurred_fg = box_blur_reference(fg * alpha, r) / (blurred_alpha + 1e-5)
    blurred_bg = box_blur_reference(bg * (1 - alpha), r) / (1 - blurred_alpha + 1e-5)
    out = blurred_fg + alpha * (image - alpha * blurred_fg - (1 - alpha) * blurred_bg)
    return np.clip(out, 0, 1), blurred_bg

  fg, bg = step(image, image, 90)
  fg, _ = step(fg, bg, 6)
  return fg * 255


# ------------------------------------------------------------------------------------------
# No model needed.

def test_parse_resolution_is_width_by_height():
  assert inference.parse_resolution('96x64') == (64, 96)
  assert inference.parse_resolution('original') is None
  for bad in ('100x64', '64', 'axb', '0x64'):
    with pytest.raises(ValueError):
      inference.parse_resolution(bad)
  assert inference.model_input_size((100, 70), None) == (96, 64)
  assert inference.model_input_size((20, 70), None) == (32, 64)
  assert inference.model_input_size((100, 70), (64, 96)) == (64, 96)


def test_reads_mixed_files_and_reports_unreadable(image_folder):
  root, expected = image_folder
  files = image_io.list_images([root])
  assert sorted(rel for _, rel in files) == sorted(expected)   # notes.txt left out
  for path, rel in files:
    image, reason = image_io.try_read_image(path)
    if expected[rel] is None:
      assert image is None and 'broken.jpg' in reason
    else:
      assert reason is None and image.dtype == np.uint8
      np.testing.assert_array_equal(image, expected[rel], err_msg=rel)
  with pytest.raises(FileNotFoundError):
    image_io.list_images([root / 'missing'])


def test_run_batches_groups_by_shape_and_pads():
  shapes_seen = []

  def forward(x):
    shapes_seen.append(x.shape)
    return x.mean(-1)

  rng = np.random.default_rng(0)
  sizes = [(32, 64), (64, 32), (32, 64), (32, 64), (64, 32), (32, 64), (32, 64)]
  records = [(i, (i, i), rng.normal(size=s + (3,)).astype(np.float32)) for i, s in enumerate(sizes)]
  results = list(inference.run_batches(forward, iter(records), batch_size=3, max_waiting=100))
  assert sorted(k for k, _, _ in results) == list(range(len(sizes)))
  for key, size, probabilities in results:
    assert size == (key, key)
    np.testing.assert_array_equal(probabilities, records[key][2].mean(-1))
  assert all(s[0] == 3 for s in shapes_seen)                  # partial batches padded
  assert sorted(s[1:3] for s in shapes_seen) == [(32, 64), (32, 64), (64, 32)]


def test_probabilities_to_mask_resizes_align_corners_and_truncates():
  rng = np.random.default_rng(1)
  p = jax.nn.sigmoid(rng.normal(size=(64, 96)).astype(np.float32) * 3)
  reference = resize_bilinear_align_corners(p[None, :, :, None], (70, 100))
  reference = np.floor(np.asarray(reference)[0, :, :, 0] * 255).astype(np.uint8)
  np.testing.assert_array_equal(inference.probabilities_to_mask(np.asarray(p), (70, 100)),
                                reference)


def test_refine_foreground_matches_blur_fusion_reference():
  image = _smooth_image(70, 100, 7)
  mask = (255 * (_smooth_image(70, 100, 8)[..., 0] > 120)).astype(np.uint8)
  mask = cv2.GaussianBlur(mask, (9, 9), 3)   # soft edges, where the refinement matters
  refined = inference.refine_foreground(image, mask)
  reference = refine_reference(image, mask)
  # Truncation of float32 vs float64 values may differ by one level.
  assert np.abs(refined.astype(np.float64) - reference).max() < 1.0 + 1e-3
  assert np.mean(refined == np.floor(reference)) > 0.99
  assert np.abs(refined.astype(int) - image.astype(int)).max() > 10   # it does change colours


def test_output_name_collisions_are_refused(tmp_path):
  files = [('x/a.jpg', 'a.jpg'), ('x/a.png', 'a.png')]
  with pytest.raises(ValueError, match='both be written'):
    inference.plan_outputs(files, str(tmp_path))


# ------------------------------------------------------------------------------------------
# With the tiny converted model.

@pytest.fixture(scope='module')
def predicted(converted, image_folder, tmp_path_factory):
  """One CLI run over the mixed folder (64x64, batch 2, refined cut-outs)."""
  root, _ = image_folder
  out = tmp_path_factory.mktemp('predicted')
  argv = ['--checkpoint', converted, '--input', str(root), '--output', str(out),
          '--resolution', '64x64', '--batch_size', '2', '--cutout', '--refine_foreground']
  return argv, out


def test_cli_writes_masks_skips_unreadable_and_matches_reference(
    predicted, image_folder, model_and_variables, capsys):
  argv, out = predicted
  root, expected = image_folder
  assert predict.main(argv) == 0
  stderr = capsys.readouterr().err
  assert 'skipped 1 unreadable' in stderr and 'broken.jpg' in stderr
  model, variables = model_and_variables
  for rel, image in expected.items():
    mask_path = out / (os.path.splitext(rel)[0] + '.png')
    if image is None:
      assert not mask_path.exists()
      continue
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    assert mask.shape == image.shape[:2], rel             # original size, one channel
    assert_masks_match(mask, mask_reference(model, variables, image, (64, 64)))


def test_cutouts_are_rgba_with_the_mask_as_alpha(predicted, image_folder):
  argv, out = predicted
  root, expected = image_folder
  if not (out / 'cutout').exists():
    assert predict.main(argv + ['--overwrite']) == 0
  for rel, image in expected.items():
    if image is None:
      continue
    stem = os.path.splitext(rel)[0] + '.png'
    rgba = np.asarray(Image.open(out / 'cutout' / stem))
    mask = cv2.imread(str(out / stem), cv2.IMREAD_UNCHANGED)
    assert rgba.shape == image.shape[:2] + (4,), rel
    np.testing.assert_array_equal(rgba[..., 3], mask)
    reference = refine_reference(image, mask)
    assert np.abs(rgba[..., :3].astype(np.float64) - reference).max() < 1.0 + 1e-3, rel


def test_existing_outputs_are_not_overwritten_without_the_flag(predicted, capsys):
  argv, out = predicted
  if not (out / 'photo.png').exists():
    assert predict.main(argv) == 0
  before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob('*.png')}
  assert predict.main(argv) == 1
  assert '--overwrite' in capsys.readouterr().err
  assert predict.main(argv + ['--skip_existing']) == 0
  after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob('*.png')}
  assert after == before                                   # nothing was touched
  (out / 'photo.png').unlink()
  assert predict.main(argv + ['--skip_existing']) == 0    # resumes: only photo is redone
  assert (out / 'photo.png').exists()
  assert (out / 'cutout' / 'photo.png').stat().st_mtime_ns > before[out / 'cutout' / 'photo.png'][0]
  assert (out / 'palette.png').stat().st_mtime_ns == before[out / 'palette.png'][0]
  assert predict.main(argv + ['--overwrite']) == 0
  assert (out / 'palette.png').stat().st_mtime_ns > before[out / 'palette.png'][0]


class ConvStandIn(nn.Module):
  """A one-conv stand-in with BiRefNet's interface (cfg with a dtype, logits (B,H,W,1)): cheap
  to compile for every input shape, to exercise batching by shape."""
  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x):
    return nn.Conv(1, (3, 3), name='conv')(x) * 3


def test_predict_images_original_resolution_batches_by_shape():
  """Sizes floored to multiples of 32, each shape its own batches, masks at the input sizes."""
  model = ConvStandIn(ml_collections.ConfigDict(dict(dtype='float32')))
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
  images = [_smooth_image(70, 100, 10), _smooth_image(100, 70, 11), _smooth_image(75, 110, 12),
            _smooth_image(40, 33, 13)]
  inputs = [(64, 96), (96, 64), (64, 96), (32, 32)]
  masks = inference.predict_images(model, variables, images, resolution='original', batch_size=2)
  for image, size, mask in zip(images, inputs, masks):
    assert_masks_match(mask, mask_reference(model, variables, image, size))


def test_bfloat16_computes_in_bfloat16_with_kernels_cast_once(model_and_variables):
  """The predictor holds the conv/dense kernels in bfloat16 (cast once, not on every call);
  norms, biases and BatchNorm statistics stay float32; the output is float32."""
  model, variables = model_and_variables
  bf16 = inference.Predictor(model, variables, resolution='64x64', dtype='bfloat16')
  assert bf16.model.cfg.dtype == 'bfloat16' and model.cfg.dtype == 'float32'
  lowered = jax.jit(bf16._forward).lower(bf16.variables, np.zeros((1, 64, 64, 3), np.float32))
  text = lowered.as_text()
  assert 'bf16' in text and 'convolution' in text
  leaves = jax.tree_util.tree_leaves_with_path(bf16.variables)
  kernels = [leaf for path, leaf in leaves if getattr(path[-1], 'key', '') == 'kernel']
  others = [leaf for path, leaf in leaves if getattr(path[-1], 'key', '') != 'kernel']
  assert kernels and all(leaf.dtype == jnp.bfloat16 for leaf in kernels)
  assert others and all(leaf.dtype == np.float32 for leaf in others)
  assert lowered.out_info.dtype == np.float32


def test_fused_attention_path_gives_the_same_masks(model_and_variables):
  """--attention xla runs Swin's window attention through jax.nn.dot_product_attention (the
  path of cuDNN's fused kernel on GPU): same masks as the default einsums."""
  model, variables = model_and_variables
  images = [_smooth_image(64, 96, 3), _smooth_image(48, 40, 4)]
  fused = inference.Predictor(model, variables, resolution='64x64', attention='xla')
  assert fused.model.cfg.attention == 'xla' and model.cfg.get('attention', 'einsum') == 'einsum'
  plain = inference.Predictor(model, variables, resolution='64x64')
  for a, b in zip(fused.predict(images), plain.predict(images)):
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
  with pytest.raises(ValueError, match='attention must be one of'):
    inference.Predictor(model, variables, attention='flash')

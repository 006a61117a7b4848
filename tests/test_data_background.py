"""Background-colour synthesis (data/background.py) against the official dataset.py expression,
and in the training pipeline (flips only, a flat background per example)."""

import numpy as np
import pytest
from PIL import Image

from birefnet_jax.data import background
from birefnet_jax.data import config as data_config_lib
from birefnet_jax.data import pipeline


class ScriptedRng:
  """A stand-in for numpy's Generator that returns the given draws, in order, and checks that
  the integer draws ask for randint(0, 255)'s range."""

  def __init__(self, randoms=(), integers=()):
    self.randoms, self.integers_ = list(randoms), list(integers)

  def random(self):
    return self.randoms.pop(0)

  def integers(self, low, high):
    assert (low, high) == (0, 256)           # random.randint(0, 255) is inclusive
    return self.integers_.pop(0)

  def exhausted(self):
    return not self.randoms and not self.integers_


def official_composite(image, label, choice, color_up_or_down=1, shift_random=0.0, ints=()):
  """The official dataset.py expression (25cb930), written out here with the official random
  draws given as arguments: PIL putalpha, float32 foreground, (alpha / 255) float32 mask."""
  image = Image.fromarray(image)
  image.putalpha(Image.fromarray(label))
  array_image = np.array(image)
  array_foreground = array_image[:, :, :3].astype(np.float32)
  array_mask = (array_image[:, :, 3:] / 255).astype(np.float32)
  array_background = np.zeros_like(array_foreground)
  if choice < 0.4:
    array_background[:, :, :] = ints[0]
  elif choice < 0.8:
    foreground_pixel_number = np.sum(array_mask > 0)
    color_foreground_mean = np.mean(array_foreground * array_mask, axis=(0, 1)) * (
        np.prod(array_foreground.shape[:2]) / foreground_pixel_number)
    color_foreground_mean += (255 - color_foreground_mean if color_up_or_down == 1
                              else color_foreground_mean) * (shift_random * 0.2) * color_up_or_down
    array_background[:, :, :] = color_foreground_mean
  else:
    for idx_channel in range(3):
      array_background[:, :, idx_channel] = ints[idx_channel]
  composite = array_foreground * array_mask + array_background * (1 - array_mask)
  return composite.astype(np.uint8)


@pytest.fixture
def example():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
  mask = np.zeros((24, 20), np.uint8)
  mask[5:18, 4:15] = 255
  mask[5:18, 3] = 128                        # a soft edge
  mask[4, 4:15] = rng.integers(1, 255, 11)
  return image, mask


def assert_uint8_close(ours, official):
  # float32 sums may round the other way at a .0 boundary: 1 level, on few pixels.
  diff = np.abs(ours.astype(int) - official.astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize('draws,official_args', [
    (dict(randoms=[0.1], integers=[200]), dict(choice=0.1, ints=[200])),          # grey level
    (dict(randoms=[0.39999], integers=[0]), dict(choice=0.39999, ints=[0])),      # black
    (dict(randoms=[0.5, 0.2, 0.7]),                                              # hard negative, up
     dict(choice=0.5, color_up_or_down=1, shift_random=0.7)),
    (dict(randoms=[0.79, 0.9, 0.99]),                                            # hard negative, down
     dict(choice=0.79, color_up_or_down=-1, shift_random=0.99)),
    (dict(randoms=[0.8], integers=[0, 177, 64]), dict(choice=0.8, ints=[0, 177, 64])),  # green
])
def test_composite_equals_the_official_expression(example, draws, official_args):
  image, mask = example
  rng = ScriptedRng(**draws)
  ours = background.synthesize_background(image, mask, rng)
  assert rng.exhausted()                     # the same number of draws as the official branch
  assert ours.dtype == np.uint8 and ours.shape == image.shape
  assert_uint8_close(ours, official_composite(image, mask, **official_args))


def test_foreground_kept_and_background_flat(example):
  image, mask = example
  out = background.synthesize_background(image, mask, ScriptedRng([0.9], [12, 34, 56]))
  np.testing.assert_array_equal(out[mask == 255], image[mask == 255])
  np.testing.assert_array_equal(out[mask == 0], np.broadcast_to([12, 34, 56], out[mask == 0].shape))
  soft = mask == 128                         # 128/255 of the image + 127/255 of the colour
  expected = image[soft] * (128 / 255) + np.array([12, 34, 56]) * (127 / 255)
  assert np.abs(out[soft] - expected).max() <= 1


def test_hard_negative_is_near_the_foreground_mean():
  image = np.zeros((8, 8, 3), np.uint8)
  image[2:6, 2:6] = (100, 40, 220)
  mask = np.zeros((8, 8), np.uint8)
  mask[2:6, 2:6] = 255
  rng = np.random.default_rng(0)
  for _ in range(50):
    colour, kind = background.random_background_colour(
        image.astype(np.float32), background.alpha_of(mask), ScriptedRng(
            [0.6, rng.random(), rng.random()]))
    assert kind == 'hard_negative'
    mean = np.array([100, 40, 220], np.float64)
    up, down = mean + 0.2 * (255 - mean), mean - 0.2 * mean
    assert np.all(colour >= down - 1e-9) and np.all(colour <= up + 1e-9)
    # Either every channel moved up or every channel moved down, by the same fraction.
    moved = (colour - mean) / np.where(colour >= mean, 255 - mean, mean)
    assert np.allclose(moved, moved[0])


def test_branch_frequencies_are_the_official_ones(example):
  image, mask = example
  foreground, alpha = image.astype(np.float32), background.alpha_of(mask)
  rng = np.random.default_rng(1)
  kinds, greys = [], []
  for _ in range(4000):
    colour, kind = background.random_background_colour(foreground, alpha, rng)
    kinds.append(kind)
    if kind == 'grey':
      assert colour[0] == colour[1] == colour[2]
      greys.append(int(colour[0]))
  kinds = np.array(kinds)
  # 4000 draws: the standard error of each frequency is below 0.008.
  assert abs((kinds == 'grey').mean() - 0.4) < 0.03
  assert abs((kinds == 'hard_negative').mean() - 0.4) < 0.03
  assert abs((kinds == 'any').mean() - 0.2) < 0.03
  assert min(greys) <= 5 and max(greys) >= 250      # randint(0, 255): both ends reachable


def test_empty_mask_gives_black_without_nan(example, recwarn):
  image, _ = example
  out = background.synthesize_background(image, np.zeros(image.shape[:2], np.uint8),
                                         ScriptedRng([0.5, 0.1, 0.3]))
  assert not out.any()
  assert not [w for w in recwarn if 'invalid value' in str(w.message)]


def test_pipeline_synthesizes_backgrounds_with_flips_only():
  cfg = data_config_lib.data_config(source='synthetic', image_size=(64, 64),
                                    synthetic_train_examples=4, num_workers=0,
                                    synthetic_difficulty='easy', background_color_synthesis=True)
  assert pipeline.training_augmentations(cfg) == ('flip',)
  cfg.background_color_synthesis = False
  assert pipeline.training_augmentations(cfg) == data_config_lib.OFFICIAL_AUGMENTATIONS
  cfg.background_color_synthesis = True
  batch = pipeline.train_dataset(cfg, local_batch_size=4, seed=0)[0]
  for image, mask in zip(batch['image'], batch['mask']):
    outside = image[mask[..., 0] == 0]
    assert len(outside) > 100
    # No pepper, no enhance: the background is one flat colour.
    assert np.ptp(outside, axis=0).max() < 1e-5

"""Background-colour synthesis: the official ``background_color_synthesis`` (dataset.py).

A training example's background is replaced by one flat colour, using its mask as the alpha:
  composite = image * alpha + colour * (1 - alpha),  alpha = mask / 255,
computed in float32 and cast to uint8 (truncation), as the official code. The colour is drawn,
with the official probabilities, as
  p = 0.4  a grey level: the same integer in [0, 255] on the three channels (black, grey, white);
  p = 0.4  a hard negative: the mean colour of the foreground (the alpha-weighted sum over the
           pixels divided by the number of pixels with alpha > 0), moved up towards 255 or down
           towards 0 (either with p = 0.5) by a uniform fraction in [0, 0.2) of the distance;
  p = 0.2  any colour: an integer in [0, 255] per channel (this includes green screens).
The official code applies it to the image after its first resize, before the augmentation, and
reduces the augmentation to flips when it is on (``preproc_methods[:1]``); pipeline.py does the
same. Only training examples are changed.

The draws come from the numpy Generator grain hands to the pipeline's random maps, not from
Python's ``random``: the same distributions, not the same numbers as an official run.

A mask without any pixel > 0 has no foreground colour: the official hard-negative branch then
divides by zero and its NaN colour becomes 0 in the uint8 cast on x86 (with a warning); we use
black, the same image, without the NaN.
"""

import numpy as np

GREY_PROBABILITY = 0.4          # choice < 0.4
HARD_NEGATIVE_PROBABILITY = 0.4  # 0.4 <= choice < 0.8
MAX_SHIFT = 0.2                 # the hard negative moves by up to 20% of the way to 255 or 0


def alpha_of(mask):
  """uint8 (H, W) mask -> float32 (H, W, 1) alpha in [0, 1] (official ``(a / 255).astype``)."""
  return (np.asarray(mask)[:, :, None] / 255).astype(np.float32)


def foreground_mean_colour(foreground, alpha):
  """(3,) float64: the official mean foreground colour, sum(image * alpha) / #(alpha > 0).

  None when no pixel has alpha > 0. ``foreground`` is float32 (H, W, 3), ``alpha`` (H, W, 1).
  """
  count = np.sum(alpha > 0)
  if count == 0:
    return None
  # Written as the official expression: mean over all pixels, times pixels / foreground pixels.
  return np.mean(foreground * alpha, axis=(0, 1)) * (np.prod(foreground.shape[:2]) / count)


def shifted_colour(mean_colour, direction: int, fraction: float):
  """The hard negative: ``mean`` moved by ``fraction`` (in [0, 0.2)) of the way to 255 when
  ``direction`` is 1, towards 0 when it is -1 (official expression)."""
  if direction not in (-1, 1):
    raise ValueError(f'direction must be -1 or 1, got {direction!r}')
  distance = 255 - mean_colour if direction == 1 else mean_colour
  return mean_colour + distance * fraction * direction


def random_background_colour(foreground, alpha, rng):
  """(3,) background colour drawn as the official code (module docstring); ``rng`` is a numpy
  Generator. Returns (colour, kind) with kind 'grey', 'hard_negative' or 'any'."""
  choice = rng.random()
  if choice < GREY_PROBABILITY:
    return np.full(3, int(rng.integers(0, 256)), np.float32), 'grey'   # random.randint(0, 255)
  if choice < GREY_PROBABILITY + HARD_NEGATIVE_PROBABILITY:
    mean = foreground_mean_colour(foreground, alpha)
    direction = 1 if rng.random() < 0.5 else -1                     # random.choice((-1, 1))
    fraction = rng.random() * MAX_SHIFT                             # random.random() * 0.2
    if mean is None:
      return np.zeros(3, np.float32), 'hard_negative'
    return shifted_colour(mean, direction, fraction), 'hard_negative'
  return np.asarray([int(rng.integers(0, 256)) for _ in range(3)], np.float32), 'any'


def composite_on_colour(image, mask, colour):
  """uint8 image (H, W, 3) with its background replaced by ``colour`` (3,) through the mask
  (H, W) uint8 as alpha; float32 arithmetic, truncated to uint8, as the official code."""
  foreground = np.asarray(image)[:, :, :3].astype(np.float32)
  alpha = alpha_of(mask)
  background = np.zeros_like(foreground)
  background[:, :, :] = colour
  return (foreground * alpha + background * (1 - alpha)).astype(np.uint8)


def synthesize_background(image, mask, rng):
  """The official background-colour synthesis of one uint8 example (the mask is unchanged)."""
  foreground = np.asarray(image)[:, :, :3].astype(np.float32)
  colour, _ = random_background_colour(foreground, alpha_of(mask), rng)
  return composite_on_colour(image, mask, colour)

"""The official training augmentation (image_proc.py `preproc`), in numpy + Pillow.

Order and probabilities as official: flip (p=0.5) -> crop (defined, off by default) ->
rotate (p=0.2, integer angle in [-15, 14]) -> enhance (always: brightness, contrast, colour,
sharpness) -> pepper (always, int(0.0015 * H * W) pixels). Only flip, crop and rotate touch the
mask; masks stay soft (no binarization).

Rotation and the enhancements use Pillow's own `Image.rotate(angle, BICUBIC)` and
`ImageEnhance`, exactly the calls of the official code, so the pixels are bit-identical for the
same random draws (no OpenCV operation reproduces Pillow's bicubic rotation or its Sharpness
kernel exactly). The random draws come from the numpy Generator grain hands to RandomMap
(deterministic in the pipeline seed and the element index), not from Python's `random`, so the
draws themselves differ from an official run; their distributions are the same.
"""

import numpy as np
from PIL import Image, ImageEnhance

from birefnet_jax.data.config import IMAGENET_MEAN, IMAGENET_STD

_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)
PEPPER_FRACTION = 0.0015
MAX_ROTATION = 15


def flip(image, mask):
  """Horizontal flip of image (H,W,3) and mask (H,W)."""
  return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])


def random_flip(image, mask, rng):
  if rng.random() > 0.5:  # official: random.random() > 0.5
    return flip(image, mask)
  return image, mask


def center_crop_box(width, height, crop_width, crop_height):
  """(left, top, right, bottom) of the official centred crop window."""
  return ((width - crop_width) >> 1, (height - crop_height) >> 1,
          (width + crop_width) >> 1, (height + crop_height) >> 1)


def random_crop(image, mask, rng):
  """Official `random_crop`: a centred window shrunk by up to 10% of the short side."""
  height, width = mask.shape
  border = int(min(width, height) * 0.1)
  if border == 0:  # np.random.randint(w, w) would raise; nothing to crop
    return image, mask
  crop_width = int(rng.integers(width - border, width))
  crop_height = int(rng.integers(height - border, height))
  left, top, right, bottom = center_crop_box(width, height, crop_width, crop_height)
  return image[top:bottom, left:right], mask[top:bottom, left:right]


def rotate(image, mask, angle):
  """PIL rotate(angle, BICUBIC), expand=False, fill 0, for both (official random_rotate)."""
  image = Image.fromarray(image).rotate(angle, Image.BICUBIC)
  mask = Image.fromarray(mask).rotate(angle, Image.BICUBIC)
  return np.asarray(image), np.asarray(mask)


def random_rotate(image, mask, rng):
  if rng.random() > 0.8:  # official: random.random() > 0.8
    angle = int(rng.integers(-MAX_ROTATION, MAX_ROTATION))  # np.random.randint(-15, 15)
    return rotate(image, mask, angle)
  return image, mask


def enhance(image, brightness, contrast, color, sharpness):
  """Pillow Brightness, Contrast, Color, Sharpness in sequence (official color_enhance)."""
  im = Image.fromarray(image)
  im = ImageEnhance.Brightness(im).enhance(brightness)
  im = ImageEnhance.Contrast(im).enhance(contrast)
  im = ImageEnhance.Color(im).enhance(color)
  im = ImageEnhance.Sharpness(im).enhance(sharpness)
  return np.asarray(im)


def random_enhance(image, rng):
  # random.randint(a, b) is inclusive: integers(a, b + 1).
  brightness = int(rng.integers(5, 16)) / 10.0
  contrast = int(rng.integers(5, 16)) / 10.0
  color = int(rng.integers(0, 21)) / 10.0
  sharpness = int(rng.integers(0, 31)) / 10.0
  return enhance(image, brightness, contrast, color, sharpness)


def random_pepper(image, rng, fraction=PEPPER_FRACTION):
  """int(fraction * H * W) random pixels set to 0 or 255 on all channels."""
  height, width = image.shape[:2]
  count = int(fraction * height * width)
  rows = rng.integers(0, height, count)
  cols = rng.integers(0, width, count)
  values = rng.integers(0, 2, count).astype(np.uint8) * 255
  image = np.array(image)  # writable copy
  image[rows, cols] = values[:, None]
  return image


def augment(image, mask, rng, methods=('flip', 'enhance', 'rotate', 'pepper')):
  """Official `preproc` on uint8 image (H,W,3) and mask (H,W); the order is fixed."""
  if 'flip' in methods:
    image, mask = random_flip(image, mask, rng)
  if 'crop' in methods:
    image, mask = random_crop(image, mask, rng)
  if 'rotate' in methods:
    image, mask = random_rotate(image, mask, rng)
  if 'enhance' in methods:
    image = random_enhance(image, rng)
  if 'pepper' in methods:
    image = random_pepper(image, rng)
  return image, mask


# The float32 result of ToTensor + Normalize for each uint8 value and channel, computed with
# the same float32 operations ((v / 255 - mean) / std): a table lookup gives identical values
# at half the cost of the arithmetic on a whole image.
_IMAGE_TABLE = (np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0) - _MEAN) / _STD
_MASK_TABLE = np.clip(np.arange(256, dtype=np.float32) / np.float32(255.0), 0.0, 1.0)


def normalize_image(image):
  """uint8 RGB (H,W,3) -> float32 ImageNet-normalized, as torchvision ToTensor + Normalize."""
  return np.stack([_IMAGE_TABLE[:, c][image[..., c]] for c in range(3)], axis=-1)


def mask_to_float(mask):
  """uint8 (H,W) -> float32 (H,W,1) in [0, 1] (ToTensor, then the clamp of train.py)."""
  return _MASK_TABLE[mask][..., None]


def resize_pil_bilinear(image, mask, size_hw):
  """torchvision Resize((h, w)) on PIL images = PIL bilinear with antialias (dynamic_size)."""
  h, w = size_hw
  image = Image.fromarray(image).resize((w, h), Image.BILINEAR)
  mask = Image.fromarray(mask).resize((w, h), Image.BILINEAR)
  return np.asarray(image), np.asarray(mask)


def random_dynamic_size(dynamic_size, rng):
  """Per-batch (h, w): uniform integers in the ranges, floored to multiples of 32."""
  (h_lo, h_hi), (w_lo, w_hi) = dynamic_size
  h = int(rng.integers(h_lo, h_hi + 1)) // 32 * 32
  w = int(rng.integers(w_lo, w_hi + 1)) // 32 * 32
  return max(h, 32), max(w, 32)

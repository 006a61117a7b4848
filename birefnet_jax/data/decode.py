"""Robust image and mask decoding: any common file -> RGB uint8 image, one-channel uint8 mask.

What the official code does (utils.py `path_to_image`): `cv2.imread(path)` for images and
`cv2.imread(path, cv2.IMREAD_GRAYSCALE)` for masks. We decode the file's bytes with
`cv2.imdecode` and the same flags, which gives the same pixels:
- EXIF orientation IS applied (OpenCV's default without IMREAD_IGNORE_ORIENTATION; JPEG, PNG,
  WebP and TIFF files carrying an Orientation tag come out rotated/flipped upright, as the
  official pipeline sees them).
- grayscale, palette and 1-bit files are expanded to 3 channels; the alpha channel of RGBA
  files is dropped (not composited); 16-bit files are reduced to 8 bits (OpenCV keeps
  the high byte); CMYK JPEG/TIFF are converted to RGB by OpenCV.
- masks: IMREAD_GRAYSCALE (an RGB mask becomes its luminance 0.299R + 0.587G + 0.114B).
Reading bytes and decoding them (rather than cv2.imread) also copes with non-ASCII paths and
with EXIF-rotated TIFFs, which cv2.imread of OpenCV 4.14 fails to read.
When OpenCV cannot decode a file at all (an exotic format), Pillow is tried with the same
conventions; if both fail an ImageDecodeError names the file.
"""

import os

import cv2
import numpy as np

from birefnet_jax.errors import UserError

# The one list of image file extensions (lower case) taken as images when a folder is listed:
# training sources, predict's input folders, evaluate's GT and prediction folders. A file named
# explicitly is always tried, whatever its extension.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.jpe', '.jfif', '.png', '.bmp', '.dib', '.tif', '.tiff',
                    '.webp', '.ppm', '.pgm', '.pbm', '.pnm', '.gif')


def has_image_extension(name) -> bool:
  """Whether the file name ``name`` has one of IMAGE_EXTENSIONS (any case)."""
  return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_EXTENSIONS


class ImageDecodeError(UserError, ValueError):
  """A file that is not a readable image (or a mask that does not fit its image)."""


def read_bytes(path):
  """File contents as a uint8 array; clear errors for missing or empty files."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  data = np.fromfile(path, dtype=np.uint8)
  if data.size == 0:
    raise ImageDecodeError(f'{path}: empty file, not an image')
  return data


def _decode_with_pillow(data, gray):
  """Fallback decoder following OpenCV's conventions (EXIF applied, 16 bit -> 8 bit)."""
  try:
    import io
    from PIL import Image, ImageOps
    with Image.open(io.BytesIO(data.tobytes())) as im:
      im = ImageOps.exif_transpose(im)
      if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        arr = np.asarray(im).astype(np.int64)
        im = Image.fromarray(np.clip(arr >> 8, 0, 255).astype(np.uint8))
      if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
        im = im.convert('RGBA').convert('RGB')  # drop alpha like IMREAD_COLOR
      im = im.convert('L' if gray else 'RGB')
      return np.array(im)
  except Exception:  # pylint: disable=broad-except
    return None


def decode_image_bytes(data, name='<bytes>'):
  """Encoded image bytes -> (H, W, 3) uint8 RGB (see the module docstring)."""
  data = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else data
  bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
  if bgr is not None:
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
  rgb = _decode_with_pillow(data, gray=False)
  if rgb is None:
    raise ImageDecodeError(f'{name}: not a readable image (corrupt, truncated or unsupported)')
  return rgb


def decode_mask_bytes(data, name='<bytes>'):
  """Encoded mask bytes -> (H, W) uint8, as cv2.imread(path, IMREAD_GRAYSCALE)."""
  data = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else data
  mask = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
  if mask is None:
    mask = _decode_with_pillow(data, gray=True)
  if mask is None:
    raise ImageDecodeError(f'{name}: not a readable mask (corrupt, truncated or unsupported)')
  return mask


def read_image(path):
  """Image file -> (H, W, 3) uint8 RGB."""
  return decode_image_bytes(read_bytes(path), os.fspath(path))


def read_mask(path):
  """Mask file -> (H, W) uint8."""
  return decode_mask_bytes(read_bytes(path), os.fspath(path))


def resize_linear(array, size_hw):
  """cv2.resize INTER_LINEAR (no antialias) to (height, width), as the official loader."""
  h, w = size_hw
  if array.shape[:2] == (h, w):
    return array
  return cv2.resize(array, (w, h), interpolation=cv2.INTER_LINEAR)


def check_same_size(image, mask, image_name, mask_name):
  if image.shape[:2] != mask.shape[:2]:
    raise ImageDecodeError(
        f'mask {mask_name} is {mask.shape[1]}x{mask.shape[0]} but its image {image_name} is '
        f'{image.shape[1]}x{image.shape[0]} (width x height); fix the pair, or set '
        "mask_size_mismatch='resize' to resize both independently as the official code does")


def read_pair(image_path, mask_path, mask_size_mismatch='error'):
  """(image RGB uint8 (H,W,3), mask uint8 (H,W)); sizes must match unless 'resize'."""
  image = read_image(image_path)
  mask = read_mask(mask_path)
  if mask_size_mismatch == 'error':
    check_same_size(image, mask, os.fspath(image_path), os.fspath(mask_path))
  elif mask_size_mismatch != 'resize':
    raise ValueError(f"mask_size_mismatch must be 'error' or 'resize', got {mask_size_mismatch!r}")
  return image, mask

"""Image files for inference: finding them, reading them leniently, resizing, writing PNGs.

Decoding is ``birefnet_jax.data.decode`` (the official ``cv2.imread`` conventions: BGR -> RGB,
grayscale / palette / 1-bit expanded to 3 channels, alpha dropped, 16-bit reduced to 8 bits,
EXIF orientation applied). Here a file that cannot be decoded is not an error but a
``(None, reason)`` answer, so that a folder with one broken file still gets predicted.
ImageNet normalization is ``birefnet_jax.data.augment.normalize_image``, the one training uses.
"""

import os

import cv2
import numpy as np

from birefnet_jax import writing
from birefnet_jax.data import decode

# Formats that may hold several frames (animated GIF, APNG, animated WebP): we predict the first.
MULTI_FRAME_EXTENSIONS = ('.gif', '.png', '.webp')


def _is_image_name(name):
  """Picked up when a folder is given (a file named explicitly is always tried)."""
  return not name.startswith('.') and decode.has_image_extension(name)


def is_under(path, folder):
  """Whether ``path`` is ``folder`` or lies below it (both absolute, symlinks resolved)."""
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def real(path):
  return os.path.realpath(os.path.abspath(os.fspath(path)))


def list_images(paths, exclude_folders=()):
  """Files to predict: ``[(path, relative path)]`` for files and folders (recursive, sorted).

  A file given directly is relative to its own folder (its name); a file found under a given
  folder keeps its path below that folder, so that outputs mirror the input tree. Hidden files
  and folders are skipped, and so is everything under ``exclude_folders`` found while walking a
  folder (our own output folders inside an input folder: earlier masks are not images to
  predict). Raises FileNotFoundError for a path that does not exist.
  """
  excluded = [real(f) for f in exclude_folders]
  found = []
  for path in paths:
    path = os.fspath(path)
    if os.path.isfile(path):
      found.append((path, os.path.basename(path)))
    elif os.path.isdir(path):
      for folder, subfolders, files in os.walk(path):
        if any(is_under(real(folder), e) for e in excluded):
          subfolders[:] = []
          continue
        subfolders[:] = sorted(d for d in subfolders if not d.startswith('.'))
        for name in sorted(files):
          if _is_image_name(name):
            file_path = os.path.join(folder, name)
            found.append((file_path, os.path.relpath(file_path, path)))
    else:
      raise FileNotFoundError(f'{path}: no such file or folder')
  return found


def animation_note(path):
  """A warning naming ``path`` when it holds several frames (of which we read the first), else
  None."""
  if not os.fspath(path).lower().endswith(MULTI_FRAME_EXTENSIONS):
    return None
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(path) as image:
      frames = getattr(image, 'n_frames', 1)
  except Exception:  # pylint: disable=broad-except  (unreadable: try_read_image says so)
    return None
  if frames <= 1:
    return None
  return f'{os.fspath(path)}: animated ({frames} frames); predicting its first frame only'


def try_read_image(path):
  """``(RGB uint8 (H, W, 3), None)``, or ``(None, reason)`` for an unreadable file."""
  try:
    return decode.read_image(path), None
  except (decode.ImageDecodeError, OSError) as e:
    return None, str(e)
  except cv2.error as e:  # e.g. a decoder refusing an image too large for its limits
    detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return None, f'{os.fspath(path)}: OpenCV could not decode it ({detail})'


def resize_linear(image, size_hw):
  """cv2.resize INTER_LINEAR (no antialias) to ``(height, width)``, as the official loader."""
  return decode.resize_linear(image, size_hw)


def write_png(path, array):
  """Writes a uint8 (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA array as a PNG.

  The file appears complete or not at all (``writing.write_atomically``), so an interrupted
  run never leaves a truncated PNG that a later run would take for a finished output.
  """
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f'{path}: PNG output must be uint8, got {array.dtype}')
  if array.ndim == 3 and array.shape[-1] == 3:
    array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
  elif array.ndim == 3 and array.shape[-1] == 4:
    array = cv2.cvtColor(array, cv2.COLOR_RGBA2BGRA)
  elif array.ndim != 2:
    raise ValueError(f'{path}: cannot write an array of shape {array.shape} as a PNG')
  ok, encoded = cv2.imencode('.png', array)
  if not ok:
    raise OSError(f'{path}: PNG encoding failed')
  writing.write_atomically(path, encoded.tobytes())

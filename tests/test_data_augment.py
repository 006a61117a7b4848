"""Parity of the augmentation and preprocessing with the official transforms.

References are written the way the official code computes them (utils.path_to_image,
image_proc.py with Pillow, torchvision ToTensor + Normalize re-done in torch).
"""

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from birefnet_jax.data import augment, decode


def _image(h=64, w=64, seed=0):
  rng = np.random.default_rng(seed)
  base = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (w, h))
  return np.clip(base.astype(int) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _mask(h=64, w=64):
  m = np.zeros((h, w), np.uint8)
  cv2.circle(m, (w // 2, h // 2), min(h, w) // 3, 255, -1)
  return m


def test_load_and_resize_match_official_path_to_image(tmp_path):
  path = str(tmp_path / 'x.jpg')
  cv2.imwrite(path, _image(100, 150))
  cv2.imwrite(str(tmp_path / 'm.png'), _mask(100, 150))
  # utils.path_to_image: cv2.imread -> cv2.resize(size=(w, h), INTER_LINEAR) -> BGR2RGB.
  official = cv2.cvtColor(cv2.resize(cv2.imread(path), (96, 64), interpolation=cv2.INTER_LINEAR),
                          cv2.COLOR_BGR2RGB)
  np.testing.assert_array_equal(decode.resize_linear(decode.read_image(path), (64, 96)), official)
  official_mask = cv2.resize(cv2.imread(str(tmp_path / 'm.png'), cv2.IMREAD_GRAYSCALE), (96, 64),
                             interpolation=cv2.INTER_LINEAR)
  ours = decode.resize_linear(decode.read_mask(str(tmp_path / 'm.png')), (64, 96))
  np.testing.assert_array_equal(ours, official_mask)
  assert len(np.unique(ours)) > 2  # resizing leaves soft edges, kept (not binarized)


def test_normalize_matches_to_tensor_and_normalize():
  torch = pytest.importorskip('torch')
  image = _image()
  x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)  # ToTensor
  mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
  std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
  ref = ((x - mean) / std).permute(1, 2, 0).numpy()  # Normalize: sub_(mean).div_(std)
  ours = augment.normalize_image(image)
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
  mask = augment.mask_to_float(np.array([[0, 128, 255]], np.uint8))
  assert mask.shape == (1, 3, 1) and mask.dtype == np.float32
  np.testing.assert_array_equal(mask[..., 0], torch.tensor([[0, 128, 255]]).float().div(255))


def test_flip_matches_pil_transpose():
  image, mask = _image(), _mask()
  fi, fm = augment.flip(image, mask)
  np.testing.assert_array_equal(fi, np.asarray(Image.fromarray(image).transpose(
      Image.FLIP_LEFT_RIGHT)))
  np.testing.assert_array_equal(fm, np.asarray(Image.fromarray(mask).transpose(
      Image.FLIP_LEFT_RIGHT)))


@pytest.mark.parametrize('angle', [-15, -7, 3, 14])
def test_rotate_matches_pil_bicubic_and_keeps_soft_masks(angle):
  image, mask = _image(), _mask()
  ri, rm = augment.rotate(image, mask, angle)
  np.testing.assert_array_equal(ri, np.asarray(Image.fromarray(image, 'RGB').rotate(
      angle, Image.BICUBIC)))
  np.testing.assert_array_equal(rm, np.asarray(Image.fromarray(mask, 'L').rotate(
      angle, Image.BICUBIC)))
  assert ri.shape == image.shape  # expand=False
  assert (ri[0, 0] == 0).all() and (ri[-1, -1] == 0).all()  # corners filled with black
  assert len(np.unique(rm)) > 2  # interpolated (soft) mask values are kept


def test_enhance_matches_pil_sequence():
  image = _image()
  ours = augment.enhance(image, 1.3, 0.7, 1.8, 2.5)
  im = Image.fromarray(image)
  for op, factor in ((ImageEnhance.Brightness, 1.3), (ImageEnhance.Contrast, 0.7),
                     (ImageEnhance.Color, 1.8), (ImageEnhance.Sharpness, 2.5)):
    im = op(im).enhance(factor)
  np.testing.assert_array_equal(ours, np.asarray(im))
  np.testing.assert_array_equal(augment.enhance(image, 1.0, 1.0, 1.0, 1.0), image)


def test_random_draws_follow_official_ranges(monkeypatch):
  """Over many draws: flip p=0.5, rotate p=0.2 with integer angles in [-15, 14], enhance
  factors on the official 0.1 grids, pepper int(0.0015*H*W) pixels of 0/255."""
  rng = np.random.default_rng(0)
  image, mask = np.zeros((1, 2, 3), np.uint8), np.array([[1, 0]], np.uint8)
  flips = [augment.random_flip(image, mask, rng)[1][0, 0] == 0 for _ in range(4000)]
  assert abs(np.mean(flips) - 0.5) < 0.03
  angles, factors = [], []
  monkeypatch.setattr(augment, 'rotate', lambda i, m, a: (angles.append(a), (i, m))[1])
  monkeypatch.setattr(augment, 'enhance', lambda i, *f: factors.append(f))
  for _ in range(4000):
    augment.random_rotate(None, None, rng)
    augment.random_enhance(None, rng)
  assert abs(len(angles) / 4000 - 0.2) < 0.03
  assert set(angles) == set(range(-15, 15))
  factors = np.array(factors)
  for column, (lo, hi) in enumerate([(5, 15), (5, 15), (0, 20), (0, 30)]):
    assert set(np.round(factors[:, column] * 10).astype(int)) == set(range(lo, hi + 1))
  gray = np.full((100, 120, 3), 128, np.uint8)
  peppered = augment.random_pepper(gray, rng)
  changed = np.any(peppered != 128, -1)
  assert 0.9 * int(0.0015 * 100 * 120) <= changed.sum() <= int(0.0015 * 100 * 120)
  values = peppered[changed]
  assert ((values == 0).all(-1) | (values == 255).all(-1)).all()


def test_official_crop_window_matches_pil_crop():
  image, mask = _image(50, 80), _mask(50, 80)
  for seed in range(10):
    ci, cm = augment.random_crop(image, mask, np.random.default_rng(seed))
    # image_proc.random_crop with the same draws: border = int(0.1 * short side).
    draws = np.random.default_rng(seed)
    cw, ch = int(draws.integers(80 - 5, 80)), int(draws.integers(50 - 5, 50))
    box = ((80 - cw) >> 1, (50 - ch) >> 1, (80 + cw) >> 1, (50 + ch) >> 1)
    np.testing.assert_array_equal(ci, np.asarray(Image.fromarray(image).crop(box)))
    np.testing.assert_array_equal(cm, np.asarray(Image.fromarray(mask).crop(box)))


def test_augment_is_deterministic_in_the_rng_and_touches_mask_only_geometrically():
  image, mask = _image(), _mask()
  a = augment.augment(image, mask, np.random.default_rng(5))
  b = augment.augment(image, mask, np.random.default_rng(5))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  for seed in range(10):
    _, m = augment.augment(image, mask, np.random.default_rng(seed), methods=('enhance', 'pepper'))
    np.testing.assert_array_equal(m, mask)


def test_dynamic_size_resize_is_pil_bilinear_and_multiple_of_32():
  rng = np.random.default_rng(0)
  sizes = {augment.random_dynamic_size(((256, 2304), (256, 2304)), rng) for _ in range(200)}
  assert all(h % 32 == 0 and w % 32 == 0 and 256 <= h <= 2304 and 256 <= w <= 2304
             for h, w in sizes)
  image, mask = _image(70, 90), _mask(70, 90)
  ri, rm = augment.resize_pil_bilinear(image, mask, (32, 64))
  np.testing.assert_array_equal(ri, np.asarray(Image.fromarray(image).resize((64, 32),
                                                                              Image.BILINEAR)))
  np.testing.assert_array_equal(rm, np.asarray(Image.fromarray(mask).resize((64, 32),
                                                                            Image.BILINEAR)))

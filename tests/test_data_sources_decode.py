"""Folder layouts, image/mask pairing, and decoding of every common image kind."""

import os

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from birefnet_jax.data import decode, sources
from birefnet_jax.data.classes import DIS_CLASS_NAMES, class_label_from_filename
from birefnet_jax.data.config import data_config


def _rgb(h=12, w=16, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_pair(folder, stem, image_ext='.jpg', mask_ext='.png', size=(12, 16)):
  os.makedirs(os.path.join(folder, 'im'), exist_ok=True)
  os.makedirs(os.path.join(folder, 'gt'), exist_ok=True)
  cv2.imwrite(os.path.join(folder, 'im', stem + image_ext), _rgb(*size))
  cv2.imwrite(os.path.join(folder, 'gt', stem + mask_ext), _rgb(*size)[..., 0])


# ----------------------------------------------------------------------------- layouts

def test_official_layout_pairs_by_stem_and_joins_with_plus(tmp_path):
  root = tmp_path / 'data'
  _write_pair(root / 'HRSOD' / 'TR-DUTS', 'a')
  _write_pair(root / 'HRSOD' / 'TR-DUTS', 'b', image_ext='.png', mask_ext='.jpg')
  _write_pair(root / 'HRSOD' / 'TR-HRSOD', 'c', image_ext='.JPEG', mask_ext='.PNG')
  # A second mask with the same stem: the official lookup prefers .png over .jpg.
  cv2.imwrite(str(root / 'HRSOD' / 'TR-DUTS' / 'gt' / 'a.jpg'), _rgb()[..., 0])
  src = sources.official_layout(str(root), 'HRSOD', 'TR-DUTS+TR-HRSOD')
  got = [(os.path.basename(r['image_path']), os.path.basename(r['mask_path']), r['dataset'])
         for r in (src[i] for i in range(len(src)))]
  assert got == [('a.jpg', 'a.png', 'TR-DUTS'), ('b.png', 'b.jpg', 'TR-DUTS'),
                 ('c.JPEG', 'c.PNG', 'TR-HRSOD')]
  assert src[0]['name'] == 'a.png' and src[0]['class_label'] == -1


def test_dis_class_label_from_gt_name(tmp_path):
  # Values taken from the official list's positions (dataset.py class_labels_TR_sorted).
  assert len(DIS_CLASS_NAMES) == 219
  assert class_label_from_filename('x/1#Accessories#1#Bag#2339506821_83cc4c7b13_o.png') == 6
  assert class_label_from_filename('1#A#1#Airplane#x.jpg') == 0
  assert class_label_from_filename('1#A#1#Yacht#x.jpg') == 218
  assert class_label_from_filename('1#A#1#TV#x.jpg') == DIS_CLASS_NAMES.index('TV')
  assert class_label_from_filename('1#A#1#NoSuchClass#x.jpg') == -1
  assert class_label_from_filename('plain_name.png') == -1
  root = tmp_path / 'd'
  _write_pair(root / 'DIS5K' / 'DIS-TR', '3#Nature#2#Tree#123')
  src = sources.official_layout(str(root), 'DIS5K', 'DIS-TR')
  assert src[0]['class_label'] == DIS_CLASS_NAMES.index('Tree')


def test_image_without_mask_is_an_error_naming_it_or_a_counted_skip(tmp_path):
  root = tmp_path / 'd'
  _write_pair(root / 'DIS5K' / 'DIS-TR', 'good')
  cv2.imwrite(str(root / 'DIS5K' / 'DIS-TR' / 'im' / 'orphan.jpg'), _rgb())
  with pytest.raises(FileNotFoundError, match='orphan.jpg'):
    sources.official_layout(str(root), 'DIS5K', 'DIS-TR')
  src = sources.official_layout(str(root), 'DIS5K', 'DIS-TR', on_bad_file='skip')
  assert len(src) == 1 and src.num_skipped == 1


def test_missing_data_set_names_path_and_config_field(tmp_path):
  _write_pair(tmp_path / 'DIS5K' / 'DIS-TR', 'a')
  with pytest.raises(sources.MissingDataError) as e:
    sources.train_files(data_config(root=str(tmp_path), train_sets='DIS-TR+DIS-TE9'))
  msg = str(e.value)
  assert os.path.join(str(tmp_path), 'DIS5K', 'DIS-TE9') in msg and 'data.train_sets' in msg
  assert 'DIS-TR' in msg  # lists what is there
  with pytest.raises(sources.MissingDataError, match='data.root'):
    sources.train_files(data_config(root=''))
  with pytest.raises(sources.MissingDataError, match=str(tmp_path / 'nowhere')):
    sources.train_files(data_config(root=str(tmp_path / 'nowhere')))


def test_plain_folder_of_images_and_masks(tmp_path):
  (tmp_path / 'pics').mkdir()
  (tmp_path / 'masks').mkdir()
  for stem in ('z', 'y'):
    cv2.imwrite(str(tmp_path / 'pics' / f'{stem}.webp'), _rgb())
    cv2.imwrite(str(tmp_path / 'masks' / f'{stem}.bmp'), _rgb()[..., 1])
  (tmp_path / 'pics' / 'notes.txt').write_text('not an image')
  cfg = data_config(image_dir=str(tmp_path / 'pics'), mask_dir=str(tmp_path / 'masks'))
  src = sources.train_files(cfg)
  assert [os.path.basename(src[i]['image_path']) for i in range(len(src))] == ['y.webp', 'z.webp']


# ----------------------------------------------------------------------------- decoding

def test_decodes_every_image_kind_to_rgb_uint8(tmp_path):
  rgb = _rgb()
  p = lambda name: str(tmp_path / name)  # noqa: E731
  Image.fromarray(rgb).save(p('rgb.png'))
  Image.fromarray(rgb).save(p('rgb.bmp'))
  Image.fromarray(rgb).save(p('rgb.tif'))
  Image.fromarray(rgb).save(p('rgb.webp'), lossless=True)
  Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(p('rgba.png'))
  for name in ('rgb.png', 'rgb.bmp', 'rgb.tif', 'rgb.webp', 'rgba.png'):
    out = decode.read_image(p(name))
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    np.testing.assert_array_equal(out, rgb, err_msg=name)  # lossless; alpha dropped

  Image.fromarray(rgb).convert('L').save(p('gray.png'))
  np.testing.assert_array_equal(decode.read_image(p('gray.png')),
                                np.repeat(np.asarray(Image.open(p('gray.png')))[..., None], 3, -1))
  Image.fromarray(rgb).convert('P').save(p('pal.png'))
  np.testing.assert_array_equal(decode.read_image(p('pal.png')),
                                np.asarray(Image.open(p('pal.png')).convert('RGB')))
  # 16 bit per channel: the high byte survives (v * 256 + low byte -> v).
  cv2.imwrite(p('deep.png'), (rgb.astype(np.uint16) * 256 + 100)[..., ::-1])
  np.testing.assert_array_equal(decode.read_image(p('deep.png')), rgb)
  cv2.imwrite(p('deep.tif'), (rgb.astype(np.uint16) * 256 + 100)[..., ::-1])
  assert np.abs(decode.read_image(p('deep.tif')).astype(int) - rgb).max() <= 1
  # CMYK (JPEG and TIFF) -> RGB close to Pillow's conversion.
  Image.fromarray(rgb).convert('CMYK').save(p('cmyk.jpg'), quality=100)
  Image.fromarray(rgb).convert('CMYK').save(p('cmyk.tif'))
  for name in ('cmyk.jpg', 'cmyk.tif'):
    ref = np.asarray(Image.open(p(name)).convert('RGB')).astype(int)
    assert np.abs(decode.read_image(p(name)).astype(int) - ref).max() <= 2, name


@pytest.mark.parametrize('ext', ['.jpg', '.png', '.webp', '.tif'])
def test_exif_orientation_is_applied_like_cv2_imread(tmp_path, ext):
  rgb = _rgb(12, 16)
  im = Image.fromarray(rgb)
  exif = im.getexif()
  exif[0x0112] = 6  # rotate 90 CW to display
  path = str(tmp_path / f'o{ext}')
  kwargs = {'quality': 100} if ext == '.jpg' else {'lossless': True} if ext == '.webp' else {}
  im.save(path, exif=exif, **kwargs)
  out = decode.read_image(path)
  assert out.shape == (16, 12, 3)
  upright = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert('RGB'))
  np.testing.assert_array_equal(out, upright)
  official = cv2.imread(path)  # what the official loader sees, where cv2.imread can read it
  if official is not None:
    np.testing.assert_array_equal(out, official[..., ::-1])
  assert decode.read_mask(path).shape == (16, 12)


def test_masks_are_one_channel_like_imread_grayscale(tmp_path):
  rgb = _rgb()
  for name, data in (('m_rgb.png', rgb), ('m_gray.png', rgb[..., 0]),
                     ('m_rgba.png', np.dstack([rgb, rgb[..., :1]]))):
    path = str(tmp_path / name)
    cv2.imwrite(path, data)
    np.testing.assert_array_equal(decode.read_mask(path), cv2.imread(path, cv2.IMREAD_GRAYSCALE))
  path = str(tmp_path / 'm16.png')
  cv2.imwrite(path, rgb[..., 0].astype(np.uint16) * 256)
  np.testing.assert_array_equal(decode.read_mask(path), rgb[..., 0])


def test_unreadable_files_raise_naming_the_file(tmp_path):
  bad = tmp_path / 'bad.jpg'
  bad.write_bytes(b'this is not a jpeg')
  with pytest.raises(decode.ImageDecodeError, match='bad.jpg'):
    decode.read_image(str(bad))
  Image.fromarray(_rgb(64, 64)).save(tmp_path / 'full.png')
  data = (tmp_path / 'full.png').read_bytes()
  (tmp_path / 'cut.png').write_bytes(data[:len(data) // 2])
  with pytest.raises(decode.ImageDecodeError, match='cut.png'):
    decode.read_mask(str(tmp_path / 'cut.png'))
  (tmp_path / 'empty.png').write_bytes(b'')
  with pytest.raises(decode.ImageDecodeError, match='empty.png'):
    decode.read_image(str(tmp_path / 'empty.png'))
  with pytest.raises(FileNotFoundError, match='gone.png'):
    decode.read_image(str(tmp_path / 'gone.png'))


def test_mask_of_another_size_names_both_files_or_resizes(tmp_path):
  cv2.imwrite(str(tmp_path / 'i.jpg'), _rgb(12, 16))
  cv2.imwrite(str(tmp_path / 'm.png'), _rgb(10, 16)[..., 0])
  with pytest.raises(decode.ImageDecodeError) as e:
    decode.read_pair(str(tmp_path / 'i.jpg'), str(tmp_path / 'm.png'))
  assert 'i.jpg' in str(e.value) and 'm.png' in str(e.value)
  image, mask = decode.read_pair(str(tmp_path / 'i.jpg'), str(tmp_path / 'm.png'), 'resize')
  assert image.shape == (12, 16, 3) and mask.shape == (10, 16)

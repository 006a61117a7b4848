"""The synthetic DIS-like set, and the tfds builders (prepared and read back without TF)."""

import os
import pickle
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from birefnet_jax.data import pipeline, sources
from birefnet_jax.data.classes import DIS_CLASS_NAMES
from birefnet_jax.data.config import data_config
from birefnet_jax.data.synthetic import KINDS, SyntheticDataset, write_official_layout


def test_synthetic_examples_are_deterministic_and_distinct():
  a, b = SyntheticDataset(6, (64, 96), seed=3), SyntheticDataset(6, (64, 96), seed=3)
  for i in range(6):
    x, y = a[i], b[i]
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['mask'], y['mask'])
    assert x['name'] == y['name']
  assert not np.array_equal(a[0]['image'], a[1]['image'])
  assert not np.array_equal(a[0]['mask'], SyntheticDataset(6, (64, 96), seed=4)[0]['mask'])
  with pytest.raises(IndexError):
    a[6]


def test_synthetic_masks_are_exact_and_non_trivial():
  ds = SyntheticDataset(24, (128, 128), seed=0)
  kinds = set()
  for i in range(len(ds)):
    ex = ds[i]
    image, mask = ex['image'], ex['mask']
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert mask.shape == (128, 128) and set(np.unique(mask)) == {0, 255}  # exact, binary
    assert 0.005 < (mask > 0).mean() < 0.9
    kinds.add(DIS_CLASS_NAMES[ex['class_label']])
    # Thin structures and holes: a 3x3 erosion removes a real part of the foreground.
    eroded = cv2.erode(mask, np.ones((3, 3), np.uint8))
    assert (eroded > 0).sum() < (mask > 0).sum()
    # The image is composited from the mask: the foreground differs from the background.
    fg, bg = image[mask > 0].astype(float), image[mask == 0].astype(float)
    assert np.abs(fg.mean(0) - bg.mean(0)).max() > 1 or np.abs(fg.std(0) - bg.std(0)).max() > 1
  assert kinds == set(KINDS)  # every structure kind occurs


def test_synthetic_any_size_and_written_layout_reads_back(tmp_path):
  assert SyntheticDataset(1, (40, 200), seed=0)[0]['image'].shape == (40, 200, 3)
  written = write_official_layout(str(tmp_path), 'DIS5K', {'DIS-TR': 3, 'DIS-VD': 2},
                                  image_size=(48, 64), seed=5)
  assert written['DIS-TR'] == os.path.join(str(tmp_path), 'DIS5K', 'DIS-TR')
  src = sources.official_layout(str(tmp_path), 'DIS5K', 'DIS-TR')
  assert len(src) == 3
  for i in range(3):
    record = src[i]
    mask = cv2.imread(record['mask_path'], cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 255}  # PNG: lossless
    assert DIS_CLASS_NAMES[record['class_label']] in KINDS  # class from the DIS-style name


# ----------------------------------------------------------------------------- tfds

@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  from birefnet_jax.data import tfds_datasets  # pylint: disable=g-import-not-at-top
  root = str(tmp_path_factory.mktemp('tfds_root'))
  write_official_layout(root, 'DIS5K', {'DIS-TR': 5, 'DIS-VD': 3}, image_size=(40, 56))
  vd = os.path.join(root, 'DIS5K', 'DIS-VD')
  # Files whose bytes tfds would decode differently from cv2.imread: stored re-encoded.
  rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
  im = Image.fromarray(rgb)
  exif = im.getexif()
  exif[0x0112] = 6
  im.save(os.path.join(vd, 'im', 'rotated.jpg'), exif=exif, quality=95)
  cv2.imwrite(os.path.join(vd, 'gt', 'rotated.png'), rgb[:, :, 0].T.copy())  # upright size
  cv2.imwrite(os.path.join(vd, 'im', 'deep.png'), rgb.astype(np.uint16) * 256)
  Image.fromarray(rgb).convert('L').save(os.path.join(vd, 'im', 'gray.png'))
  for stem in ('deep', 'gray'):
    cv2.imwrite(os.path.join(vd, 'gt', f'{stem}.png'), rgb[..., 1])
  data_dir = str(tmp_path_factory.mktemp('tfds_data'))
  builder = tfds_datasets.prepare('DIS5K', root, data_dir)
  return root, data_dir, builder


def test_tfds_builder_prepares_splits_without_tensorflow(prepared):
  _, _, builder = prepared
  assert builder.name == 'dis5k'
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {'DIS-TR': 5, 'DIS-VD': 6}
  assert 'tensorflow' not in sys.modules  # nothing here imported TensorFlow
  assert any(f.endswith('array_record-00000-of-00001') for f in os.listdir(builder.data_dir))


def test_tfds_reads_back_the_folder_examples(prepared):
  root, data_dir, _ = prepared
  folder = data_config(root=root, image_size=(64, 64))
  tfds_cfg = data_config(source='tfds', root=root, tfds_data_dir=data_dir, image_size=(64, 64))
  expected = {e['name']: e for e in pipeline.eval_examples(folder, 'DIS-VD')}
  got = {e['name']: e for e in pipeline.eval_examples(tfds_cfg, 'DIS-VD')}
  assert sorted(got) == sorted(expected) and len(got) == 6
  for name, e in expected.items():
    np.testing.assert_array_equal(got[name]['image'], e['image'], err_msg=name)
    np.testing.assert_array_equal(got[name]['mask_uint8'], e['mask_uint8'], err_msg=name)
  # Raw records: the class id survives; the data source is what grain reads.
  from birefnet_jax.data import tfds_datasets  # pylint: disable=g-import-not-at-top
  src = tfds_datasets.data_source(tfds_cfg, 'DIS-TR')
  src = pickle.loads(pickle.dumps(src))  # grain workers receive it pickled
  labels = sorted(src[i]['class_label'] for i in range(len(src)))
  files = sources.official_layout(root, 'DIS5K', 'DIS-TR')
  assert labels == sorted(files[i]['class_label'] for i in range(len(files)))


def test_tfds_training_iterator_and_clear_errors(prepared, tmp_path):
  root, data_dir, _ = prepared
  cfg = data_config(source='tfds', root=root, tfds_data_dir=data_dir, image_size=(64, 64),
                    num_workers=0, train_sets='DIS-TR+DIS-VD', mask_size_mismatch='resize')
  batch = next(pipeline.train_iterator(cfg, local_batch_size=4, seed=0))
  assert batch['image'].shape == (4, 64, 64, 3) and batch['mask'].shape == (4, 64, 64, 1)
  with pytest.raises(sources.MissingDataError, match='DIS-TE7'):
    pipeline.train_iterator(data_config(source='tfds', tfds_data_dir=data_dir,
                                        train_sets='DIS-TE7'), local_batch_size=1, seed=0)
  with pytest.raises(sources.MissingDataError, match='not prepared'):
    pipeline.train_iterator(data_config(source='tfds', tfds_data_dir=str(tmp_path)),
                            local_batch_size=1, seed=0)

"""The grain training iterator and the evaluation examples."""

import os
import re
import shutil

import cv2
import grain
import numpy as np
import pytest
from absl import flags

from birefnet_jax.data import augment, decode, pipeline, sources
from birefnet_jax.data.config import data_config
from birefnet_jax.data.synthetic import write_official_layout

flags.FLAGS.mark_as_parsed()  # grain workers read absl flags

SIZE = (64, 64)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('data'))
  write_official_layout(root, splits={'DIS-TR': 12, 'DIS-VD': 3}, image_size=(72, 88))
  return root


def _cfg(root, **kw):
  return data_config(**{'root': root, 'image_size': SIZE, 'num_workers': 0, **kw})


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_batches_follow_the_contract(root):
  batch = next(pipeline.train_iterator(_cfg(root), local_batch_size=4, seed=0))
  assert set(batch) == {'image', 'mask', 'class_label'}
  assert batch['image'].shape == (4, 64, 64, 3) and batch['image'].dtype == np.float32
  assert batch['mask'].shape == (4, 64, 64, 1) and batch['mask'].dtype == np.float32
  assert batch['class_label'].shape == (4,) and batch['class_label'].dtype == np.int32
  assert 0 <= batch['mask'].min() and batch['mask'].max() <= 1 and batch['mask'].max() > 0.5
  assert (batch['class_label'] >= 0).all()  # synthetic names carry DIS classes
  # ImageNet-normalized: 0 and 255 map to -mean/std and (1-mean)/std.
  assert batch['image'].min() >= (0 - 0.485) / 0.229 - 1e-5
  assert batch['image'].max() <= (1 - 0.406) / 0.225 + 1e-5


def test_deterministic_in_seed(root):
  a = _take(pipeline.train_iterator(_cfg(root), local_batch_size=3, seed=7), 4)
  b = _take(pipeline.train_iterator(_cfg(root), local_batch_size=3, seed=7), 4)
  c = _take(pipeline.train_iterator(_cfg(root), local_batch_size=3, seed=8), 4)
  _assert_same_batches(a, b)
  assert not all(np.array_equal(x['image'], y['image']) for x, y in zip(a, c))


def test_resume_from_state_gives_the_same_batches(root, tmp_path):
  it = pipeline.train_iterator(_cfg(root), local_batch_size=3, seed=1)
  _take(it, 5)  # crosses an epoch boundary (4 batches per epoch)
  state = it.get_state()
  expected = _take(it, 4)
  fresh = pipeline.train_iterator(_cfg(root), local_batch_size=3, seed=1)
  fresh.set_state(state)
  _assert_same_batches(_take(fresh, 4), expected)

  # The same through orbax, as the trainer saves it.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  it = pipeline.train_iterator(_cfg(root), local_batch_size=3, seed=1)
  _take(it, 5)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as mngr:
    mngr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    restored = pipeline.train_iterator(_cfg(root), local_batch_size=3, seed=1)
    mngr.restore(5, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(restored)))
  _assert_same_batches(_take(restored, 4), expected)


def test_processes_get_disjoint_shards_reshuffled_each_epoch(root):
  cfg = _cfg(root, augment=False)
  # Without augmentation an example's pixels identify its file.
  key = {e['image'].tobytes(): e['name'] for e in pipeline.eval_examples(cfg, 'DIS-TR')}
  assert len(key) == 12
  epochs = {}
  for process in (0, 1):
    it = pipeline.train_iterator(cfg, local_batch_size=2, seed=3, process_index=process,
                                 process_count=2)
    names = [key[img.tobytes()] for b in _take(it, 6) for img in b['image']]
    epochs[process] = (names[:6], names[6:])  # 6 examples per process per epoch
  for epoch in (0, 1):
    a, b = set(epochs[0][epoch]), set(epochs[1][epoch])
    assert len(a) == 6 and len(b) == 6 and not a & b and len(a | b) == 12
  assert epochs[0][0] + epochs[1][0] != epochs[0][1] + epochs[1][1]  # new order each epoch


def test_worker_processes_give_the_same_batches(root):
  in_process = _take(pipeline.train_iterator(_cfg(root), local_batch_size=2, seed=4), 3)
  with_workers = _take(pipeline.train_iterator(_cfg(root, num_workers=2, per_worker_buffer_size=1),
                                               local_batch_size=2, seed=4), 3)
  _assert_same_batches(in_process, with_workers)


@pytest.fixture
def root_with_bad_file(root, tmp_path):
  copy = str(tmp_path / 'copy')
  shutil.copytree(root, copy)
  train = os.path.join(copy, 'DIS5K', 'DIS-TR')
  victim = sorted(os.listdir(os.path.join(train, 'im')))[4]
  with open(os.path.join(train, 'im', victim), 'wb') as f:
    f.write(b'\xff\xd8 truncated')
  return copy, victim


def test_bad_file_error_names_the_file(root_with_bad_file):
  copy, victim = root_with_bad_file
  it = pipeline.train_iterator(_cfg(copy), local_batch_size=4, seed=0)
  with pytest.raises(decode.ImageDecodeError, match=re.escape(victim)):
    _take(it, 3)  # one epoch: the bad file is met


def test_bad_file_error_names_the_file_from_a_worker(root_with_bad_file):
  copy, victim = root_with_bad_file
  it = pipeline.train_iterator(_cfg(copy, num_workers=1), local_batch_size=4, seed=0)
  with pytest.raises(decode.ImageDecodeError, match=re.escape(victim)):  # re-raised here
    _take(it, 3)


def test_skip_mode_replaces_bad_files_and_counts_them(root_with_bad_file):
  copy, _ = root_with_bad_file
  before = pipeline.skipped_count()
  # No read-ahead, so the examples decoded are exactly those of the batches taken.
  cfg = _cfg(copy, on_bad_file='skip', read_threads=0, read_prefetch=0)
  batches = _take(pipeline.train_iterator(cfg, local_batch_size=4, seed=0), 6)  # two epochs
  assert all(b['image'].shape == (4, 64, 64, 3) for b in batches)  # every batch full
  assert pipeline.skipped_count() - before == 2  # met once per epoch


def test_eval_skip_mode_leaves_bad_examples_out(root_with_bad_file):
  copy, victim = root_with_bad_file
  names = [e['name'] for e in pipeline.eval_examples(_cfg(copy, on_bad_file='skip'), 'DIS-TR')]
  assert len(names) == 11 and os.path.splitext(victim)[0] + '.png' not in names
  with pytest.raises(decode.ImageDecodeError, match=re.escape(victim)):
    list(pipeline.eval_examples(_cfg(copy), 'DIS-TR'))


def test_enabled_crop_keeps_the_training_size(root):
  cfg = _cfg(root, augmentations=('flip', 'crop', 'rotate', 'enhance', 'pepper'))
  batch = next(pipeline.train_iterator(cfg, local_batch_size=4, seed=0))
  assert batch['image'].shape == (4, 64, 64, 3) and batch['mask'].shape == (4, 64, 64, 1)


def test_dynamic_size_batches(root):
  cfg = _cfg(root, dynamic_size=((64, 160), (32, 128)))
  sizes = set()
  for batch in _take(pipeline.train_iterator(cfg, local_batch_size=2, seed=0), 6):
    h, w = batch['image'].shape[1:3]
    assert batch['mask'].shape == (2, h, w, 1)
    assert h % 32 == 0 and w % 32 == 0 and 64 <= h <= 160 and 32 <= w <= 128
    sizes.add((h, w))
  assert len(sizes) > 1


def test_eval_examples_match_official_preprocessing(root):
  cfg = _cfg(root)
  examples = list(pipeline.eval_examples(cfg, 'DIS-VD'))
  files = sources.eval_files(cfg, 'DIS-VD')
  assert [e['name'] for e in examples] == [files[i]['name'] for i in range(3)]
  for example, i in zip(examples, range(3)):
    record = files[i]
    bgr = cv2.resize(cv2.imread(record['image_path']), (64, 64), interpolation=cv2.INTER_LINEAR)
    expected = augment.normalize_image(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    np.testing.assert_array_equal(example['image'], expected)
    np.testing.assert_array_equal(example['mask_uint8'],
                                  cv2.imread(record['mask_path'], cv2.IMREAD_GRAYSCALE))
    assert example['mask_uint8'].shape == (72, 88) and example['dataset'] == 'DIS-VD'


def test_synthetic_source_needs_no_files():
  cfg = data_config(source='synthetic', image_size=SIZE, num_workers=0,
                    synthetic_train_examples=8, synthetic_val_examples=2)
  batch = next(pipeline.train_iterator(cfg, local_batch_size=4, seed=0))
  assert batch['image'].shape == (4, 64, 64, 3) and batch['mask'].max() == 1.0
  examples = list(pipeline.eval_examples(cfg, 'val'))
  assert len(examples) == 2 and examples[0]['mask_uint8'].shape == SIZE


def test_missing_training_set_is_one_clear_error(tmp_path):
  with pytest.raises(sources.MissingDataError) as e:
    pipeline.train_iterator(_cfg(str(tmp_path)), local_batch_size=2, seed=0)
  assert os.path.join(str(tmp_path), 'DIS5K', 'DIS-TR') in str(e.value)
  assert 'data.train_sets' in str(e.value)

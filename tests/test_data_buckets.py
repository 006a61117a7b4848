"""Shape buckets for dynamic-size training (data/buckets.py): the official size distribution
restricted to the buckets, and one shape per bucket in the pipeline."""

from fractions import Fraction

import numpy as np
import pytest

from birefnet_jax.data import buckets
from birefnet_jax.data import config as data_config_lib
from birefnet_jax.data import pipeline

OFFICIAL = ((256, 2304), (256, 2304))


def enumerate_official_axis(low, high):
  """Exact probabilities of randint(low, high) // 32 * 32, by enumerating every integer."""
  counts = {}
  for n in range(low, high + 1):
    counts[n // 32 * 32] = counts.get(n // 32 * 32, 0) + 1
  return {size: Fraction(c, high - low + 1) for size, c in counts.items()}


@pytest.mark.parametrize('low,high', [(256, 2304), (250, 300), (100, 130), (512, 512)])
def test_axis_probability_is_the_official_draw(low, high):
  exact = enumerate_official_axis(low, high)
  for size in range(0, high + 64, 32):
    assert buckets.official_axis_probability(size, low, high) == pytest.approx(
        float(exact.get(size, 0)), abs=1e-15)
  assert buckets.official_axis_probability(260, low, high) == 0   # not a multiple of 32


def test_bucket_probabilities_are_the_official_joint_draw_conditioned_on_the_buckets():
  chosen = ((512, 512), (256, 1024), (2304, 2080), (1024, 2048))
  ranges = ((250, 2304), (256, 2100))      # (h, w); partial ends on both axes
  p_h, p_w = enumerate_official_axis(*ranges[0]), enumerate_official_axis(*ranges[1])
  joint = [p_h.get(h, 0) * p_w.get(w, 0) for h, w in chosen]
  expected = [float(j / sum(joint)) for j in joint]
  ours = buckets.bucket_probabilities(chosen, ranges)
  np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=0)
  # Height 2304 comes only from n = 2304, width 2080 from 2080..2100: rare, but drawn.
  assert ours[2] == pytest.approx(ours[0] * (1 / 32) * (21 / 32), rel=1e-12)


def test_random_bucket_follows_the_probabilities():
  chosen = ((256, 256), (512, 1024), (2304, 2304))   # the last: only n == 2304 gives it
  p = buckets.bucket_probabilities(chosen, OFFICIAL)
  assert p[2] < p[0] / 500
  rng = np.random.default_rng(0)
  draws = [buckets.random_bucket(chosen, p, rng) for _ in range(20000)]
  for bucket, expected in zip(chosen, p):
    frequency = sum(d == bucket for d in draws) / len(draws)
    assert abs(frequency - expected) < 4 * np.sqrt(expected * (1 - expected) / len(draws)) + 1e-4


@pytest.mark.parametrize('chosen,dynamic_size,message', [
    (((500, 512),), OFFICIAL, 'multiples of 32'),
    (((512,),), OFFICIAL, 'multiples of 32'),
    (((512, 512), (512, 512)), OFFICIAL, 'duplicates'),
    (((2560, 512),), OFFICIAL, 'outside data.dynamic_size'),
    (((512, 512),), None, 'needs data.dynamic_size'),
    ((), OFFICIAL, 'empty'),
])
def test_bad_buckets_are_named(chosen, dynamic_size, message):
  with pytest.raises(ValueError, match=message):
    buckets.check_buckets(chosen, dynamic_size)


def test_pipeline_batches_take_bucket_shapes():
  chosen = ((64, 64), (32, 96))
  cfg = data_config_lib.data_config(source='synthetic', image_size=(64, 64),
                                    synthetic_train_examples=8, num_workers=0, augment=False,
                                    dynamic_size=((32, 127), (32, 127)), size_buckets=chosen)
  ds = pipeline.train_dataset(cfg, local_batch_size=2, seed=0)
  shapes = {tuple(ds[i]['image'].shape) for i in range(8)}
  assert shapes <= {(2, 64, 64, 3), (2, 32, 96, 3)} and len(shapes) == 2
  cfg.size_buckets = ((64, 160),)            # width 160 > 127: never drawn
  with pytest.raises(ValueError, match='outside data.dynamic_size'):
    pipeline.train_dataset(cfg, local_batch_size=2, seed=0)


def test_a_bad_bucket_stops_main_before_start_up():
  from birefnet_jax import main   # pylint: disable=g-import-not-at-top
  from birefnet_jax.errors import UserError   # pylint: disable=g-import-not-at-top
  from birefnet_jax import recipes   # pylint: disable=g-import-not-at-top
  config = recipes.recipe('General', image_size=(64, 64))
  config.data.source = 'synthetic'
  config.batch_size = 1
  config.data.dynamic_size = ((256, 2304), (256, 2304))
  config.data.size_buckets = ((512, 512), (1000, 512))
  with pytest.raises(UserError, match=r'\(1000, 512\) is not \(height, width\)'):
    main.check_config(config)

"""Shape buckets for dynamic-size training: the official size distribution, on a few shapes.

The official ``custom_collate_fn`` (dataset.py) draws each batch's size as
  randint(lo, hi) // 32 * 32   per axis, independently (randint is inclusive),
so a size s (a multiple of 32) has the probability #{n in [lo, hi] : n // 32 * 32 = s} /
(hi - lo + 1): uniform over the multiples of 32 inside the range, less at a partial end. Every
new size is a new compilation for XLA (~65^2 sizes for the official range 256..2304).

With buckets, a batch takes bucket (h, w) with the probability the official draw gives that
size, renormalized over the buckets: P(h, w) = P_h(h) P_w(w) / sum over buckets. That is the
official distribution conditioned on landing on a bucket, so each bucket keeps the relative
weight the official code gives it, and training compiles one step per bucket.
"""

import numpy as np

ALIGN = 32


def official_axis_probability(size: int, low: int, high: int) -> float:
  """P(randint(low, high) // 32 * 32 == size) (0 for a size the draw never gives)."""
  if size % ALIGN:
    return 0.0
  first, last = max(low, size), min(high, size + ALIGN - 1)
  return max(0, last - first + 1) / (high - low + 1)


def check_buckets(buckets, dynamic_size):
  """((h, w), ...) as a tuple of int pairs; a ValueError names a bucket that is not a pair of
  positive multiples of 32 or that the official draw over ``dynamic_size`` never gives."""
  if not buckets:
    raise ValueError('data.size_buckets is empty: give at least one (height, width)')
  if dynamic_size is None:
    raise ValueError('data.size_buckets needs data.dynamic_size (the ranges the official code '
                     'draws sizes from, which weight the buckets)')
  out = []
  for bucket in buckets:
    if len(bucket) != 2 or any(int(s) <= 0 or int(s) % ALIGN for s in bucket):
      raise ValueError(f'data.size_buckets: {tuple(bucket)} is not (height, width) in positive '
                       f'multiples of {ALIGN}')
    out.append((int(bucket[0]), int(bucket[1])))
  if len(set(out)) != len(out):
    raise ValueError(f'data.size_buckets has duplicates: {out}')
  probabilities = _unnormalized(out, dynamic_size)
  for bucket, p in zip(out, probabilities):
    if p == 0:
      (h_lo, h_hi), (w_lo, w_hi) = dynamic_size
      raise ValueError(f'data.size_buckets: {bucket} is outside data.dynamic_size (heights '
                       f'{h_lo}..{h_hi}, widths {w_lo}..{w_hi}): it would never be drawn')
  return tuple(out)


def _unnormalized(buckets, dynamic_size):
  (h_lo, h_hi), (w_lo, w_hi) = dynamic_size
  return np.asarray([official_axis_probability(h, h_lo, h_hi) *
                     official_axis_probability(w, w_lo, w_hi) for h, w in buckets])


def bucket_probabilities(buckets, dynamic_size):
  """(len(buckets),) float64: each bucket's probability (module docstring)."""
  buckets = check_buckets(buckets, dynamic_size)
  p = _unnormalized(buckets, dynamic_size)
  return p / p.sum()


def random_bucket(buckets, probabilities, rng):
  """One (h, w) of ``buckets`` drawn with ``probabilities`` by the numpy Generator ``rng``."""
  return tuple(buckets[int(rng.choice(len(buckets), p=probabilities))])

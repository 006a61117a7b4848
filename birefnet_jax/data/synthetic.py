"""A built-in DIS-like data set: thin branching structures, meshes with holes, wires and holed
gears with textured foregrounds on cluttered backgrounds, each with its exact mask.

Two difficulties: 'dis' (the default: thin structures on busy scenes, like DIS5K) and 'easy'
(the same four kinds drawn 2-3x thicker, in a colour that stands out, on a smooth background
without clutter), which a tiny model learns within minutes on a CPU (configs/quickstart.py).

Examples are drawn on the fly from (seed, index) at any size, so the set needs no disk and is
the same on every machine and in every grain worker. The image is composited from the mask
(foreground texture where mask = 255, background elsewhere), so the mask is exact.
`write_official_layout` writes it to disk as ROOT/TASK/DATASET/{im,gt} for tests and demos.
"""

import os
import zlib

import cv2
import numpy as np

from birefnet_jax.data.classes import DIS_CLASS_NAMES

# Structure kinds and the DIS5K category each stands in for.
KINDS = ('Tree', 'Fence', 'Cable', 'Gear')


def _smooth_noise(rng, height, width, cells, amplitude, channels=3):
  """Low-frequency noise: a coarse random grid upsampled (bicubic to 1/8 size, then linear)."""
  coarse = rng.normal(0.0, amplitude, (cells, cells, channels)).astype(np.float32)
  mid = cv2.resize(coarse, (max(width // 8, 1), max(height // 8, 1)),
                   interpolation=cv2.INTER_CUBIC)
  return cv2.resize(mid, (width, height), interpolation=cv2.INTER_LINEAR).reshape(
      height, width, channels)


def _ramp(rng, height, width):
  """A linear ramp in [0, 1] along a random direction, (H, W, 1) float32."""
  theta = rng.uniform(0, np.pi)
  xs = np.arange(width, dtype=np.float32) * np.float32(np.cos(theta))
  ys = np.arange(height, dtype=np.float32) * np.float32(np.sin(theta))
  t = ys[:, None] + xs[None, :]
  t -= t.min()
  return (t / max(float(t.max()), 1.0))[..., None]


def _grain(rng, shape, sigma):
  """Fine noise, uniform with standard deviation sigma (cheaper to draw than Gaussian)."""
  noise = rng.integers(0, 256, shape, dtype=np.uint8).astype(np.float32) - np.float32(127.5)
  return noise * np.float32(sigma / 73.9)


def _background(rng, height, width):
  """Gradient + blobs + clutter of random shapes + grain: a busy scene without the object."""
  scale = min(height, width) / 256.0
  c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
  bg = c0 + _ramp(rng, height, width) * (c1 - c0)
  bg += _smooth_noise(rng, height, width, int(rng.integers(3, 9)), 30.0)
  bg = np.clip(bg, 0, 255).astype(np.uint8)
  for _ in range(int(rng.integers(8, 25))):
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    thickness = int(rng.choice([-1, max(1, int(rng.integers(1, 4) * scale))]))
    x0, x1 = (int(v) for v in rng.integers(0, width, 2))
    y0, y1 = (int(v) for v in rng.integers(0, height, 2))
    shape = rng.integers(0, 3)
    if shape == 0:
      cv2.rectangle(bg, (x0, y0), (x1, y1), color, thickness)
    elif shape == 1:
      radius = max(1, int(rng.integers(4, 40) * scale))
      cv2.circle(bg, (x0, y0), radius, color, thickness)
    else:
      cv2.line(bg, (x0, y0), (x1, y1), color, max(1, abs(thickness)))
  bg = cv2.GaussianBlur(bg, (0, 0), sigmaX=rng.uniform(0.3, 1.5))
  return np.clip(bg + _grain(rng, (height, width, 1), 6.0), 0, 255).astype(np.uint8)


def _foreground_texture(rng, height, width):
  """Stripes of a random period and direction over a base colour, plus shading."""
  period = rng.uniform(3, 20) * min(height, width) / 256.0 + 1.0
  stripes = np.sin(_ramp(rng, height, width) * np.float32(2 * np.pi * (height + width) / period))
  base = rng.uniform(0, 255, 3).astype(np.float32)
  accent = rng.uniform(-80, 80, 3).astype(np.float32)
  fg = base + stripes * accent
  fg += _smooth_noise(rng, height, width, int(rng.integers(2, 6)), 25.0)
  fg += _grain(rng, (height, width, 1), 4.0)
  return np.clip(fg, 0, 255).astype(np.uint8)


def _draw_tree(rng, mask, thick=1.0):
  """A branching structure: each branch splits into 2-3 thinner, shorter ones."""
  height, width = mask.shape
  scale = thick * min(height, width) / 256.0
  x, y = rng.uniform(0.3, 0.7) * width, rng.uniform(0.8, 0.97) * height
  stack = [(x, y, -np.pi / 2 + rng.uniform(-0.3, 0.3), rng.uniform(0.2, 0.35) * height,
            max(1.0, rng.uniform(4, 9) * scale), int(rng.integers(5, 8)))]
  segments = 0
  while stack and segments < 2000:
    x, y, angle, length, thickness, depth = stack.pop()
    x2, y2 = x + length * np.cos(angle), y + length * np.sin(angle)
    cv2.line(mask, (int(x), int(y)), (int(x2), int(y2)), 255, max(1, int(round(thickness))))
    segments += 1
    if depth > 0:
      for _ in range(int(rng.integers(2, 4))):
        stack.append((x2, y2, angle + rng.uniform(-0.8, 0.8), length * rng.uniform(0.55, 0.8),
                      thickness * 0.7, depth - 1))


def _draw_fence(rng, mask, thick=1.0):
  """A lattice of thin wires inside a quadrilateral frame: many holes."""
  height, width = mask.shape
  scale = thick * min(height, width) / 256.0
  corners = np.array([[rng.uniform(0.05, 0.3) * width, rng.uniform(0.05, 0.3) * height],
                      [rng.uniform(0.7, 0.95) * width, rng.uniform(0.05, 0.3) * height],
                      [rng.uniform(0.7, 0.95) * width, rng.uniform(0.7, 0.95) * height],
                      [rng.uniform(0.05, 0.3) * width, rng.uniform(0.7, 0.95) * height]],
                     np.int32)
  lattice = np.zeros_like(mask)
  spacing = max(3, int(rng.uniform(8, 20) * scale))
  wire = max(1, int(rng.uniform(1, 2.5) * scale))
  span = height + width
  for offset in range(-span, span, spacing):
    cv2.line(lattice, (offset, 0), (offset + height, height), 255, wire)
    cv2.line(lattice, (offset + height, 0), (offset, height), 255, wire)
  region = np.zeros_like(mask)
  cv2.fillPoly(region, [corners], 255)
  mask |= lattice & region
  cv2.polylines(mask, [corners], True, 255, max(2, int(rng.uniform(3, 6) * scale)))


def _draw_cables(rng, mask, thick=1.0):
  """Cubic Bezier wires of 1-4 px across the image, hanging from a pole."""
  height, width = mask.shape
  scale = thick * min(height, width) / 256.0
  pole_x = int(rng.uniform(0.1, 0.9) * width)
  pole_w = max(2, int(rng.uniform(3, 7) * scale))
  cv2.rectangle(mask, (pole_x - pole_w, int(0.1 * height)), (pole_x + pole_w, height - 1), 255, -1)
  t = np.linspace(0, 1, 200)[:, None]
  for _ in range(int(rng.integers(3, 7))):
    start = np.array([pole_x, rng.uniform(0.1, 0.4) * height])
    end = np.array([rng.choice([0, width - 1]), rng.uniform(0.05, 0.6) * height])
    c1 = start + rng.uniform(-0.3, 0.3, 2) * [width, height] + [0, 0.2 * height]
    c2 = end + rng.uniform(-0.3, 0.3, 2) * [width, height] + [0, 0.2 * height]
    curve = ((1 - t) ** 3 * start + 3 * (1 - t) ** 2 * t * c1 + 3 * (1 - t) * t ** 2 * c2
             + t ** 3 * end)
    cv2.polylines(mask, [curve.astype(np.int32)], False, 255, max(1, int(rng.uniform(1, 4) * scale)))


def _draw_gear(rng, mask, thick=1.0):
  """A toothed disc with a central hole and a ring of holes."""
  del thick   # a gear is solid at any difficulty
  height, width = mask.shape
  cx, cy = rng.uniform(0.35, 0.65) * width, rng.uniform(0.35, 0.65) * height
  radius = rng.uniform(0.2, 0.33) * min(height, width)
  teeth = int(rng.integers(8, 24))
  angles = np.linspace(0, 2 * np.pi, 4 * teeth, endpoint=False)
  radii = np.tile([radius, radius * 1.15, radius * 1.15, radius], teeth)
  outline = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], -1)
  cv2.fillPoly(mask, [outline.astype(np.int32)], 255)
  cv2.circle(mask, (int(cx), int(cy)), max(1, int(radius * rng.uniform(0.15, 0.3))), 0, -1)
  holes = int(rng.integers(3, 9))
  for k in range(holes):
    a = 2 * np.pi * k / holes
    r = radius * 0.6
    cv2.circle(mask, (int(cx + r * np.cos(a)), int(cy + r * np.sin(a))),
               max(1, int(radius * rng.uniform(0.08, 0.15))), 0, -1)


_DRAW = {'Tree': _draw_tree, 'Fence': _draw_fence, 'Cable': _draw_cables, 'Gear': _draw_gear}


def _easy_background(rng, height, width):
  """A smooth two-colour gradient with faint noise: nothing that looks like an object."""
  c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
  bg = c0 + _ramp(rng, height, width) * (c1 - c0)
  bg += _smooth_noise(rng, height, width, int(rng.integers(2, 5)), 12.0)
  return np.clip(bg + _grain(rng, (height, width, 1), 3.0), 0, 255).astype(np.uint8)


def _easy_foreground(rng, background):
  """A flat colour far in brightness from the background's mean, with faint shading."""
  height, width = background.shape[:2]
  mean = background.reshape(-1, 3).mean(0)
  target = 210.0 if mean.mean() < 128 else 45.0
  fg = np.float32(target) + rng.uniform(-40, 40, 3).astype(np.float32)
  fg = fg + _smooth_noise(rng, height, width, 3, 10.0)
  return np.clip(fg, 0, 255).astype(np.uint8)


DIFFICULTIES = ('dis', 'easy')
_EASY_THICKNESS = 2.5


def render(seed, index, image_size, difficulty='dis'):
  """(image uint8 (H,W,3), mask uint8 (H,W) in {0,255}, kind) for one (seed, index)."""
  if difficulty not in DIFFICULTIES:
    raise ValueError(f'synthetic difficulty must be one of {DIFFICULTIES}, got {difficulty!r}')
  height, width = image_size
  rng = np.random.default_rng([int(seed), int(index)])
  kind = KINDS[int(rng.integers(0, len(KINDS)))]
  mask = np.zeros((height, width), np.uint8)
  if difficulty == 'easy':
    _DRAW[kind](rng, mask, thick=_EASY_THICKNESS)
    background = _easy_background(rng, height, width)
    foreground = _easy_foreground(rng, background)
  else:
    _DRAW[kind](rng, mask)
    background = _background(rng, height, width)
    foreground = _foreground_texture(rng, height, width)
  image = np.where(mask[..., None] > 0, foreground, background)
  return image, mask, kind


def example_name(seed, index, kind):
  """DIS5K-style file stem, so the official class-id rule (split('#')[3]) finds `kind`."""
  return f'{index + 1}#Synthetic#{KINDS.index(kind) + 1}#{kind}#synthetic_s{seed}_{index:06d}'


class SyntheticDataset:
  """Random-access source (len / getitem) of synthetic examples.

  Each item: {'image': (H,W,3) uint8 RGB, 'mask': (H,W) uint8, 'name': str, 'dataset': str,
  'class_label': int (the DIS5K id of the structure's category)}.
  """

  def __init__(self, num_examples, image_size, seed=0, difficulty='dis'):
    if difficulty not in DIFFICULTIES:
      raise ValueError(f'synthetic difficulty must be one of {DIFFICULTIES}, got {difficulty!r}')
    self.num_examples = int(num_examples)
    self.image_size = tuple(int(s) for s in image_size)
    self.seed = int(seed)
    self.difficulty = difficulty

  def __len__(self):
    return self.num_examples

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range for {self!r}')
    image, mask, kind = render(self.seed, index, self.image_size, self.difficulty)
    return dict(image=image, mask=mask, name=example_name(self.seed, index, kind) + '.png',
                dataset='synthetic', class_label=DIS_CLASS_NAMES.index(kind))

  def __repr__(self):
    return (f'SyntheticDataset({self.num_examples}, {self.image_size}, seed={self.seed}, '
            f'difficulty={self.difficulty!r})')


def write_official_layout(root, task='DIS5K', splits=None, image_size=(256, 256), seed=0,
                          image_ext='.jpg'):
  """Writes ROOT/TASK/SPLIT/im/*.{jpg,png} and gt/*.png; returns {split: folder}.

  splits: {dataset folder name: number of examples}, by default a tiny DIS5K (DIS-TR 16,
  DIS-VD 4). Each split draws from its own seed, derived from `seed` and the split name.
  """
  splits = splits or {'DIS-TR': 16, 'DIS-VD': 4}
  written = {}
  for split, count in splits.items():
    split_seed = (int(seed) * 1_000_003 + zlib.crc32(split.encode())) % 2**31
    base = os.path.join(root, task, split) if task else os.path.join(root, split)
    os.makedirs(os.path.join(base, 'im'), exist_ok=True)
    os.makedirs(os.path.join(base, 'gt'), exist_ok=True)
    for index in range(count):
      image, mask, kind = render(split_seed, index, image_size)
      stem = example_name(split_seed, index, kind)
      params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_ext.lower() in ('.jpg', '.jpeg') else []
      ok = cv2.imwrite(os.path.join(base, 'im', stem + image_ext),
                       cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
      ok &= cv2.imwrite(os.path.join(base, 'gt', stem + '.png'), mask)
      if not ok:
        raise OSError(f'could not write synthetic example {stem} under {base}')
    written[split] = base
  return written

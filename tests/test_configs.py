"""The official-recipe configs load and carry the official numbers (docs §8)."""

import importlib.util
import math
from pathlib import Path

import pytest

from birefnet_jax import optim

ROOT = Path(__file__).resolve().parents[1]


def load(name):
  # By path: configs/ on sys.path would let configs/dis.py shadow the stdlib's dis.
  spec = importlib.util.spec_from_file_location(f'config_{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('name,task,base_lr,epochs', [('dis', 'DIS5K', 1e-4, 500),
                                                      ('hrsod', 'HRSOD', 1e-5, 150),
                                                      ('cod', 'COD', 1e-5, 150),
                                                      ('general', 'General', 1e-5, 200)])
def test_official_recipes(name, task, base_lr, epochs):
  config = load(name)
  assert config.model.backbone.family == 'swin' and config.model.backbone.embed_dim == 192
  assert tuple(config.data.image_size) == (1024, 1024)
  assert config.data.task == task and config.epochs == epochs
  opt = config.optim.copy_and_resolve_references()
  assert opt.lr is None                    # resolved from the run's global batch
  opt.global_batch_size, opt.epochs = 16, epochs
  _, schedule = optim.make_optimizer(opt, steps_per_epoch=10)
  assert math.isclose(float(schedule(0)), base_lr * math.sqrt(16 / 4), rel_tol=1e-6)
  assert opt.weight_decay == 1e-2


def test_quickstart_is_small():
  config = load('quickstart')
  assert config.data.source == 'synthetic'
  assert max(config.data.image_size) <= 256

"""The config files: the official recipes' numbers (docs §8), one schema, one task field, and the
variants a config file accepts (``--config configs/dis.py:backbone=swin_v1_t,size=512``)."""

import importlib.util
import math
from pathlib import Path

import pytest

from birefnet_jax import optim
from birefnet_jax import train
from birefnet_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def load(name, arg=None):
  # By path: configs/ on sys.path would let configs/dis.py shadow the stdlib's dis.
  spec = importlib.util.spec_from_file_location(f'config_{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('name,task,base_lr,epochs,last', [('dis', 'DIS5K', 1e-4, 500, -40),
                                                           ('hrsod', 'HRSOD', 1e-5, 150, -20),
                                                           ('cod', 'COD', 1e-5, 150, -20),
                                                           ('general', 'General', 1e-5, 200, -20)])
def test_official_recipes(name, task, base_lr, epochs, last):
  config = load(name)
  assert config.model.backbone.family == 'swin' and config.model.backbone.embed_dim == 192
  assert config.model.dtype == 'bfloat16'
  assert tuple(config.data.image_size) == (1024, 1024)
  assert config.task == task and config.data.task == task and config.epochs == epochs
  assert config.finetune_last_epochs == last
  assert config.optim.lr is None           # resolved from the run's global batch
  lr = train.peak_learning_rate(config, 16)
  assert math.isclose(lr, base_lr * math.sqrt(16 / 4), rel_tol=1e-12)
  _, schedule = optim.make_optimizer(config.optim, steps_per_epoch=10, epochs=epochs, lr=lr)
  assert math.isclose(float(schedule(0)), lr, rel_tol=1e-6)
  assert math.isclose(float(schedule(10 * epochs - 1)), lr, rel_tol=1e-6)   # constant
  assert config.optim.weight_decay == 1e-2


def test_every_config_has_the_same_fields():
  # One schema: every config file is recipes.recipe(...) plus overrides, so they share their
  # field names at every level but the model's backbone (Swin / PVT presets differ).
  def names(config, prefix=''):
    out = set()
    for key, value in config.items():
      if hasattr(value, 'items') and key != 'backbone':
        out |= names(value, prefix + key + '.')
      else:
        out.add(prefix + key)
    return out
  reference = names(load('dis'))
  for name in ('hrsod', 'cod', 'general', 'quickstart', 'general_2k', 'matting', 'hr', 'dynamic'):
    assert names(load(name)) == reference, name
  assert 'loss_task' not in reference and 'optim.task' not in reference


# The official numbers of the practical-use setups (config.py, train.sh, README at 25cb930).
@pytest.mark.parametrize('name,task,size,epochs,last,lambdas', [
    ('general_2k', 'General-2K', (1440, 2560), 250, -20,
     dict(bce=30.0, iou=0.5, ssim=10.0, mae=100.0)),
    ('matting', 'Matting', (1024, 1024), 150, -10, dict(bce=30.0, iou=0.0, ssim=10.0, mae=100.0)),
    ('hr', 'General', (2048, 2048), 200, -20, dict(bce=30.0, iou=0.5, ssim=10.0, mae=100.0)),
    ('dynamic', 'General', (1024, 1024), 200, -20, dict(bce=30.0, iou=0.5, ssim=10.0, mae=100.0)),
])
def test_practical_recipes(name, task, size, epochs, last, lambdas):
  config = load(name)
  assert config.task == task and config.data.task == task
  assert tuple(config.data.image_size) == size
  assert config.epochs == epochs and config.finetune_last_epochs == last
  assert config.model.backbone.family == 'swin' and config.model.backbone.embed_dim == 192
  got = {k: v for k, v in train.loss_lambdas(config, 0, 10, epochs).items() if v}
  assert got == {k: v for k, v in lambdas.items() if v}
  assert math.isclose(train.peak_learning_rate(config, 8), 1e-5 * math.sqrt(2), rel_tol=1e-12)


def test_general_2k_checkpoints_every_2_epochs_and_matting_validates_on_matting_sets():
  assert load('general_2k').ckpt_every_epochs == 2             # train.sh step=2
  assert load('matting').data.val_sets == 'TE-P3M-500-NP,TE-AM-2k'
  assert load('general_2k').data.val_sets == 'DIS-VD,TE-P3M-500-NP'


def test_dynamic_config_draws_the_official_range_on_buckets():
  config = load('dynamic')
  assert config.data.dynamic_size == ((256, 2304), (256, 2304))
  sides = {s for bucket in config.data.size_buckets for s in bucket}
  assert len(config.data.size_buckets) == 16 and sides == {512, 1024, 1536, 2048}


def test_hr_matting_is_the_task_variant():
  config = load('hr', 'task=Matting')
  assert config.task == 'Matting' and tuple(config.data.image_size) == (2048, 2048)
  assert config.epochs == 150 and config.finetune_last_epochs == -10
  assert train.loss_lambdas(config, 0, 10, 150) == dict(bce=30.0, ssim=10.0, mae=100.0)
  # A variant overrides the config file's own defaults.
  assert tuple(load('general_2k', 'size=1024').data.image_size) == (1024, 1024)
  assert load('general_2k', 'backbone=swin_v1_t').model.backbone.embed_dim == 96


def test_task_is_one_field():
  config = load('dis')
  config.task = 'COD'                      # as --config.task=COD does
  assert config.data.task == 'COD'
  assert train.peak_learning_rate(config, 8) == optim.official_learning_rate('COD', 8)
  config.data.task = 'HRSOD'               # the reference works both ways: still one value
  assert config.task == 'HRSOD'
  resolved = config.copy_and_resolve_references()
  assert resolved.task == resolved.data.task == 'HRSOD'


def test_loss_lambdas_follow_the_task_field():
  config = load('general')
  assert train.loss_lambdas(config, 0, 1, 200).get('mae') == 100.0    # General adds MAE x100
  config.task = 'DIS5K'
  assert 'mae' not in train.loss_lambdas(config, 0, 1, 200)


def test_loss_lambdas_decay_in_the_official_finetune_window():
  config = load('dis')                      # 500 epochs, the last 40 are the finetune
  first_finetune_step = 460 * 10            # 10 steps per epoch: epoch 461 starts here
  assert train.loss_lambdas(config, first_finetune_step - 1, 10, 500) == dict(
      bce=30.0, iou=0.5, ssim=10.0)
  assert train.loss_lambdas(config, first_finetune_step, 10, 500) == dict(
      bce=0.0, iou=0.25, ssim=10.0)         # official: bce *= 0, iou *= 0.5 per finetune epoch
  assert train.loss_lambdas(config, 500 * 10 - 1, 10, 500)['iou'] == 0.5 * 0.5 ** 40


def test_on_n_devices_the_loss_is_the_official_ddp_average_of_per_gpu_losses():
  """Official DDP: each of N GPUs computes the loss of its own batch (IoU a sum over it, the
  other terms means) and the gradients are averaged. One loss over the global batch with
  ``loss_lambdas(..., data_parallel=N)`` must equal that average, value and gradient."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from birefnet_jax import losses  # pylint: disable=g-import-not-at-top

  config = load('general')                  # bce, iou, ssim and mae all active
  n, per_gpu = 4, 2
  official = train.loss_lambdas(config, 0, 1, 200)
  ours = train.loss_lambdas(config, 0, 1, 200, data_parallel=n)
  assert ours == dict(official, iou=official['iou'] / n) and official['iou'] == 0.5

  rng = np.random.default_rng(0)
  gt = jnp.asarray(rng.random((n * per_gpu, 16, 16, 1)) > 0.5, jnp.float32)
  logits = [jnp.asarray(rng.normal(size=(n * per_gpu, s, s, 1)), jnp.float32) for s in (4, 8, 16)]

  def global_loss(logits):
    return losses.pixel_loss(logits, gt, ours)[0]

  def ddp_loss(logits):
    shard = lambda a, i: a[i * per_gpu:(i + 1) * per_gpu]
    return sum(losses.pixel_loss([shard(l, i) for l in logits], shard(gt, i), official)[0]
               for i in range(n)) / n

  np.testing.assert_allclose(global_loss(logits), ddp_loss(logits), rtol=1e-5)
  for a, b in zip(jax.grad(global_loss)(logits), jax.grad(ddp_loss)(logits)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  # Without the division the IoU term would weigh N times the official one: the test can fail.
  assert abs(losses.pixel_loss(logits, gt, official)[0] - ddp_loss(logits)) > 1e-2
  with pytest.raises(ValueError, match='data_parallel'):
    train.loss_lambdas(config, 0, 1, 200, data_parallel=0)


def test_quickstart_is_small():
  config = load('quickstart')
  assert config.data.source == 'synthetic'
  assert max(config.data.image_size) <= 256
  assert config.task == 'DIS5K' and config.finetune_last_epochs == 0


@pytest.mark.parametrize('arg,backbone,embed_dim,size,epochs', [
    ('backbone=swin_v1_t,size=512', 'swin', 96, (512, 512), 500),
    ('size=2560x1440', 'swin', 192, (1440, 2560), 500),          # W x H, as predict's --resolution
    ('epochs=3', 'swin', 192, (1024, 1024), 3),
    ('backbone=pvt_v2_b2', 'pvt_v2', None, (1024, 1024), 500),
    ('backbone=dino_v3_b', 'dino_v3', 768, (1024, 1024), 500),
])
def test_variants(arg, backbone, embed_dim, size, epochs):
  config = load('dis', arg)
  assert config.model.backbone.family == backbone
  if embed_dim:
    assert config.model.backbone.embed_dim == embed_dim
  assert tuple(config.data.image_size) == size and config.epochs == epochs
  assert config.arg == arg and config.task == 'DIS5K'


@pytest.mark.parametrize('arg,message', [
    ('backbone=resnet50', 'unknown backbone'),
    ('sise=512', 'expected KEY=VALUE'),
    ('size=500', 'multiples of 32'),
    ('size=big', 'expected N or WxH'),
    ('epochs=-1', 'positive integer'),
    ('task=SOD', 'unknown task'),
    ('swin_v1_t', 'expected KEY=VALUE'),
])
def test_bad_variants_are_user_errors(arg, message):
  with pytest.raises(UserError, match=message):
    load('dis', arg)

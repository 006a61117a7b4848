"""BasicDecBlk / ASPPDeformable: variable tree against the official state dict (fixture), and the
eval / train forward against an independent float64 PyTorch re-statement of the official modules
run with the fixture's squeeze-block weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from birefnet_jax.convert import names
from birefnet_jax.models.aspp import ASPPDeformable
from birefnet_jax.models.decoder_blocks import BasicDecBlk

import reference

jax.config.update('jax_default_matmul_precision', 'highest')

REFERENCE = reference.REFERENCE
PREFIX = 'squeeze_module.0.'


@pytest.fixture(scope='module')
def fixture():
  """The squeeze block's state dict (keys without the prefix) and its widths."""
  hp = json.loads((REFERENCE / 'swin_w12_tiny.json').read_text())
  cfg = hp['config_resulting']
  c4 = cfg['lateral_channels_in_collection'][0]
  decoder_widths = hp['decoder_widths']
  widths = dict(in_channels=c4 + sum(cfg['cxt']), out_channels=c4,
                inter_channels=decoder_widths['dec_inter_channels']['fixture'],
                planes=decoder_widths['aspp_planes']['fixture'])
  sd = load_file(str(REFERENCE / 'swin_w12_tiny.safetensors'))
  block = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
  return widths, block


def converted_variables(block):
  flat = {}
  for key, value in block.items():
    entry = names.torch_to_flax(key, value)
    if entry is not None:
      collection, path, array = entry
      flat[(collection,) + path] = array
  return names.nest(flat)


def test_fixture_widths(fixture):
  widths, block = fixture
  # The numbers the brief states for this fixture; also read back from the weights' shapes.
  assert widths == dict(in_channels=240, out_channels=128, inter_channels=8, planes=16)
  assert block['conv_in.weight'].shape == (8, 240, 3, 3)
  assert block['dec_att.conv1.weight'].shape == (8, 5 * 16, 1, 1)


def test_variable_tree_equals_converted_state_dict(fixture):
  widths, block = fixture
  module = BasicDecBlk(widths['out_channels'], widths['inter_channels'], widths['planes'])
  x = jnp.zeros((1, 7, 7, widths['in_channels']))
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False,
                                              deterministic=True))
  ours = {path: tuple(v.shape) for path, v in names.flatten(shapes).items()}
  theirs = {path: tuple(v.shape) for path, v in names.flatten(converted_variables(block)).items()}
  assert ours == theirs


def test_without_batch_norm_no_bn_variables(fixture):
  widths, block = fixture
  module = BasicDecBlk(widths['out_channels'], widths['inter_channels'], widths['planes'],
                       batch_norm=False)
  x = jnp.zeros((1, 7, 7, widths['in_channels']))
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False,
                                              deterministic=True))
  assert set(shapes) == {'params'}
  ours = {path: tuple(v.shape) for path, v in names.flatten(shapes['params']).items()}
  bn_modules = {k.rpartition('.')[0] for k in block if k.endswith('running_mean')}
  theirs = {path: tuple(v.shape) for path, v in names.flatten(
      converted_variables({k: v for k, v in block.items()
                           if k.rpartition('.')[0] not in bn_modules})['params']).items()}
  assert ours == theirs


# ------------------------------------------------- independent PyTorch statement of the block

def torch_block(sd, x, train):
  """BasicDecBlk forward (official structure) from a state dict of float64 tensors, NCHW."""
  # torch only here: the tests that do not compare against torch run without it.
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  from torch_reference import deform_conv2d  # pylint: disable=import-outside-toplevel

  def bn(prefix, v):
    if train:
      return F.batch_norm(v, None, None, sd[prefix + '.weight'], sd[prefix + '.bias'],
                          training=True, eps=1e-5)
    return F.batch_norm(v, sd[prefix + '.running_mean'], sd[prefix + '.running_var'],
                        sd[prefix + '.weight'], sd[prefix + '.bias'], training=False, eps=1e-5)

  def deform_branch(prefix, v, k):
    p = prefix + '.atrous_conv.'
    offset = F.conv2d(v, sd[p + 'offset_conv.weight'], sd[p + 'offset_conv.bias'], padding=k // 2)
    mask = 2 * torch.sigmoid(F.conv2d(v, sd[p + 'modulator_conv.weight'],
                                      sd[p + 'modulator_conv.bias'], padding=k // 2))
    v = deform_conv2d(v, offset, sd[p + 'regular_conv.weight'], padding=k // 2, mask=mask)
    return F.relu(bn(prefix + '.bn', v))

  v = F.relu(bn('bn_in', F.conv2d(x, sd['conv_in.weight'], sd['conv_in.bias'], padding=1)))
  outs = [deform_branch('dec_att.aspp1', v, 1)]
  outs += [deform_branch(f'dec_att.aspp_deforms.{j}', v, k) for j, k in enumerate((1, 3, 7))]
  g = F.conv2d(v.mean(dim=(2, 3), keepdim=True), sd['dec_att.global_avg_pool.1.weight'])
  g = F.relu(bn('dec_att.global_avg_pool.2', g))
  outs.append(F.interpolate(g, size=v.shape[2:], mode='bilinear', align_corners=True))
  a = F.conv2d(torch.cat(outs, dim=1), sd['dec_att.conv1.weight'])
  a = F.relu(bn('dec_att.bn1', a))
  y = F.conv2d(a, sd['conv_out.weight'], sd['conv_out.bias'], padding=1)
  return bn('bn_out', y)


@pytest.mark.parametrize('train', [False, True])
def test_forward_matches_torch_statement_float64(fixture, train):
  torch = pytest.importorskip('torch')
  widths, block = fixture
  rng = np.random.default_rng(0)
  # Large inputs so that the predicted offsets move samples by several pixels, many off the map.
  x = rng.normal(scale=3.0, size=(2, 7, 6, widths['in_channels']))
  sd = {k: torch.from_numpy(v.astype(np.float64)) for k, v in block.items()
        if not k.endswith('num_batches_tracked')}
  with torch.no_grad():
    want = torch_block(sd, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), train)
  want = want.numpy().transpose(0, 2, 3, 1)

  with jax.enable_x64(True):
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), converted_variables(block))
    module = BasicDecBlk(widths['out_channels'], widths['inter_channels'], widths['planes'])
    if train:
      got, updates = jax.jit(lambda v, x: module.apply(v, x, train=True, deterministic=True,
                                                       mutable=['batch_stats']))(
          variables, jnp.asarray(x))
      # Running statistics moved (torch semantics are layers.BatchNorm's own test's business).
      assert not np.allclose(updates['batch_stats']['bn_in']['mean'],
                             variables['batch_stats']['bn_in']['mean'])
    else:
      got = jax.jit(lambda v, x: module.apply(v, x, train=False, deterministic=True))(
          variables, jnp.asarray(x))
    got = np.asarray(got)
  assert got.shape == (2, 7, 6, widths['out_channels'])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * max(1.0, np.abs(want).max()))


def test_offsets_in_fixture_weights_are_exercised(fixture):
  """Guards the forward test: the fixture's offset convs are non-zero (not the zero init)."""
  _, block = fixture
  assert np.abs(block['dec_att.aspp_deforms.2.atrous_conv.offset_conv.weight']).max() > 0


def test_dropout_only_in_training_and_not_deterministic():
  module = ASPPDeformable(in_channels=4, planes=6)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 5, 4)), jnp.float32)
  variables = jax.jit(module.init, static_argnames=('train', 'deterministic'))(
      jax.random.key(0), x, train=False, deterministic=True)
  rngs = {'dropout': jax.random.key(3)}

  @jax.jit
  def outputs(variables, x, rngs):
    eval_det = module.apply(variables, x, train=False, deterministic=True)
    eval_rng = module.apply(variables, x, train=False, deterministic=False, rngs=rngs)
    train_det, _ = module.apply(variables, x, train=True, deterministic=True,
                                mutable=['batch_stats'])
    train_drop, _ = module.apply(variables, x, train=True, deterministic=False, rngs=rngs,
                                 mutable=['batch_stats'])
    return eval_det, eval_rng, train_det, train_drop

  eval_det, eval_rng, train_det, train_drop = map(np.asarray, outputs(variables, x, rngs))
  np.testing.assert_array_equal(eval_det, eval_rng)
  dropped = train_drop == 0
  kept = ~dropped
  assert 0.3 < dropped[train_det > 0].mean() < 0.7   # rate 0.5 on the non-zero outputs
  np.testing.assert_allclose(train_drop[kept], 2 * train_det[kept], rtol=1e-6)


def test_wrong_input_width_is_reported():
  module = ASPPDeformable(in_channels=4, planes=6)
  with pytest.raises(ValueError, match='in_channels=4'):
    module.init(jax.random.key(0), jnp.zeros((1, 5, 5, 3)), train=False, deterministic=True)

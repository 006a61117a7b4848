"""The whole model, converted from the official fixtures, against the official outputs."""

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import reference
from birefnet_jax.convert import convert_state_dict, read_state_dict
from birefnet_jax.models.birefnet import BiRefNet

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='module', params=reference.VARIANTS)
def converted(request):
  variant = request.param
  cfg, variables = convert_state_dict(load_file(reference.path(f'{variant}.safetensors')),
                                      inref_order=reference.inref_order(variant))
  return variant, cfg, variables


def test_inferred_architecture_matches_the_official_constructor(converted):
  variant, cfg, _ = converted
  desc = reference.description(variant)
  kwargs = desc['backbone']['kwargs']
  bb = cfg.backbone
  if bb.family == 'swin':
    assert (bb.embed_dim, list(bb.depths), list(bb.num_heads), bb.window_size) == (
        kwargs['embed_dim'], kwargs['depths'], kwargs['num_heads'], kwargs['window_size'])
  else:
    assert list(bb.embed_dims) == kwargs['embed_dims']
    assert list(bb.depths) == kwargs['depths']
    assert list(bb.mlp_ratios) == kwargs['mlp_ratios']
    assert list(bb.sr_ratios) == kwargs['sr_ratios']
    assert list(bb.num_heads) == kwargs['num_heads']
  widths = desc['decoder_widths']
  assert cfg.aspp_planes == widths['aspp_planes']['fixture']
  assert cfg.dec_inter_channels == widths['dec_inter_channels']['fixture']
  assert cfg.ipt_inter_channels == widths['ipt_inter_channels']['fixture']
  resulting = desc['config_resulting']
  assert cfg.auxiliary_classification == resulting['auxiliary_classification']
  assert cfg.mul_scl_ipt == resulting['mul_scl_ipt'] and cfg.cxt_num == resulting['cxt_num']
  assert cfg.batch_norm and cfg.ms_supervision and cfg.out_ref and cfg.dec_ipt


def test_eval_logits(converted):
  variant, cfg, variables = converted
  io, tol = reference.io(variant), reference.tolerances(variant)['arrays']
  model = BiRefNet(cfg)
  apply = jax.jit(lambda v, x: model.apply(
      v, x, capture_intermediates=lambda m, _: m.name == 'squeeze_module_0'))
  logits, state = apply(variables, reference.nhwc(io['input']))
  np.testing.assert_allclose(np.asarray(logits), reference.nhwc(io['eval_final_logits']),
                             rtol=0, atol=tol['eval_final_logits'])
  squeeze = state['intermediates']['squeeze_module_0']['__call__'][0]
  np.testing.assert_allclose(np.asarray(squeeze), reference.nhwc(io['eval_squeeze_out']),
                             rtol=0, atol=tol['eval_squeeze_out'])


def test_train_outputs(converted):
  variant, cfg, variables = converted
  io, tol = reference.io(variant), reference.tolerances(variant)['arrays']
  model = BiRefNet(cfg)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True, deterministic=True,
                                           mutable=['batch_stats']))
  outs, _ = apply(variables, reference.nhwc(io['input']))
  expected = {
      'train_m4_logits': outs['scaled_logits'][0], 'train_m3_logits': outs['scaled_logits'][1],
      'train_m2_logits': outs['scaled_logits'][2], 'train_final_logits': outs['scaled_logits'][3],
      'train_gdt_pred_4': outs['gdt_preds'][0], 'train_gdt_pred_3': outs['gdt_preds'][1],
      'train_gdt_pred_2': outs['gdt_preds'][2], 'train_gdt_label_4': outs['gdt_labels'][0],
      'train_gdt_label_3': outs['gdt_labels'][1], 'train_gdt_label_2': outs['gdt_labels'][2]}
  if cfg.auxiliary_classification:
    expected['train_class_logits'] = outs['class_logits']
  else:
    assert outs['class_logits'] is None
  for name, ours in expected.items():
    np.testing.assert_allclose(np.asarray(ours), reference.nhwc(io[name]), rtol=0,
                               atol=tol[name], err_msg=name)


@pytest.mark.parametrize('file', ['swin_w12_tiny.pth', 'swin_w12_tiny_prefixed.pth'])
def test_pth_files_convert_to_the_same_variables(file):
  pytest.importorskip('torch')
  _, reference_vars = convert_state_dict(load_file(reference.path('swin_w12_tiny.safetensors')))
  _, variables = convert_state_dict(read_state_dict(str(reference.path(file))))
  flat_ref = jax.tree_util.tree_leaves_with_path(reference_vars)
  flat = dict(jax.tree_util.tree_leaves_with_path(variables))
  assert len(flat) == len(flat_ref)
  for key, value in flat_ref:
    np.testing.assert_array_equal(flat[key], value)


def test_legacy_order_matters():
  """The legacy fixture through the current patch order must fail by far (not a no-op switch)."""
  variant = 'swin_w12_tiny_legacy'
  cfg, variables = convert_state_dict(load_file(reference.path(f'{variant}.safetensors')),
                                      inref_order='current')
  io = reference.io(variant)
  logits = jax.jit(BiRefNet(cfg).apply)(variables, reference.nhwc(io['input']))
  assert np.max(np.abs(np.asarray(logits) - reference.nhwc(io['eval_final_logits']))) > 0.1

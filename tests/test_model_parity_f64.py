"""Float64 runs of the converted model against the official float64 fixtures (far tighter than f32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import reference
from birefnet_jax.convert import convert_state_dict
from birefnet_jax.models.birefnet import BiRefNet

TRAIN_ARRAYS = ('train_m4_logits', 'train_m3_logits', 'train_m2_logits', 'train_final_logits',
                'train_gdt_pred_4', 'train_gdt_pred_3', 'train_gdt_pred_2', 'train_gdt_label_4',
                'train_gdt_label_3', 'train_gdt_label_2')


def to_f64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)
                      if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def check(name, ours, expected, strict, conservative):
  """Strict float64 tolerance first; the documented conservative bound for XLA's other order."""
  ours, expected = np.asarray(ours), np.asarray(expected)
  assert ours.dtype == np.float64, name
  diff = np.max(np.abs(ours - expected))
  assert diff <= max(strict, conservative), f'{name}: max |diff| {diff:.3g} > {conservative:.3g}'
  return diff


@pytest.mark.parametrize('variant', reference.F64_VARIANTS)
def test_float64_eval_and_train_outputs(variant):
  io, ref = reference.io(variant), np.load(reference.path(f'{variant}.f64.npz'))
  tol = reference.tolerances_f64(variant)
  with jax.enable_x64(True):
    cfg, variables = convert_state_dict(load_file(reference.path(f'{variant}.safetensors')),
                                        inref_order=reference.inref_order(variant))
    variables = to_f64(variables)
    images = jnp.asarray(reference.nhwc(io['input']), jnp.float64)
    model = BiRefNet(cfg)
    logits = jax.jit(model.apply)(variables, images)
    check('eval_final_logits', logits, reference.nhwc(ref['eval_final_logits']),
          tol['arrays']['eval_final_logits'], tol['arrays_conservative']['eval_final_logits'])
    outs, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, deterministic=True,
                                               mutable=['batch_stats']))(variables, images)
    ours = dict(zip(TRAIN_ARRAYS, outs['scaled_logits'] + outs['gdt_preds'] + outs['gdt_labels']))
    if cfg.auxiliary_classification:
      ours['train_class_logits'] = outs['class_logits']
    for name, value in ours.items():
      check(name, value, reference.nhwc(ref[name]), tol['arrays'][name],
            tol['arrays_conservative'][name])

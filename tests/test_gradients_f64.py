"""Float64 gradients of the official total loss through the whole model, against the official
float64 gradients (``NAME.train_step_f64.safetensors``): the sensitive check of the backward pass
(deformable sampling, train-mode BatchNorm, the undetached OutRef target, the losses)."""

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

import reference
from birefnet_jax import losses
from birefnet_jax.convert import convert_state_dict, names
from birefnet_jax.models.birefnet import BiRefNet

VARIANT = 'swin_w12_tiny'


def test_float64_gradients_match_the_official_ones():
  io = reference.io(VARIANT)
  grads_ref = load_file(reference.path(f'{VARIANT}.train_step_f64.safetensors'))
  tol = reference.tolerances_f64(VARIANT)
  with jax.enable_x64(True):
    state_dict = load_file(reference.path(f'{VARIANT}.safetensors'))
    cfg, variables = convert_state_dict(state_dict)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    model = BiRefNet(cfg)
    images = jnp.asarray(reference.nhwc(io['input']), jnp.float64)
    gt = jnp.asarray(reference.nhwc(io['gt']), jnp.float64)

    def loss_fn(params):
      outs, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, images,
                            train=True, deterministic=True, mutable=['batch_stats'])
      return losses.total_loss(outs, gt)[0]

    grads = jax.jit(jax.grad(loss_fn))(variables['params'])
    flat = names.flatten(jax.device_get(grads))
    checked, worst = 0, 0.0
    for key in (k[len('grad/'):] for k in grads_ref):
      collection, path, _ = names.torch_to_flax(key, grads_ref['grad/' + key])
      assert collection == 'params', key
      ours = names.to_torch_layout(key, np.asarray(flat[path]))
      diff = float(np.max(np.abs(ours - grads_ref['grad/' + key])))
      bound = max(tol['grad'][key], tol['grad_conservative'][key])
      assert diff <= bound, f'{key}: max |diff| {diff:.3g} > {bound:.3g}'
      worst = max(worst, diff / bound)
      checked += 1
    assert checked == len(flat)

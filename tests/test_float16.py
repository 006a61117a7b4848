"""--dtype float16 (the official tutorials' torch autocast fp16): the converted fixture model in
float16 against the official float32 outputs, within a stated tolerance."""

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import reference
from birefnet_jax import inference
from birefnet_jax.convert import convert_state_dict
from birefnet_jax.errors import UserError
from birefnet_jax.models.birefnet import BiRefNet
from birefnet_jax.models.config import model_config

# Stated in README (Inference): float16 vs float32 on the fixtures. Measured on swin_w12_tiny
# (CPU): logits 0.0038, probabilities 0.0008 (bfloat16: 0.025 and 0.0054).
FLOAT16_LOGIT_ATOL = 0.02
FLOAT16_PROBABILITY_ATOL = 0.004
VARIANT = 'swin_w12_tiny'


def test_float16_matches_the_official_float32_outputs():
  cfg, variables = convert_state_dict(load_file(reference.path(f'{VARIANT}.safetensors')),
                                      inref_order=reference.inref_order(VARIANT))
  io = reference.io(VARIANT)
  model = inference.with_inference_options(BiRefNet(cfg), 'float16')
  assert model.cfg.dtype == 'float16'
  lowered = jax.jit(model.apply).lower(variables, reference.nhwc(io['input']))
  assert 'f16' in lowered.as_text()           # the convolutions and matmuls run in float16
  logits = np.asarray(lowered.compile()(variables, reference.nhwc(io['input'])))
  assert logits.dtype == np.float32 and np.isfinite(logits).all()
  official = reference.nhwc(io['eval_final_logits'])      # float32, the official code
  np.testing.assert_allclose(logits, official, rtol=0, atol=FLOAT16_LOGIT_ATOL)
  sigmoid = lambda a: 1 / (1 + np.exp(-a.astype(np.float64)))
  np.testing.assert_allclose(sigmoid(logits), sigmoid(official), rtol=0,
                             atol=FLOAT16_PROBABILITY_ATOL)
  # float16 is not float32: the difference is there, and above float32's noise.
  assert np.abs(logits - official).max() > reference.tolerances(VARIANT)['arrays'][
      'eval_final_logits']


def test_non_finite_probabilities_are_a_user_error():
  forward = lambda x: np.full(x.shape[:3], np.nan, np.float32)
  records = [(0, (8, 8), np.zeros((32, 32, 3), np.float32))]
  with pytest.raises(UserError, match='non-finite'):
    list(inference.run_batches(forward, records, batch_size=1))


def test_unknown_dtype_is_refused():
  with pytest.raises(ValueError, match='float16'):
    inference.with_inference_options(BiRefNet(model_config('swin_v1_t')), 'float8')

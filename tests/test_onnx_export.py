"""ONNX export: the file follows the official BiRefNet ONNX convention and onnxruntime computes
the same logits as the JAX model (float32, within 1e-4), on a converted fixture model and on a
tiny model at 1024x1024."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ort = pytest.importorskip('onnxruntime')
pytest.importorskip('jax2onnx')

from birefnet_jax import export, load_converted, onnx_export  # pylint: disable=wrong-import-position
from birefnet_jax.convert import convert_file  # pylint: disable=wrong-import-position
from birefnet_jax.models.birefnet import BiRefNet  # pylint: disable=wrong-import-position
from birefnet_jax.models.deform_conv import (loop_free,  # pylint: disable=wrong-import-position
                                             modulated_deform_conv2d)
from birefnet_jax.convert import names  # pylint: disable=wrong-import-position

import reference  # pylint: disable=wrong-import-position
import tiny_model  # pylint: disable=wrong-import-position

jax.config.update('jax_default_matmul_precision', 'highest')

TOLERANCE = 1e-4


def jax_logits_nchw(model, variables, x_nchw):
  out = model.apply(variables, jnp.transpose(jnp.asarray(x_nchw), (0, 2, 3, 1)))
  return np.transpose(np.asarray(out, np.float32), (0, 3, 1, 2))


def run_onnx(path, x):
  session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  inputs, outputs = session.get_inputs(), session.get_outputs()
  assert [i.name for i in inputs] == [onnx_export.INPUT_NAME]
  assert outputs[0].name == onnx_export.OUTPUT_NAME
  return session, session.run(None, {inputs[0].name: x})[0]


@pytest.mark.parametrize('max_sample_bytes', [None, 2000])   # one tile; several tiles
def test_loop_free_trace_equals_the_op(max_sample_bytes):
  """The straight-line graph traced for ONNX computes what the op computes (tiles in a Python
  loop instead of a scan, no custom_vjp)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 5, 4)).astype(np.float32)
  offset = rng.normal(0, 2, size=(2, 6, 5, 18)).astype(np.float32)
  mask = rng.uniform(0, 2, size=(2, 6, 5, 9)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 4, 3)).astype(np.float32)
  # A new function per trace: JAX caches a function's jaxpr, and the context is not in its key.
  conv = lambda: lambda *a: modulated_deform_conv2d(*a, padding=1,
                                                    max_sample_bytes=max_sample_bytes)
  reference = conv()(x, offset, mask, kernel)
  jaxpr = str(jax.make_jaxpr(conv())(x, offset, mask, kernel))
  assert 'custom_vjp' in jaxpr and ('scan' in jaxpr) == bool(max_sample_bytes)
  with loop_free():
    straight = conv()(x, offset, mask, kernel)
    jaxpr = str(jax.make_jaxpr(conv())(x, offset, mask, kernel))
  assert 'scan' not in jaxpr and 'custom_vjp' not in jaxpr
  np.testing.assert_allclose(np.asarray(straight), np.asarray(reference), rtol=1e-6, atol=1e-6)


def test_fixture_model_exports_and_onnxruntime_matches_jax(tmp_path):
  """The command line on a converted fixture (Swin, BatchNorm, deformable ASPP, InRef):
  --format onnx, batch 2, 64x64; onnxruntime's logits equal model.apply's."""
  dst = tmp_path / 'converted'
  convert_file(str(reference.path('swin_w12_tiny.safetensors')), str(dst))
  output = tmp_path / 'birefnet.onnx'
  assert export.main(['--format', 'onnx', '--checkpoint', str(dst), '--output', str(output),
                      '--resolution', '64x64', '--batch_size', '2']) == 0
  model, variables = load_converted(str(dst))
  x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
  session, got = run_onnx(output, x)
  assert session.get_inputs()[0].shape == [2, 3, 64, 64]
  assert got.shape == (2, 1, 64, 64) and got.dtype == np.float32
  want = jax_logits_nchw(model, variables, x)
  np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


@pytest.mark.skipif(not os.environ.get('BIREFNET_ONNX_1024'),
                    reason='a second jax2onnx conversion (minutes of CPU); set BIREFNET_ONNX_1024=1')
def test_tiny_model_at_1024(tmp_path):
  """A tiny BiRefNet (the quickstart's reduced model, random weights) at the default 1024x1024."""
  cfg = tiny_model.quickstart_config().model
  model = BiRefNet(cfg)
  variables = names.nest({k: jnp.asarray(v) for k, v in
                          tiny_model.random_variables(cfg, seed=3).items()})
  proto = onnx_export.export_onnx(model, variables, height=1024, width=1024, batch_size=1)
  path = tmp_path / 'tiny.onnx'
  path.write_bytes(onnx_export.serialize(proto))
  x = np.random.default_rng(2).normal(size=(1, 3, 1024, 1024)).astype(np.float32)
  _, got = run_onnx(path, x)
  want = jax_logits_nchw(model, variables, x)
  assert got.shape == (1, 1, 1024, 1024)
  np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)

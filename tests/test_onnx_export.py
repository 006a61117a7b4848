"""ONNX export: the file follows the official BiRefNet ONNX convention and onnxruntime computes
the same logits as the JAX model (float32, within 1e-4), on a converted fixture model (dynamic
batch) and on a tiny model at 1024x1024 (fixed batch)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ort = pytest.importorskip('onnxruntime')
jax2onnx = pytest.importorskip('jax2onnx')

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


def test_fixture_model_exports_with_a_dynamic_batch_and_onnxruntime_matches_jax(tmp_path):
  """The command line on a converted fixture (Swin, BatchNorm, deformable ASPP, InRef):
  --format onnx --batch_size dynamic, 64x64; one file runs batches of 2 and 1, and
  onnxruntime's logits equal model.apply's."""
  dst = tmp_path / 'converted'
  convert_file(str(reference.path('swin_w12_tiny.safetensors')), str(dst))
  output = tmp_path / 'birefnet.onnx'
  assert export.main(['--format', 'onnx', '--checkpoint', str(dst), '--output', str(output),
                      '--resolution', '64x64', '--batch_size', 'dynamic']) == 0
  model, variables = load_converted(str(dst))
  session = None
  for batch in (2, 1):
    x = np.random.default_rng(batch).normal(size=(batch, 3, 64, 64)).astype(np.float32)
    session, got = run_onnx(output, x)
    assert got.shape == (batch, 1, 64, 64) and got.dtype == np.float32
    want = jax_logits_nchw(model, variables, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
  assert session.get_inputs()[0].shape == ['B', 3, 64, 64]
  assert session.get_outputs()[0].shape == ['B', 1, 64, 64]


def tiny_model_and_variables():
  """A tiny BiRefNet (the quickstart's reduced model, random weights)."""
  cfg = tiny_model.quickstart_config().model
  model = BiRefNet(cfg)
  variables = names.nest({k: jnp.asarray(v) for k, v in
                          tiny_model.random_variables(cfg, seed=3).items()})
  return model, variables


def test_fast_graph_lookups_patches_jax2onnx_and_changes_no_graph():
  """The jax2onnx functions the patch replaces exist in the tested jax2onnx (else the export is
  quadratic again, silently), are replaced only inside the context, and a graph exported with
  the patch is the one exported without it (the optimizer's reshape and transpose passes
  included: the function reshapes and transposes)."""
  # pylint: disable=protected-access,g-import-not-at-top
  from jax2onnx.converter import ir_optimizations, optimizer_graph_utils, output_binding
  patched_names = [(output_binding, '_value_is_graph_connected'),
                   (optimizer_graph_utils, '_producer_node'),
                   (optimizer_graph_utils, '_consumer_nodes'),
                   (ir_optimizations, '_producer_node'), (ir_optimizations, '_consumer_nodes')]
  originals = [getattr(module, name) for module, name in patched_names]
  with onnx_export.fast_graph_lookups():
    for (module, name), original in zip(patched_names, originals):
      assert getattr(module, name) is not original, name
  for (module, name), original in zip(patched_names, originals):
    assert getattr(module, name) is original, name
  # pylint: enable=protected-access,g-import-not-at-top

  kernel = np.random.default_rng(5).normal(size=(3, 3, 3, 4)).astype(np.float32)

  def f(x):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                     dimension_numbers=('NCHW', 'HWIO', 'NCHW'))
    y = jax.nn.relu(y).reshape(y.shape[0], 4, -1)
    return jnp.einsum('bcn,bdn->bcd', y, y) + y.mean()

  def graph(patched):
    context = onnx_export.fast_graph_lookups() if patched else onnx_export.quiet_converter()
    with context:
      proto = jax2onnx.to_onnx(f, inputs=[(2, 3, 8, 8)], opset=onnx_export.DEFAULT_OPSET)
    nodes = [(n.op_type, list(n.input), list(n.output)) for n in proto.graph.node]
    return nodes, proto

  plain, _ = graph(False)
  patched, proto = graph(True)
  assert len(plain) > 5 and plain == patched
  x = np.random.default_rng(6).normal(size=(2, 3, 8, 8)).astype(np.float32)
  got = ort.InferenceSession(proto.SerializeToString(), providers=['CPUExecutionProvider']).run(
      None, {proto.graph.input[0].name: x})[0]
  np.testing.assert_allclose(got, np.asarray(f(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('logger', ['jax2onnx.plugins.plugin_system', 'onnx_ir.serde'])
def test_quiet_converter_drops_warnings_only(logger):
  """jax2onnx logs a traceback per example plugin whose library is missing, onnx_ir a line per
  shape value it leaves untyped: hidden during the export; errors are not, nor anything after."""
  assert logger in onnx_export.QUIET_LOGGERS
  log = logging.getLogger(logger)
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  log.addHandler(handler)
  try:
    with onnx_export.quiet_converter():
      log.warning('Skipping import of jax2onnx.plugins.examples.eqx.dino')
      log.error('a real failure')
    log.warning('after the export')
  finally:
    log.removeHandler(handler)
  assert [r.getMessage() for r in records] == ['a real failure', 'after the export']


def test_tiny_model_at_1024_with_a_fixed_batch(tmp_path):
  """A tiny BiRefNet (the quickstart's reduced model, random weights) at the default 1024x1024,
  batch 1 fixed in the file: what rembg loads."""
  model, variables = tiny_model_and_variables()
  proto = onnx_export.export_onnx(model, variables, height=1024, width=1024, batch_size=1)
  path = tmp_path / 'tiny.onnx'
  path.write_bytes(onnx_export.serialize(proto))
  x = np.random.default_rng(2).normal(size=(1, 3, 1024, 1024)).astype(np.float32)
  session, got = run_onnx(path, x)
  assert session.get_inputs()[0].shape == [1, 3, 1024, 1024]
  want = jax_logits_nchw(model, variables, x)
  assert got.shape == (1, 1, 1024, 1024)
  np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)

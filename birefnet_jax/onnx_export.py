"""The model as an ONNX graph, in the official BiRefNet ONNX convention (what rembg's BiRefNet
sessions and the official ``BiRefNet_pth2onnx`` notebook use):

- one input ``input_image``: float32 NCHW (B, 3, H, W), RGB, ImageNet-normalized;
- the first (only) output ``output_image``: the final logits (B, 1, H, W), before the sigmoid;
- H and W fixed at export; B fixed or dynamic (``batch_size=None``).

The converter is jax2onnx (an optional dependency: ``pip install 'birefnet_jax[onnx]'``): it
converts the traced jaxpr directly into standard ONNX operators, so the deformable convolution
(gathers and matmuls here, ``deform_conv.py``) needs no custom operator. It is traced loop-free (``deform_conv.loop_free``): its forward
alone, position tiles in a Python loop, as one straight-line graph instead of an ONNX ``Loop``.
"""

import contextlib
import logging
import sys
from typing import Optional
import warnings

import jax.numpy as jnp

from birefnet_jax.errors import UserError
from birefnet_jax.models.deform_conv import loop_free

INPUT_NAME = 'input_image'
OUTPUT_NAME = 'output_image'
QUIET_LOGGERS = ('jax2onnx.plugins.plugin_system', 'onnx_ir.serde')
DEFAULT_OPSET = 23   # jax2onnx's own default; onnxruntime >= 1.22 runs it (jax2onnx's opset 17
# output is invalid: it writes ReduceMean with opset-18 inputs)


def logits_function(model, variables):
  """NCHW normalized images (B, 3, H, W) -> final logits (B, 1, H, W) float32, the weights
  closed over (they become initializers of the graph)."""
  def logits(images_nchw):
    images = jnp.transpose(images_nchw, (0, 2, 3, 1))
    out = model.apply(variables, images).astype(jnp.float32)
    return jnp.transpose(out, (0, 3, 1, 2))
  return logits


@contextlib.contextmanager
def quiet_converter():
  """jax2onnx without its noise: it imports every plugin, its examples too, and logs a full
  traceback for each example whose library (equinox, dm_pix, ...) is not installed (hundreds of
  lines, nothing wrong); onnx_ir warns for each shape value whose type it leaves out of the
  file's optional value_info; and jax warns when jax2onnx asks for float64 with x64 off. Errors
  still show, and raise."""
  logs = [logging.getLogger(name) for name in QUIET_LOGGERS]
  levels = [log.level for log in logs]
  for log in logs:
    log.setLevel(logging.ERROR)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', message='Explicitly requested dtype float64',
                              category=UserWarning)
      yield
  finally:
    for log, level in zip(logs, levels):
      log.setLevel(level)


@contextlib.contextmanager
def fast_graph_lookups():
  """jax2onnx (0.17) is quadratic in the graph's size in three lookups; here each first takes a
  constant-time (or C-speed) path to the answer the converter's own code gives, and falls back
  to that code whenever the shortcut does not apply, so the graph is unchanged (tested):

  * ``output_binding._value_is_graph_connected`` (while tracing: is this value in the graph?)
    scans every node built so far. First: does the value's producing node belong to the graph
    being built (onnx_ir keeps ``Node.graph``, cleared when a node is removed)?
  * ``_producer_node`` / ``_consumer_nodes`` (the graph optimizer) build a set of the ids of
    every node on each call. First: is the value's producer (are its consumers) in the node list,
    by identity (onnx_ir nodes compare by identity; ``list.__contains__`` runs in C)?

  The converted fixture's export went from 5.0 to 1.2-1.5 min on 2 cores, its file
  byte-identical. Without these private functions (another jax2onnx), nothing is patched.
  """
  patches = []
  try:
    import onnx_ir as ir  # pylint: disable=g-import-not-at-top
    from jax2onnx.converter import output_binding  # pylint: disable=g-import-not-at-top
    from jax2onnx.converter import optimizer_graph_utils  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return

  full_scan = getattr(output_binding, '_value_is_graph_connected', None)
  if full_scan is not None:
    def connected(ctx, value):
      node = value.producer() if isinstance(value, ir.Value) else None
      if isinstance(node, ir.Node) and node.graph is ctx.builder.nodes:
        return True
      return full_scan(ctx, value)
    patches += _patch_everywhere('_value_is_graph_connected', full_scan, connected)

  producer_node = getattr(optimizer_graph_utils, '_producer_node', None)
  if producer_node is not None:
    def fast_producer_node(nodes, value):
      if isinstance(value, ir.Value) and isinstance(nodes, list):
        producer = value.producer()
        if isinstance(producer, ir.Node) and producer in nodes:
          return producer
      return producer_node(nodes, value)
    patches += _patch_everywhere('_producer_node', producer_node, fast_producer_node)

  consumer_nodes = getattr(optimizer_graph_utils, '_consumer_nodes', None)
  if consumer_nodes is not None:
    def fast_consumer_nodes(nodes, value):
      if isinstance(value, ir.Value) and isinstance(nodes, list):
        consumers = value.consumers()
        if consumers and all(isinstance(c, ir.Node) for c in consumers):
          found = [c for c in consumers if c in nodes]
          if found:
            return found
      return consumer_nodes(nodes, value)
    patches += _patch_everywhere('_consumer_nodes', consumer_nodes, fast_consumer_nodes)

  for module, name, _, replacement in patches:
    setattr(module, name, replacement)
  try:
    yield
  finally:
    for module, name, original, _ in patches:
      setattr(module, name, original)


def _patch_everywhere(name, original, replacement):
  """(module, name, original, replacement) for every loaded jax2onnx converter module that
  holds ``original`` under ``name`` (its users import it by name)."""
  return [(module, name, original, replacement)
          for module_name, module in list(sys.modules.items())
          if module_name.startswith('jax2onnx.converter') and module is not None
          and getattr(module, name, None) is original]


def import_converter():
  """jax2onnx, or a UserError saying how to install it."""
  try:
    with quiet_converter():
      import jax2onnx  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError('ONNX export needs jax2onnx and onnx',
                    "pip install 'birefnet_jax[onnx]'") from None
  return jax2onnx


def export_onnx(model, variables, *, height: int = 1024, width: int = 1024,
                batch_size: Optional[int] = 1, opset: int = DEFAULT_OPSET):
  """The ONNX ``ModelProto`` of the model's float32 logits; ``batch_size=None``: dynamic B."""
  jax2onnx = import_converter()
  if model.cfg.get('dtype', 'float32') != 'float32':
    raise ValueError('ONNX export is float32 only (onnxruntime runs no bfloat16 convolutions '
                     'on CPU)')
  batch = 'B' if batch_size is None else int(batch_size)
  with loop_free(), quiet_converter(), fast_graph_lookups():
    proto = jax2onnx.to_onnx(logits_function(model, variables), inputs=[(batch, 3, height, width)],
                             model_name='birefnet', opset=opset, input_names=[INPUT_NAME],
                             output_names=[OUTPUT_NAME])
  return proto


def serialize(proto) -> bytes:
  """The model's bytes. (Over 2 GiB would need external data; BiRefNet SwinL is ~0.9 GiB.)"""
  return proto.SerializeToString()

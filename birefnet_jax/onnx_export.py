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
from typing import Optional
import warnings

import jax.numpy as jnp

from birefnet_jax.errors import UserError
from birefnet_jax.models.deform_conv import loop_free

INPUT_NAME = 'input_image'
OUTPUT_NAME = 'output_image'
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
  lines, nothing wrong); and jax warns when it asks for float64 with x64 off. Real errors still
  raise."""
  plugin_log = logging.getLogger('jax2onnx.plugins.plugin_system')
  level = plugin_log.level
  plugin_log.setLevel(logging.ERROR)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', message='Explicitly requested dtype float64',
                              category=UserWarning)
      yield
  finally:
    plugin_log.setLevel(level)


@contextlib.contextmanager
def linear_time_output_binding():
  """jax2onnx (0.17) asks, for every output of every traced equation, whether the value is
  already in the graph, by scanning every node built so far: quadratic in the graph's size (a
  64x64 fixture model took 5 minutes, most of it there). Here the same question first asks the
  value's producing node whether it belongs to the graph being built (onnx_ir keeps ``Node.graph``
  and clears it when a node is removed): "yes" is then the converter's own answer, in constant
  time; anything else still gets its full scan, so the result is unchanged. Without that private
  function (another jax2onnx), nothing is patched."""
  try:
    from jax2onnx.converter import output_binding  # pylint: disable=g-import-not-at-top
  except ImportError:
    output_binding = None
  full_scan = getattr(output_binding, '_value_is_graph_connected', None)
  if full_scan is None:
    yield
    return

  def connected(ctx, value):
    producer = getattr(value, 'producer', None)
    node = producer() if callable(producer) else None
    if node is not None and getattr(node, 'graph', None) is ctx.builder.nodes:
      return True
    return full_scan(ctx, value)

  output_binding._value_is_graph_connected = connected  # pylint: disable=protected-access
  try:
    yield
  finally:
    output_binding._value_is_graph_connected = full_scan  # pylint: disable=protected-access


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
  with loop_free(), quiet_converter(), linear_time_output_binding():
    proto = jax2onnx.to_onnx(logits_function(model, variables), inputs=[(batch, 3, height, width)],
                             model_name='birefnet', opset=opset, input_names=[INPUT_NAME],
                             output_names=[OUTPUT_NAME])
  return proto


def serialize(proto) -> bytes:
  """The model's bytes. (Over 2 GiB would need external data; BiRefNet SwinL is ~0.9 GiB.)"""
  return proto.SerializeToString()

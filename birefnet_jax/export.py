r"""Serializes the inference function with its weights: StableHLO via ``jax.export``, or ONNX.

  python -m birefnet_jax.export --checkpoint DST --output model.jaxexport \
      [--resolution 1024x1024] [--batch_size 1|dynamic] [--dtype float32|bfloat16|float16] \
      [--platforms cpu,cuda] [--overwrite]
  python -m birefnet_jax.export --format onnx --checkpoint DST --output model.onnx \
      [--resolution 1024x1024] [--batch_size 1|dynamic] [--opset 23] [--overwrite]

``--format onnx`` (the default for an ``--output`` ending in ``.onnx``) writes the official
BiRefNet ONNX convention instead (``birefnet_jax.onnx_export``): input ``input_image`` float32
NCHW (B, 3, H, W) ImageNet-normalized, first output ``output_image`` the final **logits**
(B, 1, H, W) before the sigmoid; float32 only. It needs ``pip install 'birefnet_jax[onnx]'``.

The artifact maps ImageNet-normalized images (B, H, W, 3) float32 — RGB, ``(x / 255 - mean) /
std`` with the ImageNet mean/std, resized to the exported resolution — to **probabilities**
(B, H, W, 1) float32, the sigmoid of the final logits (what the official inference saves, before
resizing back to the original size). The weights are constants inside the artifact, so any
process with jax can run it without this package:

  exported = jax.export.deserialize(bytearray(open('model.jaxexport', 'rb').read()))
  probabilities = exported.call(images)

``--batch_size dynamic`` exports a symbolic batch dimension (any B at call time); the default is
a fixed batch. ``--platforms`` lowers for several backends at once (default: this machine's).
"""

import argparse
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from birefnet_jax import inference
from birefnet_jax import onnx_export
from birefnet_jax import writing
from birefnet_jax.errors import UserError, exits_on_user_error

FORMATS = ('jaxexport', 'onnx')


def inference_function(model, variables):
  """normalized images (B, H, W, 3) float32 -> probabilities (B, H, W, 1) float32
  (``inference.model_probabilities``), with the weights closed over (they become constants of
  the exported module)."""
  def probabilities(images):
    return inference.model_probabilities(model, variables, images)
  return probabilities


def export_model(model, variables, *, height: int = 1024, width: int = 1024,
                 batch_size: Optional[int] = 1, dtype: Optional[str] = None,
                 platforms: Optional[Sequence[str]] = None) -> jax.export.Exported:
  """The ``jax.export.Exported`` inference function; ``batch_size=None`` makes B symbolic."""
  model = inference.with_inference_options(model, dtype)
  if batch_size is None:
    shape = jax.export.symbolic_shape(f'b, {height}, {width}, 3')
  else:
    shape = (batch_size, height, width, 3)
  # BatchNorms folded and, in bfloat16, the kernels stored in bfloat16 (half the artifact).
  function = jax.jit(inference_function(model, inference.inference_variables(model, variables)))
  return jax.export.export(function, platforms=platforms)(
      jax.ShapeDtypeStruct(shape, jnp.float32))


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m birefnet_jax.export', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  inference.add_checkpoint_arguments(parser)
  parser.add_argument('--output', required=True, help='file to write the serialized export to')
  parser.add_argument('--format', choices=FORMATS, default=None,
                      help="jaxexport (jax.export, NHWC probabilities) or onnx (NCHW logits); "
                           "default: onnx for an OUTPUT ending in .onnx, else jaxexport")
  parser.add_argument('--opset', type=int, default=onnx_export.DEFAULT_OPSET,
                      help=f'ONNX opset (--format onnx; default {onnx_export.DEFAULT_OPSET})')
  parser.add_argument('--resolution', default=None,
                      help='input WIDTHxHEIGHT, multiples of 32 (default: the training '
                           f'resolution of a workdir, else {inference.DEFAULT_RESOLUTION})')
  parser.add_argument('--batch_size', default='1',
                      help="fixed batch size, or 'dynamic' for a symbolic one (default 1)")
  parser.add_argument('--dtype', choices=inference.DTYPES, default='float32',
                      help='compute dtype (bfloat16: conv/dense kernels stored in bfloat16, norms '
                      'and biases float32; inputs/outputs float32)')
  parser.add_argument('--platforms', default=None,
                      help="comma-separated backends to lower for, e.g. 'cpu,cuda' "
                           '(default: the current backend)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace OUTPUT if it is an existing file (a folder is never replaced)')
  args = parser.parse_args(argv)
  try:
    args.resolution_hw = (inference.parse_resolution(args.resolution)
                          if args.resolution is not None else 'default')
  except ValueError as e:
    parser.error(str(e))
  if args.resolution_hw is None:
    parser.error("--resolution original is not exportable; give WIDTHxHEIGHT")
  if args.batch_size == 'dynamic':
    args.batch = None
  else:
    try:
      args.batch = int(args.batch_size)
    except ValueError:
      parser.error(f"--batch_size must be a positive integer or 'dynamic', got {args.batch_size!r}")
    if args.batch < 1:
      parser.error('--batch_size must be >= 1')
  args.platform_list = ([p.strip() for p in args.platforms.split(',') if p.strip()]
                        if args.platforms else None)
  if args.format is None:
    args.format = 'onnx' if args.output.lower().endswith('.onnx') else 'jaxexport'
  if args.format == 'onnx':
    if args.dtype != 'float32':
      parser.error('--format onnx exports float32 only')
    if args.platforms:
      parser.error('--platforms applies to --format jaxexport only')
  return args


@exits_on_user_error
def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  # Before the model is loaded and compiled: a file we may write (never a folder).
  writing.check_output_file(args.output, '--output', args.overwrite)
  loaded = inference.load(args.checkpoint, args.step)
  height, width = (inference.default_resolution(loaded) if args.resolution_hw == 'default'
                   else args.resolution_hw)
  print(f'loaded {loaded.description}')
  if args.format == 'onnx':
    return _write_onnx(args, loaded, height, width)
  exported = export_model(loaded.model, loaded.variables, height=height, width=width,
                          batch_size=args.batch,
                          dtype=args.dtype, platforms=args.platform_list)
  data = exported.serialize()
  writing.write_atomically(args.output, bytes(data))
  print(f'exported {args.checkpoint} -> {args.output} ({len(data) / 2**20:.1f} MiB)\n'
        f'  input  {exported.in_avals[0]} (ImageNet-normalized RGB)\n'
        f'  output {exported.out_avals[0]} (probabilities)\n'
        f'  platforms {", ".join(exported.platforms)}; compute dtype {args.dtype}')
  return 0


def _write_onnx(args, loaded, height, width) -> int:
  onnx_export.import_converter()   # a clear error before the long tracing if it is missing
  try:
    proto = onnx_export.export_onnx(loaded.model, loaded.variables, height=height, width=width,
                                    batch_size=args.batch, opset=args.opset)
  except ValueError as e:
    raise UserError(str(e)) from None
  data = onnx_export.serialize(proto)
  writing.write_atomically(args.output, data)
  batch = 'B (dynamic)' if args.batch is None else args.batch
  print(f'exported {args.checkpoint} -> {args.output} ({len(data) / 2**20:.1f} MiB, opset '
        f'{args.opset})\n'
        f'  input  {onnx_export.INPUT_NAME} float32 ({batch}, 3, {height}, {width}) '
        '(ImageNet-normalized RGB, NCHW)\n'
        f'  output {onnx_export.OUTPUT_NAME} float32 ({batch}, 1, {height}, {width}) (logits)')
  return 0


if __name__ == '__main__':
  sys.exit(main())

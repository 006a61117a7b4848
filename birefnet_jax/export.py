r"""Serializes the inference function with its weights (StableHLO via ``jax.export``).

  python -m birefnet_jax.export --checkpoint DST --output model.jaxexport \
      [--resolution 1024x1024] [--batch_size 1|dynamic] [--dtype float32|bfloat16] \
      [--platforms cpu,cuda] [--overwrite]

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
from birefnet_jax import writing
from birefnet_jax.errors import exits_on_user_error


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


if __name__ == '__main__':
  sys.exit(main())

r"""Predicts masks for image files (and optionally RGBA cut-outs), as the official inference.py.

  python -m birefnet_jax.predict --checkpoint DST --input PATH [PATH ...] --output DIR \
      [--resolution 1024x1024|WxH|original] [--batch_size 4] [--dtype float32|bfloat16|float16] \
      [--attention einsum|xla|cudnn] [--cutout [--refine_foreground]] \
      [--overwrite | --skip_existing]

DST: a converter output (``model_config.json`` + ``variables/``) or a training workdir.
PATH: image files or folders (searched recursively). For an input ``PATH/sub/x.jpg`` the mask is
``DIR/sub/x.png`` (8-bit gray, the image's original size); with ``--cutout`` an RGBA PNG (the image
with the mask as alpha) is also written to ``--cutout_dir`` (default ``DIR/cutout``) under the same
relative name.

``--resolution`` is width x height, as the official ``--resolution``; ``original`` keeps each
image's size floored to a multiple of 32. The pipeline (as the official ``inference.py``) and the
batching by shape are ``birefnet_jax.inference``'s; this module is the command line over it.

Inputs are never outputs: an output folder (``--output``, ``--cutout_dir``) that is or holds an
input file is refused; one that lies inside an input folder is left out of the inputs (a rerun
never takes earlier masks for images). Existing outputs are never replaced silently: unless
``--overwrite`` (replace the masks / cut-outs named from the inputs, nothing else) or
``--skip_existing`` (leave those images out, e.g. to resume an interrupted run) is given, the
command stops before doing any work and lists them. Output folders are checked (a folder, one
we can write in) before the model is loaded. Two inputs mapping to the same output name
(``a.jpg`` and ``a.png``) also stop it before any work. Unreadable files are skipped with a
warning and listed at the end (exit status 0; 1 when no input at all is readable).
An animated image (GIF, APNG, WebP) is predicted from its first frame, with a warning naming it.
"""

import argparse
import os
import sys
import time

from birefnet_jax import image_io
from birefnet_jax import inference
from birefnet_jax import writing
from birefnet_jax.errors import UserError, exits_on_user_error
from birefnet_jax.models.swin import ATTENTION_IMPLEMENTATIONS


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m birefnet_jax.predict', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  inference.add_checkpoint_arguments(parser)
  parser.add_argument('--input', required=True, nargs='+', help='image files and/or folders')
  parser.add_argument('--output', required=True, help='folder for the masks')
  parser.add_argument('--resolution', default=None,
                      help="model input WIDTHxHEIGHT (multiples of 32) or 'original' (default: "
                           'the training resolution of a workdir, else '
                           f'{inference.DEFAULT_RESOLUTION})')
  parser.add_argument('--batch_size', type=int, default=1)
  parser.add_argument('--dtype', choices=inference.DTYPES, default='float32',
                      help='compute dtype (bfloat16 / float16: conv/dense kernels cast once, '
                           'norms and biases float32; float16 as the official tutorials\' torch '
                           'autocast fp16)')
  parser.add_argument('--attention', choices=ATTENTION_IMPLEMENTATIONS, default=None,
                      help="Swin window attention: einsum (default), xla, or cudnn (cuDNN's fused "
                           'kernel; GPU with --dtype bfloat16)')
  parser.add_argument('--cutout', action='store_true',
                      help='also write RGBA cut-outs (the image with the mask as alpha)')
  parser.add_argument('--cutout_dir', default=None,
                      help='folder for the cut-outs (default OUTPUT/cutout)')
  parser.add_argument('--refine_foreground', action='store_true',
                      help='cut-out colours by blur-fusion foreground estimation (official '
                           'refine_foreground), removing background colour from soft edges')
  group = parser.add_mutually_exclusive_group()
  group.add_argument('--overwrite', action='store_true', help='replace existing outputs')
  group.add_argument('--skip_existing', action='store_true',
                     help='leave out images whose outputs all exist (resume a run)')
  parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                      help='threads for reading and writing files')
  args = parser.parse_args(argv)
  if args.refine_foreground and not args.cutout:
    parser.error('--refine_foreground needs --cutout')
  if args.cutout_dir and not args.cutout:
    parser.error('--cutout_dir needs --cutout')
  try:
    args.resolution_hw = (inference.parse_resolution(args.resolution) if args.resolution is not None
                          else 'default')
  except ValueError as e:
    parser.error(str(e))
  if args.batch_size < 1:
    parser.error('--batch_size must be >= 1')
  args.cutout_dir_resolved = ((args.cutout_dir or os.path.join(args.output, 'cutout'))
                              if args.cutout else None)
  return args


def _output_folders(args):
  """[(flag, folder)] of the folders this run writes into."""
  folders = [('--output', args.output)]
  if args.cutout_dir_resolved:
    folders.append(('--cutout_dir', args.cutout_dir_resolved))
  return folders


def _folders_inside_inputs(folders, inputs):
  """The output folders that lie strictly inside an input folder (left out of the inputs)."""
  inside = []
  for flag, folder in folders:
    if any(image_io.is_under(image_io.real(folder), image_io.real(f)) for f in inside):
      continue   # --cutout_dir inside --output: one note says it
    for given in inputs:
      if (os.path.isdir(given) and image_io.real(folder) != image_io.real(given)
          and image_io.is_under(image_io.real(folder), image_io.real(given))):
        print(f'note: {flag} {folder} lies inside the input folder {given}: files under it '
              'are not taken as inputs', file=sys.stderr)
        inside.append(folder)
        break
  return inside


def check_inputs_are_not_outputs(files, folders):
  """Refuses an output folder that is, or holds, an input file: masks named like the inputs
  would be written among them, and --overwrite would replace them."""
  inputs = [(path, image_io.real(path)) for path, _ in files]
  for flag, folder in folders:
    root = image_io.real(folder)
    for path, real_path in inputs:
      if image_io.is_under(real_path, root):
        raise UserError(
            f'{flag} {folder} holds the input {path}; outputs are never written among the inputs',
            'choose an output folder that holds no input (a new folder, or a subfolder of the '
            'input folder: that one is left out of the inputs)')


def check_planned_outputs(plan):
  """Every planned output can be a file: not an existing folder, its parents folders."""
  parents = set()
  for path, *outs in plan:
    for out in filter(None, outs):
      if os.path.isdir(out):
        raise UserError(f'the output {out} for {path} is a folder; --overwrite replaces only '
                        'files', 'move that folder away or choose another --output')
      parents.add(os.path.dirname(os.path.abspath(out)))
  for parent in sorted(parents):
    if not os.path.isdir(writing.nearest_existing(parent)):
      raise UserError(f'cannot make the folder {parent}: {writing.nearest_existing(parent)} is a '
                      'file', 'move that file away or choose another --output')


def plan_request(args):
  """The checked ``inference.plan_outputs`` of the request (before any model is loaded)."""
  folders = _output_folders(args)
  for flag, folder in folders:
    writing.check_output_folder(folder, flag)
  excluded = _folders_inside_inputs(folders, args.input)
  try:
    files = image_io.list_images(args.input, exclude_folders=excluded)
  except FileNotFoundError as e:
    raise UserError(str(e)) from None
  if not files:
    raise UserError(f'no image files found in {" ".join(args.input)}')
  check_inputs_are_not_outputs(files, folders)
  try:
    plan = inference.plan_outputs(files, args.output, args.cutout_dir_resolved)
  except ValueError as e:
    raise UserError(str(e)) from None
  check_planned_outputs(plan)
  return plan


def leave_out_existing(args, plan):
  """The plan without images whose outputs exist (--skip_existing); a UserError listing them
  unless --overwrite or --skip_existing."""
  existing = [(p, [o for o in outs if o and os.path.exists(o)]) for p, *outs in plan]
  existing = [(p, e) for p, e in existing if e]
  if not existing or args.overwrite:
    return plan
  if args.skip_existing:
    done = {p for p, e in existing if len(e) == (2 if args.cutout_dir_resolved else 1)}
    print(f'skipping {len(done)} images whose outputs exist', file=sys.stderr)
    return [item for item in plan if item[0] not in done]
  shown = '\n  '.join(o for _, e in existing[:5] for o in e)
  raise UserError(f'{len(existing)} images already have outputs, e.g.\n  {shown}',
                  'pass --overwrite to replace them or --skip_existing to leave those images out')


@exits_on_user_error
def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cutout_dir = args.cutout_dir_resolved
  # Everything that can be wrong with the request is checked before the model is loaded.
  plan = plan_request(args)
  n_listed = len(plan)
  plan = leave_out_existing(args, plan)
  if not plan:
    print(f'all {n_listed} images already have their outputs; nothing to do', file=sys.stderr)
    return 0
  loaded = inference.load(args.checkpoint, args.step)
  resolution = (inference.default_resolution(loaded) if args.resolution_hw == 'default'
                else args.resolution_hw)
  print(f'loaded {loaded.description}; resolution '
        f'{"original" if resolution is None else "x".join(map(str, resolution[::-1]))}',
        file=sys.stderr)
  predictor = inference.Predictor(loaded.model, loaded.variables, resolution=resolution,
                                  batch_size=args.batch_size, dtype=args.dtype,
                                  attention=args.attention)
  start = time.perf_counter()
  written, skipped = inference.predict_files(predictor, plan, refine=args.refine_foreground,
                                             workers=max(1, args.workers))
  seconds = time.perf_counter() - start
  print(f'wrote {written} masks to {args.output}'
        f'{" and cut-outs to " + cutout_dir if cutout_dir else ""} in {seconds:.1f} s '
        f'({written / max(seconds, 1e-9):.2f} images/s, first-batch compilation included)',
        file=sys.stderr)
  if skipped:
    print(f'skipped {len(skipped)} unreadable files:', file=sys.stderr)
    for _, reason in skipped:
      print(f'  {reason}', file=sys.stderr)
  # Failure only when no input at all is a readable image.
  return 1 if skipped and len(skipped) == n_listed else 0


if __name__ == '__main__':
  sys.exit(main())

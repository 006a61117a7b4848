#!/usr/bin/env python
"""Converts an official BiRefNet PyTorch checkpoint into a Flax checkpoint.

  python tools/convert_torch_weights.py SRC DST [--inref-order legacy|current] [--revision REV]
      [--overwrite] [--dino-heads N --dino-out-indices I,J,K,L]

SRC: a Hugging Face Hub repo id such as ``ZhengPeng7/BiRefNet`` (its ``model.safetensors`` is
downloaded with huggingface_hub into its cache: resumable, ``HF_TOKEN`` and ``HF_ENDPOINT``
honoured; ``--revision`` or ``REPO@REV`` pins a branch, tag or commit), or an official ``.safetensors`` (read without torch) or ``.pth`` state dict (optionally nested
under 'model'/'state_dict', optionally with ``module.``/``_orig_mod.`` prefixes), or an official
Swin/PVTv2 ImageNet backbone checkpoint (written as backbone-only weights for initializing
training). The architecture (backbone family and sizes, decoder widths, BatchNorm, auxiliary
head...) is read off the tensors. DST: a directory with the orbax checkpoint of the Flax
variables and ``model_config.json``; load it with ``birefnet_jax.load_converted(DST)``.

``--inref-order``: official weights released before 2024-11-05 (the paper's DIS/COD/HRSOD models,
general BiRefNet, lite, matting, portrait) were trained with the legacy InRef patch order; later
ones (BiRefNet_HR, HR-matting, dynamic) with the current one. Nothing in a checkpoint tells them
apart; for an official Hub repo the order comes from the release table
(``birefnet_jax/convert/releases.py``) unless ``--inref-order`` overrides it, another Hub repo
needs ``--inref-order``, and a local file defaults to ``current``; see the README.

``--dino-heads`` / ``--dino-out-indices``: a DINOv3 backbone's attention head count and the four
blocks its features are taken from, which no tensor shape shows. The official presets'
(``dino_v3_s`` ... ``dino_v3_7b``) are found from the widths; a backbone of other widths needs both.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from birefnet_jax.convert import CheckpointMismatchError, convert_file  # pylint: disable=g-import-not-at-top,wrong-import-position
from birefnet_jax.convert import hub, releases  # pylint: disable=g-import-not-at-top,wrong-import-position
from birefnet_jax.errors import UserError, exits_on_user_error  # pylint: disable=g-import-not-at-top,wrong-import-position


def count_parameters(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def out_indices(text: str) -> tuple:
  try:
    values = tuple(int(v) for v in text.split(','))
  except ValueError:
    values = ()
  if len(values) != 4:
    raise argparse.ArgumentTypeError(f'{text!r} is not four comma-separated ints, e.g. 2,5,8,11')
  return values


@exits_on_user_error
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('src', help='official checkpoint (.safetensors or .pth), or a Hugging Face '
                                  'Hub repo id (e.g. ZhengPeng7/BiRefNet, optionally @REVISION)')
  parser.add_argument('dst', help='output directory')
  parser.add_argument('--inref-order', choices=('current', 'legacy'), default=None,
                      help='InRef patch channel order the checkpoint was trained with (default: '
                           "the release table's for an official Hub repo, current for a file)")
  parser.add_argument('--revision', default=None,
                      help='Hub branch, tag or commit to download (default: main)')
  parser.add_argument('--backbone-only', action='store_true',
                      help='treat SRC as an ImageNet backbone checkpoint (detected automatically)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace DST if it is an earlier converter output (model_config.json, '
                           'variables/ and nothing else); no other folder is ever replaced')
  parser.add_argument('--dino-heads', type=int, default=None,
                      help="DINOv3 backbone's attention heads (default: the official preset's of "
                           'the same widths)')
  parser.add_argument('--dino-out-indices', type=out_indices, default=None,
                      help="DINOv3 blocks whose outputs feed the decoder, four comma-separated "
                           "ints (default: the official preset's)")
  args = parser.parse_args(argv)
  src, inref_order, release = args.src, args.inref_order or 'current', None
  hub_name = None if os.path.exists(args.src) else hub.parse_hub_name(args.src)
  if hub_name is not None:
    repo_id, revision = hub_name
    if args.revision and revision and args.revision != revision:
      raise UserError(f'{args.src} names revision {revision} and --revision {args.revision}',
                      'give one of them')
    inref_order = hub.inref_order_for(repo_id, args.inref_order)
    release = releases.find_release(repo_id)
    from birefnet_jax.convert.convert import check_destination  # pylint: disable=g-import-not-at-top
    check_destination(args.dst, args.overwrite)   # before the download
    src = hub.download_checkpoint(repo_id, args.revision or revision)
    print(f'downloaded {args.src} -> {src}')
  try:
    cfg, variables, backbone_only, report = convert_file(
        src, args.dst, inref_order=inref_order, overwrite=args.overwrite,
        backbone_only=args.backbone_only or None, dino_heads=args.dino_heads,
        dino_out_indices=args.dino_out_indices)
  except UserError:
    raise   # reported with its hint by exits_on_user_error
  except (CheckpointMismatchError, FileNotFoundError, ValueError) as e:   # what SRC holds
    message = str(e)
    print(f'error: {message if src in message else f"{src}: {message}"}', file=sys.stderr)
    return 1
  bb = cfg.backbone
  params = count_parameters(variables.get('params', {}))
  kind = 'backbone-only' if backbone_only else 'BiRefNet'
  print(f'converted {kind} checkpoint {args.src} -> {args.dst}')
  print(f'  backbone: {bb.family} {dict(bb)}')
  print(f'  parameters: {params:,}')
  if not backbone_only:
    print(f'  decoder: aspp_planes={cfg.aspp_planes} dec_inter_channels={cfg.dec_inter_channels} '
          f'ipt_inter_channels={cfg.ipt_inter_channels} batch_norm={cfg.batch_norm} '
          f'auxiliary_classification={cfg.auxiliary_classification} inref_order={cfg.inref_order}')
  if release is not None:
    size = ('any size' if release.resolution is None
            else 'x'.join(map(str, release.resolution[::-1])))
    print(f'  release: {release.repo_id}, {release.task}, trained at {size} '
          f'(predict/export --resolution)')
  for what in ('ignored', 'missing'):
    if report[what]:
      print(f'  {what} ({len(report[what])}): {", ".join(report[what][:20])}'
            f'{" ..." if len(report[what]) > 20 else ""}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

r"""Evaluate saved prediction maps against ground truth, as BiRefNet / DIS5K report them.

  python -m birefnet_jax.evaluate --pred_dir P --gt_dir G [--json OUT] [--plot DIR]
                                  [--workers N]

Accepted layouts (images: the extensions of ``data.decode.IMAGE_EXTENSIONS``, as ``predict``
reads: .png .jpg .jpeg .bmp .tif .tiff .webp ...; pairs are matched by file stem):

* one dataset: ``G/*.png`` (or ``G/gt/*.png``) with predictions in ``P/*.png``;
* several datasets, the official layouts: ``G/DATASET/*.png`` or ``G/DATASET/gt/*.png``
  (DIS5K: ``DIS5K/DIS-TE1/gt/``), with predictions in ``P/DATASET/*.png`` (BiRefNet's
  ``e_preds/<run>/<DATASET>/``). Each sub-directory of G holding GT images is one dataset.

Every GT image needs a prediction: a missing one is an error that lists them, unless
``--skip_missing`` (then a warning, and those images are left out). Predictions without GT are
ignored. Both images are read as 8-bit grayscale; a prediction of another size is resized to
the GT size (cv2 INTER_LINEAR). Metrics: ``birefnet_jax.metrics`` (numbers identical to
pysodmetrics / the official BiRefNet evaluation; HCE is the official relaxed HCE, gamma 5;
mBA and BIoU the official boundary metrics).

Prints one row per dataset in the DIS5K table order of the BiRefNet paper (values <= 1 as
``.xxx``, HCE as an integer) and a progress line (images/s) on stderr. ``--json OUT`` writes
the full-precision values (HCE: the mean over images): for one dataset the object
``{Sm, MAE, maxFm, meanFm, adpFm, wFm, maxEm, meanEm, adpEm, HCE, mBA, maxBIoU, meanBIoU,
n_images}``, for several ``{DATASET: {...}, ...}``. mBA is the mean over the images whose GT
has a boundary (a warning names the others; null if none has one).

``--plot DIR`` (needs matplotlib: ``pip install 'birefnet_jax[plot]'``) writes per dataset
the precision-recall curve and the F-measure and E-measure curves over the 256 thresholds as
PNG files, and the plotted numbers as JSON (``birefnet_jax.curve_plots``).
"""

import argparse
import json
import pathlib
import sys
import time

from birefnet_jax import curve_plots
from birefnet_jax import writing
from birefnet_jax.data import decode
from birefnet_jax.errors import UserError, report
from birefnet_jax.metrics import evaluation

# The DIS5K column order of BiRefNet's eval_existingOnes.py.
TABLE_COLUMNS = (('maxFm', 'maxFm'), ('wFmeasure', 'wFm'), ('MAE', 'MAE'), ('Smeasure', 'Sm'),
                 ('meanEm', 'meanEm'), ('HCE', 'HCE'), ('maxEm', 'maxEm'), ('meanFm', 'meanFm'),
                 ('adpEm', 'adpEm'), ('adpFm', 'adpFm'), ('mBA', 'mBA'),
                 ('maxBIoU', 'maxBIoU'), ('meanBIoU', 'meanBIoU'), ('n', 'n_images'))


def images_by_stem(directory: pathlib.Path) -> dict:
  """{stem: path} of the image files directly inside ``directory``."""
  found = {}
  for path in sorted(directory.iterdir()):
    if path.is_file() and decode.has_image_extension(path.name):
      if path.stem in found:
        raise ValueError(f'{directory}: two images share the stem {path.stem!r} '
                         f'({found[path.stem].name}, {path.name})')
      found[path.stem] = path
  return found


def _gt_images(directory: pathlib.Path) -> dict:
  images = images_by_stem(directory)
  if not images and (directory / 'gt').is_dir():
    images = images_by_stem(directory / 'gt')
  return images


def find_datasets(gt_dir, pred_dir) -> list:
  """[(dataset name, {stem: gt path}, pred directory)] in the layouts the module doc lists."""
  gt_dir, pred_dir = pathlib.Path(gt_dir), pathlib.Path(pred_dir)
  for directory, flag in ((gt_dir, '--gt_dir'), (pred_dir, '--pred_dir')):
    if not directory.is_dir():
      raise ValueError(f'{flag} {directory}: not a directory')
  single = _gt_images(gt_dir)
  if single:
    name = gt_dir.parent.name if gt_dir.name == 'gt' else gt_dir.name
    return [(name, single, pred_dir)]
  datasets = []
  for sub in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
    images = _gt_images(sub)
    if images:
      datasets.append((sub.name, images, pred_dir / sub.name))
  if not datasets:
    raise ValueError(f'--gt_dir {gt_dir}: no GT images in it, in {gt_dir}/gt, in '
                     f'{gt_dir}/DATASET or in {gt_dir}/DATASET/gt')
  return datasets


def pair_files(name, gt_images, pred_dir, skip_missing=False):
  """Sorted (stems, pred paths, gt paths); missing predictions raise or are skipped."""
  preds = images_by_stem(pred_dir) if pred_dir.is_dir() else {}
  missing = [stem for stem in gt_images if stem not in preds]
  if missing:
    shown = ', '.join(missing[:20]) + (f', ... ({len(missing)} in all)' if len(missing) > 20
                                       else '')
    message = (f'dataset {name}: {len(missing)} of {len(gt_images)} GT images have no '
               f'prediction in {pred_dir}: {shown}')
    if not skip_missing:
      raise FileNotFoundError(message + ' (pass --skip_missing to evaluate the others)')
    print(f'WARNING: {message}; evaluating the other {len(gt_images) - len(missing)}.',
          file=sys.stderr)
  stems = sorted(stem for stem in gt_images if stem in preds)
  return stems, [preds[s] for s in stems], [gt_images[s] for s in stems]


def evaluate_dataset(name, stems, preds, gts, workers, with_hce=True, progress=sys.stderr):
  """The dataset's MetricAccumulator, filled with every pair."""
  acc = evaluation.MetricAccumulator(with_hce=with_hce)
  start = last = time.perf_counter()
  results = evaluation.iter_image_metrics(preds, gts, workers=workers, with_hce=with_hce)
  try:
    for done, (stem, gt, result) in enumerate(zip(stems, gts, results), 1):
      acc.add(result, stem)
      note = evaluation.tiny_image_note(result, gt)
      if note:
        print(f"{'' if progress is None else chr(10)}warning: {note}", file=sys.stderr)
      now = time.perf_counter()
      if progress is not None and (done == len(stems) or now - last > 0.5):
        last = now
        print(f'\r[{name}] {done}/{len(stems)} images, {done / (now - start):.2f} images/s',
              end='', file=progress, flush=True)
  except UserError:
    if progress is not None:
      print(file=progress)   # end the progress line before the error
    raise
  if progress is not None:
    print(file=progress)
  no_boundary = acc.without_boundary()
  if no_boundary:
    shown = ', '.join(map(str, no_boundary[:10])) + (', ...' if len(no_boundary) > 10 else '')
    print(f'warning: dataset {name}: {len(no_boundary)} of {len(stems)} GT images have no '
          f'boundary (empty or full: {shown}); mBA is the mean over the other '
          f'{len(stems) - len(no_boundary)}', file=sys.stderr)
  return acc


def format_value(key, value):
  if key == 'n_images':
    return str(value)
  if value is None:
    return '-'
  if key == 'HCE':
    return str(int(round(value)))
  if value < 1 - 5e-4:
    return '.' + format(value, '.3f').split('.')[-1]
  return format(value, '.3f')


def format_table(results: dict) -> str:
  """One row per dataset, '&'-separated as the official evaluation writes its tables."""
  header = ['Dataset'] + [title for title, _ in TABLE_COLUMNS]
  rows = [[name] + [format_value(key, scores[key]) for _, key in TABLE_COLUMNS]
          for name, scores in results.items()]
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  line = lambda cells: '& ' + ' & '.join(c.ljust(w) for c, w in zip(cells, widths)) + ' &'
  rule = '+' + '+'.join('-' * (w + 2) for w in widths) + '+'
  return '\n'.join([rule, line(header), rule] + [line(r) for r in rows] + [rule])


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m birefnet_jax.evaluate', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--pred_dir', required=True, help='predictions (8-bit maps)')
  parser.add_argument('--gt_dir', required=True, help='ground truth (see layouts above)')
  parser.add_argument('--json', default=None, help='write the dataset values here')
  parser.add_argument('--plot', default=None, metavar='DIR',
                      help='write the precision-recall, F- and E-measure curves of each dataset '
                      'here as PNG files (needs matplotlib)')
  parser.add_argument('--workers', type=int, default=None,
                      help='processes over images (default: all cores)')
  parser.add_argument('--skip_missing', action='store_true',
                      help='warn about GT images without a prediction instead of failing')
  parser.add_argument('--no_hce', action='store_true',
                      help='skip HCE (the official evaluation computes it for DIS-* sets only)')
  parser.add_argument('--quiet', action='store_true', help='no progress line')
  return parser.parse_args(argv)


def run(args) -> dict:
  """The evaluation the arguments ask for; UserError for a bad request."""
  if args.json:   # before the (long) evaluation
    writing.check_output_file(args.json, '--json', overwrite=True)
  if args.plot:
    curve_plots.require_matplotlib()
    writing.check_output_folder(args.plot, '--plot')
  try:
    datasets = find_datasets(args.gt_dir, args.pred_dir)
    pairs = [(name,) + pair_files(name, gts, pred_dir, args.skip_missing)
             for name, gts, pred_dir in datasets]
  except (ValueError, FileNotFoundError) as e:
    raise UserError(str(e)) from None
  results = {}
  for name, stems, preds, gts in pairs:
    if not stems:
      print(f'WARNING: dataset {name}: nothing to evaluate.', file=sys.stderr)
      continue
    acc = evaluate_dataset(name, stems, preds, gts, args.workers, with_hce=not args.no_hce,
                           progress=None if args.quiet else sys.stderr)
    results[name] = acc.result()
    if args.plot:
      curve_plots.write_curve_plots(args.plot, name, acc.curves())
  if not results:
    raise UserError(f'nothing to evaluate: no GT image in {args.gt_dir} has a prediction in '
                    f'{args.pred_dir}', 'check --pred_dir (predictions are matched to GT '
                    'images by file stem)')
  print(format_table(results))
  if args.plot:
    print(f'curves of {len(results)} dataset(s) in {args.plot}: '
          'DATASET_{precision_recall,f_measure,e_measure}.png, DATASET_curves.json',
          file=sys.stderr)
  if args.json:
    data = next(iter(results.values())) if len(results) == 1 else results
    writing.write_atomically(args.json, json.dumps(data, indent=2).encode())
  return results


def main(argv=None) -> dict:
  """Returns the results; a user error is one ``error:`` line and exit status 1."""
  args = parse_args(argv)
  try:
    return run(args)
  except UserError as e:
    raise SystemExit(report(e)) from None


if __name__ == '__main__':
  main()

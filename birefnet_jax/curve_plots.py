"""The figures papers print from a data set's 256-threshold curves, as PNG files (matplotlib).

``write_curve_plots(folder, name, curves)`` writes, for one data set ``name``:

* ``NAME_precision_recall.png``: precision against recall, one point per threshold;
* ``NAME_f_measure.png`` and ``NAME_e_measure.png``: F-measure (beta^2 0.3) and E-measure
  against the binarisation threshold 0..255;
* ``NAME_curves.json``: the plotted numbers (the ``MetricAccumulator.curves()`` arrays,
  threshold order 255..0 as the metrics keep them, i.e. index i <-> threshold 255 - i).

Each PNG is ``FIGURE_SIZE_PX`` (width, height) pixels. matplotlib is the optional extra
``plot`` (``pip install 'birefnet_jax[plot]'``); only the object API is used (no pyplot, no
global backend change).
"""

import io
import json
import os

import numpy as np

from birefnet_jax import writing
from birefnet_jax.errors import UserError

FIGURE_SIZE_PX = (640, 480)
_DPI = 100
PLOT_FILES = {'precision_recall': 'precision_recall.png', 'f_measure': 'f_measure.png',
              'e_measure': 'e_measure.png', 'data': 'curves.json'}


def require_matplotlib():
  """The matplotlib modules used here, or a UserError that says how to install them."""
  try:
    from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError('--plot needs matplotlib, which is not installed',
                    "pip install 'birefnet_jax[plot]' (or pip install matplotlib)") from None
  return figure, backend_agg


def thresholds() -> np.ndarray:
  """The threshold of each curve index: 255, 254, ..., 0."""
  return np.arange(255, -1, -1)


def curve_figures(curves: dict, name: str) -> dict:
  """{'precision_recall' | 'f_measure' | 'e_measure': matplotlib Figure}; each has one axes
  whose first line holds exactly the arrays of ``curves`` (x, y)."""
  figure, backend_agg = require_matplotlib()
  size = (FIGURE_SIZE_PX[0] / _DPI, FIGURE_SIZE_PX[1] / _DPI)
  levels = thresholds()
  specs = {
      'precision_recall': (curves['recall'], curves['precision'], 'recall', 'precision',
                           f'{name}: precision-recall'),
      'f_measure': (levels, curves['fm'], 'threshold', 'F-measure (β² = 0.3)',
                    f'{name}: F-measure, max {curves["fm"].max():.3f}, '
                    f'mean {curves["fm"].mean():.3f}'),
      'e_measure': (levels, curves['em'], 'threshold', 'E-measure',
                    f'{name}: E-measure, max {curves["em"].max():.3f}, '
                    f'mean {curves["em"].mean():.3f}'),
  }
  figures = {}
  for kind, (x, y, x_label, y_label, title) in specs.items():
    fig = figure.Figure(figsize=size, dpi=_DPI)
    backend_agg.FigureCanvasAgg(fig)
    axes = fig.add_subplot()
    axes.plot(np.asarray(x, np.float64), np.asarray(y, np.float64), linewidth=1.5)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    if kind == 'precision_recall':
      axes.set_xlim(0, 1)
      axes.set_ylim(0, 1.02)
    else:
      axes.set_xlim(0, 255)
    fig.tight_layout()
    figures[kind] = fig
  return figures


def write_curve_plots(folder, name: str, curves: dict) -> dict:
  """Writes the three PNGs and the JSON of data set ``name`` into ``folder``; {kind: path}."""
  figures = curve_figures(curves, name)
  paths = {}
  for kind, fig in figures.items():
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=_DPI)   # no bbox 'tight': the size stays fixed
    paths[kind] = os.path.join(folder, f'{name}_{PLOT_FILES[kind]}')
    writing.write_atomically(paths[kind], buffer.getvalue())
  data = {'dataset': name, 'thresholds': thresholds().tolist()}
  data.update({k: np.asarray(curves[k], np.float64).tolist()
               for k in ('precision', 'recall', 'fm', 'em')})
  paths['data'] = os.path.join(folder, f'{name}_{PLOT_FILES["data"]}')
  writing.write_atomically(paths['data'], json.dumps(data).encode())
  return paths

"""Access to the golden fixtures: ../shared/reference (relative to the repository root), or the
folder named by the environment variable BIREFNET_REFERENCE. Every test reads them through here."""

import json
import os
from pathlib import Path

import numpy as np

REFERENCE = Path(os.environ.get('BIREFNET_REFERENCE')
                 or Path(__file__).resolve().parents[1] / '..' / 'shared' / 'reference')
VARIANTS = ('swin_w12_tiny', 'swin_w7_tiny_cls', 'pvt_v2_b0_quarter', 'swin_w12_tiny_legacy')
F64_VARIANTS = ('swin_w12_tiny', 'swin_w7_tiny_cls', 'pvt_v2_b0_quarter')


def path(name: str) -> Path:
  return REFERENCE / name


def io(variant: str):
  return np.load(path(f'{variant}.io.npz'))


def description(variant: str) -> dict:
  return json.loads(path(f'{variant}.json').read_text())


def tolerances(variant: str) -> dict:
  return json.loads(path('tolerances.json').read_text())['variants'][variant]


def tolerances_f64(variant: str) -> dict:
  return json.loads(path('tolerances_f64.json').read_text())['variants'][variant]


def inref_order(variant: str) -> str:
  return 'legacy' if description(variant).get('inref_order') == 'legacy' else 'current'


def nhwc(array):
  array = np.asarray(array)
  return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array

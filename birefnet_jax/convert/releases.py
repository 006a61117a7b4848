"""The official BiRefNet releases on the Hugging Face Hub: what a checkpoint file does not tell.

Nothing in an official ``model.safetensors`` says which InRef patch order it was trained with
(the official code changed it on 2024-11-05, commit ``5198d3f``, without changing any tensor), nor
its training resolution. This table says it for each release, from the official README and the
release dates (see ``../shared/docs/official-birefnet.md`` sections 11 and 12): weights released
before 2024-11-05 use the legacy order, those of 2025 the current one.
"""

import dataclasses
from typing import Optional

HUB_FILE = 'model.safetensors'   # what every official Hub repo holds (PyTorchModelHubMixin)


@dataclasses.dataclass(frozen=True)
class Release:
  repo_id: str
  inref_order: str                        # 'legacy' or 'current'
  resolution: Optional[tuple[int, int]]   # (height, width) trained at; None: dynamic sizes
  task: str
  backbone: str


def _release(repo, order, resolution, task, backbone='swin_v1_l'):
  return Release(f'ZhengPeng7/{repo}', order, resolution, task, backbone)


_SQUARE_1K = (1024, 1024)
_SQUARE_2K = (2048, 2048)

RELEASES = tuple([
    _release('BiRefNet', 'legacy', _SQUARE_1K, 'general'),
    _release('BiRefNet_lite', 'legacy', _SQUARE_1K, 'general', 'swin_v1_t'),
    _release('BiRefNet_lite-2K', 'legacy', (1440, 2560), 'general', 'swin_v1_t'),
    _release('BiRefNet-legacy', 'legacy', _SQUARE_1K, 'general (older training set)'),
    _release('BiRefNet-matting', 'legacy', _SQUARE_1K, 'matting'),
    _release('BiRefNet-portrait', 'legacy', _SQUARE_1K, 'portrait matting'),
    _release('BiRefNet-DIS5K', 'legacy', _SQUARE_1K, 'DIS (paper)'),
    _release('BiRefNet-DIS5K-TR_TEs', 'legacy', _SQUARE_1K, 'DIS (DIS5K-TR + DIS-TEs)'),
    _release('BiRefNet-COD', 'legacy', _SQUARE_1K, 'COD (paper)'),
    _release('BiRefNet-HRSOD', 'legacy', _SQUARE_1K, 'HRSOD (paper)'),
    _release('BiRefNet_HR', 'current', _SQUARE_2K, 'general, high resolution'),
    _release('BiRefNet_HR-matting', 'current', _SQUARE_2K, 'matting, high resolution'),
    _release('BiRefNet_dynamic', 'current', None, 'general, any size 256-2304'),
])

_BY_ID = {r.repo_id.lower(): r for r in RELEASES}


def find_release(repo_id: str) -> Optional[Release]:
  """The release of a Hub repo id (case-insensitive, as the Hub), or None if not official."""
  return _BY_ID.get(repo_id.lower())


def format_table() -> str:
  """The table as text lines, for messages."""
  rows = [f'  {r.repo_id:<34} {r.inref_order:<7} '
          f'{"dynamic" if r.resolution is None else "x".join(map(str, r.resolution[::-1])):<10} '
          f'{r.task}' for r in RELEASES]
  return '\n'.join(rows)

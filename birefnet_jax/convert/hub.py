"""Official checkpoints by their Hugging Face Hub name: download (``huggingface_hub``, an optional
dependency: ``pip install 'birefnet_jax[hub]'``) and convert once into a cache folder.

``huggingface_hub`` keeps the downloaded file in its own cache (``HF_HOME`` / ``HF_HUB_CACHE``),
resumes an interrupted download, sends ``HF_TOKEN`` when it is set and reads the endpoint from
``HF_ENDPOINT`` (a mirror; the tests use a loopback server). The converted model of a release goes
to ``$BIREFNET_JAX_CACHE/converted/<owner>--<name>@<revision>`` (default cache
``~/.cache/birefnet_jax``) and is reused from there without any network access.
"""

import os
import re
import sys
from typing import Optional

from birefnet_jax.convert import releases
from birefnet_jax.errors import UserError

_HUB_NAME = re.compile(r'^([A-Za-z0-9][\w.-]*)/([A-Za-z0-9][\w.-]*)(?:@([\w./-]+))?$')
CACHE_ENV = 'BIREFNET_JAX_CACHE'


def parse_hub_name(text: str) -> Optional[tuple[str, Optional[str]]]:
  """'owner/name' or 'owner/name@revision' -> (repo id, revision or None); None otherwise."""
  match = _HUB_NAME.match(str(text))
  if not match:
    return None
  return f'{match.group(1)}/{match.group(2)}', match.group(3)


def inref_order_for(repo_id: str, given: Optional[str] = None) -> str:
  """The InRef patch order to convert ``repo_id`` with: ``given`` if set, else the release
  table's; an unknown repo without ``given`` is a UserError."""
  if given is not None:
    return given
  release = releases.find_release(repo_id)
  if release is None:
    raise UserError(
        f'{repo_id} is not an official BiRefNet release this package knows, so its InRef patch '
        'order is unknown',
        'pass --inref-order legacy (weights trained before 2024-11-05) or current; the known '
        'releases:\n' + releases.format_table())
  return release.inref_order


def download_checkpoint(repo_id: str, revision: Optional[str] = None,
                        filename: str = releases.HUB_FILE) -> str:
  """The local path of ``filename`` of the Hub repo (downloaded into huggingface_hub's cache if
  not there yet)."""
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    from huggingface_hub import errors as hub_errors  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f'{repo_id}: downloading from the Hugging Face Hub needs huggingface_hub',
                    "pip install 'birefnet_jax[hub]' (or download model.safetensors yourself "
                    'and give its path)') from None
  try:
    return huggingface_hub.hf_hub_download(
        repo_id, filename, revision=revision,
        endpoint=os.environ.get('HF_ENDPOINT') or None)   # read now, not at import
  except hub_errors.GatedRepoError as e:
    raise UserError(f'{repo_id} is gated: {_first_line(e)}',
                    'accept its terms on the Hub and set HF_TOKEN') from None
  except hub_errors.RepositoryNotFoundError as e:
    raise UserError(f'{repo_id}: no such repository on the Hub (or it is private): '
                    f'{_first_line(e)}', 'check the name; for a private one set HF_TOKEN') from None
  except hub_errors.RevisionNotFoundError as e:
    raise UserError(f'{repo_id}: no revision {revision!r}: {_first_line(e)}') from None
  except hub_errors.EntryNotFoundError as e:
    raise UserError(f'{repo_id} has no {filename}: {_first_line(e)}') from None
  except (hub_errors.LocalEntryNotFoundError, hub_errors.HfHubHTTPError, OSError) as e:
    raise UserError(f'{repo_id}: could not download {filename}: {_first_line(e)}',
                    'check the network (HF_ENDPOINT for a mirror), or download the file and give '
                    'its path') from None


def _first_line(error) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def cache_root() -> str:
  return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or '~/.cache', 'birefnet_jax'))


def converted_folder(repo_id: str, revision: Optional[str] = None) -> str:
  """Where the converted model of ``repo_id`` at ``revision`` is cached."""
  name = repo_id.replace('/', '--') + '@' + (revision or 'main').replace('/', '--')
  return os.path.join(cache_root(), 'converted', name)


def converted_release(repo_id: str, revision: Optional[str] = None, log=None) -> str:
  """The cached converter output of an official release, converting it on first use."""
  from birefnet_jax.convert.convert import convert_file, is_converter_output  # pylint: disable=g-import-not-at-top
  log = log or (lambda text: print(text, file=sys.stderr))
  release = releases.find_release(repo_id)
  if release is None:
    raise UserError(
        f'{repo_id}: neither a local checkpoint nor an official BiRefNet release this package '
        'knows', f'convert it first: python tools/convert_torch_weights.py {repo_id} DST '
        '--inref-order legacy|current, then pass DST')
  folder = converted_folder(release.repo_id, revision)
  if os.path.isdir(folder) and os.listdir(folder) and is_converter_output(folder):
    return folder
  source = download_checkpoint(release.repo_id, revision)
  log(f'converting {release.repo_id} ({release.inref_order} InRef order) into {folder}')
  convert_file(source, folder, inref_order=release.inref_order, overwrite=True)
  return folder

"""Writing output files: complete or not at all, with the permissions the umask asks for, and
checks that an output path can be written before any work is done.

Files are written beside their final name (``tempfile.mkstemp``) and renamed into place, so an
interrupted run never leaves a truncated file that a later run would take for a finished one.
``mkstemp`` / ``mkdtemp`` create their files 0600 / folders 0700 whatever the umask; we set the
modes a plain ``open`` / ``mkdir`` would have given (0666 / 0777 minus the umask), so that other
users of a shared machine can read what we wrote when the umask lets them.
"""

import os
import tempfile

from birefnet_jax.errors import UserError


def _read_umask() -> int:
  # The only way to read the umask is to set it; done once, at import, before any thread writes.
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


UMASK = _read_umask()


def file_mode() -> int:
  return 0o666 & ~UMASK


def folder_mode() -> int:
  return 0o777 & ~UMASK


def write_atomically(path, data: bytes):
  """Writes ``data`` to ``path`` (creating its folder) through a temporary file and a rename."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, staging = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', dir=folder)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.chmod(staging, file_mode())
    os.replace(staging, path)
  except BaseException:
    if os.path.exists(staging):
      os.remove(staging)
    raise


def make_staging_folder(final_path) -> str:
  """An empty folder beside ``final_path`` (same file system, so it can be renamed into place),
  with the mode ``mkdir`` would give."""
  final_path = os.path.abspath(os.fspath(final_path))
  staging = tempfile.mkdtemp(prefix='.' + os.path.basename(final_path) + '.',
                             dir=os.path.dirname(final_path))
  os.chmod(staging, folder_mode())
  return staging


def nearest_existing(path) -> str:
  """``path`` itself if it exists, else its closest existing ancestor."""
  path = os.path.abspath(os.fspath(path))
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def check_can_create_in(folder, what: str):
  """Raises a UserError unless files can be created in ``folder`` (or, if it does not exist
  yet, in the folders that would hold it). A real probe, not ``os.access``: that answers yes to
  root even on a read-only file system."""
  base = nearest_existing(folder)
  if not os.path.isdir(base):
    raise UserError(f'{what}: {base} is a file, so no folder can be made there',
                    'choose a path whose parent folders are folders')
  try:
    fd, probe = tempfile.mkstemp(prefix='.birefnet_write_test.', dir=base)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UserError(f'{what}: cannot write in {base} ({e.strerror or e})',
                    'choose a folder you can write to') from None


def check_output_folder(path, what: str):
  """``path`` is (or can become) a folder we can write in."""
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'{what} {path} is a file, not a folder',
                    'give a folder (new or existing) for the outputs')
  check_can_create_in(path, f'{what} {path}')


def check_output_file(path, what: str, overwrite: bool):
  """``path`` is a file we may write: not a folder, not an existing file unless ``overwrite``,
  in a folder we can write in."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise UserError(f'{what} {path} is a folder; this writes one file, and --overwrite never '
                    'replaces a folder', 'give a file name (e.g. inside that folder)')
  if os.path.lexists(path) and not overwrite:
    raise UserError(f'{what} {path} exists', 'pass --overwrite to replace it')
  check_can_create_in(os.path.dirname(os.path.abspath(path)), f'{what} {path}')

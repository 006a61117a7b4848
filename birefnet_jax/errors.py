"""Errors we raise on purpose for a user's mistake, and how a command line reports them.

A ``UserError`` is a bad input or a bad request (a missing file, an output we must not replace,
a config field that does not exist): the command line prints it as one ``error: ...`` line,
optionally followed by a ``hint: ...`` line, and exits with status 1. Anything else is a bug and
keeps its traceback.
"""

import functools
import sys
from typing import Optional


class UserError(Exception):
  """A mistake in what the user asked for; ``hint`` says what to do instead."""

  def __init__(self, message: str, hint: Optional[str] = None):
    # Both in args, so that the error survives pickling (multiprocessing workers raise it).
    super().__init__(message, hint)
    self.message = message
    self.hint = hint

  def __str__(self):
    return self.message


def report(error: UserError, stream=None) -> int:
  """Prints ``error: ...`` (and ``hint: ...``); returns the exit status, 1."""
  stream = sys.stderr if stream is None else stream
  print(f'error: {error.message}', file=stream)
  if error.hint:
    print(f'hint: {error.hint}', file=stream)
  stream.flush()
  return 1


def exits_on_user_error(main):
  """Wraps a ``main(argv) -> int``: a UserError is reported in one line and returns 1."""
  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      return report(e)
  return wrapped

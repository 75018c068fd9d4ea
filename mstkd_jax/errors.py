"""The one exception type for problems a user can fix (bad data, config, checkpoint), the
one warning line, and the filter that keeps a library's logged copies of an error we report
out of the log.

`main` and the other command-line entry points print a UserError's message alone, as
`error: <message>` on stderr, without a traceback; everything else is a bug and keeps its
traceback. Our warnings are single `warning: <message>` lines: the two prefixes are ours
alone (absl, TensorFlow and Python's `warnings` print other forms), so a reader or a test can
pick our lines out of a log.
"""

import logging
import os
import sys
from typing import TextIO


class UserError(Exception):
  """A problem in the user's input; the message names the file or field and what was expected."""


def warn(message: str, file: TextIO | None = None) -> None:
  """Prints `warning: <message>` as one line to `file` (default: stdout, next to the
  progress lines it is about) and flushes it."""
  print(f"warning: {message}", file=file or sys.stdout, flush=True)


class _DropLoggedTracebacks(logging.Filter):
  """Drops ERROR records with a traceback that a library (`package`) logs from its own
  threads for a failure that also reaches our code, which reports it in one line."""

  def __init__(self, package: str):
    super().__init__()
    self.package = package

  def filter(self, record: logging.LogRecord) -> bool:
    from_package = f"{os.sep}{self.package}{os.sep}" in (record.pathname or "")
    return not (from_package and record.exc_info and record.levelno >= logging.ERROR)


def drop_logged_tracebacks(package: str) -> None:
  """Installs `_DropLoggedTracebacks(package)` on absl's logger, once per process and
  package. Used where the same exception is re-raised to us (Orbax's failed background
  saves, clu's writer thread); the library's records without a traceback still pass."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropLoggedTracebacks) and f.package == package
             for f in logger.filters):
    logger.addFilter(_DropLoggedTracebacks(package))

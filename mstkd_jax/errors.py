"""The one exception type for problems a user can fix (bad data, config, checkpoint), the
one warning line, the filter that keeps a library's logged copies of an error we report
out of the log, and what an out-of-memory error says it needed.

`main` and the other command-line entry points print a UserError's message alone, as
`error: <message>` on stderr, without a traceback; everything else is a bug and keeps its
traceback. Our warnings are single `warning: <message>` lines: the two prefixes are ours
alone (absl, TensorFlow and Python's `warnings` print other forms), so a reader or a test can
pick our lines out of a log.
"""

import logging
import os
import re
import sys
from typing import Callable, Iterable, TextIO


class UserError(Exception):
  """A problem in the user's input; the message names the file or field and what was expected.

  `exit_code`: the status a command ends with for it (1; a subclass for command-line
  settings says 2).
  """
  exit_code = 1


def run_reported(body: Callable[[], None]) -> None:
  """Runs a command's `body()`: a UserError ends the process as one `error: <message>` line
  on stderr and its `exit_code`, Ctrl-C (KeyboardInterrupt) as `interrupted()`'s line and
  INTERRUPTED without interpreter shutdown (XLA may still be compiling on its own threads,
  and a shutdown beside them can crash the process). Anything else keeps its traceback."""
  try:
    body()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    os._exit(interrupted())  # pylint: disable=protected-access


def guarded(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """`main(argv)` for absl's app.run, run by `run_reported` (bench, plan)."""
  return lambda argv: run_reported(lambda: main(argv))


def warn(message: str, file: TextIO | None = None) -> None:
  """Prints `warning: <message>` as one line to `file` (default: stdout, next to the
  progress lines it is about) and flushes it."""
  print(f"warning: {message}", file=file or sys.stdout, flush=True)


def warn_all(messages: Iterable[str], file: TextIO | None = None) -> None:
  """`warn` for each of `messages`, in order."""
  for message in messages:
    warn(message, file)


INTERRUPTED = 130  # 128 + SIGINT: the exit code a shell gives a command ended by Ctrl-C


def interrupted() -> int:
  """Prints the one line for a Ctrl-C (KeyboardInterrupt) that reached a command's top
  level, flushes stdout and stderr, and returns the exit code to end with, INTERRUPTED.
  The commands write each output file whole (a temporary file renamed into place), so what
  they wrote before stays and no file is half written."""
  print("error: interrupted; the files written before stay, rerun the same command for "
        "the rest", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  return INTERRUPTED


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


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


_SIZE = r"([\d.]+[KMGT]?i?B?)"
# A TPU compilation's two wordings of a program that does not fit: (needed, space, limit).
_USED = re.compile(rf"Used {_SIZE} of {_SIZE} (\w+)")
_REQUIRED = re.compile(rf"required for [^(]*\({_SIZE}\) exceeds available (\w+) \({_SIZE}\)")


def _bytes(text: str) -> float:
  """"17179869184" or "20.29G" (XLA's binary units) -> bytes."""
  number, unit = re.fullmatch(r"([\d.]+)([KMGT]?)i?B?", text).groups()
  return float(number) * _UNITS[unit]


def _size(text: str) -> str:
  """"17179869184" (bytes) or "20.29G" -> "16.0 GiB" / "20.3 GiB"."""
  value = _bytes(text)
  for name, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
    if value >= scale:
      return f"{value / scale:.1f} {name}"
  return f"{value:.0f} bytes"


def out_of_memory(error: BaseException) -> str | None:
  """What an out-of-memory error says it needed, in a few words, or None for any other error.

  Recognized: XLA's RESOURCE_EXHAUSTED errors (jax.errors.JaxRuntimeError) as its
  allocators and compilers word them ("Out of memory allocating N bytes" on the CPU, "Out
  of memory while trying to allocate N bytes" on a GPU, "Ran out of memory in memory space
  hbm. Used 20.29G of 15.48G hbm" or "the total memory required for HLO temporaries
  (93.50G) exceeds available HBM (15.75G)" at a TPU compilation, "Attempting to allocate 8.00G.
  That was not possible. There are 2.75G free" on a TPU), and Python's MemoryError (host
  memory).
  """
  if isinstance(error, MemoryError):
    return "host memory"
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text or not re.search(r"memory|allocat", text, re.I):
    return None
  used = _USED.search(text)
  if used:
    return (f"it needs {_size(used.group(1))} of {used.group(3)} where the device has "
            f"{_size(used.group(2))}")
  required = _REQUIRED.search(text)
  if required:
    return (f"it needs {_size(required.group(1))} of {required.group(2)} where the device has "
            f"{_size(required.group(3))}")
  attempt = re.search(rf"Attempting to allocate {_SIZE}\..*?There are {_SIZE} free", text,
                      re.DOTALL)
  if attempt:
    return (f"an allocation of {_size(attempt.group(1))} did not fit in the "
            f"{_size(attempt.group(2))} free")
  allocation = (re.search(r"allocat\w* (\d+) bytes", text)
                or re.search(r"allocate request for [^(]*\((\d+)B\)", text))
  if allocation:
    return f"an allocation of {_size(allocation.group(1))} did not fit"
  first = text.strip().splitlines()[0]
  return first[:200]


def needed_bytes(error: BaseException) -> int | None:
  """The bytes a TPU compilation that ran out of memory says the program needs ("Used
  20.29G of 15.48G hbm", "required for HLO temporaries (93.50G) exceeds available HBM"), or
  None where the error says no such figure."""
  text = str(error)
  found = _USED.search(text) or _REQUIRED.search(text)
  return int(_bytes(found.group(1))) if found else None

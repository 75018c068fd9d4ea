"""Metric writers: clu's TensorBoard + log writer when TensorFlow is installed, else JSON lines.

clu's writers import TensorFlow; without it the metrics go to <logdir>/metrics.jsonl. Either
way a failed write is one UserError naming the folder and the OS error.
"""

import json
import os
import re

from mstkd_jax import files
from mstkd_jax import errors
from mstkd_jax.errors import UserError

# The OS errors as TensorFlow's file system words them (its errors carry no errno).
_OS_ERRORS = (("No space left on device", "ENOSPC"), ("Permission denied", "EACCES"),
              ("Read-only file system", "EROFS"), ("Disk quota exceeded", "EDQUOT"))


class JsonLinesWriter:
  """The part of clu's MetricWriter the loop uses, writing one JSON object per call."""

  def __init__(self, logdir: str, just_logging: bool = False):
    self._path = None if just_logging else os.path.join(logdir, "metrics.jsonl")

  def write_scalars(self, step, scalars):
    if self._path:
      record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
      files.append_text(self._path, json.dumps(record) + "\n")

  def flush(self):
    pass


def write_error(logdir: str, error: BaseException) -> UserError:
  """The one-line UserError of a failed write to `logdir`, naming the OS error where the
  error (an OSError, or TensorFlow's or clu's wrapping of one) carries one."""
  if isinstance(error, OSError) and error.errno:
    return UserError(f"cannot write the metrics in {logdir} ({files.os_error_reason(error)})")
  text = str(error)
  for words, code in _OS_ERRORS:
    if words in text:
      return UserError(f"cannot write the metrics in {logdir} ({code}: {words})")
  first = re.sub(r"\{\{[^}]*\}\}\s*", "", (text.strip().splitlines() or [""])[0])[:200]
  return UserError(f"cannot write the metrics in {logdir} ({type(error).__name__}: {first})")


class CheckedWriter:
  """A metric writer whose failures are `write_error`s, however deep they were raised."""

  def __init__(self, writer, logdir: str):
    self._writer, self._logdir = writer, logdir

  def _call(self, name, *args):
    try:
      return getattr(self._writer, name)(*args)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise write_error(self._logdir, e) from e

  def write_scalars(self, step, scalars):
    self._call("write_scalars", step, scalars)

  def flush(self):
    self._call("flush")


def create_writer(logdir: str, *, just_logging: bool) -> CheckedWriter:
  """clu's default writer (TensorBoard events + logging), or JsonLinesWriter without TF,
  as a CheckedWriter; UserError (`write_error`) where it cannot be created."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return CheckedWriter(JsonLinesWriter(logdir, just_logging), logdir)
  # clu logs "Error in producer thread" with a traceback; the same error reaches the next
  # flush or write, where CheckedWriter reports it in one line.
  errors.drop_logged_tracebacks("clu")
  try:
    writer = metric_writers.create_default_writer(logdir, just_logging=just_logging,
                                                  asynchronous=True)
  except Exception as e:  # pylint: disable=broad-except
    raise write_error(logdir, e) from e
  return CheckedWriter(writer, logdir)

"""Metric writers: clu's TensorBoard + log writer when TensorFlow is installed, else JSON lines.

clu's writers import TensorFlow; a JAX-only machine (a bare GPU box, a colab without TF)
still trains and keeps its metrics in <logdir>/metrics.jsonl. Progress (steps/s, ETA) is
the loop's own line (train/loop.py), the same with either writer. Either way a write that
fails (disk full, no permission, a read-only file system) is one UserError naming the
folder and the OS error.
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
  """The subset of clu's MetricWriter the loop uses, writing one JSON object per call."""

  def __init__(self, logdir: str, just_logging: bool = False):
    self._path = None if just_logging else os.path.join(logdir, "metrics.jsonl")

  def _write(self, record):
    if self._path:
      files.append_text(self._path, json.dumps(record) + "\n")

  def write_scalars(self, step, scalars):
    self._write({"step": int(step), **{k: float(v) for k, v in scalars.items()}})

  def write_hparams(self, hparams):
    self._write({"hparams": {k: str(v) for k, v in hparams.items()}})

  def flush(self):
    pass

  def close(self):
    pass


def write_error(logdir: str, error: BaseException) -> UserError:
  """The one-line UserError of a failed metrics write to `logdir`: the OS error's name and
  text where the error (an OSError, or TensorFlow's or clu's wrapping of one) has one."""
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

  def write_hparams(self, hparams):
    self._call("write_hparams", hparams)

  def flush(self):
    self._call("flush")

  def close(self):
    self._call("close")


def create_writer(logdir: str, *, just_logging: bool) -> CheckedWriter:
  """clu's default writer (TensorBoard events + logging), or JsonLinesWriter without TF,
  as a CheckedWriter.

  Raises:
    UserError: the events file cannot be created in `logdir` (naming it and the OS error).
  """
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

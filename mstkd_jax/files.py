"""The one set of file helpers: atomic writes, JSON, .npz and memory-mapped .npy files.

Every writer goes through `atomic_path`: the data goes to a unique temporary name next to
the target and is renamed over it only once complete, so a file with its final name is
always whole (an interruption leaves the earlier file, or none), and two processes never
share a temporary file. An OS error while writing (disk full, no permission, a read-only
file system) becomes one UserError naming the path and the error. Standard library and
numpy only: the data readers use it without pulling in JAX.
"""

import contextlib
import errno
import json
import os
import tempfile
from typing import Iterator

import numpy as np

from mstkd_jax.errors import UserError


def os_error_reason(error: OSError) -> str:
  """"ENOSPC: No space left on device" (the errno's name and text), or the message."""
  code = errno.errorcode.get(error.errno, "") if error.errno else ""
  return f"{code}: {error.strerror}" if code and error.strerror else str(error)


def write_error(path: str, error: OSError) -> UserError:
  """The one-line UserError of an OS error while writing `path`."""
  return UserError(f"cannot write {path} ({os_error_reason(error)})")


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a unique temporary file name next to `path`, ending in `suffix` (e.g. ".npz",
  where a writer would append one otherwise). When the block ends without an error the
  file is renamed over `path`; otherwise it is removed and `path` is left as it was.

  Raises:
    UserError: an OS error (ENOSPC, EACCES, EROFS, ...) while creating, writing or
      renaming, naming `path`.
  """
  path = os.fspath(path)
  directory, name = os.path.split(os.path.abspath(path))
  try:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; outputs of a run are shareable
  except OSError as e:
    raise write_error(path, e) from e
  try:
    yield tmp
    os.replace(tmp, path)
  except OSError as e:  # from the block too: its writes to `tmp` fail the same way
    raise write_error(path, e) from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def write_json(path: str, value, sort_keys: bool = False) -> None:
  """Writes `value` as indented JSON to `path`, atomically."""
  write_bytes(path, json.dumps(value, indent=2, sort_keys=sort_keys).encode())


def read_json(path: str, expected: str = "readable JSON", missing=UserError):
  """The JSON value in `path`.

  Args:
    path: the file.
    expected: what the file should be, for the error message.
    missing: returned where the file does not exist; the default, UserError, raises.

  Raises:
    UserError: the file is missing (unless `missing` is given), unreadable, or not JSON.
  """
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    if missing is UserError:
      raise UserError(f"{path} is missing; expected {expected}") from e
    return missing
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}); expected {expected}") from e


def save_npz(path: str, arrays: dict) -> None:
  """np.savez of `arrays` ({name: array}) to `path`, atomically."""
  with atomic_path(path, suffix=".npz") as tmp:
    np.savez(tmp, **arrays)


@contextlib.contextmanager
def npy_writer(path: str, shape: tuple, dtype=np.float32, enabled: bool = True):
  """Yields a memory-mapped array [shape] of `dtype` to fill in chunks; it becomes the
  .npy `path` only when the block ends without an error (an earlier file there stays until
  then), so arrays larger than memory are written whole or not at all. Yields None where
  not `enabled` (processes other than 0)."""
  if not enabled:
    yield None
    return
  with atomic_path(path, suffix=".npy") as tmp:
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
    try:
      yield array
      array.flush()
    finally:
      del array

"""The one set of file helpers: atomic writes, JSON, .npz and memory-mapped .npy files.

Every path may be a local path or a URL (gs://bucket/run/x.json), str or os.PathLike; reads
and file-system calls go through `etils.epath`. A local file is written under a unique
temporary name next to it and renamed over it once complete (`atomic_path`); an object
appears whole when its one upload ends. An OS error or a storage library's error (no
credentials, no such bucket, no network) becomes one UserError naming the path and the
error; FileNotFoundError passes where a function says so, for the caller to word. Standard
library, numpy and etils only: the data readers use it without JAX.
"""

import contextlib
import errno
import io
import json
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np

from mstkd_jax import paths
from mstkd_jax.errors import UserError

URL_ERROR_CHARS = 297  # of a storage library's first message line (retry logs run long)


def os_error_reason(error: OSError) -> str:
  """"ENOSPC: No space left on device" (the errno's name and text), or the message."""
  code = errno.errorcode.get(error.errno, "") if error.errno else ""
  return f"{code}: {error.strerror}" if code and error.strerror else str(error)


def write_error(path, error: OSError, action: str = "write") -> UserError:
  """The one-line UserError of an OS error while `action`-ing the local `path`."""
  return UserError(f"cannot {action} {os.fspath(path)} ({os_error_reason(error)})")


def url_error(path, error: Exception, action: str = "write") -> UserError:
  """The one-line UserError of a storage library's `error` while `action`-ing URL `path`."""
  return UserError(f"cannot {action} {os.fspath(path)} ({error_line(error)})")


def error_line(error: BaseException, limit: int = URL_ERROR_CHARS) -> str:
  """"Type: the first line of the message", that line cut to `limit` characters (then
  "...") where longer: storage libraries and tensorstore write kilobytes."""
  first = (str(error).strip().splitlines() or [""])[0].strip()
  if len(first) > limit:
    first = first[:limit] + "..."
  return f"{type(error).__name__}: {first}" if first else type(error).__name__


def epath_of(path):
  """`path` (str or os.PathLike) as an etils.epath.Path (gs://... included)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(os.fspath(path))


def _write_url(path, source) -> None:
  """Uploads the binary file object `source` to the URL `path` in one go. Its folder is
  made first: file systems behind a URL other than object stores (and TF's in-memory
  ram://) list only folders that were made."""
  target = epath_of(path)
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as f:
      shutil.copyfileobj(source, f, 1 << 20)
  except Exception as e:  # pylint: disable=broad-except; the storage library's own errors
    raise url_error(path, e) from e


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a unique temporary file name ending in `suffix` (e.g. ".npz", where a writer
  would append one otherwise); renamed over `path` when the block succeeds, else removed.
  For a URL `path` it is a local temporary file, uploaded when the block succeeds.

  Raises:
    UserError: an OS error (ENOSPC, EACCES, EROFS, ...) while creating, writing or
      renaming, or a URL's storage library error, naming `path`.
  """
  path = os.fspath(path)
  url = paths.is_url(path)
  directory, name = ((None, path.rstrip("/").rsplit("/", 1)[-1]) if url
                     else os.path.split(os.path.abspath(path)))
  try:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    if not url:
      os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; outputs of a run are shareable
  except OSError as e:
    raise write_error(path, e) from e
  try:
    yield tmp
    if url:
      with open(tmp, "rb") as f:
        _write_url(path, f)
    else:
      os.replace(tmp, path)
  except OSError as e:  # from the block too: its writes to `tmp` fail the same way
    if url:
      raise UserError(f"cannot write {path} (its local temporary file {tmp}: "
                      f"{os_error_reason(e)})") from e
    raise write_error(path, e) from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically: a local path by a rename, a URL in one upload."""
  if paths.is_url(path):
    _write_url(path, io.BytesIO(data))
    return
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def write_json(path: str, value, sort_keys: bool = False) -> None:
  """Writes `value` as indented JSON to `path`, atomically."""
  write_bytes(path, json.dumps(value, indent=2, sort_keys=sort_keys).encode())


_JSON_NAMES = {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def read_json(path: str, expected: str = "readable JSON", missing=UserError) -> dict:
  """The JSON object in `path` (every record a run reads is one); `missing` where the file
  does not exist (the default, UserError, raises). `expected` is what the file should be,
  for the error message.

  Raises:
    UserError: the file is missing (unless `missing` is given), unreadable, not JSON, or
      JSON of another shape than an object ("... holds a JSON list; expected ...").
  """
  try:  # a URL's storage errors are UserErrors from _call; a local path's pass to here
    value = json.loads(_call(path, "read", lambda p: p.read_text(encoding="utf-8"),
                             local_errors=False))
  except FileNotFoundError as e:
    if missing is UserError:
      raise UserError(f"{path} is missing; expected {expected}") from e
    return missing
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}); expected {expected}") from e
  if not isinstance(value, dict):
    raise UserError(f"{os.fspath(path)} holds a JSON {_JSON_NAMES.get(type(value), 'value')}"
                    f", not an object; expected {expected}")
  return value


def read_bytes(path) -> bytes:
  """The bytes of `path`; FileNotFoundError passes."""
  return _call(path, "read", lambda p: p.read_bytes())


def append_text(path, text: str) -> None:
  """Appends `text` to `path`, creating it. An object store cannot append: a URL's object
  is read and written again whole (one writer at a time: one run per workdir)."""
  if paths.is_url(path):
    try:
      old = read_bytes(path)
    except FileNotFoundError:
      old = b""
    _write_url(path, io.BytesIO(old + text.encode("utf-8")))
    return
  try:
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)
  except OSError as e:
    raise write_error(path, e) from e


def save_npz(path: str, arrays: dict) -> None:
  """np.savez of `arrays` ({name: array}) to `path`, atomically. A URL's archive is built
  in memory and uploaded whole (object-store files cannot seek, which zip writing needs)."""
  if paths.is_url(path):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    _write_url(path, buffer)
    return
  with atomic_path(path, suffix=".npz") as tmp:
    np.savez(tmp, **arrays)


@contextlib.contextmanager
def npy_writer(path: str, shape: tuple, dtype=np.float32, enabled: bool = True):
  """Yields a memory-mapped array [shape] of `dtype` to fill in chunks; it becomes the
  .npy `path` only when the block succeeds, so arrays larger than memory are written whole
  or not at all. Yields None where not `enabled` (processes that write no copy).

  Raises:
    UserError: `path` is a URL (a memory map needs a local disk: see paths.cache_dir), or
      an OS error while writing, naming `path`.
  """
  if paths.is_url(path):
    raise UserError(f"{os.fspath(path)} is a URL; a memory-mapped cache needs a local disk "
                    "(set cache_dir to a local folder)")
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


@contextlib.contextmanager
def load_npz(path) -> Iterator:
  """np.load of the .npz `path` (a URL is read whole) as a context manager; no pickles.
  FileNotFoundError, and OSError / ValueError of a file that is no .npz archive, pass."""
  source = io.BytesIO(read_bytes(path)) if paths.is_url(path) else os.fspath(path)
  with np.load(source, allow_pickle=False) as data:
    yield data


# ------------------------------------------------------ file-system calls, local or URL

def _failure(path, error: Exception, action: str) -> UserError:
  return (url_error if paths.is_url(path) else write_error)(path, error, action)


def _call(path, action: str, call, local_errors: bool = True):
  """call(epath.Path(path)); any error but FileNotFoundError of a URL, and a local OSError
  where `local_errors`, becomes `_failure`."""
  try:
    return call(epath_of(path))
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except; the storage library's own errors
    if paths.is_url(path) or (local_errors and isinstance(e, OSError)):
      raise _failure(path, e, action) from e
    raise


def exists(path) -> bool:
  return _call(path, "read", lambda p: p.exists())


def isdir(path) -> bool:
  return _call(path, "read", lambda p: p.is_dir())


def isfile(path) -> bool:
  return _call(path, "read", lambda p: p.is_file())


def listdir(path) -> list[str]:
  """The names in the folder `path`, sorted, less names ending in "~" (editors' backups:
  epath leaves them out locally as gfile does on URLs). Local OSErrors pass."""
  return sorted(_call(path, "list", lambda p: [c.name for c in p.iterdir()],
                      local_errors=False))


def makedirs(path) -> None:
  """Makes the folder `path` and its parents; no error if it exists."""
  try:
    _call(path, "write", lambda p: p.mkdir(parents=True, exist_ok=True))
  except FileNotFoundError as e:
    raise _failure(path, e, "write") from e


def remove(path) -> None:
  """Removes the file `path`; no error if it is already gone."""
  _call(path, "remove", lambda p: p.unlink(missing_ok=True))


def rmtree(path) -> None:
  """Removes the folder `path` with everything in it; no error if it is already gone."""
  _call(path, "remove", lambda p: p.rmtree(missing_ok=True))


def size(path) -> int:
  """The size in bytes of the file `path`; local OSErrors pass."""
  if not paths.is_url(path):
    # Not epath's stat(): on a local path it also looks up the owner's user and group
    # names, which raises KeyError for a uid with no passwd entry (containers, clusters).
    return os.path.getsize(path)
  return _call(path, "read", lambda p: p.stat().length)


def open_read(path):
  """A seekable binary file object of `path`; local OSErrors pass as open() raises them."""
  return _call(path, "read", lambda p: p.open("rb"), local_errors=False)

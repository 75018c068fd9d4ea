"""The one set of file helpers: atomic writes, JSON, .npz and memory-mapped .npy files.

Every path may be a local path or a URL (gs://bucket/run/x.json; str or os.PathLike, an
epath.Path included). Reads and file-system calls take `etils.epath` for both (os for a
local path; for gs:// tf.io.gfile where TensorFlow is installed, else fsspec/gcsfs). Writes
differ as the storage does: a local file is written under a unique temporary name next to
it and renamed over it once complete (`atomic_path`), so a file with its final name is
always whole and two processes never share a temporary file; an object store has no rename
and needs none, as an object appears whole when its one upload ends. An OS error (disk
full, no permission, a read-only file system) or a storage library's error (no
credentials, no such bucket, no network) becomes one UserError naming the path and the
error. Standard library, numpy and etils only: the data readers use it without JAX.
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

# Where a URL's storage library fails, its message can run over many lines (a retry log,
# the request): its first line, cut to this many characters (then "..."), names what went
# wrong.
URL_ERROR_CHARS = 297


def os_error_reason(error: OSError) -> str:
  """"ENOSPC: No space left on device" (the errno's name and text), or the message."""
  code = errno.errorcode.get(error.errno, "") if error.errno else ""
  return f"{code}: {error.strerror}" if code and error.strerror else str(error)


def write_error(path: str, error: OSError) -> UserError:
  """The one-line UserError of an OS error while writing `path`."""
  return UserError(f"cannot write {path} ({os_error_reason(error)})")


def url_error(path, error: Exception, action: str = "write") -> UserError:
  """The one-line UserError of a storage library's `error` (e.g. tf.errors.OpError, an
  OSError from gcsfs) while `action`-ing the URL `path`: `error_line` of it."""
  return UserError(f"cannot {action} {os.fspath(path)} ({error_line(error)})")


def error_line(error: BaseException, limit: int = URL_ERROR_CHARS) -> str:
  """"Type: the first line of the message" of `error`, that line cut to `limit` characters
  (then "...") where longer: storage libraries and tensorstore write kilobytes."""
  lines = str(error).strip().splitlines()
  first = lines[0].strip() if lines else ""
  if len(first) > limit:
    first = first[:limit] + "..."
  return f"{type(error).__name__}: {first}" if first else type(error).__name__


def epath_of(path):
  """`path` (str or os.PathLike) as an etils.epath.Path (gs://... included)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(os.fspath(path))


def _write_url(path, source) -> None:
  """Writes the bytes `source` (bytes, or a binary file object to copy) to the URL `path`
  in one upload (the object appears whole when the file closes). Its folder is made
  first: object stores infer folders from names, but other file systems behind a URL (and
  TF's in-memory ram://) list only folders that were made.

  Raises:
    UserError: the storage library failed (no credentials, no such bucket, ...).
  """
  target = epath_of(path)
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as f:
      if isinstance(source, bytes):
        f.write(source)
      else:
        shutil.copyfileobj(source, f, 1 << 20)
  except Exception as e:  # pylint: disable=broad-except; the storage library's own errors
    raise url_error(path, e) from e


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a unique temporary file name next to `path`, ending in `suffix` (e.g. ".npz",
  where a writer would append one otherwise). When the block ends without an error the
  file is renamed over `path`; otherwise it is removed and `path` is left as it was.

  For a URL `path` the temporary file is a local one (tempfile.gettempdir()) and is
  uploaded to `path` when the block ends without an error (an object appears whole; there
  is no rename on an object store), then removed.

  Raises:
    UserError: an OS error (ENOSPC, EACCES, EROFS, ...) while creating, writing or
      renaming, naming `path`; for a URL the storage library's error, naming `path`.
  """
  path = os.fspath(path)
  if paths.is_url(path):
    with _url_atomic_path(path, suffix) as tmp:
      yield tmp
    return
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


@contextlib.contextmanager
def _url_atomic_path(path: str, suffix: str) -> Iterator[str]:
  """`atomic_path` of a URL: a local temporary file, uploaded once the block succeeds."""
  name = path.rstrip("/").rsplit("/", 1)[-1]
  try:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}")
    os.close(fd)
  except OSError as e:
    raise write_error(path, e) from e
  try:
    yield tmp
    with open(tmp, "rb") as f:
      _write_url(path, f)
  except OSError as e:  # the block's writes to the local `tmp`
    raise UserError(f"cannot write {path} (its local temporary file {tmp}: "
                    f"{os_error_reason(e)})") from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` (str or os.PathLike; a URL included) atomically: a local path
  by a rename, a URL in one upload.

  Raises:
    UserError: the write failed (OS or storage library error), naming `path`.
  """
  if paths.is_url(path):
    _write_url(path, data)
    return
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def write_json(path: str, value, sort_keys: bool = False) -> None:
  """Writes `value` as indented JSON to `path` (str or os.PathLike; a URL included),
  atomically (`write_bytes`)."""
  write_bytes(path, json.dumps(value, indent=2, sort_keys=sort_keys).encode())


def read_json(path: str, expected: str = "readable JSON", missing=UserError) -> dict:
  """The JSON object in `path` (every record a run reads is one).

  Args:
    path: the file (str or os.PathLike; a URL is read through etils.epath).
    expected: what the file should be, for the error message.
    missing: returned where the file does not exist; the default, UserError, raises.

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
  return _object(value, path, expected)


_JSON_NAMES = {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _object(value, path, expected: str) -> dict:
  """`value` where it is a JSON object; UserError naming `path` otherwise."""
  if not isinstance(value, dict):
    raise UserError(f"{os.fspath(path)} holds a JSON {_JSON_NAMES.get(type(value), 'value')}"
                    f", not an object; expected {expected}")
  return value


def read_bytes(path) -> bytes:
  """The bytes of `path` (str or os.PathLike; a URL included).

  Raises:
    FileNotFoundError: there is no such file (for the caller to word).
    UserError: any other OS or storage library error, naming `path`.
  """
  return _call(path, "read", lambda p: p.read_bytes())


def append_text(path, text: str) -> None:
  """Appends `text` to `path` (str or os.PathLike), creating it. A local file is opened
  for appending; an object store cannot append, so a URL's object is read and written
  again whole (one writer at a time: one run per workdir).

  Raises:
    UserError: the write failed, naming `path`.
  """
  if paths.is_url(path):
    try:
      old = read_bytes(path)
    except FileNotFoundError:
      old = b""
    _write_url(path, old + text.encode("utf-8"))
    return
  try:
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)
  except OSError as e:
    raise write_error(path, e) from e


def save_npz(path: str, arrays: dict) -> None:
  """np.savez of `arrays` ({name: array}) to `path` (str or os.PathLike; a URL included),
  atomically. A URL's archive is built in memory and uploaded whole (object-store files
  cannot seek, which zip writing needs).

  Raises:
    UserError: the write failed (OS or storage library error), naming `path`.
  """
  if paths.is_url(path):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _write_url(path, buffer.getvalue())
    return
  with atomic_path(path, suffix=".npz") as tmp:
    np.savez(tmp, **arrays)


@contextlib.contextmanager
def npy_writer(path: str, shape: tuple, dtype=np.float32, enabled: bool = True):
  """Yields a memory-mapped array [shape] of `dtype` to fill in chunks; it becomes the
  .npy `path` only when the block ends without an error (an earlier file there stays until
  then), so arrays larger than memory are written whole or not at all. Yields None where
  not `enabled` (processes that write no copy: stages.shared.writes_caches).

  Raises:
    UserError: `path` is a URL (a memory map needs a local disk: such caches go under the
      local `cache_dir`, see paths.cache_dir), or an OS error while writing, naming `path`.
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
  """np.load of the .npz `path` (str or os.PathLike; a URL is read whole through
  etils.epath), as a context manager yielding the NpzFile. Pickles are refused.

  Raises:
    FileNotFoundError: there is no such file; OSError / ValueError: not an .npz archive
      (for the caller to word, as np.load raises them).
    UserError: a URL's storage library failed, naming `path`.
  """
  source = io.BytesIO(read_bytes(path)) if paths.is_url(path) else os.fspath(path)
  with np.load(source, allow_pickle=False) as data:
    yield data


# ------------------------------------------------------ file-system calls, local or URL

def _failure(path, error: Exception, action: str) -> UserError:
  """The one-line UserError of `error` while `action`-ing `path`: a URL's storage library
  error by its type and first line (url_error), a local OS error by its errno name."""
  if paths.is_url(path):
    return url_error(path, error, action)
  return UserError(f"cannot {action} {os.fspath(path)} ({os_error_reason(error)})")


def _call(path, action: str, call, local_errors: bool = True):
  """call(epath.Path(path)). FileNotFoundError passes; any other error of a URL, and a local
  OSError where `local_errors`, becomes `_failure`; anything else passes."""
  try:
    return call(epath_of(path))
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except; the storage library's own errors
    if paths.is_url(path) or (local_errors and isinstance(e, OSError)):
      raise _failure(path, e, action) from e
    raise


def exists(path) -> bool:
  """Whether `path` (str or os.PathLike; a URL included) exists."""
  return _call(path, "read", lambda p: p.exists())


def isdir(path) -> bool:
  """Whether `path` (a local path or a URL) is a folder."""
  return _call(path, "read", lambda p: p.is_dir())


def isfile(path) -> bool:
  """Whether `path` (a local path or a URL) exists and is not a folder."""
  return _call(path, "read", lambda p: p.is_file())


def listdir(path) -> list[str]:
  """The names in the folder `path` (a local path or a URL), sorted; names ending in "~"
  (editors' backups) are left out, by epath on local folders as by gfile on URLs.

  Raises:
    FileNotFoundError: there is no such folder; OSError: another OS error (local paths).
    UserError: a URL's storage library failed, naming `path`.
  """
  return sorted(_call(path, "list", lambda p: [c.name for c in p.iterdir()],
                      local_errors=False))


def makedirs(path) -> None:
  """Makes the folder `path` (a local path or a URL) and its parents; no error if it exists.

  Raises:
    UserError: it cannot be made (OS or storage library error), naming `path`.
  """
  try:
    _call(path, "write", lambda p: p.mkdir(parents=True, exist_ok=True))
  except FileNotFoundError as e:
    raise _failure(path, e, "write") from e


def remove(path) -> None:
  """Removes the file `path` (a local path or a URL); no error if it is already gone.

  Raises:
    UserError: it cannot be removed (OS or storage library error), naming `path`.
  """
  _call(path, "remove", lambda p: p.unlink(missing_ok=True))


def rmtree(path) -> None:
  """Removes the folder `path` (a local path or a URL) with everything in it; no error if
  it is already gone.

  Raises:
    UserError: it cannot be removed (OS or storage library error), naming `path`.
  """
  _call(path, "remove", lambda p: p.rmtree(missing_ok=True))


def size(path) -> int:
  """The size in bytes of the file `path` (a local path or a URL's object).

  Raises:
    FileNotFoundError: there is no such file; OSError: another OS error (local paths).
    UserError: a URL's storage library failed, naming `path`.
  """
  if not paths.is_url(path):
    # Not epath's stat(): on a local path it also looks up the owner's user and group
    # names, which raises KeyError for a uid with no passwd entry (containers, clusters).
    return os.path.getsize(path)
  return _call(path, "read", lambda p: p.stat().length)


def open_read(path):
  """A binary file object of `path` for reading (a local path or a URL), seekable.

  Raises:
    FileNotFoundError / OSError as open() raises them; UserError where a URL's storage
      library fails, naming `path`.
  """
  return _call(path, "read", lambda p: p.open("rb"), local_errors=False)

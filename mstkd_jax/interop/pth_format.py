"""The PyTorch `.pth` file format (torch.save's zip of a pickle and raw storages), read and
written without PyTorch: state_dicts of any network as numpy arrays.

Reading never runs code from the file: a restricted unpickler rebuilds the state_dict as
numpy arrays and refuses every global that is not needed for that. Writing produces the
zip format that `torch.load(path, weights_only=True)` reads. Finding the state_dict in
what a file holds is torch_checkpoint.py's; what its names mean, the mappings'.
"""

import collections
import math
import os
import pickle
import struct
import sys
import zipfile
from typing import Any, Callable, Mapping, NamedTuple

import ml_dtypes
import numpy as np

from mstkd_jax import files
from mstkd_jax.errors import UserError

# The first bytes of PyTorch's legacy (pre-1.6, non-zip) format: pickle protocol 2, then
# the magic number 0x1950a86a20f9469cfc6c as LONG1.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),  # Raw bytes; _rebuild_tensor_v3 names the dtype.
}
_STORAGE_NAMES = {dtype: name for name, dtype in _STORAGE_DTYPES.items()
                  if name != "UntypedStorage"}

# torch.<dtype> globals, as `_rebuild_tensor_v3` records them (e.g. for uint16 tensors).
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32,
    "float": np.float32, "float16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64,
    "complex128": np.complex128,
}

_ARCHIVE_NAME = "archive"
_STORAGE_ALIGNMENT = 64  # torch.save aligns storage bytes to 64 (lets torch mmap them).


class _StorageType(NamedTuple):
  """Stands in for a torch storage class (a tuple: pickle's BUILD cannot alter it)."""
  name: str
  dtype: np.dtype


class _DType(NamedTuple):
  """Stands in for a torch.dtype global."""
  name: str
  dtype: np.dtype


class _Storage(NamedTuple):
  """One storage read from the archive: a flat array of its dtype."""
  key: str
  data: np.ndarray


def _int_tuple(value, what):
  if (not isinstance(value, tuple) or
      not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
    raise ValueError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
  return value


def _view(storage, offset, size, stride, dtype=None):
  """Copies tensor `size`/`stride` at element `offset` out of `storage`, bounds-checked."""
  if not isinstance(storage, _Storage):
    raise ValueError(f"expected a storage, got {type(storage).__name__}")
  data = storage.data if dtype is None else storage.data.view(dtype)
  if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
    raise ValueError(f"bad storage offset {offset!r}")
  size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  if len(size) != len(stride):
    raise ValueError(f"size {size} and stride {stride} differ in length")
  if math.prod(size) == 0:
    return np.zeros(size, data.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= data.size:
    raise ValueError(f"tensor of size {size}, stride {stride}, offset {offset} reads past "
                     f"the end of storage {storage.key!r} ({data.size} elements)")
  # A size-1 dimension's stride is never used; torch allows any value there.
  strides = [s * data.itemsize if n > 1 else 0 for n, s in zip(size, stride)]
  view = np.lib.stride_tricks.as_strided(data[offset:], shape=size, strides=strides,
                                         writeable=False)
  return np.array(view, order="C")


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward_hooks, metadata: nothing to rebuild in numpy.
  return _view(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
  del requires_grad, hooks, unused
  if not isinstance(storage, _Storage) or not isinstance(dtype, _DType):
    raise ValueError(f"expected a storage and a torch dtype, got "
                     f"{type(storage).__name__}, {type(dtype).__name__}")
  if storage.data.size % dtype.dtype.itemsize:
    raise ValueError(f"storage {storage.key!r} is not a whole number of {dtype.name}")
  return _view(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, *unused):
  del unused  # requires_grad, backward_hooks, state.
  if not isinstance(data, np.ndarray):
    raise ValueError(f"expected a tensor inside the parameter, got {type(data).__name__}")
  return data


class _Rebuilder:
  """Wraps a rebuild function so that a pickle's BUILD opcode cannot modify it."""
  __slots__ = ("_function",)

  def __init__(self, function):
    object.__setattr__(self, "_function", function)

  def __setattr__(self, name, value):
    raise AttributeError("read-only")

  def __call__(self, *args):
    return self._function(*args)


def _safe_globals() -> dict[tuple[str, str], Any]:
  """The only globals a state_dict needs, each mapped to a replacement that runs no torch."""
  table = {("collections", "OrderedDict"): collections.OrderedDict}
  for name, function in (("_rebuild_tensor", _rebuild_tensor),
                         ("_rebuild_tensor_v2", _rebuild_tensor),
                         ("_rebuild_tensor_v3", _rebuild_tensor_v3),
                         ("_rebuild_parameter", _rebuild_parameter),
                         ("_rebuild_parameter_with_state", _rebuild_parameter)):
    table[("torch._utils", name)] = _Rebuilder(function)
  for module in ("torch", "torch.cuda"):  # Old torch spelled GPU storages torch.cuda.X.
    for name, dtype in _STORAGE_DTYPES.items():
      table[(module, name)] = _StorageType(name, dtype)
  table[("torch.storage", "UntypedStorage")] = table[("torch", "UntypedStorage")]
  for name, dtype in _TORCH_DTYPES.items():
    table[("torch", name)] = _DType(name, np.dtype(dtype))
  return table


_SAFE_GLOBALS = _safe_globals()


class _RefusedGlobal(Exception):
  """Raised by the unpickler for a global outside the allow-list."""


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a torch.save'd state_dict, resolving only `_SAFE_GLOBALS`."""

  def __init__(self, file, read_storage: Callable[[str, _StorageType, int], _Storage]):
    super().__init__(file)
    self._read_storage = read_storage

  def find_class(self, module, name):
    try:
      return _SAFE_GLOBALS[(module, name)]
    except KeyError:
      raise _RefusedGlobal(f"{module}.{name}") from None

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage" or
        not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str) or
        not isinstance(pid[4], int) or pid[4] < 0):
      raise ValueError(f"unsupported persistent id {pid!r}")
    return self._read_storage(pid[2], pid[1], pid[4])


def _byteswapped(raw: bytes, dtype: np.dtype) -> np.ndarray:
  """Reads `raw` of the other byte order as `dtype` (complex numbers swap per part)."""
  unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
  if unit == 1:
    return np.frombuffer(raw, dtype).copy()
  words = np.frombuffer(raw, np.dtype(f"u{unit}")).byteswap()
  return words.view(dtype)


def _open_archive(path: str) -> zipfile.ZipFile:
  """Opens the zip archive of a .pth, or says what else the file is."""
  try:
    with open(path, "rb") as f:
      head = f.read(len(_LEGACY_MAGIC))
  except OSError as e:
    raise UserError(f"cannot read PyTorch checkpoint {path}: {e}") from e
  if zipfile.is_zipfile(path):
    try:
      return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
      raise UserError(f"{path} is a corrupt zip archive, expected a PyTorch checkpoint: "
                      f"{e}") from e
  if head.startswith(_LEGACY_MAGIC):
    raise UserError(
        f"{path} is in PyTorch's legacy (pre-1.6, non-zip) format, which is read only by "
        f"running its pickle; expected the zip format. Re-save it once with PyTorch, in an "
        f"environment you trust: torch.save(torch.load(old, map_location='cpu'), new)")
  if head.startswith(b"PK\x03\x04"):
    raise UserError(f"{path} is a truncated or corrupt zip archive (no central "
                    f"directory); expected a complete PyTorch checkpoint")
  raise UserError(f"{path} is not a PyTorch checkpoint: expected a zip archive as written "
                  f"by torch.save (PyTorch >= 1.6)")


def _unpickle_archive(path: str, archive: zipfile.ZipFile):
  """Returns the object pickled in the archive's data.pkl, tensors as numpy arrays."""
  names = archive.namelist()
  pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
  if len(pickles) != 1:
    raise UserError(f"{path} is a zip archive but not a PyTorch checkpoint: expected one "
                    f"<name>/data.pkl, found {len(pickles)}")
  prefix = pickles[0][:-len("data.pkl")]
  if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
    raise UserError(f"{path} is a TorchScript archive; expected a state_dict saved with "
                    f"torch.save(model.state_dict(), path)")
  storages: dict[str, _Storage] = {}
  swap = False

  def read_storage(key, storage_type, numel):
    if key not in storages:
      record = f"{prefix}data/{key}"
      if record not in names:
        raise ValueError(f"storage record {record!r} is missing")
      raw = archive.read(record)
      dtype = storage_type.dtype
      if len(raw) != numel * dtype.itemsize:
        raise ValueError(f"storage record {record!r} holds {len(raw)} bytes, expected "
                         f"{numel} x {dtype.itemsize}")
      data = _byteswapped(raw, dtype) if swap else np.frombuffer(raw, dtype)
      storages[key] = _Storage(key, data)
    elif storages[key].data.dtype != storage_type.dtype:
      raise ValueError(f"storage {key!r} is used with two dtypes")
    return storages[key]

  try:
    byteorder = b"little"  # What torch assumes for files without the record.
    if f"{prefix}byteorder" in names:
      byteorder = archive.read(f"{prefix}byteorder")
      if byteorder not in (b"little", b"big"):
        raise ValueError(f"unknown byteorder record {byteorder[:20]!r}")
    swap = byteorder.decode() != sys.byteorder
    with archive.open(pickles[0]) as f:
      return _StateDictUnpickler(f, read_storage).load()
  except _RefusedGlobal as e:
    raise UserError(
        f"{path}: refused to load the global {e} (a pickle can run code when loaded); "
        f"expected a state_dict of tensors, which needs only torch tensor/storage globals "
        f"and collections.OrderedDict") from None
  except MemoryError:
    raise
  except Exception as e:  # Anything a malformed pickle or archive can raise.
    raise UserError(f"{path} is not a readable PyTorch checkpoint: "
                    f"{type(e).__name__}: {e}") from e


def read_object(path: str) -> Any:
  """The object a zip-format .pth holds, its tensors as numpy arrays, running no code.

  Raises:
    UserError: the file is missing, not a zip-format PyTorch checkpoint (legacy format,
      TorchScript, truncated, corrupt), or its pickle names any global other than torch
      tensor/storage rebuilders and collections.OrderedDict.
  """
  with _open_archive(path) as archive:
    return _unpickle_archive(path, archive)


# --- Writing ---------------------------------------------------------------------------


def _pickle_int(n: int) -> bytes:
  if 0 <= n < 1 << 8:
    return b"K" + struct.pack("<B", n)
  if 0 <= n < 1 << 16:
    return b"M" + struct.pack("<H", n)
  if -(1 << 31) <= n < 1 << 31:
    return b"J" + struct.pack("<i", n)
  encoded = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
  return b"\x8a" + struct.pack("<B", len(encoded)) + encoded


def _pickle_str(s: str) -> bytes:
  encoded = s.encode("utf-8")
  return b"X" + struct.pack("<I", len(encoded)) + encoded


def _pickle_global(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode("ascii")


def _pickle_int_tuple(values) -> bytes:
  return b"(" + b"".join(_pickle_int(v) for v in values) + b"t"


def _state_dict_pickle(items: list[tuple[str, str, np.ndarray]]) -> bytes:
  """Protocol-2 pickle of an OrderedDict of tensors, as torch.save writes it.

  Written opcode by opcode because pickling a reference to torch._utils needs torch.
  Each item is (key, storage key, C-contiguous array).
  """
  ordered_dict = _pickle_global("collections", "OrderedDict") + b")R"
  out = [b"\x80\x02", ordered_dict, b"("]
  for key, storage_key, array in items:
    strides = [s // array.itemsize for s in array.strides]
    out += [
        _pickle_str(key), _pickle_global("torch._utils", "_rebuild_tensor_v2"), b"(",
        b"(", _pickle_str("storage"), _pickle_global("torch", _STORAGE_NAMES[array.dtype]),
        _pickle_str(storage_key), _pickle_str("cpu"), _pickle_int(array.size), b"tQ",
        _pickle_int(0), _pickle_int_tuple(array.shape), _pickle_int_tuple(strides),
        b"\x89", ordered_dict, b"tR",
    ]
  out.append(b"u.")
  return b"".join(out)


def _write_aligned(f, archive: zipfile.ZipFile, name: str, data: bytes) -> None:
  """Stores `data` uncompressed with its bytes starting on a 64-byte boundary, as torch."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  header = 30 + len(name.encode("utf-8")) + 4  # Local header, name, extra-field header.
  pad = -(f.tell() + header) % _STORAGE_ALIGNMENT
  info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
  archive.writestr(info, data)


def save_state_dict(path: str | os.PathLike, state_dict: Mapping[str, Any]) -> None:
  """Writes a PyTorch zip-format .pth that `torch.load(path, weights_only=True)` reads.

  The file is written to a temporary name in the same folder, then renamed over `path`.

  Args:
    path: where to write.
    state_dict: names to arrays (numpy or JAX) of float16/32/64, bfloat16, ints, bool.

  Raises:
    UserError: an array has a dtype PyTorch storages lack, or `path` cannot be written.
  """
  path = os.fspath(path)
  items = []
  for i, (key, value) in enumerate(state_dict.items()):
    array = np.asarray(value, order="C")
    if array.dtype.byteorder not in "=|":
      array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype not in _STORAGE_NAMES:
      raise UserError(f"cannot save {key!r} to {path}: dtype {array.dtype} has no PyTorch "
                      f"storage; expected float, int, bool or complex")
    items.append((key, str(i), array))
  with files.atomic_path(path) as tmp_path:  # OS errors: one line naming `path`
    with open(tmp_path, "wb") as f:
      with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
        _write_aligned(f, archive, f"{_ARCHIVE_NAME}/data.pkl", _state_dict_pickle(items))
        _write_aligned(f, archive, f"{_ARCHIVE_NAME}/byteorder", sys.byteorder.encode())
        for _, storage_key, array in items:
          _write_aligned(f, archive, f"{_ARCHIVE_NAME}/data/{storage_key}", array.tobytes())
        _write_aligned(f, archive, f"{_ARCHIVE_NAME}/version", b"3\n")
      f.flush()
      os.fsync(f.fileno())

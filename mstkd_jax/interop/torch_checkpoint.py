"""PyTorch `.pth` IResNet checkpoints (insightface / MST-KD) in and out, without PyTorch.

Reading never runs code from the file: a restricted unpickler rebuilds the state_dict as
numpy arrays and refuses every global that is not needed for that. Writing produces the
zip format that `torch.load(path, weights_only=True)` reads.
"""

import collections
import math
import os
import pickle
import re
import struct
import sys
import zipfile
from typing import Any, Callable, Mapping, NamedTuple

from flax import traverse_util
import flax.core
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


# Where trainers keep the model's state_dict inside a larger checkpoint dict, most
# specific first: arcface_torch's resume checkpoint (checkpoint_gpu_<rank>.pt) holds
# state_dict_backbone next to state_dict_softmax_fc, optimizer and scheduler states; others
# use state_dict (Lightning, timm), model / model_state_dict (torchvision references, the
# PyTorch tutorials), net / network, or backbone.
STATE_DICT_KEYS = ("state_dict_backbone", "backbone", "state_dict", "model_state_dict",
                   "model", "net", "network", "module")
_MODULE_PREFIX = "module."  # DataParallel / DistributedDataParallel parameter names.


def _is_tensor_dict(obj) -> bool:
  return isinstance(obj, dict) and all(isinstance(v, np.ndarray) for v in obj.values())


def _find_state_dict(path: str, obj, where: tuple[str, ...] = ()
                     ) -> tuple[dict, tuple[str, ...]]:
  """Returns (the state_dict in `obj`, the keys leading to it: () when it is `obj`)."""
  if not isinstance(obj, dict):
    raise UserError(f"{path}: expected a state_dict (a dict of tensors), found a "
                    f"{type(obj).__name__}" + (f" under {_key_path(where)}" if where else ""))
  if _is_tensor_dict(obj):
    return obj, where
  for key in STATE_DICT_KEYS:
    if isinstance(obj.get(key), dict):
      return _find_state_dict(path, obj[key], where + (key,))
  holders = [repr(k) for k, v in obj.items() if _is_tensor_dict(v) and v]
  others = [repr(k) for k, v in obj.items() if not isinstance(v, np.ndarray)]
  found = (f"dicts of tensors under {', '.join(holders[:10])}" if holders else
           f"non-tensor entries {', '.join(others[:10])}{' ...' if len(others) > 10 else ''}")
  place = f" (under {_key_path(where)})" if where else ""
  raise UserError(f"{path}: expected a state_dict (a dict of tensors) or a dict holding one "
                  f"under one of {', '.join(repr(k) for k in STATE_DICT_KEYS)}{place}, found "
                  f"{found}")


def _key_path(keys: tuple[str, ...]) -> str:
  return "".join(f"[{k!r}]" for k in keys)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
  """Reads a PyTorch zip-format .pth state_dict, running no code; also says where it was.

  The state_dict is the file's object itself, or the one under the first of
  STATE_DICT_KEYS a checkpoint dict holds (recursively; e.g. arcface_torch's resume
  checkpoint: ['state_dict_backbone']). Whatever else the file holds (optimizer and
  scheduler states, epoch, ...) is read with the same restricted unpickler and dropped.
  The "module." prefix of DataParallel/DistributedDataParallel models is stripped.

  Args:
    path: the .pth file (as written by `torch.save`, PyTorch >= 1.6).

  Returns:
    (state_dict in file order with tensors as numpy arrays of their dtype (bfloat16 as
    ml_dtypes.bfloat16), a note such as "state_dict under ['state_dict_backbone'],
    'module.' prefix removed"; "" when the file is a plain state_dict).

  Raises:
    UserError: the file is missing, truncated, holds no state_dict, or its pickle names
      any global other than torch tensor/storage rebuilders and collections.OrderedDict.
  """
  path = os.fspath(path)
  with _open_archive(path) as archive:
    obj = _unpickle_archive(path, archive)
  state_dict, where = _find_state_dict(path, obj)
  if not all(isinstance(k, str) for k in state_dict):
    raise UserError(f"{path}: expected string keys in the state_dict"
                    + (f" under {_key_path(where)}" if where else ""))
  notes = [f"state_dict under {_key_path(where)}"] if where else []
  if state_dict and all(k.startswith(_MODULE_PREFIX) for k in state_dict):
    state_dict = {k[len(_MODULE_PREFIX):]: v for k, v in state_dict.items()}
    notes.append(f"{_MODULE_PREFIX!r} prefix removed")
  return dict(state_dict), ", ".join(notes)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch zip-format .pth state_dict as numpy arrays, running no code from it.

  As `read_state_dict`, without the note: a checkpoint dict is searched for the
  state_dict under STATE_DICT_KEYS and the "module." prefix is stripped.

  Args:
    path: the .pth file (as written by `torch.save`, PyTorch >= 1.6).

  Returns:
    The state_dict in file order; tensors keep their dtype (bfloat16 as ml_dtypes.bfloat16).

  Raises:
    UserError: the file is missing, truncated, not a state_dict, or its pickle names any
      global other than torch tensor/storage rebuilders and collections.OrderedDict.
  """
  return read_state_dict(path)[0]


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


# --- IResNet name and layout mapping ---------------------------------------------------

_BLOCK_NAME = re.compile(r"layer(\d+)_(\d+)")
_TORCH_MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1",
                  "se": "se_block"}
_TORCH_LEAVES = {"scale": "weight", "alpha": "weight", "mean": "running_mean",
                 "var": "running_var", "bias": "bias", "kernel": "weight"}
# PyTorch state_dict order: registration order of modules, then parameters and buffers.
_TOP_ORDER = ("conv1", "bn1", "prelu", "layer", "bn2", "fc", "features")
_BLOCK_ORDER = ("bn1", "conv1", "bn2", "prelu", "conv2", "bn3", "downsample.0",
                "downsample.1", "se_block.fc1", "se_block.fc2")
_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _rank(name: str, order: tuple[str, ...]) -> int:
  return order.index(name) if name in order else len(order)


def _torch_order(key: str):
  """Sort key putting torch names in the order a PyTorch IResNet's state_dict has them."""
  module, _, leaf = key.rpartition(".")
  block = re.match(r"layer(\d+)\.(\d+)\.(.*)", module)
  if block:
    stage, index, inner = block.groups()
    return (_rank("layer", _TOP_ORDER), int(stage), int(index),
            _rank(inner, _BLOCK_ORDER), _rank(leaf, _LEAF_ORDER), key)
  return (_rank(module, _TOP_ORDER), 0, 0, 0, _rank(leaf, _LEAF_ORDER), key)


class _Entry(NamedTuple):
  """One tensor: where it lives in Flax, its torch name and shape, and the converters."""
  flax_path: tuple[str, ...]  # (collection, module, ..., leaf)
  torch_key: str
  torch_shape: tuple[int, ...]
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


def _torch_module(flax_modules: tuple[str, ...]) -> str:
  parts = []
  for name in flax_modules:
    block = _BLOCK_NAME.fullmatch(name)
    parts.append(f"layer{block[1]}.{block[2]}" if block else _TORCH_MODULES.get(name, name))
  return ".".join(parts)


def _fc_layout(params, kernel_shape, feature_hw):
  """Returns (height, width, channels) of the feature map flattened into fc."""
  channels = params["bn2"]["scale"].shape[0]
  if feature_hw is None:
    side = math.isqrt(kernel_shape[0] // channels)
    feature_hw = (side, side)
  height, width = feature_hw
  if height * width * channels != kernel_shape[0]:
    raise UserError(
        f"fc takes {kernel_shape[0]} inputs, not a {height}x{width}x{channels} feature map; "
        f"pass feature_hw=(height, width) of the last feature map (input size / 16)")
  return height, width, channels


def _entries(variables, feature_hw) -> list[_Entry]:
  """Lists every tensor of a Flax IResNet's variables with its PyTorch counterpart."""
  variables = flax.core.unfreeze(variables)
  extra = set(variables) - {"params", "batch_stats"}
  if extra or "params" not in variables:
    raise ValueError(f"expected IResNet variables with 'params' and 'batch_stats', got "
                     f"collections {sorted(variables)}")
  entries = []
  for path, leaf in traverse_util.flatten_dict(variables).items():
    modules, name = path[1:-1], path[-1]
    shape = tuple(leaf.shape)
    same = lambda x: x
    to_flax, to_torch, torch_shape = same, same, shape
    if name == "kernel" and len(shape) == 4:  # Conv: HWIO here, OIHW in PyTorch.
      to_flax = lambda x: x.transpose(2, 3, 1, 0)
      to_torch = lambda x: x.transpose(3, 2, 0, 1)
      torch_shape = (shape[3], shape[2], shape[0], shape[1])
    elif name == "kernel" and modules == ("fc",):
      # PyTorch flattens CHW and stores [out, in]; we flatten HWC and store [in, out].
      h, w, c = _fc_layout(variables["params"], shape, feature_hw)
      out = shape[1]
      to_flax = (lambda x, h=h, w=w, c=c, out=out:
                 x.reshape(out, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, out))
      to_torch = (lambda x, h=h, w=w, c=c, out=out:
                  x.reshape(h, w, c, out).transpose(3, 2, 0, 1).reshape(out, c * h * w))
      torch_shape = (out, shape[0])
    elif name not in _TORCH_LEAVES or len(shape) != 1:
      raise ValueError(f"no PyTorch counterpart for IResNet variable {'/'.join(path)} "
                       f"of shape {shape}")
    key = f"{_torch_module(modules)}.{_TORCH_LEAVES[name]}"
    entries.append(_Entry(path, key, torch_shape, to_flax, to_torch))
  return entries


def _architecture_hint(state_dict) -> str:
  """Describes the IResNet a state_dict seems to hold (depths, width, embedding, SE)."""
  blocks = collections.defaultdict(set)
  for key in state_dict:
    match = re.match(r"layer(\d+)\.(\d+)\.", key)
    if match:
      blocks[int(match[1])].add(int(match[2]))
  depths = tuple(len(blocks[s]) for s in sorted(blocks))
  names = {(2, 2, 2, 2): "iresnet18", (3, 4, 6, 3): "iresnet34",
           (3, 4, 14, 3): "iresnet50", (3, 13, 30, 3): "iresnet100"}
  parts = [f"stage depths {depths}" + (f" ({names[depths]})" if depths in names else "")]
  if getattr(state_dict.get("conv1.weight"), "ndim", 0) == 4:
    parts.append(f"width {state_dict['conv1.weight'].shape[0]}")
  if getattr(state_dict.get("fc.weight"), "ndim", 0) == 2:
    parts.append(f"embedding_size {state_dict['fc.weight'].shape[0]}")
  parts.append("use_se=" + str(any(".se_block." in k for k in state_dict)))
  return "the checkpoint looks like: " + ", ".join(parts)


def _listing(title, lines, limit=12) -> str:
  shown = "\n    ".join(lines[:limit])
  more = f"\n    ... and {len(lines) - limit} more" if len(lines) > limit else ""
  return f"\n  {title} ({len(lines)}):\n    {shown}{more}"


def import_iresnet(state_dict: Mapping[str, np.ndarray], template_variables, *,
                   source: str = "state_dict",
                   feature_hw: tuple[int, int] | None = None) -> dict[str, Any]:
  """Converts a PyTorch insightface/MST-KD IResNet state_dict into our Flax variables.

  Args:
    state_dict: from `load_state_dict` (names like layer1.0.conv1.weight).
    template_variables: variables of the target model (`model.init` or `jax.eval_shape`);
      they fix the expected names, shapes and dtypes.
    source: what to call the state_dict in error messages (e.g. its file name).
    feature_hw: (height, width) of the last feature map; default square (7x7 at 112x112).

  Returns:
    {"params": ..., "batch_stats": ...} as nested dicts of numpy arrays.

  Raises:
    UserError: names missing, unexpected or mis-shaped tensors (all in one message), or a
      features.weight other than ones (our embedding BatchNorm has no scale).
  """
  entries = _entries(template_variables, feature_hw)
  embedding = flax.core.unfreeze(template_variables)["params"]["features"]["bias"].shape
  expected = {e.torch_key: e.torch_shape for e in entries}
  expected["features.weight"] = tuple(embedding)
  missing = [k for k in expected if k not in state_dict]
  unexpected = [k for k in state_dict
                if k not in expected and not k.endswith(".num_batches_tracked")]
  misshaped = [f"{k}: expected {expected[k]}, found {tuple(np.shape(state_dict[k]))}"
               for k in sorted(expected, key=_torch_order)
               if k in state_dict and tuple(np.shape(state_dict[k])) != expected[k]]
  if missing or unexpected or misshaped:
    message = f"{source} does not fit this IResNet ({len(expected)} tensors expected)"
    for title, keys in (("missing keys", sorted(missing, key=_torch_order)),
                        ("unexpected keys", sorted(unexpected, key=_torch_order)),
                        ("mis-shaped keys", misshaped)):
      if keys:
        message += _listing(title, keys)
    raise UserError(message + "\n  " + _architecture_hint(state_dict))
  features_weight = np.asarray(state_dict["features.weight"], np.float64)
  if not np.allclose(features_weight, 1.0, rtol=0.0, atol=1e-6):
    raise UserError(
        f"{source}: features.weight must be all ones (insightface fixes it to 1; our "
        f"embedding BatchNorm has no scale), found values in "
        f"[{features_weight.min():.6g}, {features_weight.max():.6g}]")
  flat = {}
  template = traverse_util.flatten_dict(flax.core.unfreeze(template_variables))
  for entry in entries:
    value = np.asarray(state_dict[entry.torch_key]).astype(template[entry.flax_path].dtype)
    flat[entry.flax_path] = np.asarray(entry.to_flax(value), order="C")
  return traverse_util.unflatten_dict(flat)


def export_iresnet(variables, *,
                   feature_hw: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """Converts our Flax IResNet variables into an insightface/MST-KD PyTorch state_dict.

  Adds what PyTorch has and we do not: features.weight (ones) and every BatchNorm's
  num_batches_tracked (int64 0).

  Args:
    variables: {"params": ..., "batch_stats": ...} of an IResNet.
    feature_hw: (height, width) of the last feature map; default square.

  Returns:
    The state_dict in PyTorch's order, float32 arrays (shapes as in PyTorch).
  """
  state_dict = {}
  flat = traverse_util.flatten_dict(flax.core.unfreeze(variables))
  for entry in _entries(variables, feature_hw):
    value = np.asarray(flat[entry.flax_path], np.float32)
    state_dict[entry.torch_key] = np.asarray(entry.to_torch(value), order="C")
  for key in list(state_dict):
    if key.endswith(".running_var"):
      state_dict[key[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  state_dict["features.weight"] = np.ones_like(state_dict["features.bias"])
  return {k: state_dict[k] for k in sorted(state_dict, key=_torch_order)}


def _note_to_stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def load_iresnet(path: str | os.PathLike, template_variables, *,
                 feature_hw: tuple[int, int] | None = None,
                 log: Callable[[str], None] | None = _note_to_stderr) -> dict[str, Any]:
  """Reads a .pth IResNet checkpoint into Flax variables shaped like `template_variables`.

  Args:
    path: a state_dict, or a checkpoint dict holding one (see `read_state_dict`).
    template_variables: variables of the target model (see `import_iresnet`).
    feature_hw: (height, width) of the last feature map; default square.
    log: receives one line saying where the state_dict was found, when it was not the
      file's object itself (default: stderr; None: silent).

  Returns:
    {"params": ..., "batch_stats": ...} as nested dicts of numpy arrays.

  Raises:
    UserError: as `read_state_dict` and `import_iresnet`; messages name the file and key.
  """
  path = os.fspath(path)
  state_dict, note = read_state_dict(path)
  if note and log is not None:
    log(f"note: {path}: using the {note}")
  source = f"{path} ({note})" if note else path
  return import_iresnet(state_dict, template_variables, source=source, feature_hw=feature_hw)

"""insightface verification .bin: a pickle of (encoded images, issame); pair k = images 2k, 2k+1.

Loading uses an allow-list unpickler, since a pickle can run arbitrary code when loaded. What
it accepts is what insightface's loader (`pickle.load(f, encoding="bytes")`) reads in files
built the usual ways: images as `bytes` or as numpy uint8 arrays (OpenCV's `imencode` gives
shape (N, 1)), issame as a list of bools, of numpy bool scalars or of 0/1 integers, or as a
numpy bool/integer array. Only plain numpy arrays and scalars of bool and integer dtypes
are rebuilt, from their raw bytes (numpy 1.x pickles name numpy.core.multiarray, numpy 2.x
numpy._core.multiarray); every other global is refused before anything runs.
"""

import math
import os
import pickle
import struct
import tempfile
from typing import Iterator, Sequence

import numpy as np

from mstkd_jax.formats.image_tree import decode_image
from mstkd_jax.formats.rfw import VerificationPair
from mstkd_jax.errors import UserError

_BYTE_ORDERS = ("|", "<", ">", "=")
# The dtypes a pickled array or scalar may have: numpy pickles dtype(<str without byte
# order>), e.g. "b1", "u1", "i8"; older files may spell the name out.
_PLAIN_DTYPES = {}
for _code, _name in (("b1", "bool"), ("u1", "uint8"), ("i1", "int8"), ("u2", "uint16"),
                     ("i2", "int16"), ("u4", "uint32"), ("i4", "int32"), ("u8", "uint64"),
                     ("i8", "int64")):
  _PLAIN_DTYPES[_code] = _PLAIN_DTYPES[_name] = np.dtype(_code)


class _Refused(Exception):
  """Raised inside the unpickler; becomes a UserError naming the file."""


def _text(value) -> str:
  # py2 pickles loaded with encoding='bytes' give bytes where py3 pickles give str.
  return value.decode("latin1") if isinstance(value, bytes) else value


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


class _StandIn:
  """Base of the unpickler's stand-ins: refuses pickle BUILD state unless overridden."""
  __slots__ = ()

  def __setstate__(self, state):
    raise _Refused(f"state for {type(self).__name__} is not allowed")


class _NdarrayClass(_StandIn):
  """Stands for numpy.ndarray as the first argument of _reconstruct."""
  __slots__ = ()


_NDARRAY = _NdarrayClass()


class _Dtype(_StandIn):
  """Stands for a plain numpy dtype; its byte order comes with the state numpy pickles."""
  __slots__ = ("base", "dtype")

  def __init__(self, base: np.dtype):
    self.base = base
    self.dtype = None

  def __setstate__(self, state):
    # numpy's dtype state: (version, byte order, subarray, names, fields, elsize,
    # alignment, flags[, metadata]); plain dtypes have no subarray, names or fields.
    if self.dtype is not None:
      raise _Refused("numpy dtype state given twice")
    if not (isinstance(state, tuple) and len(state) >= 5 and state[0] in (3, 4)
            and _text(state[1]) in _BYTE_ORDERS and state[2] is None and state[3] is None
            and state[4] is None and all(v is None for v in state[8:9])):
      raise _Refused(f"unexpected numpy dtype state {state!r:.80}")
    order = _text(state[1])
    self.dtype = self.base.newbyteorder(order) if order in "<>" else self.base

  def built(self) -> np.dtype:
    if self.dtype is None:
      raise _Refused("numpy dtype used before its state was set")
    return self.dtype


def _check_bools(raw: bytes, dtype: np.dtype):
  # A numpy bool is one byte, 0 or 1; other bytes are not a bool numpy would have written.
  if dtype.kind == "b" and raw and max(raw) > 1:
    raise _Refused("numpy bool data with bytes other than 0 and 1")


def _array_from_raw(raw, dtype, shape, fortran: bool) -> "_Array":
  """Checks and wraps the raw bytes of a plain array (they are its memory, in order)."""
  if isinstance(raw, pickle.PickleBuffer):
    raw = bytes(raw.raw())
  if not (isinstance(dtype, _Dtype) and isinstance(raw, (bytes, bytearray))
          and isinstance(shape, tuple) and all(_is_int(n) and n >= 0 for n in shape)):
    raise _Refused("numpy array that is not a plain bool or integer array")
  dtype = dtype.built()
  if math.prod(shape) * dtype.itemsize != len(raw):
    raise _Refused(f"numpy array of shape {shape} and dtype {dtype.str} with {len(raw)} "
                   "bytes of data")
  _check_bools(raw, dtype)
  array = np.frombuffer(bytes(raw), dtype).reshape(shape, order="F" if fortran else "C")
  return _Array(array, bytes(raw))


class _Array(_StandIn):
  """Stands for a plain ndarray: made empty by _reconstruct, filled by its state."""
  __slots__ = ("array", "raw")

  def __init__(self, array: np.ndarray | None = None, raw: bytes | None = None):
    self.array = array
    self.raw = raw

  def __setstate__(self, state):
    # numpy's ndarray state: ([version,] shape, dtype, is_fortran, raw bytes).
    if self.array is not None:
      raise _Refused("numpy array state given twice")
    if isinstance(state, tuple) and len(state) == 5:
      state = state[1:]
    if not (isinstance(state, tuple) and len(state) == 4 and state[2] in (0, 1)):
      raise _Refused("unexpected numpy array state")
    shape, dtype, fortran, raw = state
    built = _array_from_raw(raw, dtype, shape, bool(fortran))
    self.array, self.raw = built.array, built.raw


class _Scalar(_StandIn):
  """Stands for a numpy scalar of a plain dtype (numpy.bool_, numpy.int64, ...)."""
  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value


class _Guard(_StandIn):
  """A callable stand-in for an allowed global; each checks its own arguments."""
  __slots__ = ("_fn",)

  def __init__(self, fn):
    self._fn = fn

  def __call__(self, *args):
    return self._fn(*args)


def _reconstruct(cls, shape, typecode):
  if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
    raise _Refused("numpy _reconstruct with unexpected arguments")
  return _Array()


def _frombuffer(buf, dtype, shape, order):
  # numpy's protocol-5 form of a contiguous array.
  if _text(order) not in ("C", "F"):
    raise _Refused("numpy _frombuffer with unexpected arguments")
  return _array_from_raw(buf, dtype, shape, _text(order) == "F")


def _scalar(dtype, raw=None):
  # numpy's scalar pickle: scalar(dtype, raw bytes of one item).
  if not (isinstance(dtype, _Dtype) and isinstance(raw, (bytes, bytearray))):
    raise _Refused("numpy scalar with unexpected arguments")
  dtype = dtype.built()
  if len(raw) != dtype.itemsize:
    raise _Refused(f"numpy scalar of dtype {dtype.str} with {len(raw)} bytes")
  _check_bools(raw, dtype)
  return _Scalar(np.frombuffer(bytes(raw), dtype)[0])


def _dtype(name, align=False, copy=True):
  del align, copy
  base = _PLAIN_DTYPES.get(_text(name)) if isinstance(name, (str, bytes)) else None
  if base is None:
    raise _Refused(f"numpy dtype {name!r:.40} (only bool and integer dtypes are accepted)")
  return _Dtype(base)


def _codecs_encode(text, encoding="utf-8"):
  # Protocols 0-2 store bytes as _codecs.encode(<latin-1 str>, 'latin1').
  if not isinstance(text, str) or encoding != "latin1":
    raise _Refused("_codecs.encode with unexpected arguments")
  return text.encode("latin1")


def _bytes(*args):
  # Protocols 0-2 store b'' as bytes(); bytes(<int>) would allocate, so accept no ints.
  if not args:
    return b""
  if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
    return bytes(args[0])
  raise _Refused("bytes() with unexpected arguments")


def _bool(*args):
  if args and not (len(args) == 1 and isinstance(args[0], (bool, int))):
    raise _Refused("bool() with unexpected arguments")
  return bool(*args)


def _sequence(kind):
  def build(*args):
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
      raise _Refused(f"{kind.__name__}() with unexpected arguments")
    return kind(*args)
  return build


_ALLOWED = {}
for _module in ("builtins", "__builtin__"):
  _ALLOWED[(_module, "bytes")] = _Guard(_bytes)
  _ALLOWED[(_module, "list")] = _Guard(_sequence(list))
  _ALLOWED[(_module, "tuple")] = _Guard(_sequence(tuple))
  _ALLOWED[(_module, "bool")] = _Guard(_bool)
_ALLOWED[("_codecs", "encode")] = _Guard(_codecs_encode)
_ALLOWED[("numpy", "ndarray")] = _NDARRAY
_ALLOWED[("numpy", "dtype")] = _Guard(_dtype)
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
  _ALLOWED[(_module, "_reconstruct")] = _Guard(_reconstruct)
  _ALLOWED[(_module, "scalar")] = _Guard(_scalar)
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
  _ALLOWED[(_module, "_frombuffer")] = _Guard(_frombuffer)


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the allow-listed globals, each to a checking stand-in."""

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise _Refused(f"global {module}.{name} is not allowed") from None

  def persistent_load(self, pid):
    raise _Refused("persistent ids are not allowed")


def _describe(value) -> str:
  if isinstance(value, _Array):
    if value.array is None:
      return "an incomplete numpy array"
    return f"a numpy {value.array.dtype.name} array of shape {value.array.shape}"
  if isinstance(value, _Scalar):
    return f"a numpy {value.value.dtype.name} scalar"
  return "an incomplete numpy object" if isinstance(value, _StandIn) else (
      f"a {type(value).__name__}")


def _as_image_bytes(value, path: str, k: int) -> bytes:
  if isinstance(value, bytes):
    return value
  if isinstance(value, bytearray):
    return bytes(value)
  if isinstance(value, _Array) and value.array is not None and value.array.dtype == np.uint8:
    # The array's memory, as insightface's imdecode(np.frombuffer(...)) reads it.
    return value.raw
  raise UserError(f"{path}: image {k} is {_describe(value)}; expected encoded image bytes or "
                  "a uint8 numpy array")


def _as_issame(value, path: str, k: int) -> bool:
  if isinstance(value, _Scalar):
    value = value.value.item()
  elif isinstance(value, _Array) and value.array is not None and value.array.ndim == 0:
    value = value.array.item()
  # py2 pickles and numpy-built lists may hold 0/1 ints; anything else would be a guess.
  if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
    return bool(value)
  shown = _describe(value) if isinstance(value, _StandIn) else f"{value!r:.40}"
  raise UserError(f"{path}: issame[{k}] is {shown}; expected True/False (or 0/1)")


def _issame_items(value, path: str) -> list:
  if isinstance(value, (list, tuple)):
    return list(value)
  array = value.array
  if array is None or array.ndim != 1:
    raise UserError(f"{path}: issame is {_describe(value)}; expected a list or a 1-D array of "
                    "True/False (or 0/1)")
  return array.tolist()


def load_verification_bin(path: str) -> tuple[list[bytes], list[bool]]:
  """Loads (encoded images, issame) with a restricted unpickler, executing nothing.

  Returns:
    (images, issame): 2N encoded images as bytes and N Python bools; pair k is images
    2k and 2k+1.

  Raises:
    UserError: naming the file: missing, not a pickle, a refused global (anything but the
      builtins of plain lists/tuples/bytes/bools and plain numpy arrays/scalars of bool and
      integer dtypes), not a pair (images, issame), an image that is not bytes or a uint8
      array, an issame that is not a bool or 0/1, or not two images per pair.
  """
  path = os.fspath(path)
  expected = ("expected an insightface verification .bin: a pickle of (list of encoded "
              "images, list of bools)")
  try:
    with open(path, "rb") as f:
      obj = _RestrictedUnpickler(f, encoding="bytes").load()
  except FileNotFoundError:
    raise UserError(f"{path}: verification .bin does not exist") from None
  except _Refused as e:
    raise UserError(f"{path}: refused to load: {e}; {expected}") from None
  except Exception as e:  # Truncated or not a pickle: EOFError, UnpicklingError, ...
    raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); "
                    f"{expected}") from None
  if not (isinstance(obj, (tuple, list)) and len(obj) == 2
          and isinstance(obj[0], (list, tuple))
          and isinstance(obj[1], (list, tuple, _Array))):
    raise UserError(f"{path}: holds a {type(obj).__name__}; {expected}")
  raw_images, raw_issame = obj
  images = [_as_image_bytes(v, path, k) for k, v in enumerate(raw_images)]
  issame = [_as_issame(v, path, k) for k, v in enumerate(_issame_items(raw_issame, path))]
  if len(images) != 2 * len(issame):
    raise UserError(f"{path}: {len(images)} images for {len(issame)} pairs; expected exactly "
                    "two images per pair")
  return images, issame


class VerificationBinWriter:
  """Streams pairs into an insightface .bin without holding the images in memory.

  It emits the protocol-4 pickle opcodes for (list of bytes, list of bools) directly:
  images are appended one by one and only the issame list is kept until close().
  """

  def __init__(self, path: str):
    self.path = os.fspath(path)
    # A unique name next to the target: concurrent writers never share a partial file.
    fd, self._tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(self.path)),
                                     prefix=f".{os.path.basename(self.path)}.",
                                     suffix=".partial")
    os.chmod(self._tmp, 0o644)  # mkstemp makes it owner-only; a data file is shareable
    self._f = os.fdopen(fd, "wb")
    self._issame: list[bool] = []
    self._f.write(b"\x80\x04]")  # PROTO 4, EMPTY_LIST (the images).

  def add_pair(self, image1: bytes, image2: bytes, same: bool):
    for image in (image1, image2):
      image = bytes(image)
      if len(image) < 1 << 32:
        self._f.write(b"B" + struct.pack("<I", len(image)))  # BINBYTES
      else:
        self._f.write(b"\x8e" + struct.pack("<Q", len(image)))  # BINBYTES8
      self._f.write(image)
      self._f.write(b"a")  # APPEND
    self._issame.append(bool(same))

  def close(self) -> int:
    """Finishes the file (atomically renamed into place); returns the number of pairs."""
    # EMPTY_LIST, MARK, NEWTRUE/NEWFALSE..., APPENDS, TUPLE2, STOP.
    flags = b"".join(b"\x88" if v else b"\x89" for v in self._issame)
    self._f.write(b"](" + flags + b"e\x86.")
    self._f.close()
    os.replace(self._tmp, self.path)
    return len(self._issame)

  def abort(self):
    """Closes and removes the partial file."""
    self._f.close()
    if os.path.exists(self._tmp):
      os.remove(self._tmp)


def write_verification_bin(path: str, images: Sequence[bytes], issame: Sequence[bool]) -> None:
  """Writes (images, issame) as an insightface .bin (a protocol-4 pickle), atomically."""
  if len(images) != 2 * len(issame):
    raise UserError(f"{path}: {len(images)} images for {len(issame)} pairs; expected two "
                    "images per pair")
  writer = VerificationBinWriter(path)
  try:
    for k, same in enumerate(issame):
      writer.add_pair(images[2 * k], images[2 * k + 1], same)
  except BaseException:
    writer.abort()
    raise
  writer.close()


def iter_verification_pairs(path: str, validate: bool = False) -> Iterator[VerificationPair]:
  """Yields the pairs of a .bin in order; sources are "<path>#<image index>"."""
  images, issame = load_verification_bin(path)
  for k, same in enumerate(issame):
    sources = (f"{path}#{2 * k}", f"{path}#{2 * k + 1}")
    if validate:
      decode_image(images[2 * k], sources[0])
      decode_image(images[2 * k + 1], sources[1])
    yield VerificationPair(images[2 * k], images[2 * k + 1], same, *sources)


def decode_verification_images(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a whole .bin to uint8 [2N, H, W, 3] images and bool [N] issame (same-size images)."""
  images, issame = load_verification_bin(path)
  arrays = [decode_image(b, f"{path}#{k}") for k, b in enumerate(images)]
  shapes = {a.shape for a in arrays}
  if len(shapes) > 1:
    raise UserError(f"{path}: images have different sizes {sorted(shapes)}; expected one size")
  return np.stack(arrays) if arrays else np.zeros((0, 0, 0, 3), np.uint8), np.array(issame)

"""An allow-list unpickler for pickles of plain data, since a pickle can run arbitrary code
when loaded.

It accepts the builtins of plain lists, tuples, bytes and bools (and protocols 0-2's
_codecs.encode of bytes), and plain numpy arrays and scalars of bool and integer dtypes,
rebuilt from their raw bytes (numpy 1.x pickles name numpy.core.multiarray, numpy 2.x
numpy._core.multiarray). Every other global, and any state or argument a plain object would
not have, is refused (`Refused`) before anything runs. Arrays and scalars come back as the
stand-ins `Array` and `Scalar`, for the caller to check and unwrap.
"""

import math
import pickle

import numpy as np

_BYTE_ORDERS = ("|", "<", ">", "=")
# The dtypes a pickled array or scalar may have: numpy pickles dtype(<str without byte
# order>), e.g. "b1", "u1", "i8"; older files may spell the name out.
_PLAIN_DTYPES = {}
for _code, _name in (("b1", "bool"), ("u1", "uint8"), ("i1", "int8"), ("u2", "uint16"),
                     ("i2", "int16"), ("u4", "uint32"), ("i4", "int32"), ("u8", "uint64"),
                     ("i8", "int64")):
  _PLAIN_DTYPES[_code] = _PLAIN_DTYPES[_name] = np.dtype(_code)


class Refused(Exception):
  """Raised inside the unpickler; its message says what was refused (the caller names the
  file)."""


def _text(value) -> str:
  # py2 pickles loaded with encoding='bytes' give bytes where py3 pickles give str.
  return value.decode("latin1") if isinstance(value, bytes) else value


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


class StandIn:
  """Base of the unpickler's stand-ins: refuses pickle BUILD state unless overridden."""
  __slots__ = ()

  def __setstate__(self, state):
    raise Refused(f"state for {type(self).__name__} is not allowed")


class _NdarrayClass(StandIn):
  """Stands for numpy.ndarray as the first argument of _reconstruct."""
  __slots__ = ()


_NDARRAY = _NdarrayClass()


class _Dtype(StandIn):
  """Stands for a plain numpy dtype; its byte order comes with the state numpy pickles."""
  __slots__ = ("base", "dtype")

  def __init__(self, base: np.dtype):
    self.base = base
    self.dtype = None

  def __setstate__(self, state):
    # numpy's dtype state: (version, byte order, subarray, names, fields, elsize,
    # alignment, flags[, metadata]); plain dtypes have no subarray, names or fields.
    if self.dtype is not None:
      raise Refused("numpy dtype state given twice")
    if not (isinstance(state, tuple) and len(state) >= 5 and state[0] in (3, 4)
            and _text(state[1]) in _BYTE_ORDERS and state[2] is None and state[3] is None
            and state[4] is None and all(v is None for v in state[8:9])):
      raise Refused(f"unexpected numpy dtype state {state!r:.80}")
    order = _text(state[1])
    self.dtype = self.base.newbyteorder(order) if order in "<>" else self.base

  def built(self) -> np.dtype:
    if self.dtype is None:
      raise Refused("numpy dtype used before its state was set")
    return self.dtype


def _check_bools(raw: bytes, dtype: np.dtype):
  # A numpy bool is one byte, 0 or 1; other bytes are not a bool numpy would have written.
  if dtype.kind == "b" and raw and max(raw) > 1:
    raise Refused("numpy bool data with bytes other than 0 and 1")


def _array_from_raw(raw, dtype, shape, fortran: bool) -> "Array":
  """Checks and wraps the raw bytes of a plain array (they are its memory, in order)."""
  if isinstance(raw, pickle.PickleBuffer):
    raw = bytes(raw.raw())
  if not (isinstance(dtype, _Dtype) and isinstance(raw, (bytes, bytearray))
          and isinstance(shape, tuple) and all(_is_int(n) and n >= 0 for n in shape)):
    raise Refused("numpy array that is not a plain bool or integer array")
  dtype = dtype.built()
  if math.prod(shape) * dtype.itemsize != len(raw):
    raise Refused(f"numpy array of shape {shape} and dtype {dtype.str} with {len(raw)} "
                   "bytes of data")
  _check_bools(raw, dtype)
  array = np.frombuffer(bytes(raw), dtype).reshape(shape, order="F" if fortran else "C")
  return Array(array, bytes(raw))


class Array(StandIn):
  """Stands for a plain ndarray: made empty by _reconstruct, filled by its state."""
  __slots__ = ("array", "raw")

  def __init__(self, array: np.ndarray | None = None, raw: bytes | None = None):
    self.array = array
    self.raw = raw

  def __setstate__(self, state):
    # numpy's ndarray state: ([version,] shape, dtype, is_fortran, raw bytes).
    if self.array is not None:
      raise Refused("numpy array state given twice")
    if isinstance(state, tuple) and len(state) == 5:
      state = state[1:]
    if not (isinstance(state, tuple) and len(state) == 4 and state[2] in (0, 1)):
      raise Refused("unexpected numpy array state")
    shape, dtype, fortran, raw = state
    built = _array_from_raw(raw, dtype, shape, bool(fortran))
    self.array, self.raw = built.array, built.raw


class Scalar(StandIn):
  """Stands for a numpy scalar of a plain dtype (numpy.bool_, numpy.int64, ...)."""
  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value


class _Guard(StandIn):
  """A callable stand-in for an allowed global; each checks its own arguments."""
  __slots__ = ("_fn",)

  def __init__(self, fn):
    self._fn = fn

  def __call__(self, *args):
    return self._fn(*args)


def _reconstruct(cls, shape, typecode):
  if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
    raise Refused("numpy _reconstruct with unexpected arguments")
  return Array()


def _frombuffer(buf, dtype, shape, order):
  # numpy's protocol-5 form of a contiguous array.
  if _text(order) not in ("C", "F"):
    raise Refused("numpy _frombuffer with unexpected arguments")
  return _array_from_raw(buf, dtype, shape, _text(order) == "F")


def _scalar(dtype, raw=None):
  # numpy's scalar pickle: scalar(dtype, raw bytes of one item).
  if not (isinstance(dtype, _Dtype) and isinstance(raw, (bytes, bytearray))):
    raise Refused("numpy scalar with unexpected arguments")
  dtype = dtype.built()
  if len(raw) != dtype.itemsize:
    raise Refused(f"numpy scalar of dtype {dtype.str} with {len(raw)} bytes")
  _check_bools(raw, dtype)
  return Scalar(np.frombuffer(bytes(raw), dtype)[0])


def _dtype(name, align=False, copy=True):
  del align, copy
  base = _PLAIN_DTYPES.get(_text(name)) if isinstance(name, (str, bytes)) else None
  if base is None:
    raise Refused(f"numpy dtype {name!r:.40} (only bool and integer dtypes are accepted)")
  return _Dtype(base)


def _codecs_encode(text, encoding="utf-8"):
  # Protocols 0-2 store bytes as _codecs.encode(<latin-1 str>, 'latin1').
  if not isinstance(text, str) or encoding != "latin1":
    raise Refused("_codecs.encode with unexpected arguments")
  return text.encode("latin1")


def _bytes(*args):
  # Protocols 0-2 store b'' as bytes(); bytes(<int>) would allocate, so accept no ints.
  if not args:
    return b""
  if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
    return bytes(args[0])
  raise Refused("bytes() with unexpected arguments")


def _bool(*args):
  if args and not (len(args) == 1 and isinstance(args[0], (bool, int))):
    raise Refused("bool() with unexpected arguments")
  return bool(*args)


def _sequence(kind):
  def build(*args):
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
      raise Refused(f"{kind.__name__}() with unexpected arguments")
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


class RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the allow-listed globals, each to a checking stand-in."""

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise Refused(f"global {module}.{name} is not allowed") from None

  def persistent_load(self, pid):
    raise Refused("persistent ids are not allowed")


def describe(value) -> str:
  """What a loaded value is, for messages: "a numpy uint8 array of shape (2, 1)", "a list"."""
  if isinstance(value, Array):
    if value.array is None:
      return "an incomplete numpy array"
    return f"a numpy {value.array.dtype.name} array of shape {value.array.shape}"
  if isinstance(value, Scalar):
    return f"a numpy {value.value.dtype.name} scalar"
  return "an incomplete numpy object" if isinstance(value, StandIn) else (
      f"a {type(value).__name__}")

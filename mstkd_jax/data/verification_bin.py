"""insightface verification .bin: a pickle of (encoded images, issame); pair k = images 2k, 2k+1.

Loading uses an allow-list unpickler, since a pickle can run arbitrary code when loaded.
"""

import os
import pickle
import struct
from typing import Iterator, Sequence

import numpy as np

from mstkd_jax.data.image_tree import decode_image
from mstkd_jax.data.rfw import VerificationPair
from mstkd_jax.errors import UserError

_BYTE_ORDERS = ("|", "<", ">", "=")


class _Refused(Exception):
  """Raised inside the unpickler; becomes a UserError naming the file."""


def _text(value) -> str:
  # py2 pickles loaded with encoding='bytes' give bytes where py3 pickles give str.
  return value.decode("latin1") if isinstance(value, bytes) else value


class _StandIn:
  """Base of the unpickler's stand-ins: refuses pickle BUILD state unless overridden."""
  __slots__ = ()

  def __setstate__(self, state):
    raise _Refused(f"state for {type(self).__name__} is not allowed")


class _NdarrayClass(_StandIn):
  """Stands for numpy.ndarray as the first argument of _reconstruct."""
  __slots__ = ()


_NDARRAY = _NdarrayClass()


class _Uint8Dtype(_StandIn):
  """Stands for numpy.dtype('u1'); checks the state numpy pickles with it."""
  __slots__ = ()

  def __setstate__(self, state):
    if not (isinstance(state, tuple) and len(state) >= 5 and state[0] in (3, 4)
            and _text(state[1]) in _BYTE_ORDERS and state[2] is None and state[3] is None
            and state[4] is None):
      raise _Refused(f"unexpected numpy dtype state {state!r:.80}")


class _Uint8Array(_StandIn):
  """Stands for a 1-D uint8 ndarray being rebuilt by numpy's _reconstruct + __setstate__."""
  __slots__ = ("data",)

  def __init__(self, data=None):
    self.data = data

  def __setstate__(self, state):
    # numpy's ndarray state: ([version,] shape, dtype, is_fortran, raw bytes).
    if self.data is not None:
      raise _Refused("numpy array state given twice")
    if isinstance(state, tuple) and len(state) == 5:
      state = state[1:]
    if not (isinstance(state, tuple) and len(state) == 4):
      raise _Refused("unexpected numpy array state")
    shape, dtype, _, raw = state
    if not (isinstance(dtype, _Uint8Dtype) and isinstance(shape, tuple) and len(shape) == 1
            and isinstance(shape[0], int) and isinstance(raw, (bytes, bytearray))
            and len(raw) == shape[0]):
      raise _Refused("numpy array that is not a 1-D uint8 array")
    self.data = bytes(raw)


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
  return _Uint8Array()


def _frombuffer(buf, dtype, shape, order):
  # numpy's protocol-5 form of a contiguous array.
  if isinstance(buf, pickle.PickleBuffer):
    buf = bytes(buf.raw())
  if not (isinstance(buf, (bytes, bytearray)) and isinstance(dtype, _Uint8Dtype)
          and shape == (len(buf),) and _text(order) in ("C", "F")):
    raise _Refused("numpy array that is not a 1-D uint8 array")
  return _Uint8Array(bytes(buf))


def _dtype(name, align=False, copy=True):
  del align, copy
  if _text(name) not in ("u1", "uint8"):
    raise _Refused(f"numpy dtype {name!r:.40} (only uint8 is accepted)")
  return _Uint8Dtype()


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


def _as_image_bytes(value, path: str, k: int) -> bytes:
  if isinstance(value, bytes):
    return value
  if isinstance(value, bytearray):
    return bytes(value)
  if isinstance(value, _Uint8Array) and value.data is not None:
    return value.data
  kind = "an incomplete numpy array" if isinstance(value, _StandIn) else (
      f"a {type(value).__name__}")
  raise UserError(f"{path}: image {k} is {kind}; expected encoded image bytes or a 1-D uint8 "
                  "numpy array")


def load_verification_bin(path: str) -> tuple[list[bytes], list[bool]]:
  """Loads (encoded images, issame) with a restricted unpickler; UserError on anything else."""
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
          and all(isinstance(v, (list, tuple)) for v in obj)):
    raise UserError(f"{path}: holds a {type(obj).__name__}; {expected}")
  raw_images, raw_issame = obj
  images = [_as_image_bytes(v, path, k) for k, v in enumerate(raw_images)]
  issame = []
  for k, v in enumerate(raw_issame):
    # py2 pickles may hold 0/1 ints; anything else would be a guess.
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
      issame.append(bool(v))
    else:
      raise UserError(f"{path}: issame[{k}] is {v!r:.40}; expected True/False")
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
    self._tmp = self.path + ".partial"
    self._f = open(self._tmp, "wb")
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

"""insightface verification .bin: a pickle of (encoded images, issame); pair k = images 2k, 2k+1.

Loading uses the allow-list unpickler of restricted_pickle.py, since a pickle can run
arbitrary code when loaded. What it accepts is what insightface's loader
(`pickle.load(f, encoding="bytes")`) reads in files built the usual ways: images as `bytes`
or as numpy uint8 arrays (OpenCV's `imencode` gives shape (N, 1)), issame as a list of
bools, of numpy bool scalars or of 0/1 integers, or as a numpy bool/integer array.
"""

import os
import struct
import tempfile
from typing import Iterator, Sequence

import numpy as np

from mstkd_jax.errors import UserError
from mstkd_jax.formats.image_tree import decode_image
from mstkd_jax.formats.restricted_pickle import Array, Refused, RestrictedUnpickler, Scalar
from mstkd_jax.formats.restricted_pickle import StandIn, describe
from mstkd_jax.formats.rfw import VerificationPair


def _as_image_bytes(value, path: str, k: int) -> bytes:
  if isinstance(value, bytes):
    return value
  if isinstance(value, bytearray):
    return bytes(value)
  if isinstance(value, Array) and value.array is not None and value.array.dtype == np.uint8:
    # The array's memory, as insightface's imdecode(np.frombuffer(...)) reads it.
    return value.raw
  raise UserError(f"{path}: image {k} is {describe(value)}; expected encoded image bytes or "
                  "a uint8 numpy array")


def _as_issame(value, path: str, k: int) -> bool:
  if isinstance(value, Scalar):
    value = value.value.item()
  elif isinstance(value, Array) and value.array is not None and value.array.ndim == 0:
    value = value.array.item()
  # py2 pickles and numpy-built lists may hold 0/1 ints; anything else would be a guess.
  if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
    return bool(value)
  shown = describe(value) if isinstance(value, StandIn) else f"{value!r:.40}"
  raise UserError(f"{path}: issame[{k}] is {shown}; expected True/False (or 0/1)")


def _issame_items(value, path: str) -> list:
  if isinstance(value, (list, tuple)):
    return list(value)
  array = value.array
  if array is None or array.ndim != 1:
    raise UserError(f"{path}: issame is {describe(value)}; expected a list or a 1-D array of "
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
      obj = RestrictedUnpickler(f, encoding="bytes").load()
  except FileNotFoundError:
    raise UserError(f"{path}: verification .bin does not exist") from None
  except Refused as e:
    raise UserError(f"{path}: refused to load: {e}; {expected}") from None
  except Exception as e:  # Truncated or not a pickle: EOFError, UnpicklingError, ...
    raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); "
                    f"{expected}") from None
  if not (isinstance(obj, (tuple, list)) and len(obj) == 2
          and isinstance(obj[0], (list, tuple))
          and isinstance(obj[1], (list, tuple, Array))):
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

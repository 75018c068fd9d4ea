"""RecordIO framing and MXNet's image record header (the layout of dmlc-core's recordio.h
and MXNet's recordio.pack/unpack).

A record: uint32 magic, uint32 (continuation flag << 29 | length), payload padded to 4 bytes.
An image record's payload: header (uint32 flag, float32 label, uint64 id, uint64 id2), then
`flag` float32 labels when flag > 0, then the encoded image.
"""

import math
import struct
from typing import NamedTuple, Sequence

import numpy as np

from mstkd_jax.errors import UserError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
HEAD = struct.Struct("<II")
LENGTH_BITS = 29
LENGTH_MASK = (1 << LENGTH_BITS) - 1
# MXNet's image record header: flag, label, id, id2; flag > 0 means `flag` float32 labels follow.
IR_HEADER = struct.Struct("<IfQQ")
FLAG_LABEL = struct.Struct("<If")
FLOAT32 = struct.Struct("<f")
# Keys and labels live in float32 header labels; above 2**24 they stop being exact.
MAX_FLOAT_INT = 1 << 24


class IRHeader(NamedTuple):
  """An image record header; label is a float when flag == 0, else a tuple of `flag` floats."""
  flag: int
  label: float | tuple[float, ...]
  id: int
  id2: int


def pack_image_record(image: bytes, label: float | Sequence[float], id_: int = 0,
                      id2: int = 0) -> bytes:
  """Returns the payload of an image record (MXNet's recordio.pack)."""
  if isinstance(label, (int, float, np.integer, np.floating)):
    return IR_HEADER.pack(0, float(label), id_, id2) + bytes(image)
  values = np.asarray(label, dtype="<f4").ravel()
  return IR_HEADER.pack(len(values), 0.0, id_, id2) + values.tobytes() + bytes(image)


def unpack_image_record(payload: bytes, source: str) -> tuple[IRHeader, bytes]:
  """Splits a record payload into its header and image bytes (MXNet's recordio.unpack)."""
  if len(payload) < IR_HEADER.size:
    raise UserError(f"{source}: record of {len(payload)} bytes; expected at least the "
                    f"{IR_HEADER.size}-byte image record header")
  flag, label, id_, id2 = IR_HEADER.unpack_from(payload)
  rest = payload[IR_HEADER.size:]
  if flag > 0:
    if len(rest) < 4 * flag:
      raise UserError(f"{source}: header announces {flag} float32 labels but the record has "
                      f"{len(rest)} bytes after the header")
    label = tuple(float(v) for v in np.frombuffer(rest, dtype="<f4", count=flag))
    rest = rest[4 * flag:]
  return IRHeader(flag, label, id_, id2), bytes(rest)


def _encode_head(cflag: int, length: int) -> bytes:
  if length > LENGTH_MASK:
    raise UserError(f"record part of {length} bytes; RecordIO allows at most {LENGTH_MASK}")
  return HEAD.pack(MAGIC, (cflag << LENGTH_BITS) | length)


def encode_record(payload: bytes) -> bytes:
  """Returns a payload as RecordIO bytes, split where it holds the magic as dmlc-core does.

  A 4-aligned copy of the magic inside a payload would look like a record start to readers
  that resync on it, so the payload is cut there and the magic dropped; readers put it back.
  """
  payload = bytes(payload)
  out = []
  start = search = 0
  aligned_end = len(payload) - len(payload) % 4
  while True:
    i = payload.find(MAGIC_BYTES, search, aligned_end)
    if i < 0:
      break
    if i % 4:
      search = i + 1
      continue
    out.append(_encode_head(1 if not out else 2, i - start))
    out.append(payload[start:i])
    start = search = i + 4
  out.append(_encode_head(3 if out else 0, len(payload) - start))
  out.append(payload[start:])
  out.append(b"\0" * (-len(payload) % 4))
  return b"".join(out)


def label_int(value: float, source: str) -> int:
  """`value` (a float32 header label) as a non-negative int; UserError naming `source` else."""
  if not (math.isfinite(value) and value >= 0 and float(value).is_integer()):
    raise UserError(f"{source}: label {value!r}; expected a non-negative integer")
  return int(value)


def head_header(head: bytes, source: str) -> IRHeader:
  """The image record header in the first bytes of a payload, with at most two labels."""
  if len(head) < IR_HEADER.size:
    raise UserError(f"{source}: record of {len(head)} bytes; expected at least the "
                    f"{IR_HEADER.size}-byte image record header")
  flag, label, id_, id2 = IR_HEADER.unpack_from(head)
  if flag > 0:
    count = min(flag, 2)
    if len(head) < IR_HEADER.size + 4 * count:
      raise UserError(f"{source}: header announces {flag} float32 labels but the record has "
                      f"{len(head) - IR_HEADER.size} bytes after the header")
    label = tuple(float(v) for v in np.frombuffer(head, "<f4", count=count,
                                                  offset=IR_HEADER.size))
  return IRHeader(flag, label, id_, id2)

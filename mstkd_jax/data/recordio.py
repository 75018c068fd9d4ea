"""MXNet RecordIO (insightface train.rec + train.idx) reader and writer, without MXNet.

A record: uint32 magic, uint32 (continuation flag << 29 | length), payload padded to 4 bytes.
"""

import array
import json
import math
import os
import struct
import sys
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

from mstkd_jax.data.image_tree import DatasetIndex
from mstkd_jax.data.image_tree import FaceRecord
from mstkd_jax.data.image_tree import decode_image
from mstkd_jax import errors
from mstkd_jax.errors import UserError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEAD = struct.Struct("<II")
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
# MXNet's image record header: flag, label, id, id2; flag > 0 means `flag` float32 labels follow.
_IR = struct.Struct("<IfQQ")
_FLAG_LABEL = struct.Struct("<If")
_FLOAT32 = struct.Struct("<f")
# Keys and labels live in float32 header labels; above 2**24 they stop being exact.
_MAX_FLOAT_INT = 1 << 24
NAMES_FORMAT = "mstkd_jax.identities"


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
    return _IR.pack(0, float(label), id_, id2) + bytes(image)
  values = np.asarray(label, dtype="<f4").ravel()
  return _IR.pack(len(values), 0.0, id_, id2) + values.tobytes() + bytes(image)


def unpack_image_record(payload: bytes, source: str) -> tuple[IRHeader, bytes]:
  """Splits a record payload into its header and image bytes (MXNet's recordio.unpack)."""
  if len(payload) < _IR.size:
    raise UserError(f"{source}: record of {len(payload)} bytes; expected at least the "
                    f"{_IR.size}-byte image record header")
  flag, label, id_, id2 = _IR.unpack_from(payload)
  rest = payload[_IR.size:]
  if flag > 0:
    if len(rest) < 4 * flag:
      raise UserError(f"{source}: header announces {flag} float32 labels but the record has "
                      f"{len(rest)} bytes after the header")
    label = tuple(float(v) for v in np.frombuffer(rest, dtype="<f4", count=flag))
    rest = rest[4 * flag:]
  return IRHeader(flag, label, id_, id2), bytes(rest)


def _encode_head(cflag: int, length: int) -> bytes:
  if length > _LENGTH_MASK:
    raise UserError(f"record part of {length} bytes; RecordIO allows at most {_LENGTH_MASK}")
  return _HEAD.pack(MAGIC, (cflag << _LENGTH_BITS) | length)


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
    i = payload.find(_MAGIC_BYTES, search, aligned_end)
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


class RecordIOReader:
  """Reads raw RecordIO records, sequentially or by key through the .idx.

  Attributes:
    rec_path: the .rec file.
    idx_path: the .idx file, or None when there is none.
  """

  def __init__(self, rec_path: str, idx_path: str | None = None):
    """Opens the .rec; idx_path None uses <rec without .rec>.idx when it exists."""
    self.rec_path = os.fspath(rec_path)
    if idx_path is None:
      guess = os.path.splitext(self.rec_path)[0] + ".idx"
      idx_path = guess if os.path.isfile(guess) else None
    self.idx_path = None if idx_path is None else os.fspath(idx_path)
    try:
      self._f = open(self.rec_path, "rb")
    except FileNotFoundError:
      raise UserError(f"{self.rec_path}: RecordIO file does not exist") from None
    except IsADirectoryError:
      raise UserError(f"{self.rec_path}: expected a .rec file, found a folder") from None
    self._size = os.fstat(self._f.fileno()).st_size
    self._keys = self._offsets = self._lines = self._order = self._by_offset = None
    self._dense = False
    if self.idx_path is not None:
      try:
        self._load_idx()
      except BaseException:
        self._f.close()
        raise

  def _load_idx(self):
    # Compact int64 arrays: an .idx can list tens of millions of records.
    keys, offsets, lines = array.array("q"), array.array("q"), array.array("q")
    try:
      f = open(self.idx_path, encoding="ascii")
    except FileNotFoundError:
      raise UserError(f"{self.idx_path}: RecordIO index file does not exist") from None
    with f:
      try:
        for number, line in enumerate(f, start=1):
          fields = line.split()
          if not fields:
            continue
          if len(fields) != 2 or not fields[0].isdigit() or not fields[1].isdigit():
            raise UserError(f"{self.idx_path}:{number}: cannot parse {line.strip()!r:.60}; "
                            'expected "<key>\\t<byte offset>"')
          key, offset = int(fields[0]), int(fields[1])
          if offset + _HEAD.size > self._size:
            raise UserError(f"{self.idx_path}:{number}: record {key} at byte {offset} lies past "
                            f"the end of {self.rec_path} ({self._size} bytes); the .rec is "
                            "truncated or the .idx belongs to another .rec")
          if offset % 4:
            raise UserError(f"{self.idx_path}:{number}: record {key} at byte {offset} is not "
                            "4-byte aligned as RecordIO records are; expected the .idx written "
                            "with this .rec")
          keys.append(key)
          offsets.append(offset)
          lines.append(number)
      except UnicodeDecodeError as e:
        raise UserError(f"{self.idx_path}: not a text index ({e}); expected lines "
                        '"<key>\\t<byte offset>"') from None
    self._keys = np.frombuffer(keys, dtype=np.int64)
    self._offsets = np.frombuffer(offsets, dtype=np.int64)
    self._lines = np.frombuffer(lines, dtype=np.int64)
    self._order = np.argsort(self._keys, kind="stable")
    sorted_keys = self._keys[self._order]
    dup = np.nonzero(sorted_keys[1:] == sorted_keys[:-1])[0]
    if dup.size:
      key = int(sorted_keys[dup[0]])
      raise UserError(f"{self.idx_path}: key {key} appears on more than one line; expected "
                      "each record key once")
    # The usual index lists keys 0..n-1 in order; then a key is its own position.
    self._dense = bool(np.array_equal(self._keys, np.arange(len(keys))))

  @property
  def keys(self) -> np.ndarray:
    """Record keys in .idx order (int64); UserError when there is no .idx."""
    self._require_idx()
    return self._keys

  def _require_idx(self):
    if self._keys is None:
      raise UserError(f"{self.rec_path}: no .idx file next to it; expected "
                      f"{os.path.splitext(self.rec_path)[0]}.idx for reading records by key")

  def _position(self, key: int) -> int:
    self._require_idx()
    if self._dense:
      return key if 0 <= key < len(self._keys) else -1
    i = int(np.searchsorted(self._keys, key, sorter=self._order))
    if i < len(self._keys) and self._keys[self._order[i]] == key:
      return int(self._order[i])
    return -1

  def has_key(self, key: int) -> bool:
    return self._position(key) >= 0

  def read(self, key: int) -> bytes:
    """Returns the payload of the record `key` (continuation parts joined)."""
    i = self._position(int(key))
    if i < 0:
      raise UserError(f"{self.idx_path}: no record with key {key}; expected it listed in the "
                      ".idx")
    payload, _ = self._read_at(int(self._offsets[i]), self._where(i), from_idx=True)
    return payload

  def read_head(self, key: int, size: int) -> bytes:
    """Returns the first `size` bytes of record `key`'s payload (all of it if shorter).

    Reads only those bytes when the record's first part holds them, which makes scanning
    the labels of millions of image records cheap; otherwise (a short first part of a
    multi-part record, or anything odd) it falls back to `read`, which checks everything.
    """
    i = self._position(int(key))
    if i >= 0:
      offset = self._offsets.item(i)
      self._f.seek(offset)
      head = self._f.read(_HEAD.size + size)
      if len(head) >= _HEAD.size:
        magic, lrec = _HEAD.unpack_from(head)
        cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
        inside = offset + _HEAD.size + length + (-length % 4) <= self._size
        if magic == MAGIC and inside and (cflag == 0 or (cflag == 1 and length >= size)):
          available = head[_HEAD.size:_HEAD.size + length]
          if len(available) == min(length, size):
            return available
    return self.read(key)[:size]

  def _where(self, i: int) -> str:
    return (f"record {int(self._keys[i])} at byte {int(self._offsets[i])} (from "
            f"{self.idx_path} line {int(self._lines[i])})")

  def _index_at_offset(self, offset: int) -> int:
    """Position in the .idx of the record at `offset`, or -1."""
    if self._by_offset is None:
      self._by_offset = np.argsort(self._offsets, kind="stable")
    j = int(np.searchsorted(self._offsets, offset, sorter=self._by_offset))
    if j < len(self._offsets) and self._offsets[self._by_offset[j]] == offset:
      return int(self._by_offset[j])
    return -1

  def _read_at(self, offset: int, where: str, from_idx: bool) -> tuple[bytes, int]:
    """Reads the record starting at `offset`; returns (payload, offset after it)."""
    hint = ("; expected the .idx written with this .rec" if from_idx else
            "; the .rec is corrupt or not a RecordIO file")
    parts = []
    pos = offset
    while True:
      self._f.seek(pos)
      head = self._f.read(_HEAD.size)
      if len(head) < _HEAD.size:
        raise UserError(f"{self.rec_path}: {where}: file ends inside a record header at byte "
                        f"{pos}; the .rec is truncated")
      magic, lrec = _HEAD.unpack(head)
      if magic != MAGIC:
        raise UserError(f"{self.rec_path}: {where}: expected RecordIO magic 0x{MAGIC:08x} at "
                        f"byte {pos}, found 0x{magic:08x}{hint}")
      cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
      if cflag not in ((0, 1) if not parts else (2, 3)):
        raise UserError(f"{self.rec_path}: {where}: continuation flag {cflag} at byte {pos}; "
                        f'expected {"0 or 1 (record start)" if not parts else "2 or 3"}{hint}')
      padded = length + (-length % 4)
      if pos + _HEAD.size + padded > self._size:
        raise UserError(f"{self.rec_path}: {where}: length field says {length} bytes at byte "
                        f"{pos} but only {self._size - pos - _HEAD.size} remain; the .rec is "
                        "truncated or the length is wrong")
      parts.append(self._f.read(length))
      pos += _HEAD.size + padded
      if cflag in (0, 3):
        break
    if from_idx and pos < self._size:
      # A wrong length still lands inside the file; the next record must start right here.
      self._f.seek(pos)
      if self._f.read(4) != _MAGIC_BYTES:
        j = self._index_at_offset(pos)
        if j >= 0:  # This length agrees with the .idx: blame the record that starts there.
          self._read_at(pos, self._where(j), from_idx=False)
        raise UserError(f"{self.rec_path}: {where}: the record should end at byte {pos} but no "
                        "record starts there; its length field is wrong or the file is corrupt")
    return _MAGIC_BYTES.join(parts), pos

  def __iter__(self) -> Iterator[tuple[int, bytes]]:
    """Yields (byte offset, payload) of every record in file order; needs no .idx."""
    pos = 0
    n = 0
    while pos < self._size:
      payload, end = self._read_at(pos, f"record #{n} in file order", from_idx=False)
      yield pos, payload
      pos = end
      n += 1

  def close(self):
    self._f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class RecordIOWriter:
  """Writes raw RecordIO records and, when given an idx path, the "<key>\\t<offset>" index."""

  def __init__(self, rec_path: str, idx_path: str | None = None):
    self.rec_path = os.fspath(rec_path)
    self._f = open(self.rec_path, "w+b")
    self._idx = None if idx_path is None else open(idx_path, "w", encoding="ascii")
    self._keys = set()

  def tell(self) -> int:
    return self._f.tell()

  def write(self, payload: bytes, key: int | None = None) -> int:
    """Appends one record (indexed under `key` if given); returns its byte offset."""
    offset = self._f.tell()
    self._f.write(encode_record(payload))
    if key is not None:
      if key in self._keys:
        raise ValueError(f"record key {key} written twice")
      self._keys.add(key)
      if self._idx is not None:
        self._idx.write(f"{int(key)}\t{offset}\n")
    return offset

  def overwrite(self, offset: int, payload: bytes):
    """Rewrites the record at `offset` in place; its encoded size must not change."""
    data = encode_record(payload)
    end = self._f.tell()
    self._f.seek(offset)
    lrec = _HEAD.unpack(self._f.read(_HEAD.size))[1]
    old_len = lrec & _LENGTH_MASK
    if lrec >> _LENGTH_BITS or _HEAD.size + old_len + (-old_len % 4) != len(data):
      raise ValueError("overwrite must keep the record size and have one part")
    self._f.seek(offset)
    self._f.write(data)
    self._f.seek(end)

  def close(self):
    self._f.close()
    if self._idx is not None:
      self._idx.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def names_path_for(rec_path: str) -> str:
  """Where the identity/group names of a .rec are kept: <rec without .rec>.identities.json."""
  return os.path.splitext(os.fspath(rec_path))[0] + ".identities.json"


def write_identity_names(path: str, index: DatasetIndex):
  """Writes group and identity names (RecordIO stores only numeric labels)."""
  data = {"format": NAMES_FORMAT, "version": 1, "groups": list(index.group_names),
          "identities": [[n, g] for n, g in zip(index.identity_names, index.identity_groups)]}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, ensure_ascii=False)


def read_identity_names(path: str, num_identities: int
                        ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
  """Reads (group names, identity names, identity groups) and checks them against the .rec."""
  expected = (f'expected {{"format": "{NAMES_FORMAT}", "groups": [names], "identities": '
              "[[name, group index or -1], ...]}")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: cannot read identity names ({e}); {expected}") from None
  ok = (isinstance(data, dict) and data.get("format") == NAMES_FORMAT
        and isinstance(data.get("groups"), list)
        and all(isinstance(g, str) for g in data["groups"])
        and isinstance(data.get("identities"), list))
  if ok:
    n_groups = len(data["groups"])
    for item in data["identities"]:
      if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
              and type(item[1]) is int
              and (0 <= item[1] < n_groups or (item[1] == -1 and not n_groups))):
        ok = False
        break
  if not ok:
    raise UserError(f"{path}: malformed identity names; {expected}")
  if len(data["identities"]) != num_identities:
    raise UserError(f'{path}: names {len(data["identities"])} identities but the .rec has '
                    f"{num_identities}; expected the names file written with this .rec")
  return (tuple(data["groups"]), tuple(n for n, _ in data["identities"]),
          tuple(g for _, g in data["identities"]))


def _label_int(value: float, source: str) -> int:
  if not (math.isfinite(value) and value >= 0 and float(value).is_integer()):
    raise UserError(f"{source}: label {value!r}; expected a non-negative integer")
  return int(value)


def _head_header(head: bytes, source: str) -> IRHeader:
  """The image record header in the first bytes of a payload, with at most two labels."""
  if len(head) < _IR.size:
    raise UserError(f"{source}: record of {len(head)} bytes; expected at least the "
                    f"{_IR.size}-byte image record header")
  flag, label, id_, id2 = _IR.unpack_from(head)
  if flag > 0:
    count = min(flag, 2)
    if len(head) < _IR.size + 4 * count:
      raise UserError(f"{source}: header announces {flag} float32 labels but the record has "
                      f"{len(head) - _IR.size} bytes after the header")
    label = tuple(float(v) for v in np.frombuffer(head, "<f4", count=count, offset=_IR.size))
  return IRHeader(flag, label, id_, id2)


class FaceRecordIOReader:
  """Streams FaceRecords from an insightface training RecordIO (train.rec + train.idx).

  With a header record (key 0, flag > 0, label = (first identity key, end key)), images are
  keys 1..first-1 and identity record first+j holds the key range of label j. Without a
  header all keys are images. Either way every image's label is the one in its own header,
  as insightface's trainer reads it. Where identity records disagree (an image in the key
  range of another identity, as in Glint360K; identity records with a scalar label and
  flag 0, as in merged packs; ranges that do not tile the images), the disagreements are
  counted and one warning line says so (`warn`); strict_identity_records=True refuses such
  packs instead. Building the index reads the header of every image record (only the
  first bytes of each record).

  Attributes:
    index: DatasetIndex counted from the image labels; names come from
      <rec>.identities.json if present, else labels.
    has_header: whether the insightface header/identity records are present.
    identity_record_disagreements: images whose own label differs from what the identity
      records say (0 without a header).
    identity_record_warning: the warning said about them, or None.
    malformed_identity_records: identity records that are not a usable key range.
    skipped: (source, reason) of images skipped when skip_corrupt=True.
  """

  def __init__(self, rec_path: str, idx_path: str | None = None,
               names_path: str | None = None, validate: bool = True,
               skip_corrupt: bool = False, strict_identity_records: bool = False,
               warn: Callable[[str], None] | None = None):
    """Opens the files and builds the index from the image labels.

    Args:
      rec_path: the .rec file; its .idx is idx_path or <rec without .rec>.idx.
      names_path: identity names file; default <rec>.identities.json when it exists.
      validate: fully decode every image while iterating.
      skip_corrupt: skip (and list in `skipped`) undecodable images instead of raising.
      strict_identity_records: refuse (UserError) identity records that are malformed or
        disagree with an image's own label, instead of counting them.
      warn: receives the one warning about disagreeing identity records; default: printed
        as a `warning: ...` line on stderr (errors.warn).

    Raises:
      UserError: naming the file and record: missing files, a malformed .idx, a missing
        or malformed header or image record, or (strict) a disagreeing identity record.
    """
    self.rec_path = os.fspath(rec_path)
    self.validate = validate
    self.skip_corrupt = skip_corrupt
    self.strict_identity_records = strict_identity_records
    self.skipped: list[tuple[str, str]] = []
    self.identity_record_disagreements = 0
    self.malformed_identity_records = 0
    self.identity_record_warning: str | None = None
    self._warn = warn or (lambda message: errors.warn(message, file=sys.stderr))
    self._image_keys: range | np.ndarray = range(0)  # In reading order.
    self._image_labels = np.zeros(0, np.int32)  # From the image headers, per image key.
    self._raw = RecordIOReader(self.rec_path, idx_path)
    try:
      if self._raw.idx_path is None:
        raise UserError(f"{self.rec_path}: no .idx file next to it; expected "
                        f"{os.path.splitext(self.rec_path)[0]}.idx (insightface packs ship one)")
      self._build_index(names_path)
    except BaseException:
      self._raw.close()
      raise

  def _source(self, key: int) -> str:
    return f"{self.rec_path}#{key}"

  def _header(self, key: int) -> tuple[IRHeader, bytes]:
    return unpack_image_record(self._raw.read(key), self._source(key))

  def _head(self, key: int) -> IRHeader:
    """The header of record `key` (with at most two labels), reading only its first bytes."""
    return _head_header(self._raw.read_head(key, _IR.size + 8), self._source(key))

  def _build_index(self, names_path: str | None):
    if not self._raw.has_key(0):
      raise UserError(f"{self._raw.idx_path}: no record with key 0; expected the insightface "
                      "header record (or the first image) under key 0")
    header, _ = self._header(0)
    self.has_header = header.flag > 0
    if self.has_header:
      first, end = self._header_range(header)
      self._image_keys = range(1, first)
      self._image_labels = self._scan_labels(self._image_keys)
      counts = self._check_identity_records(first, end)
    else:
      self._image_keys = np.sort(self._raw.keys)
      self._image_labels = self._scan_labels(self._image_keys)
      counts = np.bincount(self._image_labels, minlength=0).tolist()
    n = len(counts)
    if names_path is None:
      guess = names_path_for(self.rec_path)
      names_path = guess if os.path.isfile(guess) else None
    if names_path is not None:
      groups, names, identity_groups = read_identity_names(names_path, n)
    else:
      width = len(str(max(n - 1, 0)))
      groups, names, identity_groups = (), tuple(f"{i:0{width}d}" for i in range(n)), (-1,) * n
    self.index = DatasetIndex(groups, names, identity_groups, tuple(counts), self.rec_path)

  def _header_range(self, header: IRHeader) -> tuple[int, int]:
    src0 = self._source(0)
    if len(header.label) < 2:
      raise UserError(f"{src0}: header record label {header.label}; expected (first identity "
                      "record key, end key)")
    first = _label_int(header.label[0], src0)
    end = _label_int(header.label[1], src0)
    if not 1 <= first <= end:
      raise UserError(f"{src0}: header label ({first}, {end}); expected 1 <= first identity "
                      "key <= end key")
    return first, end

  def _scan_labels(self, keys: range | np.ndarray) -> np.ndarray:
    """Reads the label in the header of every image record; int32 [len(keys)]."""
    # int32: labels live in float32 headers, exact only below 2**24.
    labels = array.array("i", bytes(4 * len(keys)))
    read_head, size = self._raw.read_head, _IR.size + 4
    for i, key in enumerate(keys):
      key = int(key)
      head = read_head(key, size)
      # The common case inline (millions of records); anything else takes the checked path.
      if len(head) == size or (len(head) >= _IR.size and head[:4] == b"\0\0\0\0"):
        flag, value = _FLAG_LABEL.unpack_from(head)
        if flag > 0:
          value = _FLOAT32.unpack_from(head, _IR.size)[0]
        if 0 <= value < _MAX_FLOAT_INT and value == int(value):
          labels[i] = int(value)
          continue
      labels[i] = self._image_label(self._head(key), key)
    return np.frombuffer(labels, np.int32)

  def _identity_record(self, key: int, first: int, expected_start: int
                       ) -> tuple[tuple[int, int] | None, str]:
    """(identity record `key`'s key range or None if it has none, '' or why it does not tile).

    Raises:
      UserError: the record is missing or unreadable (a damaged file, not a disagreement).
    """
    src = self._source(key)
    h, _ = self._header(key)  # A full read: these few records are never read again.
    if h.flag < 2:
      return None, (f"{src}: identity record has flag {h.flag}; expected a (first image "
                    "key, end key) label with flag 2")
    try:
      start, stop = _label_int(h.label[0], src), _label_int(h.label[1], src)
    except UserError as e:
      return None, str(e)
    span = (start, stop) if 1 <= start <= stop <= first else None
    # Ranges must tile 1..first-1 in order, or some image would get another's label.
    if start != expected_start or stop < start or stop > first:
      return span, (f"{src}: identity {key - first} covers image keys [{start}, {stop}); "
                    f"expected a range starting at {expected_start} and ending by {first}")
    return span, ""

  def _check_identity_records(self, first: int, end: int) -> list[int]:
    """Compares the identity records with the image labels; returns counts per label."""
    claimed = np.full(first, -1, np.int32)  # Label the identity records give each key.
    expected_start = 1
    for key in range(first, end):
      span, problem = self._identity_record(key, first, expected_start)
      if problem and self.strict_identity_records:
        raise UserError(problem)
      if span is None:
        self.malformed_identity_records += 1
        continue
      start, stop = span
      claimed[start:stop] = np.where(claimed[start:stop] == -1, key - first, -2)  # -2: overlap.
      expected_start = stop
    if expected_start != first and self.strict_identity_records:
      raise UserError(f"{self._source(0)}: identity records cover image keys up to "
                      f"{expected_start}, but images run to key {first - 1}; expected every "
                      "image in one identity")
    wrong = np.nonzero(claimed[1:] != self._image_labels)[0]
    self.identity_record_disagreements = int(wrong.size)
    if wrong.size and self.strict_identity_records:
      key = int(self._image_keys[wrong[0]])
      raise UserError(f"{self._source(key)}: image label {int(self._image_labels[wrong[0]])} "
                      f"disagrees with identity record {int(claimed[key])} whose key range "
                      "holds it; refusing to guess the label")
    if wrong.size or self.malformed_identity_records:
      example = ""
      if wrong.size:
        key = int(self._image_keys[wrong[0]])
        owner = int(claimed[key])
        example = (f" (first: key {key} has label {int(self._image_labels[wrong[0]])}, " +
                   (f"in the range of identity record {owner})" if owner >= 0 else
                    "in no single identity record's range)"))
      message = (f"{self.rec_path}: {wrong.size} of {len(self._image_keys)} images carry a "
                 "label other than the identity record whose key range holds them"
                 f"{example}, and {self.malformed_identity_records} of {end - first} identity "
                 "records hold no (first key, end key) range; each image's own label is "
                 "used, as insightface's trainer does (--strict_identity_records refuses "
                 "such packs)")
      self.identity_record_warning = message
      self._warn(message)
    n = max(end - first, int(self._image_labels.max()) + 1 if self._image_labels.size else 0)
    return np.bincount(self._image_labels, minlength=n).tolist()

  def _image_label(self, h: IRHeader, key: int) -> int:
    value = h.label if h.flag == 0 else h.label[0]
    label = _label_int(value, self._source(key))
    if label >= _MAX_FLOAT_INT:
      raise UserError(f"{self._source(key)}: label {label}; expected an identity label below "
                      f"{_MAX_FLOAT_INT} (float32 header labels are exact only below it)")
    return label

  def __iter__(self) -> Iterator[FaceRecord]:
    self.skipped = []
    for key, expected in zip(self._image_keys, self._image_labels):
      key, expected = int(key), int(expected)
      source = self._source(key)
      h, image = self._header(key)
      label = self._image_label(h, key)
      if label != expected:
        raise UserError(f"{source}: image label {label} now but {expected} when the index "
                        "was read; expected the .rec not to change while it is read")
      if self.validate:
        try:
          decode_image(image, source)
        except UserError as e:
          if not self.skip_corrupt:
            raise
          self.skipped.append((source, str(e)))
          continue
      yield FaceRecord(image, label, self.index.identity_groups[label], source)

  def close(self):
    self._raw.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class FaceRecordIOWriter:
  """Writes images as an insightface training RecordIO: header, images, identity records.

  Images must arrive grouped by label in increasing order; labels with no image get an empty
  key range. Call finish() to write the identity records and fill in the header.
  """

  def __init__(self, rec_path: str, idx_path: str, names_path: str | None = None):
    self._raw = RecordIOWriter(rec_path, idx_path)
    self.rec_path = os.fspath(rec_path)
    self._names_path = names_path
    # Placeholder header, rewritten in finish() once the counts are known (same size).
    self._raw.write(pack_image_record(b"", (0.0, 0.0)), key=0)
    self._key = 1
    self._starts: list[int] = []
    self._finished = False

  def add(self, image: bytes, identity: int, source: str = "") -> int:
    """Appends one image of label `identity`; returns its record key."""
    if identity < len(self._starts) - 1:
      raise UserError(f"{source}: label {identity} after label {len(self._starts) - 1}; "
                      "expected images grouped by label in increasing order")
    if self._key >= _MAX_FLOAT_INT:
      raise UserError(f"{self.rec_path}: more than {_MAX_FLOAT_INT} records do not fit "
                      "the float32 labels of the insightface header")
    while len(self._starts) <= identity:
      self._starts.append(self._key)
    key = self._key
    self._raw.write(pack_image_record(image, float(identity), id_=key), key=key)
    self._key += 1
    return key

  def finish(self, index: DatasetIndex | None = None) -> dict:
    """Writes identity records (for all index labels) and the header; closes the files."""
    n = len(self._starts) if index is None else index.num_identities
    if len(self._starts) > n:
      raise UserError(f"{self.rec_path}: label {len(self._starts) - 1} is outside the index "
                      f"({n} identities)")
    first = self._key
    if first + n >= _MAX_FLOAT_INT:
      raise UserError(f"{self.rec_path}: too many records for float32 header labels")
    starts = self._starts + [first] * (n - len(self._starts))
    for j in range(n):
      stop = starts[j + 1] if j + 1 < n else first
      self._raw.write(pack_image_record(b"", (float(starts[j]), float(stop))), key=first + j)
    self._raw.overwrite(0, pack_image_record(b"", (float(first), float(first + n))))
    self._raw.close()
    self._finished = True
    if index is not None and self._names_path is not None:
      write_identity_names(self._names_path, index)
    return {"images": first - 1, "identities": n}

  def close(self):
    """Closes without finishing (the files are then incomplete)."""
    if not self._finished:
      self._raw.close()

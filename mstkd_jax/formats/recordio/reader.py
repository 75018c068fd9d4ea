"""Raw RecordIO records, read sequentially or by key through the .idx ("<key>\\t<offset>"),
every header, length and index line checked."""

import array
import contextlib
import os
from typing import Iterator

import numpy as np

from mstkd_jax.errors import UserError
from mstkd_jax.formats.recordio.codec import HEAD, LENGTH_BITS, LENGTH_MASK, MAGIC, MAGIC_BYTES


class RecordIOReader(contextlib.AbstractContextManager):
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
          if offset + HEAD.size > self._size:
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
      head = self._f.read(HEAD.size + size)
      if len(head) >= HEAD.size:
        magic, lrec = HEAD.unpack_from(head)
        cflag, length = lrec >> LENGTH_BITS, lrec & LENGTH_MASK
        inside = offset + HEAD.size + length + (-length % 4) <= self._size
        if magic == MAGIC and inside and (cflag == 0 or (cflag == 1 and length >= size)):
          available = head[HEAD.size:HEAD.size + length]
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
      head = self._f.read(HEAD.size)
      if len(head) < HEAD.size:
        raise UserError(f"{self.rec_path}: {where}: file ends inside a record header at byte "
                        f"{pos}; the .rec is truncated")
      magic, lrec = HEAD.unpack(head)
      if magic != MAGIC:
        raise UserError(f"{self.rec_path}: {where}: expected RecordIO magic 0x{MAGIC:08x} at "
                        f"byte {pos}, found 0x{magic:08x}{hint}")
      cflag, length = lrec >> LENGTH_BITS, lrec & LENGTH_MASK
      if cflag not in ((0, 1) if not parts else (2, 3)):
        raise UserError(f"{self.rec_path}: {where}: continuation flag {cflag} at byte {pos}; "
                        f'expected {"0 or 1 (record start)" if not parts else "2 or 3"}{hint}')
      padded = length + (-length % 4)
      if pos + HEAD.size + padded > self._size:
        raise UserError(f"{self.rec_path}: {where}: length field says {length} bytes at byte "
                        f"{pos} but only {self._size - pos - HEAD.size} remain; the .rec is "
                        "truncated or the length is wrong")
      parts.append(self._f.read(length))
      pos += HEAD.size + padded
      if cflag in (0, 3):
        break
    if from_idx and pos < self._size:
      # A wrong length still lands inside the file; the next record must start right here.
      self._f.seek(pos)
      if self._f.read(4) != MAGIC_BYTES:
        j = self._index_at_offset(pos)
        if j >= 0:  # This length agrees with the .idx: blame the record that starts there.
          self._read_at(pos, self._where(j), from_idx=False)
        raise UserError(f"{self.rec_path}: {where}: the record should end at byte {pos} but no "
                        "record starts there; its length field is wrong or the file is corrupt")
    return MAGIC_BYTES.join(parts), pos

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

  def __exit__(self, *exc):
    self.close()

"""Raw RecordIO records written, with the .idx ("<key>\\t<offset>") when asked."""

import os
import contextlib

from mstkd_jax.formats.recordio.codec import HEAD, LENGTH_BITS, LENGTH_MASK, encode_record


class RecordIOWriter(contextlib.AbstractContextManager):
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
    lrec = HEAD.unpack(self._f.read(HEAD.size))[1]
    old_len = lrec & LENGTH_MASK
    if lrec >> LENGTH_BITS or HEAD.size + old_len + (-old_len % 4) != len(data):
      raise ValueError("overwrite must keep the record size and have one part")
    self._f.seek(offset)
    self._f.write(data)
    self._f.seek(end)

  def close(self):
    self._f.close()
    if self._idx is not None:
      self._idx.close()

  def __exit__(self, *exc):
    self.close()

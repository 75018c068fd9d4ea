"""insightface training packs (train.rec + train.idx) as FaceRecords: read, with their
header and identity records checked against each image's own label, and written."""

import array
import contextlib
import os
import sys
from typing import Callable, Iterator

import numpy as np

from mstkd_jax import errors
from mstkd_jax.errors import UserError
from mstkd_jax.formats.image_tree import DatasetIndex, FaceRecord, decodes
from mstkd_jax.formats.recordio import identities
from mstkd_jax.formats.recordio.codec import FLAG_LABEL, FLOAT32, IR_HEADER, MAX_FLOAT_INT
from mstkd_jax.formats.recordio.codec import IRHeader, head_header, label_int
from mstkd_jax.formats.recordio.codec import pack_image_record, unpack_image_record
from mstkd_jax.formats.recordio.reader import RecordIOReader
from mstkd_jax.formats.recordio.writer import RecordIOWriter


class FaceRecordIOReader(contextlib.AbstractContextManager):
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
    return head_header(self._raw.read_head(key, IR_HEADER.size + 8), self._source(key))

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
      guess = identities.names_path_for(self.rec_path)
      names_path = guess if os.path.isfile(guess) else None
    if names_path is not None:
      groups, names, identity_groups = identities.read_identity_names(names_path, n)
    else:
      width = len(str(max(n - 1, 0)))
      groups, names, identity_groups = (), tuple(f"{i:0{width}d}" for i in range(n)), (-1,) * n
    self.index = DatasetIndex(groups, names, identity_groups, tuple(counts), self.rec_path)

  def _header_range(self, header: IRHeader) -> tuple[int, int]:
    src0 = self._source(0)
    if len(header.label) < 2:
      raise UserError(f"{src0}: header record label {header.label}; expected (first identity "
                      "record key, end key)")
    first = label_int(header.label[0], src0)
    end = label_int(header.label[1], src0)
    if not 1 <= first <= end:
      raise UserError(f"{src0}: header label ({first}, {end}); expected 1 <= first identity "
                      "key <= end key")
    return first, end

  def _scan_labels(self, keys: range | np.ndarray) -> np.ndarray:
    """Reads the label in the header of every image record; int32 [len(keys)]."""
    # int32: labels live in float32 headers, exact only below 2**24.
    labels = array.array("i", bytes(4 * len(keys)))
    read_head, size = self._raw.read_head, IR_HEADER.size + 4
    for i, key in enumerate(keys):
      key = int(key)
      head = read_head(key, size)
      # The common case inline (millions of records); anything else takes the checked path.
      if len(head) == size or (len(head) >= IR_HEADER.size and head[:4] == b"\0\0\0\0"):
        flag, value = FLAG_LABEL.unpack_from(head)
        if flag > 0:
          value = FLOAT32.unpack_from(head, IR_HEADER.size)[0]
        if 0 <= value < MAX_FLOAT_INT and value == int(value):
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
      start, stop = label_int(h.label[0], src), label_int(h.label[1], src)
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
    label = label_int(value, self._source(key))
    if label >= MAX_FLOAT_INT:
      raise UserError(f"{self._source(key)}: label {label}; expected an identity label below "
                      f"{MAX_FLOAT_INT} (float32 header labels are exact only below it)")
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
      if self.validate and not decodes(image, source, self.skip_corrupt, self.skipped):
        continue
      yield FaceRecord(image, label, self.index.identity_groups[label], source)

  def close(self):
    self._raw.close()

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
    if self._key >= MAX_FLOAT_INT:
      raise UserError(f"{self.rec_path}: more than {MAX_FLOAT_INT} records do not fit "
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
    if first + n >= MAX_FLOAT_INT:
      raise UserError(f"{self.rec_path}: too many records for float32 header labels")
    starts = self._starts + [first] * (n - len(self._starts))
    for j in range(n):
      stop = starts[j + 1] if j + 1 < n else first
      self._raw.write(pack_image_record(b"", (float(starts[j]), float(stop))), key=first + j)
    self._raw.overwrite(0, pack_image_record(b"", (float(first), float(first + n))))
    self._raw.close()
    self._finished = True
    if index is not None and self._names_path is not None:
      identities.write_identity_names(self._names_path, index)
    return {"images": first - 1, "identities": n}

  def close(self):
    """Closes without finishing (the files are then incomplete)."""
    if not self._finished:
      self._raw.close()

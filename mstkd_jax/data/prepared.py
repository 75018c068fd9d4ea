"""Prepared (TFDS) data sets on disk, read side: where they are and what their files say.

`python -m mstkd_jax.formats.prepare` writes a data set of one kind (training or verification)
into <data_dir>/<builder>/<name>/<version> (see formats/tfds_builders.py for what the files hold).
This module finds those folders, reads metadata.json and labels.npz, and checks a folder's
files (dataset_info.json, features.json, every array_record shard opening with the records
dataset_info.json counts) without TensorFlow; tfds_input streams the records (through
`open_builder`, `read_records` and `one_line_errors` here, which import TFDS and TF only
when called). A damaged folder (a shard cut short, a missing file, a damaged record) is
refused in one line naming the file and the `prepare` command that makes it again.
"""

import dataclasses
import json
import os
import re
from typing import Iterator

import numpy as np

from mstkd_jax.data import pairs
from mstkd_jax import files
from mstkd_jax.errors import UserError

METADATA_FORMAT = "mstkd_jax.tfds"
LABELS_FILE = "labels.npz"
METADATA_FILE = "metadata.json"
INFO_FILE = "dataset_info.json"         # TFDS's: splits, shard lengths, file names
FEATURES_FILE = "features.json"         # TFDS's: how a record decodes


@dataclasses.dataclass(frozen=True)
class Kind:
  """A kind of prepared data set.

  Attributes:
    builder: the TFDS builder's name, the folder under the data dir.
    version: the builder's version, the folder under the data set's name.
    formats: the source formats `prepare` makes it from.
  """
  builder: str
  version: str
  formats: tuple[str, ...]


TRAINING = Kind("mstkd_faces", "1.0.0", ("image_tree", "recordio"))
VERIFICATION = Kind("mstkd_verification", "1.0.0", pairs.FILE_FORMATS)
KINDS = (TRAINING, VERIFICATION)


def kind_of(fmt: str) -> Kind:
  """The kind of data set a source format makes; KeyError for an unknown format."""
  for kind in KINDS:
    if fmt in kind.formats:
      return kind
  raise KeyError(fmt)


def prepared_dir(data_dir: str, kind: Kind, name: str) -> str:
  """<data_dir>/<builder>/<name>/<version>: where a data set is (or will be) prepared."""
  return os.path.join(os.fspath(data_dir), kind.builder, name, kind.version)


def is_prepared(path: str) -> bool:
  """Whether `path` (a local folder or a URL) holds a prepared TFDS data set."""
  return files.isfile(os.path.join(path, INFO_FILE))


def find_prepared(data_dir: str, name: str, kind: Kind) -> str:
  """Returns the prepared folder of `name`; UserError saying how to prepare it otherwise
  (or, for a folder that holds a preparation's other files but no dataset_info.json, that
  it is damaged)."""
  path = prepared_dir(data_dir, kind, name)
  if is_prepared(path):
    return path
  if files.isfile(os.path.join(path, METADATA_FILE)):
    raise damaged(path, INFO_FILE, "it is missing")
  for other in KINDS:
    if other is not kind and is_prepared(prepared_dir(data_dir, other, name)):
      raise UserError(f"{prepared_dir(data_dir, other, name)}: {name!r} was prepared as a "
                      f"{other.builder} data set; expected a {kind.builder} one here")
  raise UserError(f"{path}: no prepared data set {name!r}; expected it prepared first with "
                  f'`python -m mstkd_jax.formats.prepare --format={"|".join(kind.formats)} '
                  f"--src=PATH --data_dir={data_dir} --name={name}`")


def damaged(path: str, file: str, reason: str) -> UserError:
  """The one line of a damaged prepared folder `path` (<data_dir>/<builder>/<name>/<version>):
  the file, what is wrong, and the command that prepares it again (from its metadata.json
  where that is readable)."""
  data_dir, name = os.path.dirname(os.path.dirname(os.path.dirname(path))), \
      os.path.basename(os.path.dirname(path))
  try:
    meta = read_metadata(path) if file != METADATA_FILE else {}
  except UserError:
    meta = {}
  fmt = meta.get("source_format") or "FORMAT"
  src = meta.get("source") or "PATH"
  return UserError(
      f"{os.path.join(path, file)}: the prepared data set {name!r} is damaged ({reason}); "
      f"remove {path} and prepare it again: python -m mstkd_jax.formats.prepare --format={fmt} "
      f"--src={src} --data_dir={data_dir} --name={name}")


def shards(path: str, split: str) -> list[tuple[str, int]]:
  """[(shard file name, records)] of `split` in the prepared folder `path`, in record
  order, as its dataset_info.json lists them.

  Raises:
    UserError: dataset_info.json is unreadable or lists no such split (`damaged`).
  """
  try:
    info = json.loads(files.read_bytes(os.path.join(path, INFO_FILE)))
    entry = next(s for s in info["splits"] if s["name"] == split)
    lengths = [int(n) for n in entry["shardLengths"]]
    template = entry.get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
    names = [template.replace("{DATASET}", info["name"]).replace("{SPLIT}", split)
             .replace("{FILEFORMAT}", info.get("fileFormat", "array_record"))
             .replace("{SHARD_X_OF_Y}", f"{k:05d}-of-{len(lengths):05d}")
             for k in range(len(lengths))]
  except FileNotFoundError:
    raise damaged(path, INFO_FILE, "it is missing") from None
  except (ValueError, KeyError, TypeError, StopIteration) as e:
    reason = f"no split {split!r}" if isinstance(e, StopIteration) else f"unreadable: {e}"
    raise damaged(path, INFO_FILE, reason) from None
  return list(zip(names, lengths))


def check_files(path: str, split: str) -> None:
  """Checks the files of the prepared folder `path` before TFDS reads it: metadata.json,
  features.json and dataset_info.json are there and readable, and every array_record shard
  of `split` opens (its index at the end of the file: a shard cut short fails here) and
  holds the records dataset_info.json counts. Reads no record.

  Raises:
    UserError: naming the first damaged file (`damaged`).
  """
  if not files.isfile(os.path.join(path, METADATA_FILE)):
    raise damaged(path, METADATA_FILE, "it is missing")
  read_metadata(path)
  for name in (FEATURES_FILE,):
    try:
      json.loads(files.read_bytes(os.path.join(path, name)))
    except FileNotFoundError:
      raise damaged(path, name, "it is missing") from None
    except ValueError as e:
      raise damaged(path, name, f"unreadable: {files.error_line(e)}") from None
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  for name, expected in shards(path, split):
    file = os.path.join(path, name)
    if not files.exists(file):
      raise damaged(path, name, "it is missing")
    try:
      reader = array_record_module.ArrayRecordReader(file)
      try:
        count = reader.num_records()
      finally:
        reader.close()
    except (RuntimeError, OSError, ValueError) as e:
      raise damaged(path, name, f"{files.error_line(e)}; a copy cut short?") from None
    if count != expected:
      raise damaged(path, name, f"{count} records where {INFO_FILE} counts {expected}")


def shard_of(path: str, split: str, row: int) -> str:
  """The shard file of record `row` of `split` in the prepared folder `path`."""
  first = 0
  for name, count in shards(path, split):
    if row < first + count:
      return name
    first += count
  return shards(path, split)[-1][0]


def read_metadata(path: str) -> dict:
  """Reads metadata.json of a prepared folder and checks it is ours."""
  file = os.path.join(path, METADATA_FILE)
  data = files.read_json(file, "the data set metadata written by mstkd_jax.formats.prepare")
  if not isinstance(data, dict) or data.get("format") != METADATA_FORMAT:
    raise UserError(f'{file}: not mstkd_jax metadata; expected "format": "{METADATA_FORMAT}"')
  return data


def read_labels(path: str, num_examples: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """(identity int32 [N], group int32 [N]) of a prepared training set, in record order.

  num_examples, when given, is checked against the arrays (the split's record count).
  """
  file = os.path.join(path, LABELS_FILE)
  try:
    with files.load_npz(file) as data:
      identity = np.asarray(data["identity"], np.int32)
      group = np.asarray(data["group"], np.int32)
  except FileNotFoundError:
    raise damaged(path, LABELS_FILE, "it is missing") from None
  except (OSError, KeyError, ValueError) as e:
    raise damaged(path, LABELS_FILE, f"cannot read the label arrays: {e}") from None
  if num_examples is None:
    num_examples = len(identity)
  if identity.shape != (num_examples,) or group.shape != (num_examples,):
    raise UserError(f"{file}: labels for {identity.shape} / {group.shape} examples but the "
                    f"data set has {num_examples}; expected the labels of this data set")
  return identity, group


def summary(path: str, name: str) -> dict:
  """{"name", "num_images", "num_identities", "groups": {...}, ..., "image_size" (the side
  images were stored at, or None), and for verification sets "alignment"} counted from the
  data and read from its metadata."""
  meta = read_metadata(path)
  out = {"name": name}
  if meta.get("kind") == "verification":
    groups = meta["group_names"]
    ids = [meta["identities"][g] for g in groups]
    out.update(num_images=int(sum(meta["images"][g] for g in groups)),
               num_identities=None if None in ids else int(sum(ids)),
               groups={g: {"images": meta["images"][g], "identities": meta["identities"][g],
                           "pairs": meta["pairs"][g], "same": meta["same"][g]}
                       for g in groups})
    dropped = sum(meta["dropped_pairs"].values())
    if dropped:
      out["dropped_pairs"] = dropped
    out["alignment"] = meta.get("alignment") or "none"
  else:
    identity, group = read_labels(path)
    num_images = len(identity)
    groups = {}
    for g, gname in enumerate(meta["group_names"]):
      in_group = group == g
      groups[gname] = {"images": int(in_group.sum()),
                       "identities": int(np.unique(identity[in_group]).size)}
    out.update(num_images=int(num_images), num_identities=int(np.unique(identity).size),
               groups=groups)
    empty = len(meta["identity_names"]) - out["num_identities"]
    if empty:
      out["identities_without_images"] = empty
  out.update(skipped=len(meta.get("skipped", [])), path=path,
             image_size=meta.get("image_size"))
  return out


def read_records(source, rows: list[int], path: str, split: str) -> list:
  """source.__getitems__(rows) of a TFDS data source over `split` of the prepared folder
  `path`; a damaged record stops with one line naming its shard (`damaged`; found by
  reading the rows one at a time)."""
  try:
    return source.__getitems__(rows)
  except RuntimeError as e:  # array_record's: a damaged chunk
    bad = rows[0]
    for row in rows:
      try:
        source.__getitems__([row])
      except RuntimeError:
        bad = row
        break
    raise damaged(path, shard_of(path, split, bad),
                  f"record {bad}: {files.error_line(e)}") from None


def open_builder(path: str):
  """TFDS's builder of the prepared folder `path` (its files `check_files` passed); any
  error of TFDS reading them is still one line naming the folder (`damaged`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder_from_directory(path)
  except Exception as e:  # pylint: disable=broad-except; TFDS's many parse errors
    raise damaged(path, INFO_FILE, files.error_line(e)) from None


def one_line_errors(iterator: Iterator) -> Iterator:
  """Yields what `iterator` (a tf.data numpy iterator over prepared records) yields; a
  UserError raised while it reads records (`read_records`, which TF reports wrapped, with
  its traceback in the message) is raised again as its one line."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    yield from iterator
  except tf.errors.OpError as e:
    found = re.search(r"UserError: ([^\n]*)", str(e))
    if found is None:
      raise
    raise UserError(found.group(1)) from None

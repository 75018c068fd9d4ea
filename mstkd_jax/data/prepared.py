"""Prepared (TFDS) data sets on disk, read side: where they are and what their files say.

`python -m mstkd_jax.data.prepare` writes a data set of one kind (training or verification)
into <data_dir>/<builder>/<name>/<version> (see tfds_builders for what the files hold).
This module finds those folders and reads metadata.json and labels.npz without TensorFlow;
tfds_input streams the records.
"""

import dataclasses
import os

import numpy as np

from mstkd_jax.data import pairs
from mstkd_jax import files
from mstkd_jax.errors import UserError

METADATA_FORMAT = "mstkd_jax.tfds"
LABELS_FILE = "labels.npz"
METADATA_FILE = "metadata.json"


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
  return files.isfile(os.path.join(path, "dataset_info.json"))


def find_prepared(data_dir: str, name: str, kind: Kind) -> str:
  """Returns the prepared folder of `name`; UserError saying how to prepare it otherwise."""
  path = prepared_dir(data_dir, kind, name)
  if is_prepared(path):
    return path
  for other in KINDS:
    if other is not kind and is_prepared(prepared_dir(data_dir, other, name)):
      raise UserError(f"{prepared_dir(data_dir, other, name)}: {name!r} was prepared as a "
                      f"{other.builder} data set; expected a {kind.builder} one here")
  raise UserError(f"{path}: no prepared data set {name!r}; expected it prepared first with "
                  f'`python -m mstkd_jax.data.prepare --format={"|".join(kind.formats)} '
                  f"--src=PATH --data_dir={data_dir} --name={name}`")


def read_metadata(path: str) -> dict:
  """Reads metadata.json of a prepared folder and checks it is ours."""
  file = os.path.join(path, METADATA_FILE)
  data = files.read_json(file, "the data set metadata written by mstkd_jax.data.prepare")
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
  except (OSError, KeyError, ValueError) as e:
    raise UserError(f"{file}: cannot read the label arrays ({e}); expected the file written "
                    "by mstkd_jax.data.prepare") from None
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

"""TFDS dataset builders over the face data readers: training sets and verification pairs.

Two builders; a data set is one BuilderConfig of them whose `name` is the user's data set
name, and whose source is the TFDS manual dir (the folder given to `prepare`, plus a file
name inside it for a .rec or a single .bin):

* `mstkd_faces` (training sets, from an image tree or an insightface RecordIO): split
  "train", one example per image: {"image": the encoded JPEG/PNG exactly as stored,
  "identity": int32 label, "group": int32 index into metadata "group_names", or -1}.
* `mstkd_verification` (from RFW or insightface .bin files): split "test", one example
  per distinct image of a group: {"image", "group", "index": its row within the group}.
  The pairs are metadata: metadata["pair_table"][group] = {"index_a": [...], "index_b":
  [...], "issame": [...]}, rows of that group's images, in the source's pair order. An
  image used by several pairs (and .bin files repeat them) is stored and decoded once, and
  loading a group is: decode its images, read its three lists (TFDS splits share one
  feature dict, so pair records beside image records would need dummy fields).

Images are a `tfds.features.Image(shape=(None, None, 3))` fed with the source bytes: TFDS
stores given bytes unchanged (no re-encoding, JPEG and PNG may mix), `tfds.load` users get
decoded uint8 images, and mstkd_jax reads the bytes with `SkipDecoding` and decodes in
tf.data. Every image is fully decoded once while preparing, to find corrupt files.

Examples are written in source order (`disable_shuffling`), so a group's rows are
contiguous and record r of the array_record shards is the r-th image read. Besides TFDS's
own files the prepared folder holds metadata.json (group and identity names, image sizes,
skipped files; also `builder.info.metadata`) and, for training sets, labels.npz with the
identity and group of every record, so labels load without reading any image.
"""

import concurrent.futures
import collections
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from mstkd_jax.data import image_tree
from mstkd_jax.data import recordio
from mstkd_jax.data import rfw
from mstkd_jax.data import verification_bin
from mstkd_jax.errors import UserError

TRAINING_FORMATS = ("image_tree", "recordio")
VERIFICATION_FORMATS = ("rfw", "bin")
METADATA_FORMAT = "mstkd_jax.tfds"
LABELS_FILE = "labels.npz"
METADATA_FILE = "metadata.json"
# Keys are spread over TFDS's 128-bit key space: with shuffling disabled TFDS sorts by key
# and buckets keys by their top bits, so small keys would all land in one in-memory bucket.
_KEY_SPACE = 1 << 128


class _SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders here.

  `code_path` is None: these builders ship no checksums or metadata files next to their
  code, and TFDS 4.9.10 resolving it for a builder inside a package imports
  `importlib_resources`, which it only declares for Python < 3.9
  (tensorflow/datasets#11212).
  """
  code_path = None


def _ordered_key(i: int, total: int) -> int:
  """A key that sorts like `i` and spreads i in [0, total) evenly over the key space."""
  if not 0 <= i < total:
    raise ValueError(f"example {i} outside the announced {total}")
  return i * (_KEY_SPACE // total)


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
  """A data set: its name (the config name) and how to read its source.

  Attributes:
    source_format: one of TRAINING_FORMATS or VERIFICATION_FORMATS.
    source_file: a file inside the manual dir (a .rec, or one .bin); '' for the folder.
    grouped: image tree layout; None detects it.
    skip_corrupt: skip undecodable images (verification: drop the pairs using them)
      instead of stopping at the first one.
    workers: threads that decode images to check them.
  """
  source_format: str = ""
  source_file: str = ""
  grouped: bool | None = None
  skip_corrupt: bool = False
  workers: int = 0


class _PreparedMetadata(tfds.core.MetadataDict):
  """metadata.json, plus labels.npz next to it when `arrays` is set."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.arrays: dict[str, np.ndarray] = {}

  def save_metadata(self, data_dir):
    super().save_metadata(data_dir)
    if self.arrays:
      with open(os.path.join(os.fspath(data_dir), LABELS_FILE), "wb") as f:
        np.savez(f, **self.arrays)


def _probe(item: tuple[Any, str]) -> tuple[bytes | None, Any]:
  """Reads (if a path) and decodes one image; returns (bytes, (h, w)) or (None, UserError)."""
  data, source = item
  try:
    if data is None:
      data = image_tree.read_image_file(source)
    shape = image_tree.decode_image(data, source).shape
  except UserError as e:
    return None, e
  return data, (int(shape[0]), int(shape[1]))


def _checked_images(items: Iterable[tuple[Any, str, Any]], *, skip_corrupt: bool,
                    skipped: list, workers: int) -> Iterator[tuple[Any, bytes, tuple]]:
  """Decodes every image in a thread pool, in order.

  Args:
    items: (tag, encoded bytes or None to read `source` as a file, source).
    skip_corrupt: list undecodable images in `skipped` instead of raising.
    skipped: receives (source, reason).
    workers: decoding threads.
  Yields:
    (tag, encoded bytes, (height, width)) of the decodable images, in input order.
  """
  lookahead = 64 * workers
  pending = collections.deque()
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:

    def drain(keep: int):
      while len(pending) > keep:
        tag, source, future = pending.popleft()
        data, result = future.result()
        if data is None:
          if not skip_corrupt:
            raise result
          skipped.append((source, str(result)))
          continue
        yield tag, data, result

    for tag, data, source in items:
      pending.append((tag, source, pool.submit(_probe, (data, source))))
      yield from drain(lookahead)
    yield from drain(0)


def _workers(config: SourceConfig) -> int:
  return config.workers or max(1, min(8, os.cpu_count() or 1))


def _sizes_list(sizes: set) -> list[list[int]]:
  return [list(s) for s in sorted(sizes)]


class MstkdFaces(_SourceBuilder):
  """A face training set from an image tree or an insightface RecordIO (manual dir)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded image, identity, group per example; labels.npz."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the image tree (<root>/<group>/<identity>/<image> or <root>/<identity>/<image>) "
      "or the folder of an insightface train.rec/.idx as the manual dir; see "
      "`python -m mstkd_jax.data.prepare --help`.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Aligned face images with identity and demographic-group labels.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "identity": tfds.features.Scalar(np.int32, doc="identity label"),
            "group": tfds.features.Scalar(
                np.int32, doc="index into metadata group_names, -1 without groups"),
        }),
        supervised_keys=("image", "identity"),
        disable_shuffling=True,
        metadata=_PreparedMetadata())

  def _split_generators(self, dl_manager):
    config = self.builder_config
    if config.source_format not in TRAINING_FORMATS:
      raise ValueError(f"{config.source_format!r} is not a training format {TRAINING_FORMATS}")
    source = os.path.normpath(os.path.join(os.fspath(dl_manager.manual_dir),
                                           config.source_file))
    if config.source_format == "image_tree":
      reader = image_tree.ImageTreeReader(source, grouped=config.grouped, validate=False,
                                          skip_corrupt=config.skip_corrupt)
    else:
      reader = recordio.FaceRecordIOReader(source, validate=False)
    index = reader.index
    self.info.metadata.update(
        format=METADATA_FORMAT, kind="training", source=source,
        source_format=config.source_format, group_names=list(index.group_names),
        identity_names=list(index.identity_names),
        identity_groups=[int(g) for g in index.identity_groups])
    return {"train": self._generate_examples(reader=reader, total=index.num_images)}

  def _generate_examples(self, reader, total: int):
    config = self.builder_config
    skipped = list(getattr(reader, "skipped", []))
    identity, group, sizes = [], [], set()
    records = ((r, r.image, r.source) for r in reader)
    try:
      for i, (record, data, size) in enumerate(_checked_images(
          records, skip_corrupt=config.skip_corrupt, skipped=skipped,
          workers=_workers(config))):
        identity.append(record.identity)
        group.append(record.group)
        sizes.add(size)
        yield _ordered_key(i, total), {"image": data, "identity": record.identity,
                                       "group": record.group}
    finally:
      if hasattr(reader, "close"):
        reader.close()
    # The tree reader lists non-image file names it skipped while iterating.
    for item in getattr(reader, "skipped", []):
      if item not in skipped:
        skipped.append(item)
    if not identity:
      raise UserError(f'{self.info.metadata["source"]}: no decodable image; expected JPEG/PNG '
                      "face images")
    self.info.metadata.update(image_sizes=_sizes_list(sizes),
                              skipped=[list(s) for s in skipped])
    self.info.metadata.arrays = {"identity": np.asarray(identity, np.int32),
                                 "group": np.asarray(group, np.int32)}


@dataclasses.dataclass
class _GroupPairs:
  """One verification group while preparing: distinct images and pairs of their rows."""
  name: str
  images: list = dataclasses.field(default_factory=list)  # (bytes or None, source).
  identities: set | None = None  # Names of the identities shown; None when unknown.
  pairs: list = dataclasses.field(default_factory=list)  # (row a, row b, issame).
  dropped: int = 0


class MstkdVerification(_SourceBuilder):
  """Per-group verification pairs from RFW or insightface .bin files (manual dir)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": 'Split "test" of distinct images; pairs in metadata.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the RFW folder (test/data, test/txts) or a folder of insightface .bin files "
      "(one group each, e.g. African_test.bin) as the manual dir; see "
      "`python -m mstkd_jax.data.prepare --help`.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Face verification pairs, one group (e.g. an RFW race) at a time.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "group": tfds.features.Scalar(np.int32, doc="index into metadata group_names"),
            "index": tfds.features.Scalar(np.int32, doc="row of the image in its group"),
        }),
        disable_shuffling=True,
        metadata=_PreparedMetadata())

  def _split_generators(self, dl_manager):
    config = self.builder_config
    source = os.path.normpath(os.path.join(os.fspath(dl_manager.manual_dir),
                                           config.source_file))
    if config.source_format == "rfw":
      groups = self._plan_rfw(source)
    elif config.source_format == "bin":
      groups = self._plan_bins(source)
    else:
      raise ValueError(f"{config.source_format!r} is not a verification format "
                       f"{VERIFICATION_FORMATS}")
    skipped, sizes = self._check_images(groups)
    for group in groups:
      if not group.pairs:
        raise UserError(f"{source}: group {group.name!r} has no pair left with two decodable "
                        "images")
    self.info.metadata.update(
        format=METADATA_FORMAT, kind="verification", source=source,
        source_format=config.source_format, group_names=[g.name for g in groups],
        images={g.name: len(g.images) for g in groups},
        identities={g.name: None if g.identities is None else len(g.identities)
                    for g in groups},
        pairs={g.name: len(g.pairs) for g in groups},
        same={g.name: int(sum(p[2] for p in g.pairs)) for g in groups},
        dropped_pairs={g.name: g.dropped for g in groups},
        pair_table={g.name: {"index_a": [p[0] for p in g.pairs],
                             "index_b": [p[1] for p in g.pairs],
                             "issame": [bool(p[2]) for p in g.pairs]} for g in groups},
        image_sizes=_sizes_list(sizes), skipped=[list(s) for s in skipped])
    return {"test": self._generate_examples(groups=groups)}

  def _plan_rfw(self, source: str) -> list[_GroupPairs]:
    reader = rfw.RFWReader(source)
    groups = []
    for name in reader.groups:
      group = _GroupPairs(name, identities=set())
      rows = {}
      for p in reader.pairs(name):
        ab = []
        for person, number in ((p.name1, p.index1), (p.name2, p.index2)):
          if (person, number) not in rows:
            rows[(person, number)] = len(group.images)
            group.images.append((None, reader.image_path(name, person, number)))
            group.identities.add(person)
          ab.append(rows[(person, number)])
        group.pairs.append((ab[0], ab[1], p.same))
      groups.append(group)
    return groups

  def _plan_bins(self, source: str) -> list[_GroupPairs]:
    if os.path.isdir(source):
      files = sorted(f for f in os.listdir(source)
                     if f.lower().endswith(".bin") and not f.startswith("."))
      if not files:
        raise UserError(f"{source}: no .bin files in this folder; expected insightface "
                        "verification files such as African_test.bin")
      paths = [os.path.join(source, f) for f in files]
    else:
      paths = [source]
    groups, seen = [], {}
    for path in paths:
      name = bin_group_name(path)
      if name in seen:
        raise UserError(f"{path}: group name {name!r} also comes from {seen[name]}; expected "
                        "one .bin per group")
      seen[name] = path
      images, issame = verification_bin.load_verification_bin(path)
      group = _GroupPairs(name)
      rows = {}
      for k, same in enumerate(issame):
        ab = []
        for j in (2 * k, 2 * k + 1):
          digest = hashlib.sha256(images[j]).digest()
          if digest not in rows:
            rows[digest] = len(group.images)
            group.images.append((images[j], f"{path}#{j}"))
          ab.append(rows[digest])
        group.pairs.append((ab[0], ab[1], same))
      groups.append(group)
    return sorted(groups, key=lambda g: g.name)

  def _check_images(self, groups: list[_GroupPairs]) -> tuple[list, set]:
    """Decodes every image; drops undecodable ones (and their pairs) when skipping."""
    config = self.builder_config
    skipped, sizes = [], set()
    for group in groups:
      kept = {}
      items = ((row, data, src) for row, (data, src) in enumerate(group.images))
      checked = _checked_images(items, skip_corrupt=config.skip_corrupt, skipped=skipped,
                                workers=_workers(config))
      # Before TFDS's own progress bars: this pass reads and decodes every image.
      for row, _, size in tqdm.tqdm(checked, total=len(group.images), unit=" images",
                                    desc=f"Checking {group.name} images", leave=False):
        kept[row] = len(kept)
        sizes.add(size)
      if len(kept) < len(group.images):
        pairs = [(kept[a], kept[b], s) for a, b, s in group.pairs if a in kept and b in kept]
        group.dropped = len(group.pairs) - len(pairs)
        group.pairs = pairs
        group.images = [group.images[row] for row in sorted(kept)]
        if group.identities is not None:
          group.identities = {os.path.basename(os.path.dirname(src))
                              for _, src in group.images}
    return skipped, sizes

  def _generate_examples(self, groups: list[_GroupPairs]):
    total = sum(len(g.images) for g in groups)
    i = 0
    for g, group in enumerate(groups):
      for row, (data, source) in enumerate(group.images):
        yield _ordered_key(i, total), {"image": image_tree.read_image_file(source) if data is None else data,
                                       "group": g, "index": row}
        i += 1


def bin_group_name(path: str) -> str:
  """African_test.bin -> African; lfw.bin -> lfw."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return stem[:-len("_test")] if stem.endswith("_test") and len(stem) > 5 else stem


BUILDERS: dict[str, Callable[..., tfds.core.DatasetBuilder]] = {
    fmt: MstkdFaces for fmt in TRAINING_FORMATS}
BUILDERS.update({fmt: MstkdVerification for fmt in VERIFICATION_FORMATS})


def prepared_dir(data_dir: str, builder: type, name: str) -> str:
  """<data_dir>/<builder name>/<name>/<version>: where a data set is (or will be) prepared."""
  return os.path.join(os.fspath(data_dir), builder.name, name, str(builder.VERSION))


def is_prepared(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "dataset_info.json"))


def find_prepared(data_dir: str, name: str, builder: type) -> str:
  """Returns the prepared folder of `name`; UserError saying how to prepare it otherwise."""
  path = prepared_dir(data_dir, builder, name)
  if is_prepared(path):
    return path
  others = [b for b in (MstkdFaces, MstkdVerification) if b is not builder]
  for other in others:
    if is_prepared(prepared_dir(data_dir, other, name)):
      raise UserError(f"{prepared_dir(data_dir, other, name)}: {name!r} was prepared as a "
                      f"{other.name} data set; expected a {builder.name} one here")
  formats = TRAINING_FORMATS if builder is MstkdFaces else VERIFICATION_FORMATS
  raise UserError(f"{path}: no prepared data set {name!r}; expected it prepared first with "
                  f'`python -m mstkd_jax.data.prepare --format={"|".join(formats)} '
                  f"--src=PATH --data_dir={data_dir} --name={name}`")


def read_metadata(path: str) -> dict:
  """Reads metadata.json of a prepared folder and checks it is ours."""
  file = os.path.join(path, METADATA_FILE)
  try:
    with open(file, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{file}: cannot read the data set metadata ({e}); expected the file "
                    "written by mstkd_jax.data.prepare") from None
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
    with np.load(file, allow_pickle=False) as data:
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
  """{"name", "num_images", "num_identities", "groups": {...}, ...} counted from the data."""
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
  out.update(skipped=len(meta.get("skipped", [])), path=path)
  return out

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

Images are a `tfds.features.Image(shape=(None, None, 3))` fed with the source bytes, stored
unchanged (JPEG and PNG may mix; `tfds.load` users get decoded uint8 images, mstkd_jax
decodes them in tf.data) and fully decoded once while preparing, to find corrupt files.
Images that preparing changes are stored as PNG: resized to `image_size` (formats/faces.py),
or aligned with their landmarks (RFW's <group>_lmk.txt); metadata "image_size" and
"alignment" say so. A `groups_file` (formats/groups.py) gives a training set's groups.

Examples are written in source order (`disable_shuffling`), so a group's rows are
contiguous and record r of the array_record shards is the r-th image read. Besides TFDS's
own files the prepared folder holds metadata.json (group and identity names, image sizes,
skipped files; also `builder.info.metadata`) and, for training sets, labels.npz with the
identity and group of every record, so labels load without reading any image; data.prepared
finds and reads those folders. The verification builder stores the plans of data.pairs, so it
takes every file format registered there.
"""

import concurrent.futures
import collections
import dataclasses
import functools
import os
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from mstkd_jax import files
from mstkd_jax.formats import faces
from mstkd_jax.formats import groups
from mstkd_jax.formats import image_tree, images
from mstkd_jax.data import pairs
from mstkd_jax.data import prepared
from mstkd_jax.formats.recordio import face_pack
from mstkd_jax.errors import UserError

TRAINING_FORMATS = prepared.TRAINING.formats
VERIFICATION_FORMATS = prepared.VERIFICATION.formats
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
    image_size: store images resized to image_size x image_size (faces.resize_image, as
      PNG); 0 keeps their size.
    groups_file: (training) the identity -> group file of formats/groups.py; "" = the
      source's own groups.
  """
  source_format: str = ""
  source_file: str = ""
  grouped: bool | None = None
  skip_corrupt: bool = False
  workers: int = 0
  image_size: int = 0
  groups_file: str = ""


class _PreparedMetadata(tfds.core.MetadataDict):
  """metadata.json, plus labels.npz next to it when `arrays` is set."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.arrays: dict[str, np.ndarray] = {}

  def save_metadata(self, data_dir):
    super().save_metadata(data_dir)
    if self.arrays:
      files.save_npz(os.path.join(os.fspath(data_dir), prepared.LABELS_FILE), self.arrays)


def _probe(item: tuple[Any, str], image_size: int = 0) -> tuple[bytes | None, Any]:
  """Reads (if a path) and decodes one image; returns (bytes, (h, w)) or (None, UserError).
  With image_size, an image of another size comes back resized (faces.resize_image), as
  PNG bytes."""
  data, source = item
  try:
    if data is None:
      data = images.read_image_file(source)
    image = images.decode_image(data, source)
  except UserError as e:
    return None, e
  if image_size and image.shape[:2] != (image_size, image_size):
    image = faces.resize_image(image, image_size)
    data = images.encode_png(image)
  return data, (int(image.shape[0]), int(image.shape[1]))


def _checked_images(items: Iterable[tuple[Any, str, Any]], *, skip_corrupt: bool,
                    skipped: list, workers: int, image_size: int = 0
                    ) -> Iterator[tuple[Any, bytes, tuple]]:
  """Decodes every image in a thread pool, in order.

  Args:
    items: (tag, encoded bytes or None to read `source` as a file, source).
    skip_corrupt: list undecodable images in `skipped` instead of raising.
    skipped: receives (source, reason).
    workers: decoding threads.
    image_size: resize images of another size to it (see `_probe`); 0 = keep them.
  Yields:
    (tag, encoded bytes, (height, width)) of the decodable images, in input order.
  """
  def probe(item):
    tag, data, source = item
    return tag, source, _probe((data, source), image_size)

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for tag, source, (data, result) in _in_order(pool, probe, items, 64 * workers):
      if data is None:
        if not skip_corrupt:
          raise result
        skipped.append((source, str(result)))
        continue
      yield tag, data, result


def _in_order(pool: concurrent.futures.Executor, fn: Callable, items: Iterable,
              lookahead: int) -> Iterator:
  """fn(item) of every item, computed on `pool` at most `lookahead` items ahead, in order."""
  pending = collections.deque()
  for item in items:
    pending.append(pool.submit(fn, item))
    if len(pending) > lookahead:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


def _workers(config: SourceConfig) -> int:
  return config.workers or max(1, min(8, os.cpu_count() or 1))


def _sizes_list(sizes: set) -> list[list[int]]:
  return [list(s) for s in sorted(sizes)]


class MstkdFaces(_SourceBuilder):
  """A face training set from an image tree or an insightface RecordIO (manual dir)."""

  name = prepared.TRAINING.builder
  VERSION = tfds.core.Version(prepared.TRAINING.version)
  RELEASE_NOTES = {"1.0.0": "Encoded image, identity, group per example; labels.npz."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the image tree (<root>/<group>/<identity>/<image> or <root>/<identity>/<image>) "
      "or the folder of an insightface train.rec/.idx as the manual dir; see "
      "`python -m mstkd_jax.formats.prepare --help`.")

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
      notes: list[str] = []  # prepare logs them after building
      reader = face_pack.FaceRecordIOReader(source, validate=False, warn=notes.append)
      self.info.metadata.update(
          warnings=notes, identity_record_disagreements=reader.identity_record_disagreements)
    index = reader.index
    group_names, identity_groups = index.group_names, index.identity_groups
    remap = None
    if config.groups_file:
      try:
        group_names, identity_groups, extra = groups.assign_groups(config.groups_file,
                                                                   index.identity_names)
      except BaseException:
        if hasattr(reader, "close"):
          reader.close()
        raise
      remap = np.asarray(identity_groups, np.int32)
      self.info.metadata.update(groups_file=config.groups_file,
                                groups_file_unused_identities=extra,
                                source_group_names=list(index.group_names))
    self.info.metadata.update(
        format=prepared.METADATA_FORMAT, kind="training", source=source,
        source_format=config.source_format, group_names=list(group_names),
        identity_names=list(index.identity_names),
        identity_groups=[int(g) for g in identity_groups],
        image_size=config.image_size or None)
    return {"train": self._generate_examples(reader=reader, total=index.num_images,
                                             remap=remap)}

  def _generate_examples(self, reader, total: int, remap: np.ndarray | None = None):
    config = self.builder_config
    skipped = list(getattr(reader, "skipped", []))
    identity, group, sizes = [], [], set()
    records = ((r, r.image, r.source) for r in reader)
    try:
      for i, (record, data, size) in enumerate(_checked_images(
          records, skip_corrupt=config.skip_corrupt, skipped=skipped,
          workers=_workers(config), image_size=config.image_size)):
        record_group = record.group if remap is None else int(remap[record.identity])
        identity.append(record.identity)
        group.append(record_group)
        sizes.add(size)
        yield _ordered_key(i, total), {"image": data, "identity": record.identity,
                                       "group": record_group}
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


class MstkdVerification(_SourceBuilder):
  """Per-group verification pairs from a file format of data.pairs (manual dir)."""

  name = prepared.VERIFICATION.builder
  VERSION = tfds.core.Version(prepared.VERIFICATION.version)
  RELEASE_NOTES = {"1.0.0": 'Split "test" of distinct images; pairs in metadata.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the RFW folder (test/data, test/txts) or a folder of insightface .bin files "
      "(one group each, e.g. African_test.bin) as the manual dir; see "
      "`python -m mstkd_jax.formats.prepare --help`.")

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
    if config.source_format not in VERIFICATION_FORMATS:
      raise ValueError(f"{config.source_format!r} is not a verification format "
                       f"{VERIFICATION_FORMATS}")
    plans = pairs.PLANNERS[config.source_format].plan(source)
    plans, dropped, skipped, sizes = self._check_images(plans)
    for plan in plans:
      if not len(plan.issame):
        raise UserError(f"{source}: group {plan.name!r} has no pair left with two decodable "
                        "images")
    self.info.metadata.update(
        format=prepared.METADATA_FORMAT, kind="verification", source=source,
        source_format=config.source_format, group_names=[p.name for p in plans],
        images={p.name: len(p.images) for p in plans},
        identities={p.name: None if p.identities is None else len(set(p.identities))
                    for p in plans},
        pairs={p.name: len(p.issame) for p in plans},
        same={p.name: int(p.issame.sum()) for p in plans},
        dropped_pairs=dropped,
        pair_table={p.name: {"index_a": p.pairs[:, 0].tolist(),
                             "index_b": p.pairs[:, 1].tolist(),
                             "issame": p.issame.tolist()} for p in plans},
        image_sizes=_sizes_list(sizes), skipped=[list(s) for s in skipped],
        image_size=config.image_size or None, alignment={})
    return {"test": self._generate_examples(plans=plans)}

  def _check_images(self, plans: list[pairs.GroupPlan]
                    ) -> tuple[list[pairs.GroupPlan], dict, list, set]:
    """Decodes every image; drops undecodable ones (and their pairs) when skipping.

    Returns (the plans without them, dropped pairs per group, skipped, image sizes).
    """
    config = self.builder_config
    kept_plans, dropped, skipped, sizes = [], {}, [], set()
    for plan in plans:
      kept = []
      items = ((row, data, src) for row, (data, src) in enumerate(plan.images))
      checked = _checked_images(items, skip_corrupt=config.skip_corrupt, skipped=skipped,
                                workers=_workers(config))
      # Before TFDS's own progress bars: this pass reads and decodes every image.
      for row, _, size in tqdm.tqdm(checked, total=len(plan.images), unit=" images",
                                    desc=f"Checking {plan.name} images", leave=False):
        kept.append(row)
        sizes.add(size)
      dropped[plan.name] = 0
      if len(kept) < len(plan.images):
        new_row = np.full(len(plan.images), -1, np.int64)
        new_row[kept] = np.arange(len(kept))
        keep = (new_row[plan.pairs] >= 0).all(axis=1)
        dropped[plan.name] = int((~keep).sum())
        plan = pairs.GroupPlan(
            plan.name, [plan.images[row] for row in kept], new_row[plan.pairs[keep]],
            plan.issame[keep],
            None if plan.identities is None else [plan.identities[row] for row in kept],
            None if plan.landmarks is None else [plan.landmarks[row] for row in kept],
            plan.landmarks_file)
      kept_plans.append(plan)
    return kept_plans, dropped, skipped, sizes

  def _generate_examples(self, plans: list[pairs.GroupPlan]):
    """Each group's images in order, as stored (`_stored_face`), counting what was done."""
    config = self.builder_config
    total, i, sizes, alignment = sum(len(p.images) for p in plans), 0, set(), {}
    with concurrent.futures.ThreadPoolExecutor(_workers(config)) as pool:
      for g, plan in enumerate(plans):
        aligned = taken = 0
        stored = _in_order(pool, functools.partial(_stored_face, plan, config.image_size),
                           range(len(plan.images)), 64 * _workers(config))
        for row, (image, size, face) in enumerate(stored):
          sizes.add(size)
          if face is not None:
            aligned, taken = aligned + face.aligned, taken + face.taken_as_aligned
          yield _ordered_key(i, total), {"image": image, "group": g, "index": row}
          i += 1
        if plan.landmarks is not None:
          alignment[plan.name] = dict(landmarks=plan.landmarks_file, aligned=aligned,
                                      taken_as_aligned=taken)
    self.info.metadata.update(image_sizes=_sizes_list(sizes), alignment=alignment)


def _stored_face(plan: pairs.GroupPlan, image_size: int, row: int
                 ) -> tuple[bytes, tuple[int, int], faces.Face | None]:
  """What a verification set stores for image `row`: its source bytes, or faces.face_image's
  result as PNG where alignment or resizing changes it; its (height, width); the Face."""
  data, source = plan.images[row]
  if data is None:
    data = images.read_image_file(source)
  landmarks = None if plan.landmarks is None else plan.landmarks[row]
  if landmarks is None and not image_size:
    return data, images.image_size(data, source), None
  face = faces.face_image(data, source, image_size or None, landmarks, plan.landmarks_file)
  if face.aligned or face.resized_from:
    data = images.encode_png(face.image)
  return data, tuple(int(v) for v in face.image.shape[:2]), face


BUILDERS: dict[str, Callable[..., tfds.core.DatasetBuilder]] = {
    fmt: MstkdFaces for fmt in TRAINING_FORMATS}
BUILDERS.update({fmt: MstkdVerification for fmt in VERIFICATION_FORMATS})

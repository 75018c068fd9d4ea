"""Where a stage's data comes from: the config's `data` section -> training, verification
(test) and validation sets.

Every stage asks this module, so adding a source is one class here and none in the stages.
Sources: "synthetic" (the built-in set, in memory) and "tfds" (a data set made by
`python -m mstkd_jax.formats.prepare`, streamed from its array_record files).

Verification sets are the test pairs: results are reported on them and nothing is selected
on them. Checkpoint selection on data uses the validation sets only (`validation_sets`;
`has_validation` says whether the config has one): the synthetic set's held-out validation
identities (data.synthetic.validation_identities_per_group > 0), or for tfds the prepared
verification set named by data.tfds.validation, which may not be the test set.
"""

import os
from typing import Iterator

import ml_collections
import numpy as np

from mstkd_jax import paths
from mstkd_jax.data import input_pipeline, pairs, prepared, synthetic
from mstkd_jax.data.pairs import VerificationSet  # The stages' pair-set type.
from mstkd_jax.errors import UserError

SOURCES = ("synthetic", "tfds")


class TrainingSet:
  """Training images with identity labels 0..I-1 and group labels; images are read through
  `train_batches` (training) and `image_chunks` (inference, in record order)."""
  identity: np.ndarray        # int32 [N]
  group: np.ndarray           # int32 [N]
  group_names: tuple[str, ...]
  image_shape: tuple[int, int, int]

  @property
  def num_examples(self) -> int:
    return len(self.identity)

  @property
  def num_identities(self) -> int:
    return int(self.identity.max()) + 1 if len(self.identity) else 0

  def identity_groups(self) -> np.ndarray:
    """int32 [num_identities]: the group of every identity."""
    out = np.full(self.num_identities, -1, np.int32)
    out[self.identity] = self.group
    return out

  def train_batches(self, rows, labels, *, extra=None, orientation="as_fed",
                    **settings) -> Iterator[dict]:
    """input_pipeline.train_batches' stream over `rows` fed with `labels`.

    `extra` maps a name to a per-record array shaped [N, 2, ...] (entries for the image as
    stored and mirrored, e.g. cached targets); each batch gets the entries of the records
    it feeds, in the orientation fed (or stored: see input_pipeline.add_oriented).
    """
    batches = self._batches(np.asarray(rows, np.int64), np.asarray(labels, np.int32),
                            **settings)
    for batch in batches:
      yield input_pipeline.add_oriented(batch, extra or {}, orientation)

  def _batches(self, rows, labels, **settings):
    raise NotImplementedError

  def image_chunks(self, chunk: int) -> Iterator[np.ndarray]:
    raise NotImplementedError

  def images_at(self, rows) -> np.ndarray:
    """uint8 [len(rows), H, W, 3]: the images of the given records, as stored."""
    raise NotImplementedError


class ArrayTrainingSet(TrainingSet):
  """Images held in memory (the synthetic set)."""

  def __init__(self, images, identity, group, group_names):
    self.images = images
    self.identity, self.group, self.group_names = identity, group, tuple(group_names)
    self.image_shape = tuple(images.shape[1:])

  def _batches(self, rows, labels, **settings):
    batches = input_pipeline.train_batches(
        {"image": self.images[rows], "label": labels, "row": rows}, **settings)
    for batch in batches:
      # input_pipeline reports positions in `rows`; callers want the record.
      batch["index"] = batch.pop("row").astype(np.int32)
      yield batch

  def image_chunks(self, chunk: int) -> Iterator[np.ndarray]:
    for start in range(0, self.num_examples, chunk):
      yield self.images[start:start + chunk]

  def images_at(self, rows) -> np.ndarray:
    return self.images[np.asarray(rows, np.int64)]


class TfdsTrainingSet(TrainingSet):
  """A prepared face data set, streamed (see data/tfds_input.py)."""

  def __init__(self, name: str, data_dir: str, image_size: int):
    from mstkd_jax.data import tfds_input  # pylint: disable=g-import-not-at-top
    self._tfds_input = tfds_input
    self.face_set = tfds_input.load_face_dataset(name, data_dir)
    self.identity, self.group = self.face_set.identity, self.face_set.group
    self.group_names = tuple(self.face_set.group_names)
    self.image_shape = (image_size, image_size, 3)

  def _batches(self, rows, labels, **settings):
    return self._tfds_input.train_batches(self.face_set, rows, labels,
                                          image_size=self.image_shape[:2], **settings)

  def image_chunks(self, chunk: int) -> Iterator[np.ndarray]:
    return self._tfds_input.ordered_images(self.face_set, self.image_shape[:2], chunk)

  def images_at(self, rows) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    chunks = self._tfds_input.ordered_images(self.face_set, self.image_shape[:2],
                                             max(len(rows), 1), rows=rows)
    return np.concatenate(list(chunks)) if len(rows) else np.zeros(
        (0,) + self.image_shape, np.uint8)


def data_dir(data_config, workdir: str, cache: str = "") -> str:
  """data.data_dir; if empty, for the tfds source TFDS_DATA_DIR (TFDS's own variable), for
  the synthetic set <workdir>/data (where it is generated and cached), or <the workdir's
  local cache folder>/data where the workdir is a URL (paths.cache_dir; `cache` is the
  config field cache_dir).

  Raises:
    UserError: the data folder is a URL (see `_tfds_dir` for the tfds source; the
      synthetic set's cache is a local file).
  """
  tfds = _check_source(data_config) == "tfds"
  if data_config.data_dir:
    if tfds:
      return _tfds_dir(data_config.data_dir, "config field data.data_dir")
    return paths.local(data_config.data_dir, "config field data.data_dir")
  if tfds:
    return _tfds_dir(os.environ["TFDS_DATA_DIR"], "TFDS_DATA_DIR")
  if paths.is_url(workdir):
    return os.path.join(paths.cache_dir(cache, workdir), "data")
  return os.path.join(paths.local(workdir, "workdir"), "data")


def with_data_dir(config, workdir: str) -> ml_collections.ConfigDict:
  """A copy of `config` (a stage's or the recipe's) with data.data_dir filled in by
  `data_dir` where it is empty (config field cache_dir read where there is one)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.data.data_dir:
    config.data.data_dir = data_dir(config.data, workdir, config.get("cache_dir", ""))
  return config


def _tfds_dir(path: str, what: str) -> str:
  """A TFDS data folder made absolute.

  Raises:
    UserError: `path` is a URL: the prepared face sets are array_record files, read by
      random access, and array_record's reader opens local files only (its open-source
      build has no GCS file: google/array_record issue 120).
  """
  if paths.is_url(path):
    raise UserError(
        f"{what}={os.fspath(path)!r} is a URL, but the prepared face sets are array_record "
        "files, whose reader opens local files only (google/array_record#120). Copy the "
        f"folder to a local disk (gsutil -m cp -r {os.fspath(path)} /local/dir) or mount "
        "the bucket (gcsfuse; launch/tpu_vm.sh run mounts it for TFDS_DATA_DIR), and give "
        "that path. The workdir may be a URL.")
  return paths.local(path, what)


def _synthetic_spec(data_config) -> synthetic.SyntheticSpec:
  try:
    return synthetic.SyntheticSpec(**data_config.synthetic.to_dict())
  except TypeError as e:
    raise UserError(f"config field data.synthetic: {e}") from e


def _synthetic(data_config, workdir: str) -> synthetic.SyntheticFaces:
  return synthetic.load_or_generate(_synthetic_spec(data_config),
                                    data_dir(data_config, workdir))


def _synthetic_sets(data_config, workdir: str, split: str) -> dict[str, VerificationSet]:
  source = pairs.SyntheticSource(_synthetic_spec(data_config), data_dir(data_config, workdir),
                                 split)
  return pairs.load("synthetic", source)


def _check_source(data_config) -> str:
  if data_config.source not in SOURCES:
    raise UserError(f"config field data.source={data_config.source!r}: expected one of "
                    f"{SOURCES}")
  if data_config.source == "tfds":
    if not data_config.tfds.train or not (data_config.data_dir or
                                          os.environ.get("TFDS_DATA_DIR")):
      raise UserError("data.source='tfds' needs config fields data.tfds.train (the name "
                      "given to `python -m mstkd_jax.formats.prepare`) and data.data_dir (its "
                      "--data_dir; or the environment variable TFDS_DATA_DIR)")
  return data_config.source


def training_set(data_config, workdir: str) -> TrainingSet:
  if _check_source(data_config) == "tfds":
    return TfdsTrainingSet(data_config.tfds.train, data_dir(data_config, workdir),
                           data_config.tfds.image_size)
  faces = _synthetic(data_config, workdir)
  return ArrayTrainingSet(faces.train_images, faces.train_identity, faces.train_group,
                          faces.spec.group_names)


def verification_sets(data_config, workdir: str) -> dict[str, VerificationSet]:
  """The test pairs of every group, {group: VerificationSet}, in group order."""
  if _check_source(data_config) == "tfds":
    from mstkd_jax.data import tfds_input  # pylint: disable=g-import-not-at-top
    if not data_config.tfds.verification:
      raise UserError("config field data.tfds.verification: expected the name of a prepared "
                      "verification set (RFW or .bin files)")
    return tfds_input.load_verification_sets(
        data_config.tfds.verification, data_dir(data_config, workdir),
        data_config.tfds.image_size)
  return _synthetic_sets(data_config, workdir, "eval")


def select(train: TrainingSet, *, group: str = "", identities=()) -> tuple[np.ndarray, np.ndarray]:
  """Rows of one group's identities, or of an identity subset, relabelled 0..K-1.

  Returns (row indices into the training set, new labels for those rows); new labels follow
  the order of the original identity labels.
  """
  if bool(group) == bool(len(identities)):
    raise UserError("give exactly one of a group name or an identity subset "
                    f"(got group={group!r} and {len(identities)} identities)")
  if group:
    if not train.group_names:
      raise UserError(f"group {group!r}: this data set has no demographic groups (a stock "
                      "insightface train.rec or a flat image tree has none); prepare it again "
                      "with `python -m mstkd_jax.formats.prepare ... --groups=FILE`, FILE naming "
                      "each identity's group (CSV identity,group or JSON)")
    if group not in train.group_names:
      raise UserError(f"unknown group {group!r}; this data set has groups "
                      f"{list(train.group_names)}")
    keep = np.flatnonzero(train.group == train.group_names.index(group))
    if not len(keep):
      raise UserError(f"group {group!r} has no training images")
  else:
    wanted = np.asarray(sorted(set(int(i) for i in identities)), np.int64)
    if wanted.min() < 0 or wanted.max() >= train.num_identities:
      raise UserError(f"identity labels must lie in [0, {train.num_identities}); got "
                      f"{wanted.min()}..{wanted.max()}")
    keep = np.flatnonzero(np.isin(train.identity, wanted))
  _, labels = np.unique(train.identity[keep], return_inverse=True)
  return keep.astype(np.int64), labels.astype(np.int32)


def _tfds_validation_name(data_config) -> str:
  """data.tfds.validation ("" = none); UserError if it names the verification (test) set."""
  name = data_config.tfds.get("validation", "")
  if not isinstance(name, str):
    raise UserError(f"config field data.tfds.validation={name!r}: expected the name of a "
                    "prepared verification set, or \"\" for none")
  if name and name == data_config.tfds.verification:
    raise UserError(f"config field data.tfds.validation={name!r} names the test set "
                    "(data.tfds.verification); selection on the test pairs is what the "
                    "held-out split avoids: prepare another verification set for it")
  return name


def has_validation(data_config) -> bool:
  """Whether the config has a held-out validation split; loads and generates nothing.

  Raises:
    UserError: for an unknown source, synthetic fields that do not make a SyntheticSpec, or
      data.tfds.validation naming the verification (test) set.
  """
  if _check_source(data_config) == "tfds":
    return bool(_tfds_validation_name(data_config))
  return _synthetic_spec(data_config).has_validation


def validation_sets(data_config, workdir: str) -> dict[str, VerificationSet]:
  """The held-out validation pairs of every group, for checkpoint selection.

  Returns:
    {} when the config has no validation split (synthetic with
    validation_identities_per_group 0, tfds with data.tfds.validation ""), else
    {group: VerificationSet} (images uint8 [M, H, W, 3], pairs int32 [P, 2], issame bool
    [P]); for tfds, images at data.tfds.image_size.
  Raises:
    UserError: as has_validation; for tfds also when the validation set is not prepared, or
      when it was prepared from the same source as the verification set (the test pairs
      under another name).
  """
  if not has_validation(data_config):
    return {}
  if data_config.source == "tfds":
    from mstkd_jax.data import tfds_input  # pylint: disable=g-import-not-at-top
    name = data_config.tfds.validation
    root = data_dir(data_config, workdir)
    _refuse_same_source(data_config, root)
    return tfds_input.load_verification_sets(name, root, data_config.tfds.image_size)
  return _synthetic_sets(data_config, workdir, "validation")


def _refuse_same_source(data_config, root: str) -> None:
  """UserError if data.tfds.validation and .verification were prepared from one source.

  Reads only the two metadata.json files; says nothing when the test set is unset or not
  prepared (verification_sets names that problem itself).
  """
  validation = prepared.find_prepared(root, data_config.tfds.validation, prepared.VERIFICATION)
  if not data_config.tfds.verification:
    return
  test = prepared.prepared_dir(root, prepared.VERIFICATION, data_config.tfds.verification)
  if not prepared.is_prepared(test):
    return
  source = prepared.read_metadata(validation).get("source")
  if source and source == prepared.read_metadata(test).get("source"):
    raise UserError(f"config field data.tfds.validation={data_config.tfds.validation!r} "
                    f"was prepared from {source}, as the test set "
                    f"data.tfds.verification={data_config.tfds.verification!r}; selection on "
                    "the test pairs is what the held-out split avoids")

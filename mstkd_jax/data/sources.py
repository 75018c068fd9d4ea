"""Where a stage's data comes from: the config's `data` section -> training and verification sets.

Every stage asks this module, so adding a source is one class here and none in the stages.
Sources: "synthetic" (the built-in set, in memory) and "tfds" (a data set made by
`python -m mstkd_jax.data.prepare`, streamed from its array_record files).
"""

import dataclasses
import os
from typing import Iterator

import numpy as np

from mstkd_jax import paths
from mstkd_jax.data import input_pipeline, synthetic
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


@dataclasses.dataclass
class VerificationSet:
  """One group's verification pairs: images and (a, b) index pairs with same/different labels."""
  images: np.ndarray          # uint8 [M, H, W, 3]
  pairs: np.ndarray           # int32 [P, 2]
  issame: np.ndarray          # bool [P]

  def pair_images(self) -> np.ndarray:
    """uint8 [2P, H, W, 3] in insightface .bin order: pair k = rows 2k and 2k+1."""
    return self.images[self.pairs.reshape(-1)]


def data_dir(data_config, workdir: str) -> str:
  """data.data_dir; if empty, for the tfds source TFDS_DATA_DIR (TFDS's own variable), for
  the synthetic set <workdir>/data (where it is generated and cached)."""
  if data_config.data_dir:
    return paths.local(data_config.data_dir, "config field data.data_dir")
  if _check_source(data_config) == "tfds":
    return paths.local(os.environ["TFDS_DATA_DIR"], "TFDS_DATA_DIR")
  return os.path.join(paths.local(workdir, "workdir"), "data")


def _synthetic(data_config, workdir: str) -> synthetic.SyntheticFaces:
  try:
    spec = synthetic.SyntheticSpec(**data_config.synthetic.to_dict())
  except TypeError as e:
    raise UserError(f"config field data.synthetic: {e}") from e
  return synthetic.load_or_generate(spec, data_dir(data_config, workdir))


def _check_source(data_config) -> str:
  if data_config.source not in SOURCES:
    raise UserError(f"config field data.source={data_config.source!r}: expected one of "
                    f"{SOURCES}")
  if data_config.source == "tfds":
    if not data_config.tfds.train or not (data_config.data_dir or
                                          os.environ.get("TFDS_DATA_DIR")):
      raise UserError("data.source='tfds' needs config fields data.tfds.train (the name "
                      "given to `python -m mstkd_jax.data.prepare`) and data.data_dir (its "
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
  if _check_source(data_config) == "tfds":
    from mstkd_jax.data import tfds_input  # pylint: disable=g-import-not-at-top
    if not data_config.tfds.verification:
      raise UserError("config field data.tfds.verification: expected the name of a prepared "
                      "verification set (RFW or .bin files)")
    sets = tfds_input.load_verification_sets(
        data_config.tfds.verification, data_dir(data_config, workdir),
        data_config.tfds.image_size)
    return {g: VerificationSet(*parts) for g, parts in sets.items()}
  faces = _synthetic(data_config, workdir)
  return {g: VerificationSet(images=faces.eval_images[g], pairs=faces.eval_pairs[g],
                             issame=faces.eval_issame[g]) for g in faces.spec.group_names}


def select(train: TrainingSet, *, group: str = "", identities=()) -> tuple[np.ndarray, np.ndarray]:
  """Rows of one group's identities, or of an identity subset, relabelled 0..K-1.

  Returns (row indices into the training set, new labels for those rows); new labels follow
  the order of the original identity labels.
  """
  if bool(group) == bool(len(identities)):
    raise UserError("give exactly one of a group name or an identity subset "
                    f"(got group={group!r} and {len(identities)} identities)")
  if group:
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

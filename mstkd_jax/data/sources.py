"""Where a stage's data comes from: the config's `data` section -> training and verification sets.

Every stage asks this module, so adding a source (a prepared TFDS dataset, an image tree)
is one branch here and none in the stages.
"""

import dataclasses
import os

import numpy as np

from mstkd_jax.data import synthetic
from mstkd_jax.errors import UserError


@dataclasses.dataclass
class TrainingSet:
  """Training images with identity and group labels (identities numbered 0..I-1)."""
  images: np.ndarray          # uint8 [N, H, W, 3]
  identity: np.ndarray        # int32 [N]
  group: np.ndarray           # int32 [N]
  group_names: tuple[str, ...]

  @property
  def num_identities(self) -> int:
    return int(self.identity.max()) + 1 if len(self.identity) else 0

  def identity_groups(self) -> np.ndarray:
    """int32 [num_identities]: the group of every identity."""
    out = np.full(self.num_identities, -1, np.int32)
    out[self.identity] = self.group
    return out


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
  return os.path.abspath(os.path.expanduser(data_config.data_dir or os.path.join(workdir, "data")))


def _synthetic(data_config, workdir: str) -> synthetic.SyntheticFaces:
  try:
    spec = synthetic.SyntheticSpec(**data_config.synthetic.to_dict())
  except TypeError as e:
    raise UserError(f"config field data.synthetic: {e}") from e
  return synthetic.load_or_generate(spec, data_dir(data_config, workdir))


def _check_source(data_config) -> None:
  if data_config.source != "synthetic":
    raise UserError(f"config field data.source={data_config.source!r}: expected 'synthetic'")


def training_set(data_config, workdir: str) -> TrainingSet:
  _check_source(data_config)
  faces = _synthetic(data_config, workdir)
  return TrainingSet(images=faces.train_images, identity=faces.train_identity,
                     group=faces.train_group, group_names=tuple(faces.spec.group_names))


def verification_sets(data_config, workdir: str) -> dict[str, VerificationSet]:
  _check_source(data_config)
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
  kept_ids, labels = np.unique(train.identity[keep], return_inverse=True)
  del kept_ids
  return keep.astype(np.int64), labels.astype(np.int32)

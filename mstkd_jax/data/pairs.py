"""Verification pairs: the one pair-set type, and one planner per source format.

A planner turns a source (an RFW folder, insightface .bin files, the synthetic set, arrays
in memory) into per-group `GroupPlan`s: each group's distinct images, not yet decoded, and
its pairs as rows of them. The TFDS builder stores plans (formats/tfds_builders.py), evaluation and
the stages decode them into `VerificationSet`s (`decode`, `load`). A new verification
format is one planner function plus one line in PLANNERS.

What the model sees of each image is made by formats/faces.py (`face_image`: decoded, aligned
with its landmarks where the plan has them, resized by the one resizer).
"""

import concurrent.futures
import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mstkd_jax.formats import faces
from mstkd_jax.errors import UserError


@dataclasses.dataclass
class VerificationSet:
  """One group's verification pairs over its distinct images.

  Unpacks as (images, pairs, issame).

  Attributes:
    images: uint8 [M, H, W, 3], every distinct image once.
    pairs: int [P, 2] rows into `images`; pair k is (pairs[k, 0], pairs[k, 1]).
    issame: bool [P], whether pair k shows one identity.
  """
  images: np.ndarray
  pairs: np.ndarray
  issame: np.ndarray

  def __iter__(self):
    return iter((self.images, self.pairs, self.issame))

  def pair_images(self) -> np.ndarray:
    """uint8 [2P, H, W, 3] in insightface .bin order: pair k = rows 2k and 2k+1."""
    return self.images[self.pairs.reshape(-1)]


@dataclasses.dataclass
class GroupPlan:
  """One group's pairs before decoding.

  Attributes:
    name: the group name.
    images: the distinct images, either a list of (encoded bytes, or None to read the file
      `source`; source) per image, or uint8 [M, H, W, 3] already decoded.
    pairs: int64 [P, 2] rows into `images`, in the source's pair order.
    issame: bool [P].
    identities: the identity shown by every image (len M), or None when unknown.
    landmarks: float64 [5, 2] (x, y) pixels per image (len M), to align the images with
      (faces.face_image), or None for images that come aligned.
    landmarks_file: the file the landmarks came from, for messages.
  """
  name: str
  images: list | np.ndarray
  pairs: np.ndarray
  issame: np.ndarray
  identities: list[str] | None = None
  landmarks: list[np.ndarray] | None = None
  landmarks_file: str | None = None

  @property
  def encoded(self) -> bool:
    """Whether `images` holds encoded files (what a TFDS verification set stores)."""
    return not isinstance(self.images, np.ndarray)


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """The built-in synthetic set: its spec, cache folder, and split ("eval" or "validation")."""
  spec: Any                   # synthetic.SyntheticSpec
  data_dir: str
  split: str = "eval"


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Verification sets given in memory: {group: VerificationSet-like}; `label` names them
  in messages (e.g. "data_sources[1]")."""
  sets: Mapping[str, Any]
  label: str = "arrays"


@dataclasses.dataclass(frozen=True)
class Planner:
  """How one verification format is read.

  Attributes:
    groups: source -> its group names in order, from listings and names only (no image).
    plan: source -> [GroupPlan], in the order of `groups`.
    expected: what a source of this format is, for messages.
    claims: path -> whether a path given as data is of this format; None for formats that
      are not files. File formats are the ones `prepare` can store as TFDS sets, so their
      plans hold encoded images.
  """
  groups: Callable[[Any], tuple[str, ...]]
  plan: Callable[[Any], list[GroupPlan]]
  expected: str
  claims: Callable[[str], bool] | None = None


def _plan(name: str, images: list, rows: list, issame: Sequence, identities=None,
          **landmarks) -> GroupPlan:
  pairs = np.asarray(rows, np.int64).reshape(-1, 2)
  return GroupPlan(name, images, pairs, np.asarray(issame, bool).reshape(-1), identities,
                   **landmarks)


# --- RFW -------------------------------------------------------------------------------


def _rfw_groups(path: str) -> tuple[str, ...]:
  from mstkd_jax.formats import rfw  # pylint: disable=g-import-not-at-top
  return tuple(rfw.RFWReader(path).groups)


def _rfw_plan(path: str) -> list[GroupPlan]:
  """Every group of an RFW folder; an image is (None, its file), named by (person, number),
  with its landmarks where the group has txts/<group>/<group>_lmk.txt."""
  from mstkd_jax.formats import rfw  # pylint: disable=g-import-not-at-top
  reader = rfw.RFWReader(path)
  plans = []
  for group in reader.groups:
    images, names, identities, rows, issame, seen = [], [], [], [], [], {}
    for p in reader.pairs(group):
      for person, number in ((p.name1, p.index1), (p.name2, p.index2)):
        if (person, number) not in seen:
          seen[(person, number)] = len(images)
          images.append((None, reader.image_path(group, person, number)))
          names.append(reader.image_name(person, number))
          identities.append(person)
        rows.append(seen[(person, number)])
      issame.append(p.same)
    landmarks = reader.landmarks(group, names)
    plans.append(_plan(group, images, rows, issame, identities, landmarks=landmarks,
                       landmarks_file=reader.landmarks_path(group) if landmarks else None))
  return plans


def _is_rfw_folder(path: str) -> bool:
  return any(os.path.isdir(os.path.join(path, *parts)) for parts in (("txts",),
                                                                     ("test", "txts")))


# --- insightface .bin ------------------------------------------------------------------


def bin_group_name(path: str) -> str:
  """African_test.bin -> African; lfw.bin -> lfw."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return stem[:-len("_test")] if stem.endswith("_test") and len(stem) > 5 else stem


def _bin_files(source: str) -> list[tuple[str, str]]:
  """(group, file) of a .bin file or of every .bin in a folder, sorted by group."""
  if os.path.isdir(source):
    names = sorted(f for f in os.listdir(source)
                   if f.lower().endswith(".bin") and not f.startswith("."))
    if not names:
      raise UserError(f"{source}: no .bin files in this folder; expected insightface "
                      "verification files such as African_test.bin")
    files = [os.path.join(source, f) for f in names]
  else:
    files = [source]
  seen = {}
  for file in files:
    group = bin_group_name(file)
    if group in seen:
      raise UserError(f"{file}: group name {group!r} also comes from {seen[group]}; "
                      "expected one .bin per group")
    seen[group] = file
  return sorted(seen.items())


def _is_bin_source(path: str) -> bool:
  """A file, or a folder holding .bin files (what `convert rfw_to_bin` writes)."""
  if os.path.isfile(path):
    return True
  return os.path.isdir(path) and any(f.lower().endswith(".bin") and not f.startswith(".")
                                     for f in os.listdir(path))


def _bin_groups(source: str) -> tuple[str, ...]:
  return tuple(group for group, _ in _bin_files(source))


def _bin_plan(source: str) -> list[GroupPlan]:
  """One group per .bin; identical bytes are one image (a .bin repeats them per pair)."""
  from mstkd_jax.formats import verification_bin  # pylint: disable=g-import-not-at-top
  plans = []
  for group, file in _bin_files(source):
    encoded, issame = verification_bin.load_verification_bin(file)
    images, rows, seen = [], [], {}
    for j, data in enumerate(encoded):
      if data not in seen:
        seen[data] = len(images)
        images.append((data, f"{file}#{j}"))
      rows.append(seen[data])
    plans.append(_plan(group, images, rows, issame))
  return plans


# --- Built-in synthetic set and arrays -------------------------------------------------


def _synthetic_groups(source: SyntheticSource) -> tuple[str, ...]:
  return tuple(source.spec.group_names)


def _synthetic_plan(source: SyntheticSource) -> list[GroupPlan]:
  """The spec's test ("eval") or validation pairs, generated once and cached in data_dir."""
  from mstkd_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  generated = synthetic.load_or_generate(source.spec, source.data_dir)
  images, pairs, issame = (getattr(generated, f"{source.split}_{field}")
                           for field in ("images", "pairs", "issame"))
  return [GroupPlan(g, images[g], pairs[g], issame[g]) for g in source.spec.group_names]


def _array_groups(source: ArraySource) -> tuple[str, ...]:
  return tuple(str(g) for g in source.sets)


def _array_plan(source: ArraySource) -> list[GroupPlan]:
  """The given sets as they are; UserError for anything but uint8 RGB images [N, H, W, 3]."""
  plans = []
  for group, vset in source.sets.items():
    where = f"{source.label}[{group!r}]"
    try:
      images, pairs, issame = vset.images, vset.pairs, vset.issame
    except AttributeError:
      raise UserError(f"{where}: expected a VerificationSet (images, pairs, issame), got "
                      f"{type(vset).__name__}") from None
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise UserError(f"{where}: images of shape {images.shape} and dtype {images.dtype} "
                      "cannot be fed to the model; expected uint8 RGB images [N, H, W, 3]")
    plans.append(GroupPlan(str(group), images, np.asarray(pairs), np.asarray(issame)))
  return plans


PLANNERS: dict[str, Planner] = {
    "rfw": Planner(_rfw_groups, _rfw_plan, "the RFW folder holding test/data and test/txts",
                   claims=_is_rfw_folder),
    "bin": Planner(_bin_groups, _bin_plan,
                   "an insightface verification .bin file or a folder of them",
                   claims=_is_bin_source),
    "synthetic": Planner(_synthetic_groups, _synthetic_plan, "the built-in synthetic set"),
    "arrays": Planner(_array_groups, _array_plan,
                      "a dict of group -> VerificationSet (uint8 RGB images, pairs, issame)"),
}
# The formats read from files, which `prepare` can store as TFDS verification sets.
FILE_FORMATS = tuple(name for name, planner in PLANNERS.items() if planner.claims)


def format_of(path: str) -> str:
  """The first format in PLANNERS order that claims an existing path (so a format that
  claims specific files goes before "bin", which takes any file and any folder holding
  .bin files)."""
  for name, planner in PLANNERS.items():
    if planner.claims and planner.claims(path):
      return name
  raise UserError(f"{path}: not a verification source; expected "
                  + " or ".join(p.expected for p in PLANNERS.values() if p.claims))


# --- Decoding --------------------------------------------------------------------------


def check_pairs(pairs: np.ndarray, issame: np.ndarray, count: int, where: str,
                min_pairs: int = 0) -> None:
  """UserError naming `where` unless pairs is [P, 2] rows of `count` images, issame [P],
  and P >= min_pairs."""
  pairs, issame = np.asarray(pairs), np.asarray(issame)
  if pairs.ndim != 2 or pairs.shape[1] != 2 or issame.shape != (pairs.shape[0],):
    raise UserError(f"{where}: pairs of shape {pairs.shape} and issame of shape "
                    f"{issame.shape}; expected [P, 2] and [P]")
  if pairs.size and (pairs.min() < 0 or pairs.max() >= count):
    raise UserError(f"{where}: pair indices must lie in [0, {count}), found "
                    f"{pairs.min()}..{pairs.max()}")
  if pairs.shape[0] < min_pairs:
    raise UserError(f"{where}: {pairs.shape[0]} pairs; the {min_pairs}-fold verification "
                    f"protocol needs at least {min_pairs}")


@dataclasses.dataclass
class Decoded:
  """What `decode` made of a plan.

  Attributes:
    vset: the VerificationSet.
    resized: the sorted [height, width] of the images that were resized.
    aligned: how many images were aligned with their landmarks.
    taken_as_aligned: how many had landmarks but were already faces.ALIGNED_SIZE square.
  """
  vset: VerificationSet
  resized: list[list[int]]
  aligned: int = 0
  taken_as_aligned: int = 0


def plan_face(plan: GroupPlan, row: int, image_size: int | None = None) -> faces.Face:
  """faces.face_image of image `row` of an encoded plan, with its landmarks if it has them."""
  data, source = plan.images[row]
  return faces.face_image(data, source, image_size,
                              None if plan.landmarks is None else plan.landmarks[row],
                              plan.landmarks_file)


def _workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))


def decode(plan: GroupPlan, image_size: int | None = None) -> Decoded:
  """Decodes a plan's images (each once, with `plan_face`, on a few threads), resized to
  image_size x image_size if given.

  Returns:
    Decoded: a VerificationSet with images uint8 [M, S, S, 3] and the plan's pairs and
    issame, and what was done to the images. Already-decoded images of the right size are
    kept as they are (not copied).
  Raises:
    UserError: an image cannot be read or decoded (naming its file), or, without
      image_size, the images differ in size.
  """
  if not plan.encoded:
    images = plan.images
    size = (image_size, image_size) if image_size else tuple(images.shape[1:3])
    issame = np.asarray(plan.issame, bool)
    if tuple(images.shape[1:3]) == size:
      return Decoded(VerificationSet(images, plan.pairs, issame), [])
    stacked = np.zeros((len(images),) + size + (3,), np.uint8)
    for i, image in enumerate(images):
      stacked[i] = faces.resize_image(image, size)
    return Decoded(VerificationSet(stacked, plan.pairs, issame), [list(images.shape[1:3])])
  with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
    made = list(pool.map(lambda row: plan_face(plan, row, image_size),
                         range(len(plan.images))))
  sizes = sorted({tuple(f.image.shape[:2]) for f in made})
  if image_size is None and len(sizes) > 1:
    raise UserError(f"group {plan.name!r}: images of sizes {sizes}; expected one size")
  size = sizes[0] if sizes else (image_size or 0, image_size or 0)
  stacked = np.empty((len(made),) + tuple(size) + (3,), np.uint8)
  for i, face in enumerate(made):
    stacked[i] = face.image
  resized = sorted({f.resized_from for f in made if f.resized_from})
  return Decoded(VerificationSet(stacked, plan.pairs, np.asarray(plan.issame, bool)),
                 [list(s) for s in resized], sum(f.aligned for f in made),
                 sum(f.taken_as_aligned for f in made))


def load(fmt: str, source: Any, image_size: int | None = None) -> dict[str, VerificationSet]:
  """{group: VerificationSet} of a source of format `fmt` (a key of PLANNERS)."""
  return {plan.name: decode(plan, image_size).vset for plan in PLANNERS[fmt].plan(source)}

"""Reader for the RFW test layout: test/data/<group>/<id>/<id>_NNNN.jpg and LFW-style pairs files.

Pairs lines: `name i j` (same identity) or `name1 i name2 j` (different); i, j are 1-based.

RFW's release ships its images as loose crops, not aligned: their five landmarks are in
test/txts/<group>/<group>_lmk.txt, one line per image, `<path> <label> x1 y1 ... x5 y5`
(formats/landmarks.py reads it, the path ending in <id>/<id>_NNNN.jpg). `landmarks` gives
them; data/pairs.py aligns with them (formats/align.py).
"""

import dataclasses
import os
from typing import Iterator, Sequence

import numpy as np

from mstkd_jax.formats.image_tree import check_path_name
from mstkd_jax.formats.images import decode_image
from mstkd_jax.formats.images import read_image_file
from mstkd_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class PairSpec:
  """One parsed pairs-file line; indices are the 1-based image numbers."""
  name1: str
  index1: int
  name2: str
  index2: int
  same: bool
  line: int


@dataclasses.dataclass(frozen=True)
class VerificationPair:
  """Two encoded images and whether they show the same identity."""
  image1: bytes
  image2: bytes
  same: bool
  source1: str
  source2: str


def _parse_index(token: str, path: str, line: int, text: str) -> int:
  if not (token.isascii() and token.isdigit()) or int(token) < 1:
    raise UserError(f"{path}:{line}: {token!r} is not an image number in {text!r}; expected "
                    "a 1-based integer")
  return int(token)


def parse_pairs_file(path: str) -> list[PairSpec]:
  """Parses an LFW-style pairs file; an optional LFW header line `<folds> <pairs>` is skipped."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise UserError(f"{path}: pairs file does not exist") from None
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: cannot read pairs file ({e}); expected UTF-8 text") from e
  pairs = []
  for number, text in enumerate(lines, start=1):
    tokens = text.split()
    if not tokens:
      continue
    if not pairs and len(tokens) == 2 and all(t.isdigit() for t in tokens):
      continue  # LFW's "10 300" header (folds, pairs per fold); RFW files have none.
    if len(tokens) == 3:
      name, i, j = tokens
      check_path_name(name, "identity", f"{path}:{number}")
      pairs.append(PairSpec(name, _parse_index(i, path, number, text), name,
                            _parse_index(j, path, number, text), True, number))
    elif len(tokens) == 4:
      name1, i, name2, j = tokens
      check_path_name(name1, "identity", f"{path}:{number}")
      check_path_name(name2, "identity", f"{path}:{number}")
      if name1 == name2:
        # Would label a same-identity pair as different.
        raise UserError(f"{path}:{number}: different-identity line {text!r} names {name1!r} "
                        "twice; expected two distinct identities")
      pairs.append(PairSpec(name1, _parse_index(i, path, number, text), name2,
                            _parse_index(j, path, number, text), False, number))
    else:
      raise UserError(f'{path}:{number}: cannot parse {text!r}; expected "name i j" (same '
                      'identity) or "name1 i name2 j" (different identities)')
  if not pairs:
    raise UserError(f"{path}: pairs file has no pairs")
  return pairs


class RFWReader:
  """Reads RFW's per-group verification pairs from <root>/test (or <root> = the test folder).

  Attributes:
    test_dir: the folder holding data/ and txts/.
    groups: sorted group names found under txts/.
  """

  def __init__(self, root: str, groups: Sequence[str] | None = None):
    root = os.fspath(root)
    if not os.path.isdir(root):
      raise UserError(f"{root}: RFW folder does not exist")
    if os.path.isdir(os.path.join(root, "txts")):
      self.test_dir = root
    elif os.path.isdir(os.path.join(root, "test", "txts")):
      self.test_dir = os.path.join(root, "test")
    else:
      raise UserError(f"{root}: not an RFW folder; expected test/txts/<group>/<group>_pairs.txt "
                      "and test/data/<group>/ under it")
    txts = os.path.join(self.test_dir, "txts")
    found = sorted(e.name for e in os.scandir(txts) if e.is_dir() and not e.name.startswith("."))
    if not found:
      raise UserError(f"{txts}: no group folders; expected txts/<group>/<group>_pairs.txt")
    if groups is not None:
      missing = [g for g in groups if g not in found]
      if missing:
        raise UserError(f"{txts}: no folder for group(s) {missing}; found {found}")
      found = sorted(groups)
    for g in found:
      if not os.path.isfile(self.pairs_path(g)):
        raise UserError(f"{self.pairs_path(g)}: pairs file does not exist")
      if not os.path.isdir(self.data_dir(g)):
        raise UserError(f"{self.data_dir(g)}: image folder of group {g!r} does not exist")
    self.groups = tuple(found)

  def pairs_path(self, group: str) -> str:
    return os.path.join(self.test_dir, "txts", group, f"{group}_pairs.txt")

  def data_dir(self, group: str) -> str:
    return os.path.join(self.test_dir, "data", group)

  def image_name(self, name: str, index: int) -> str:
    """`name`'s image number `index` (1-based) relative to data/<group>:
    <name>/<name>_<index:04d>.jpg."""
    return f"{name}/{name}_{index:04d}.jpg"

  def image_path(self, group: str, name: str, index: int) -> str:
    """Path of `name`'s image number `index` (1-based): <name>/<name>_<index:04d>.jpg."""
    return os.path.join(self.data_dir(group), *self.image_name(name, index).split("/"))

  def landmarks_path(self, group: str) -> str:
    return os.path.join(self.test_dir, "txts", group, f"{group}_lmk.txt")

  def landmarks(self, group: str, images: Sequence[str]) -> list[np.ndarray] | None:
    """The 5 landmarks of each of `images` (names relative to data/<group>, as `image_name`
    gives them) from txts/<group>/<group>_lmk.txt: float64 [5, 2] (x, y) pixels each; None
    when the group has no such file. Lines for other images are ignored.

    Raises:
      UserError: naming the file: a line that does not parse or degenerate points
        (formats/landmarks.py), two lines for one image, or an image without a line.
    """
    from mstkd_jax.formats import landmarks as landmarks_lib  # pylint: disable=g-import-not-at-top
    path = self.landmarks_path(group)
    if not os.path.isfile(path):
      return None
    points = landmarks_lib.read_landmarks(path)
    matched, _ = landmarks_lib.match_names(images, points, path)
    missing = [name for name in images if name not in matched]
    if missing:
      raise UserError(f"{path}: no landmarks for {len(missing)} of the {len(images)} images "
                      f"of the pairs (first: {missing[0]}); expected a line `<path> <label> "
                      "x1 y1 ... x5 y5` for each, or no landmarks file for aligned images")
    return [points[matched[name]] for name in images]

  def pairs(self, group: str) -> list[PairSpec]:
    """Parses the group's pairs file and checks that every image it names exists."""
    path = self.pairs_path(group)
    pairs = parse_pairs_file(path)
    for k, p in enumerate(pairs):
      for name, index in ((p.name1, p.index1), (p.name2, p.index2)):
        image = self.image_path(group, name, index)
        if not os.path.isfile(image):
          raise UserError(f"{path}:{p.line}: pair {k} names image {index} of {name!r}, but "
                          f"{image} does not exist")
    return pairs

  def iter_pairs(self, group: str, validate: bool = True) -> Iterator[VerificationPair]:
    """Yields the group's pairs in file order, reading two images at a time."""
    for p in self.pairs(group):
      images = []
      for name, index in ((p.name1, p.index1), (p.name2, p.index2)):
        source = self.image_path(group, name, index)
        data = read_image_file(source)
        if validate:
          decode_image(data, source)
        images.append((data, source))
      yield VerificationPair(images[0][0], images[1][0], p.same, images[0][1], images[1][1])

  def summary(self) -> dict:
    """Returns {"groups": {group: {"pairs": N, "same": N, "different": N}}}."""
    out = {}
    for g in self.groups:
      pairs = self.pairs(g)
      same = sum(p.same for p in pairs)
      out[g] = {"pairs": len(pairs), "same": same, "different": len(pairs) - same}
    return {"groups": out}

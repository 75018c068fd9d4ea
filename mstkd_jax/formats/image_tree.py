"""Streaming reader/writer for face image trees, plus the record types and the image check
(`decodes`) all readers share (images are decoded by images.py).

Layouts: <root>/<group>/<identity>/<image> (BUPT-Balancedface/Globalface) or
<root>/<identity>/<image>.
"""

import dataclasses
import os
from typing import Iterator, Sequence

from mstkd_jax.errors import UserError
from mstkd_jax.formats.images import decode_image, image_extension, is_image_name
from mstkd_jax.formats.images import read_image_file


@dataclasses.dataclass(frozen=True)
class FaceRecord:
  """One encoded face image and its labels.

  Attributes:
    image: the encoded JPEG/PNG bytes, as stored.
    identity: label in [0, num_identities).
    group: index into DatasetIndex.group_names, or -1 for data without groups.
    source: where it came from: a file path or "<file.rec>#<key>".
  """
  image: bytes
  identity: int
  group: int
  source: str


def decodes(data: bytes, source: str, skip_corrupt: bool, skipped: list) -> bool:
  """Whether the encoded image `data` decodes, as a reader that validates checks each image.

  With `skip_corrupt` an undecodable image is appended to `skipped` as (source, reason) and
  gives False.

  Raises:
    UserError: the image does not decode and skip_corrupt is False.
  """
  try:
    decode_image(data, source)
  except UserError as e:
    if not skip_corrupt:
      raise
    skipped.append((source, str(e)))
    return False
  return True


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
  """Names and counts of a training set; label i is identity_names[i].

  Attributes:
    group_names: sorted group names; empty for data without groups.
    identity_names: identity (folder) name per label.
    identity_groups: group index per label, -1 without groups.
    identity_image_counts: number of images per label.
    source: the folder or file the index describes.
  """
  group_names: tuple[str, ...]
  identity_names: tuple[str, ...]
  identity_groups: tuple[int, ...]
  identity_image_counts: tuple[int, ...]
  source: str

  def __post_init__(self):
    n = len(self.identity_names)
    if len(self.identity_groups) != n or len(self.identity_image_counts) != n:
      raise ValueError("identity_names, identity_groups, identity_image_counts differ in length")
    for g in self.identity_groups:
      if not -1 <= g < len(self.group_names) or (g == -1 and self.group_names):
        raise ValueError(f"group index {g} out of range for groups {self.group_names}")

  @property
  def num_identities(self) -> int:
    return len(self.identity_names)

  @property
  def num_images(self) -> int:
    return int(sum(self.identity_image_counts))

  def identity_key(self, identity: int) -> str:
    """Returns "<group>/<name>" (or "<name>" without groups) for a label."""
    g = self.identity_groups[identity]
    name = self.identity_names[identity]
    return name if g < 0 else f"{self.group_names[g]}/{name}"

  def group_counts(self) -> dict[str, dict[str, int]]:
    """Returns {group: {"images": N, "identities": N}} in group order."""
    counts = {name: {"images": 0, "identities": 0} for name in self.group_names}
    for g, n in zip(self.identity_groups, self.identity_image_counts):
      if g >= 0:
        counts[self.group_names[g]]["images"] += int(n)
        counts[self.group_names[g]]["identities"] += 1
    return counts

  def summary(self) -> dict:
    """Returns {"groups": {...}, "images": N, "identities": N}, ready for json.dumps."""
    return {"groups": self.group_counts(), "images": self.num_images,
            "identities": self.num_identities}

  def identity_range(self, group: int | str) -> range:
    """Returns the labels of one group; they are contiguous when read from a tree."""
    g = self.group_names.index(group) if isinstance(group, str) else group
    labels = [i for i, gi in enumerate(self.identity_groups) if gi == g]
    if not labels:
      return range(0)
    if labels[-1] - labels[0] + 1 != len(labels):
      raise UserError(f"{self.source}: the identities of group {self.group_names[g]!r} do not "
                      "have contiguous labels; expected groups ordered as in a sorted tree")
    return range(labels[0], labels[-1] + 1)


def _list_dir(path: str, what: str) -> tuple[list[str], list[str]]:
  """Returns sorted (subfolder names, file names) of `path`, hidden entries ignored."""
  dirs, files = [], []
  try:
    with os.scandir(path) as it:
      for entry in it:
        # Hidden entries (.DS_Store, ._foo.jpg from macOS archives) are never data.
        if entry.name.startswith("."):
          continue
        (dirs if entry.is_dir() else files).append(entry.name)
  except FileNotFoundError:
    raise UserError(f"{path}: {what} does not exist") from None
  except NotADirectoryError:
    raise UserError(f"{path}: expected {what}, found a file") from None
  except PermissionError:
    raise UserError(f"{path}: {what} is not readable (permission denied)") from None
  return sorted(dirs), sorted(files)


class ImageTreeReader:
  """Streams FaceRecords from an image tree, one file at a time.

  Listing (the `index`) never decodes. Labels follow sorted group, then sorted identity
  folder name; images within an identity are read in sorted file-name order.

  Attributes:
    root: the tree's top folder.
    grouped: True for <root>/<group>/<identity>/<image>, False for <root>/<identity>/<image>.
    index: the DatasetIndex; counts are files found (see `skipped` after iterating).
    skipped: (source, reason) of every file skipped when skip_corrupt=True.
  """

  def __init__(self, root: str, grouped: bool | None = None, validate: bool = True,
               skip_corrupt: bool = False):
    """Scans the tree.

    Args:
      root: top folder of the tree.
      grouped: layout; None detects it from the first top-level folder.
      validate: fully decode every image while iterating (cheap at 112x112).
      skip_corrupt: skip (and list in `skipped`) undecodable images and non-image files
        instead of raising UserError.
    """
    self.root = os.fspath(root)
    self.validate = validate
    self.skip_corrupt = skip_corrupt
    self._scan_skipped: list[tuple[str, str]] = []
    top_dirs, top_files = _list_dir(self.root, "image tree folder")
    if not top_dirs:
      raise UserError(f"{self.root}: no folders in the image tree; expected "
                      "<root>/<group>/<identity>/<image> or <root>/<identity>/<image>")
    self.grouped = self._detect_layout(top_dirs) if grouped is None else grouped
    self._check_no_files(self.root, top_files, "group" if self.grouped else "identity")
    names, groups, counts = [], [], []
    if self.grouped:
      group_names = tuple(top_dirs)
      for g, group in enumerate(group_names):
        group_path = os.path.join(self.root, group)
        id_dirs, files = _list_dir(group_path, "group folder")
        self._check_no_files(group_path, files, "identity")
        if not id_dirs:
          raise UserError(f"{group_path}: empty group; expected identity folders with images")
        for name in id_dirs:
          names.append(name)
          groups.append(g)
          counts.append(len(self._identity_files(os.path.join(group_path, name), scanning=True)))
    else:
      group_names = ()
      for name in top_dirs:
        names.append(name)
        groups.append(-1)
        counts.append(len(self._identity_files(os.path.join(self.root, name), scanning=True)))
    self.index = DatasetIndex(group_names, tuple(names), tuple(groups), tuple(counts), self.root)
    self.skipped = list(self._scan_skipped)

  def _detect_layout(self, top_dirs: Sequence[str]) -> bool:
    first = os.path.join(self.root, top_dirs[0])
    sub_dirs, files = _list_dir(first, "folder")
    has_images = any(is_image_name(f) for f in files)
    if sub_dirs and not has_images:
      return True
    if has_images and not sub_dirs:
      return False
    raise UserError(f"{first}: cannot tell the tree layout (found {len(sub_dirs)} folders and "
                    f"{len(files)} files); expected only identity folders (grouped tree) or "
                    "only images (tree without groups)")

  def _check_no_files(self, path: str, files: Sequence[str], expected: str):
    if files:
      raise UserError(f"{os.path.join(path, files[0])}: unexpected file; expected only "
                      f"{expected} folders in {path}")

  def _identity_files(self, path: str, scanning: bool = False) -> list[str]:
    """Returns the sorted image file names of one identity folder."""
    sub_dirs, files = _list_dir(path, "identity folder")
    if sub_dirs:
      hint = "" if self.grouped else (" (is this a grouped tree? pass --layout=grouped, or "
                                      "grouped=True in Python)")
      raise UserError(f"{os.path.join(path, sub_dirs[0])}: unexpected folder; expected only "
                      f".jpg/.jpeg/.png images in identity folder {path}{hint}")
    images = []
    for f in files:
      if is_image_name(f):
        images.append(f)
        continue
      source = os.path.join(path, f)
      if not self.skip_corrupt:
        raise UserError(f"{source}: not an image file; expected .jpg/.jpeg/.png files only "
                        "(pass --skip_corrupt, or skip_corrupt=True in Python, to skip such "
                        "files)")
      if scanning:
        self._scan_skipped.append((source, "not an image file name"))
    if not images:
      raise UserError(f"{path}: identity folder has no images; expected .jpg/.jpeg/.png files")
    return images

  def identity_dir(self, identity: int) -> str:
    """Returns the folder of one label."""
    return os.path.join(self.root, self.index.identity_key(identity))

  def __iter__(self) -> Iterator[FaceRecord]:
    self.skipped = list(self._scan_skipped)
    for identity in range(self.index.num_identities):
      path = self.identity_dir(identity)
      files = self._identity_files(path)
      if len(files) != self.index.identity_image_counts[identity]:
        raise UserError(f"{path}: holds {len(files)} images now but "
                        f"{self.index.identity_image_counts[identity]} when scanned; "
                        "expected the tree not to change while it is read")
      for name in files:
        source = os.path.join(path, name)
        data = read_image_file(source)
        if self.validate and not decodes(data, source, self.skip_corrupt, self.skipped):
          continue
        yield FaceRecord(data, identity, self.index.identity_groups[identity], source)


def read_image_tree_index(root: str, grouped: bool | None = None) -> DatasetIndex:
  """Lists a tree (no decoding) and returns its DatasetIndex."""
  return ImageTreeReader(root, grouped=grouped, validate=False).index


def check_path_name(name: str, what: str, source: str) -> str:
  """Returns `name` if it is safe as one folder name, else raises UserError."""
  if (not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name
      or "\0" in name or (os.altsep and os.altsep in name)):
    raise UserError(f"{source}: {what} name {name!r} cannot be a folder name; expected a "
                    'non-empty name without slashes that does not start with "."')
  return name


class ImageTreeWriter:
  """Writes FaceRecords as <root>/<group>/<identity>/<number>.<jpg|png>.

  Images are stored byte for byte; file names are zero-padded per-identity counters so
  that sorted order is write order. Groups are omitted when the index has none.
  """

  def __init__(self, root: str, index: DatasetIndex):
    self.root = os.fspath(root)
    self.index = index
    seen = set()
    for i in range(index.num_identities):
      check_path_name(index.identity_names[i], "identity", index.source)
      key = index.identity_key(i)
      if key in seen:
        raise UserError(f"{index.source}: identity {key!r} appears twice; expected unique "
                        "names per group")
      seen.add(key)
    for g in index.group_names:
      check_path_name(g, "group", index.source)
    self._width = max(4, len(str(max(index.identity_image_counts, default=0))))
    self._next = [0] * index.num_identities
    self.written = 0

  def write(self, record: FaceRecord) -> str:
    """Writes one record; returns its path."""
    if not 0 <= record.identity < self.index.num_identities:
      raise UserError(f"{record.source}: label {record.identity} outside [0, "
                      f"{self.index.num_identities})")
    if record.group != self.index.identity_groups[record.identity]:
      raise UserError(f"{record.source}: group {record.group} disagrees with group "
                      f"{self.index.identity_groups[record.identity]} of its identity")
    folder = os.path.join(self.root, self.index.identity_key(record.identity))
    os.makedirs(folder, exist_ok=True)
    n = self._next[record.identity]
    if n >= 10**self._width:
      raise UserError(f"{record.source}: more images for identity "
                      f"{self.index.identity_key(record.identity)!r} than the index counts")
    self._next[record.identity] = n + 1
    path = os.path.join(folder, f"{n:0{self._width}d}" + image_extension(record.image,
                                                                         record.source))
    with open(path, "xb") as f:
      f.write(record.image)
    self.written += 1
    return path

  def empty_identities(self) -> list[int]:
    """Labels that received no image (their folders do not exist)."""
    return [i for i, n in enumerate(self._next) if n == 0]

"""Reader of the IJB-B / IJB-C 1:1 verification release, and its aligned images in chunks.

The layout is the one insightface's recognition/_evaluation_/ijb/ijb_11.py and
arcface_torch's eval_ijbc.py read (`<root>` is the IJBB or IJBC folder, `<name>` its lower
case name, ijbb or ijbc):

  <root>/meta/<name>_face_tid_mid.txt        image template_id media_id        (a line per image)
  <root>/meta/<name>_name_5pts_score.txt     image x1 y1 ... x5 y5 score       (same images, same order)
  <root>/meta/<name>_template_pair_label.txt template_id_1 template_id_2 label (1 same, 0 not)
  <root>/loose_crop/<image>                  the loose face crops (JPEG)

Fields are separated by spaces; landmarks are (x, y) pixels of the loose crop in the order
of formats/align.py (eyes, nose, mouth corners), the score is the detector's face score.
insightface pairs line i of the two image files with each other; here they must name the
same image on every line.

Every line is checked; a problem stops with one UserError naming the file and line: a
missing meta file or folder, a line with the wrong number of fields or a field that does
not parse, the two image files out of step, NaN/Inf or degenerate landmarks or score, a
pair naming a template no image belongs to, a label other than 0/1, an image absent from
loose_crop (unless skip_missing: such images are dropped, counted and listed, and pairs
whose templates lost every image are dropped and counted).
"""

import concurrent.futures
import dataclasses
import os
from typing import Callable, Iterator

import numpy as np

from mstkd_jax.formats import align
from mstkd_jax.formats.images import decode_image, read_image_file
from mstkd_jax.errors import UserError

NAMES = ("IJBB", "IJBC")
ALIGNED_SIZE = align.TEMPLATE_SIZE
CHUNK = 2048


@dataclasses.dataclass
class IJBRelease:
  """One IJB release, checked.

  Attributes:
    root: the release folder (absolute).
    name: "IJBB" or "IJBC".
    images: [N] image names relative to loose_crop/, meta order (missing ones skipped).
    landmarks: float32 [N, 5, 2] (x, y) pixels of each loose crop.
    scores: float32 [N] detector face scores.
    templates: int64 [N] template id of each image.
    medias: int64 [N] media id of each image.
    pairs: int64 [P, 2] template ids of each template pair, file order.
    labels: int8 [P] 1 same subject, 0 not.
    missing: names of the images absent from loose_crop that were skipped.
    dropped_pairs: template pairs dropped because a template lost all its images.
  """
  root: str
  name: str
  images: list[str]
  landmarks: np.ndarray
  scores: np.ndarray
  templates: np.ndarray
  medias: np.ndarray
  pairs: np.ndarray
  labels: np.ndarray
  missing: list[str] = dataclasses.field(default_factory=list)
  dropped_pairs: int = 0

  def image_path(self, i: int) -> str:
    return os.path.join(self.root, "loose_crop", self.images[i])

  def summary(self) -> dict:
    """Counts for reports: images, templates, media, pairs (genuine, impostor), skipped."""
    return {"name": self.name, "root": self.root, "images": len(self.images),
            "templates": int(np.unique(self.templates).size),
            "media": int(np.unique(np.stack([self.templates, self.medias]), axis=1).shape[1]),
            "pairs": int(len(self.labels)), "genuine": int(self.labels.sum()),
            "impostor": int(len(self.labels) - self.labels.sum()),
            "missing_images": len(self.missing), "missing_listed": self.missing[:100],
            "dropped_pairs": int(self.dropped_pairs)}


def meta_file(root: str, name: str, kind: str) -> str:
  """<root>/meta/<name lower>_<kind>.txt; kind: face_tid_mid, name_5pts_score,
  template_pair_label."""
  return os.path.join(root, "meta", f"{name.lower()}_{kind}.txt")


def detect_name(root: str) -> str:
  """IJBB or IJBC: the folder's own name when it is one, else the one set of meta files.

  Raises:
    UserError: neither tells (no meta files, or both sets).
  """
  base = os.path.basename(os.path.normpath(root)).upper()
  if base in NAMES:
    return base
  found = [n for n in NAMES if os.path.exists(meta_file(root, n, "face_tid_mid"))]
  if len(found) == 1:
    return found[0]
  raise UserError(f"--ijb={root}: cannot tell IJBB from IJBC ("
                  + ("both sets of meta files are there" if found else
                     "no meta/ijbb_face_tid_mid.txt or meta/ijbc_face_tid_mid.txt")
                  + "); pass --ijb_name=IJBB or IJBC")


def _lines(path: str) -> Iterator[tuple[int, list[str]]]:
  """(line number, fields) of the non-blank lines of a text file."""
  try:
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, start=1):
        fields = line.split()
        if fields:
          yield number, fields
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: cannot read it ({e})") from e


def _int(value: str, where: str, what: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise UserError(f"{where}: {what} {value!r} does not parse as an integer") from None


def _read_tid_mid(path: str) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
  names, numbers, templates, medias = [], [], [], []
  for number, fields in _lines(path):
    where = f"{path} line {number}"
    if len(fields) != 3:
      raise UserError(f"{where}: {len(fields)} fields; expected 3: image template_id "
                      "media_id")
    names.append(fields[0])
    numbers.append(number)
    templates.append(_int(fields[1], where, "template id"))
    medias.append(_int(fields[2], where, "media id"))
  if not names:
    raise UserError(f"{path}: no lines; expected one line per image")
  return names, numbers, np.array(templates, np.int64), np.array(medias, np.int64)


def _read_5pts(path: str, names: list[str], tid_numbers: list[int], tid_path: str):
  landmarks = np.empty((len(names), 5, 2), np.float32)
  scores = np.empty(len(names), np.float32)
  i = -1
  for i, (number, fields) in enumerate(_lines(path)):
    where = f"{path} line {number}"
    if len(fields) != 12:
      raise UserError(f"{where}: {len(fields)} fields; expected 12: image, 10 landmark "
                      "numbers x1 y1 ... x5 y5 and the detector score")
    if i >= len(names):
      raise UserError(f"{where}: more images than the {len(names)} of {tid_path}; expected "
                      "the same images in the same order")
    if fields[0] != names[i]:
      raise UserError(f"{where}: names {fields[0]} where {tid_path} line {tid_numbers[i]} "
                      f"names {names[i]}; expected the same images in the same order")
    try:
      values = [float(v) for v in fields[1:]]
    except ValueError:
      raise UserError(f"{where}: {' '.join(fields[1:])!r} does not parse; expected 11 "
                      "numbers") from None
    landmarks[i] = align.check_landmarks(values[:10], f"{where} ({fields[0]})")
    if not np.isfinite(values[10]):
      raise UserError(f"{where} ({fields[0]}): detector score {fields[11]}; expected a "
                      "finite number")
    scores[i] = values[10]
  if i + 1 != len(names):
    raise UserError(f"{path}: {i + 1} images, {tid_path}: {len(names)}; expected the same "
                    "images in the same order")
  return landmarks, scores


def _line_of_row(path: str, row: int) -> int:
  """The file line number of the row-th (0-based) non-blank line."""
  for i, (number, _) in enumerate(_lines(path)):
    if i == row:
      return number
  return -1


def _read_pairs(path: str, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """int64 [P, 2] template ids and int8 [P] labels; numpy's parser, then line-by-line only
  to name a bad line."""
  try:
    table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
  except OSError as e:
    raise UserError(f"{path}: cannot read it ({e})") from e
  except ValueError:
    table = None
  if table is None or table.shape[1] != 3:
    for number, fields in _lines(path):
      where = f"{path} line {number}"
      if len(fields) != 3:
        raise UserError(f"{where}: {len(fields)} fields; expected 3: template_id_1 "
                        "template_id_2 label")
      for value, what in zip(fields, ("template id", "template id", "label")):
        _int(value, where, what)
    raise UserError(f"{path}: does not parse as lines of 3 integers")
  if not len(table):
    raise UserError(f"{path}: no lines; expected one template pair per line")
  bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
  if bad.size:
    row = int(bad[0])
    raise UserError(f"{path} line {_line_of_row(path, row)}: label {table[row, 2]}; "
                    "expected 1 (same subject) or 0")
  unknown = ~np.isin(table[:, :2], known)
  if unknown.any():
    row = int(np.flatnonzero(unknown.any(axis=1))[0])
    tid = table[row, 0] if unknown[row, 0] else table[row, 1]
    raise UserError(f"{path} line {_line_of_row(path, row)}: template {tid} is unknown (no "
                    "image of the face_tid_mid file belongs to it)")
  return table[:, :2].copy(), table[:, 2].astype(np.int8)


def _present(root: str, names: list[str]) -> np.ndarray:
  crops = os.path.join(root, "loose_crop")
  if not os.path.isdir(crops):
    raise UserError(f"{crops}: missing; expected the folder of loose face crops")
  listed = set(os.listdir(crops))
  return np.array([n in listed or ("/" in n and os.path.isfile(os.path.join(crops, n)))
                   for n in names], bool)


def read_release(root: str, name: str | None = None, skip_missing: bool = False,
                 warn: Callable[[str], None] | None = None) -> IJBRelease:
  """Reads and checks an IJB release folder (module docstring).

  Args:
    root: the IJBB or IJBC folder.
    name: "IJBB" or "IJBC" (any case); None: `detect_name`.
    skip_missing: drop images absent from loose_crop (counted, listed, warned) instead of
      refusing.
    warn: called with one line per warning (skipped images, dropped pairs).

  Raises:
    UserError: see the module docstring.
  """
  root = os.path.abspath(root)
  if not os.path.isdir(root):
    raise UserError(f"--ijb={root}: not a folder; expected an IJBB or IJBC release folder "
                    "(meta/, loose_crop/)")
  name = detect_name(root) if name is None else str(name).upper()
  if name not in NAMES:
    raise UserError(f"--ijb_name={name}: expected one of {', '.join(NAMES)}")
  paths = {k: meta_file(root, name, k)
           for k in ("face_tid_mid", "name_5pts_score", "template_pair_label")}
  for path in paths.values():
    if not os.path.isfile(path):
      raise UserError(f"{path}: missing; expected the {name} meta file (the insightface "
                      "IJB release layout)")
  names, numbers, templates, medias = _read_tid_mid(paths["face_tid_mid"])
  landmarks, scores = _read_5pts(paths["name_5pts_score"], names, numbers,
                                 paths["face_tid_mid"])
  pairs, labels = _read_pairs(paths["template_pair_label"], np.unique(templates))
  present = _present(root, names)
  missing: list[str] = []
  dropped = 0
  if not present.all():
    absent = np.flatnonzero(~present)
    missing = [names[i] for i in absent]
    if not skip_missing:
      i = int(absent[0])
      raise UserError(
          f"{paths['face_tid_mid']} line {numbers[i]}: {names[i]} is not in "
          f"{os.path.join(root, 'loose_crop')} ({len(missing)} listed images are absent); "
          "pass --skip_missing to evaluate without them")
    names = [n for n, keep in zip(names, present) if keep]
    landmarks, scores = landmarks[present], scores[present]
    templates, medias = templates[present], medias[present]
    keep = np.isin(pairs, np.unique(templates)).all(axis=1)
    dropped = int((~keep).sum())
    pairs, labels = pairs[keep], labels[keep]
    if warn is not None:
      shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
      warn(f"{name}: {len(missing)} images listed in the meta files are not in loose_crop "
           f"and were skipped ({shown}); {dropped} template pairs lost a template and were "
           "dropped")
    if not len(names) or not len(labels):
      raise UserError(f"--ijb={root}: no images or no template pairs left after skipping "
                      f"{len(missing)} missing images")
  if labels.min() == labels.max():
    raise UserError(f"{paths['template_pair_label']}: every pair has label {labels[0]}; "
                    "a ROC needs genuine (1) and impostor (0) pairs")
  return IJBRelease(root=root, name=name, images=names, landmarks=landmarks, scores=scores,
                    templates=templates, medias=medias, pairs=pairs, labels=labels,
                    missing=missing, dropped_pairs=dropped)


def _aligned(release: IJBRelease, i: int, size: int) -> np.ndarray:
  path = release.image_path(i)
  image = decode_image(read_image_file(path), path)
  face = align.align_face(image, release.landmarks[i], ALIGNED_SIZE, path)
  if size != ALIGNED_SIZE:
    from mstkd_jax.formats import faces  # pylint: disable=g-import-not-at-top
    face = faces.resize_image(face, size)
  return face


def aligned_chunks(release: IJBRelease, size: int = ALIGNED_SIZE, chunk: int = CHUNK,
                   workers: int | None = None) -> Iterator[np.ndarray]:
  """The loose crops decoded and aligned to 112x112 (formats/align.py), then resized to
  `size` (faces.resize_image) when it differs, in meta order.

  Decoding and alignment run on `workers` threads (default: the CPU count, at most 8), one
  chunk ahead of the consumer, so at most two chunks are in memory.

  Yields:
    uint8 [n, size, size, 3] RGB, n = `chunk` except for the last.

  Raises:
    UserError: an image that does not decode (naming it).
  """
  count = len(release.images)
  starts = range(0, count, chunk)
  workers = workers or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    def submit(start):
      return [pool.submit(_aligned, release, i, size)
              for i in range(start, min(start + chunk, count))]
    pending = submit(starts[0]) if count else []
    for k in range(len(starts)):
      current = pending
      pending = submit(starts[k + 1]) if k + 1 < len(starts) else []
      try:
        yield np.stack([f.result() for f in current])
      except BaseException:
        for f in pending:
          f.cancel()
        raise

"""Landmarks files of face photos: 5 points per image, read, checked and matched to images.

A text file holds one line per image: its name, then 10 numbers x1 y1 ... x5 y5 (pixels),
whitespace-separated, blank lines skipped. An 11th number is allowed in two forms, decided
for the whole file (`_parse_text`): a detector score in [0, 1] after the points (IJB's
*_name_5pts_score.txt), or an integer label before them (RFW's
test/txts/<race>/<race>_lmk.txt, `<path> <label> x1 y1 ... x5 y5`); both are ignored. A
JSON file is an object {name: [[x, y] x 5]} or {name: [10 numbers]}. The points are, in
order, the left eye, right eye, nose tip, left and right mouth corners as they appear in
the image (insightface's detectors' `face.kps` order).

A name belongs to an image when it is the image's relative path or a longer path ending
with it (`match_names`): RFW's `/test/data/African/m.0c7mh2/m.0c7mh2_0003.jpg` names the
image `m.0c7mh2/m.0c7mh2_0003.jpg` of the folder test/data/African.
"""

import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mstkd_jax.errors import UserError

# A landmark set whose points lie within this RMS distance (pixels) of their centroid has
# no usable scale (a face of one or two pixels, or all points at one place).
MIN_SPREAD_PX = 1.0
# Smaller / larger singular value of the centred points below this: the points lie on one
# line (a real face's eyes, nose and mouth never do, even in profile).
MIN_ASPECT = 1e-3
NUM_POINTS = 5

def check_landmarks(landmarks: Any, where: str) -> np.ndarray:
  """The landmarks as float64 [5, 2] (x, y) pixels, refused where they cannot be aligned.

  Args:
    landmarks: 5 (x, y) pairs or 10 numbers x1 y1 ... x5 y5.
    where: what to name in errors (e.g. "landmarks.txt line 3 (a.jpg)").

  Raises:
    UserError: naming `where`: not 10 numbers; NaN or Inf; all points within
      MIN_SPREAD_PX (RMS) of their centroid (zero scale); collinear points (smaller/larger
      singular value of the centred points below MIN_ASPECT).
  """
  try:
    points = np.asarray(landmarks, np.float64)
  except (TypeError, ValueError):
    raise UserError(f"{where}: landmarks {landmarks!r} are not numbers; expected 5 (x, y) "
                    "points") from None
  if points.size != 2 * NUM_POINTS or points.ndim not in (1, 2):
    raise UserError(f"{where}: {points.size} landmark numbers (shape {points.shape}); "
                    "expected 5 (x, y) points: 10 numbers")
  points = points.reshape(NUM_POINTS, 2)
  if not np.all(np.isfinite(points)):
    raise UserError(f"{where}: landmarks hold NaN or Inf ({points.ravel().tolist()}); "
                    "expected 5 finite (x, y) points")
  centred = points - points.mean(axis=0)
  singular = np.linalg.svd(centred, compute_uv=False)
  spread = float(np.sqrt(np.mean(np.sum(centred ** 2, axis=1))))
  if spread < MIN_SPREAD_PX:
    raise UserError(f"{where}: degenerate landmarks: the 5 points lie within {spread:.3g} "
                    f"px of their centre (zero scale; at least {MIN_SPREAD_PX} px needed)")
  if singular[1] < MIN_ASPECT * singular[0]:
    raise UserError(f"{where}: degenerate landmarks: the 5 points are collinear (singular "
                    f"values {singular[0]:.3g}, {singular[1]:.3g}); expected eyes, nose "
                    "and mouth corners of one face")
  return points



# --- Files -----------------------------------------------------------------------------


def _is_score(value: float) -> bool:
  return 0.0 <= value <= 1.0


def _is_label(value: float) -> bool:
  return value >= 0 and float(value).is_integer()


def _parse_text(path: str, text: str) -> dict[str, np.ndarray]:
  """The text form: `name x1 y1 ... x5 y5`, with an 11th number either a detector score
  last (IJB's `<name> x1 y1 ... x5 y5 <score>`, score in [0, 1]) or an identity label first
  (RFW's `<path> <label> x1 y1 ... x5 y5`). Which one is decided for the whole file: it is
  RFW's form when some line's last number is no score in [0, 1] (a mouth corner's y in
  pixels), and then every such line must start with an integer label."""
  rows: list[tuple[int, str, list[float]]] = []
  for number, line in enumerate(text.splitlines(), start=1):
    fields = line.split()
    if not fields:
      continue
    where = f"{path} line {number}"
    if len(fields) not in (11, 12):
      raise UserError(f"{where}: {len(fields)} fields; expected a name and 10 numbers "
                      "x1 y1 ... x5 y5 (an 11th is allowed: a detector score in [0, 1] last, "
                      "or an integer label first as in RFW's <race>_lmk.txt)")
    try:
      values = [float(v) for v in fields[1:]]
    except ValueError:
      raise UserError(f"{where}: {line.strip()!r} does not parse: expected a name and 10 "
                      "numbers") from None
    rows.append((number, fields[0], values))
  eleven = [(number, values) for number, _, values in rows if len(values) == 11]
  not_score = next(((n, v) for n, v in eleven if not _is_score(v[10])), None)
  if not_score is not None:
    for number, values in eleven:
      if not _is_label(values[0]):
        raise UserError(
            f"{path} line {number}: 11 numbers whose first, {values[0]:g}, is no integer "
            f"label, in a file whose line {not_score[0]} ends with {not_score[1][10]:g}, no "
            "detector score in [0, 1]; expected RFW's `<path> <label> x1 y1 ... x5 y5` or "
            "IJB's `<name> x1 y1 ... x5 y5 <score>` throughout")
  out: dict[str, np.ndarray] = {}
  lines: dict[str, int] = {}
  for number, name, values in rows:
    points = values[1:11] if len(values) == 11 and not_score is not None else values[:10]
    where = f"{path} line {number}"
    if name in lines:
      raise UserError(f"{where}: {name} is listed again (first at line {lines[name]}); "
                      "expected one line per image")
    lines[name] = number
    out[name] = check_landmarks(points, f"{where} ({name})")
  return out


def _parse_json(path: str, value: Any) -> dict[str, np.ndarray]:
  if not isinstance(value, Mapping):
    raise UserError(f"{path}: a JSON {type(value).__name__}; expected an object "
                    "{name: [[x, y] x 5] or [10 numbers]}")
  out = {}
  for name, points in value.items():
    where = f"{path} entry {name!r}"
    flat = points
    if isinstance(points, list) and points and all(isinstance(p, list) for p in points):
      if len(points) != NUM_POINTS or any(len(p) != 2 for p in points):
        raise UserError(f"{where}: expected 5 [x, y] points, got {points!r}")
      flat = [v for p in points for v in p]
    if (not isinstance(flat, list) or len(flat) != 2 * NUM_POINTS
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat)):
      raise UserError(f"{where}: expected [[x, y] x 5] or 10 numbers, got {points!r}")
    out[name] = check_landmarks(flat, where)
  return out


def read_landmarks(path: str) -> dict[str, np.ndarray]:
  """{image name: float64 [5, 2]} of a landmarks file (text or JSON; module docstring).

  Raises:
    UserError: naming the file (and line): unreadable, empty, a line or entry that does
      not parse, a name listed twice, degenerate landmarks (`check_landmarks`).
  """
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: cannot read the landmarks file ({e})") from e
  if text.lstrip().startswith("{"):
    try:
      value = json.loads(text)
    except ValueError as e:
      raise UserError(f"{path}: not valid JSON ({e})") from e
    out = _parse_json(path, value)
  else:
    out = _parse_text(path, text)
  if not out:
    raise UserError(f"{path}: no landmarks; expected one line (or JSON entry) per image")
  return out


# --- Names -----------------------------------------------------------------------------


def _shown(names: Sequence[str], limit: int = 5) -> str:
  return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit
                                     else "")


def _parts(name: str) -> list[str]:
  """A name's path components, "/"- or "\\"-separated, without "." and empty ones."""
  return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def match_names(images: Sequence[str], names: Iterable[str], where: str
                ) -> tuple[dict[str, str], list[str]]:
  """Which landmark name belongs to which image.

  A landmark name belongs to an image when it is the image's relative name or a longer
  path ending with it (component by component, "/" or "\\"; a leading "/" or "./" is
  ignored); the longest such image name wins.

  Args:
    images: the images' relative names ("/"-separated).
    names: the landmarks file's names.
    where: the landmarks file, for errors.

  Returns:
    ({image name: landmark name} of the images that have one, [landmark names that belong
    to no image]).

  Raises:
    UserError: two landmark names belong to one image (naming both).
  """
  by_name = {"/".join(_parts(image)): image for image in images}
  matched: dict[str, str] = {}
  unknown = []
  for name in names:
    parts = _parts(name)
    image = next((by_name["/".join(parts[k:])] for k in range(len(parts))
                  if "/".join(parts[k:]) in by_name), None)
    if image is None:
      unknown.append(name)
      continue
    if image in matched:
      raise UserError(f"{where}: {matched[image]!r} and {name!r} both name the image "
                      f"{image}; expected one landmark set per image")
    matched[image] = name
  return matched, unknown


def match_landmarks(images: Sequence[str], landmarks: Mapping[str, Any], landmarks_path: str,
                    src: str) -> dict[str, np.ndarray]:
  """The landmarks of every image, refusing a file that does not name exactly the images
  under `src` (names matched by `match_names`).

  Returns:
    {image name: float64 [5, 2]}.

  Raises:
    UserError: one line naming the file, the counts and the first names missing / unknown.
  """
  matched, unknown = match_names(images, landmarks, landmarks_path)
  missing = [n for n in images if n not in matched]
  if missing or unknown:
    parts = []
    if missing:
      parts.append(f"no landmarks for {len(missing)}: {_shown(missing)}")
    if unknown:
      parts.append(f"{len(unknown)} names with no image: {_shown(unknown)}")
    raise UserError(f"{landmarks_path}: {len(landmarks)} landmark sets for {len(images)} "
                    f"images in {src}; {'; '.join(parts)}")
  return {image: landmarks[name] for image, name in matched.items()}

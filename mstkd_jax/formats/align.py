"""5-point face alignment to the ArcFace template, and its command line.

  python -m mstkd_jax.formats.align --src=FOLDER --landmarks=FILE --dst=FOLDER [--size=112]

Each photo under --src (.jpg, .jpeg, .png, any depth) is warped with the similarity
transform (rotation, uniform scale, translation; no reflection or shear) that maps its 5
landmarks onto the ArcFace template, and written to --dst as a PNG of --size x --size
pixels under the same relative name (extension .png). Pixels that fall outside the photo
are black, as insightface's `norm_crop` (cv2.warpAffine, borderValue 0) makes them.

The estimation is scikit-image's `SimilarityTransform` (Umeyama's least-squares method,
what insightface's face_align.py calls), the warp scikit-image's `warp` (bilinear). The
template and its scaling follow insightface python-package/insightface/utils/face_align.py
(`arcface_dst`, `estimate_norm`): sizes that are multiples of 112 scale it by size / 112;
multiples of 128 (not of 112) scale it by size / 128 and shift x by 8 * size / 128 (the
112 template centred in a 128-wide crop). insightface refuses every other size (an
assertion); here they scale it by size / 112, with no shift.

--landmarks is a landmarks file (formats/landmarks.py): one line per photo, its name and 10
numbers x1 y1 ... x5 y5 (pixels; IJB's trailing detector score and RFW's
`<path> <label> x1 y1 ... x5 y5` lines are read too), or a JSON object {name: [[x, y] x
5]}. The points are the left eye, right eye, nose tip, left and right mouth corners as they
appear in the image (insightface's `face.kps` order). A name is a photo's path relative to
--src or a longer path ending with it; the file must name exactly the photos under --src.

Errors a user can fix print one `error: ...` line (exit 1; 2 for usage mistakes): a
landmarks file whose names or line count do not match the photos, a line that does not
parse (file and line number), a degenerate landmark set (NaN/Inf, all points within
landmarks.MIN_SPREAD_PX, or collinear), an undecodable photo.
"""

import json
import os
import sys
from typing import Any, Sequence

from absl import flags
import numpy as np

from mstkd_jax import errors, files, paths
from mstkd_jax.formats import cli
from mstkd_jax.formats.images import IMAGE_EXTENSIONS, decode_image, encode_png
from mstkd_jax.formats.images import read_image_file
# check_landmarks is used here and by the IJB reader as align.check_landmarks.
from mstkd_jax.formats.landmarks import check_landmarks, match_landmarks, read_landmarks
from mstkd_jax.errors import UserError

# insightface face_align.py `arcface_dst`: (x, y) pixels in a 112 x 112 crop; left eye,
# right eye, nose tip, left mouth corner, right mouth corner.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963],
                             [73.5318, 51.5014],
                             [56.0252, 71.7366],
                             [41.5493, 92.3655],
                             [70.7299, 92.2041]], np.float64)
TEMPLATE_SIZE = 112


def template(size: int = TEMPLATE_SIZE) -> np.ndarray:
  """The ArcFace template for a size x size crop: float64 [5, 2] (x, y) pixels.

  Source: insightface face_align.py `estimate_norm` (multiples of 112: x size/112;
  multiples of 128: x size/128 and x shifted by 8 size/128); other sizes x size/112 (see
  the module docstring).

  Raises:
    UserError: `size` is not a positive integer.
  """
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    raise UserError(f"--size: expected a positive number of pixels, got {size!r}")
  if size % TEMPLATE_SIZE == 0 or size % 128 != 0:
    return ARCFACE_TEMPLATE * (size / TEMPLATE_SIZE)
  ratio = size / 128.0
  return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])


def estimate_transform(landmarks: Any, size: int = TEMPLATE_SIZE, where: str = "landmarks"):
  """The similarity transform mapping photo (x, y) pixels onto the template of `size`.

  Args:
    landmarks: [5, 2] (or 10) float (x, y) pixels of the photo, in template order.
    size: the aligned crop's side, pixels.
    where: what to name in errors.

  Returns:
    A skimage.transform.SimilarityTransform (its `params`: float64 [3, 3]; call it on
    [N, 2] photo points to get crop points).

  Raises:
    UserError: naming `where`: the landmarks are refused by `check_landmarks`, or the
      estimation failed or gave a non-finite or zero scale.
  """
  from skimage.transform import SimilarityTransform  # pylint: disable=g-import-not-at-top
  points = check_landmarks(landmarks, where)
  target = template(size)
  if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
    transform = SimilarityTransform.from_estimate(points, target)
    ok = bool(transform)
  else:
    transform = SimilarityTransform()
    ok = transform.estimate(points, target)
  if not ok or not np.all(np.isfinite(transform.params)) or not transform.scale > 0:
    raise UserError(f"{where}: degenerate landmarks: no similarity transform maps "
                    f"{points.ravel().tolist()} onto the ArcFace template")
  return transform


def align_face(image: np.ndarray, landmarks: Any, size: int = TEMPLATE_SIZE,
               where: str = "landmarks") -> np.ndarray:
  """Warps a photo so that its 5 landmarks fall on the ArcFace template.

  Args:
    image: uint8 [H, W, 3] RGB (or BGR: channels are kept as given).
    landmarks: float [5, 2] (x, y) pixels in `image`.
    size: the output side, pixels.
    where: what to name in errors.

  Returns:
    uint8 [size, size, 3]: bilinear samples, black outside the photo (insightface
    face_align.py `norm_crop`).

  Raises:
    UserError: see `estimate_transform`; an image that is not [H, W, 3].
  """
  from skimage.transform import warp  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
    raise UserError(f"{where}: expected an [H, W, 3] image, got shape {image.shape}")
  transform = estimate_transform(landmarks, size, where)
  # warp takes the map from output (x, y) to input (x, y).
  warped = warp(image, transform.inverse, output_shape=(size, size), order=1,
                mode="constant", cval=0.0, preserve_range=True)
  return np.clip(np.rint(warped), 0, 255).astype(np.uint8)




def list_images(root: str) -> list[str]:
  """Relative names ("/"-separated, sorted) of the .jpg/.jpeg/.png files under `root`.

  Raises:
    UserError: `root` is not a folder, or holds no images.
  """
  if not os.path.isdir(root):
    raise UserError(f"--src={root}: not a folder; expected a folder of photos")
  names = []
  for directory, subdirs, names_here in os.walk(root):
    subdirs.sort()
    for name in names_here:
      if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        rel = os.path.relpath(os.path.join(directory, name), root)
        names.append(rel.replace(os.sep, "/"))
  if not names:
    raise UserError(f"--src={root}: no images (.jpg, .jpeg, .png) in it")
  return sorted(names)


def align_folder(src: str, landmarks_path: str, dst: str, size: int = TEMPLATE_SIZE) -> dict:
  """Aligns every photo under `src` with its landmarks; writes PNGs under `dst`.

  Args:
    src: folder of .jpg/.jpeg/.png photos (any depth).
    landmarks_path: text or JSON landmarks file naming exactly those photos.
    dst: output folder (created; not inside `src`): <name without extension>.png each,
      uint8 RGB [size, size], written atomically.
    size: output side, pixels.

  Returns:
    {"images": count, "size": size, "dst": dst}.

  Raises:
    UserError: see the module docstring; nothing is written before the landmarks file and
      the folder have been checked.
  """
  src = paths.local(src, "--src")
  dst = paths.local(dst, "--dst")
  landmarks_path = paths.local(landmarks_path, "--landmarks")
  template(size)  # checks size
  if os.path.commonpath([src, dst]) == src:
    raise UserError(f"--dst={dst}: is inside --src={src}; expected a folder outside it (a "
                    "rerun would take the outputs for photos)")
  images = list_images(src)
  landmarks = match_landmarks(images, read_landmarks(landmarks_path), landmarks_path, src)
  outputs: dict[str, str] = {}
  for name in images:
    out = os.path.splitext(name)[0] + ".png"
    if out in outputs:
      raise UserError(f"--src={src}: {outputs[out]} and {name} would both be written as "
                      f"{out}; rename one")
    outputs[out] = name
  for out, name in outputs.items():
    path = os.path.join(src, name)
    image = decode_image(read_image_file(path), path)
    aligned = align_face(image, landmarks[name], size, f"{landmarks_path} ({name})")
    target = os.path.join(dst, out)
    try:
      os.makedirs(os.path.dirname(target), exist_ok=True)
    except OSError as e:
      raise files.write_error(target, e) from e
    files.write_bytes(target, encode_png(aligned))
  return {"images": len(images), "size": int(size), "dst": dst}


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; prints a JSON summary. Returns 0, 1 after one `error:` line, or 130
  after one line for Ctrl-C (the PNGs written before stay)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  flags.DEFINE_string("src", None, "Folder of photos (.jpg, .jpeg, .png; any depth).",
                      flag_values=fv)
  flags.DEFINE_string("landmarks", None, "Landmarks: text (name + 10 numbers a line) or "
                      "JSON {name: [[x, y] x 5]}.", flag_values=fv)
  flags.DEFINE_string("dst", None, "Output folder for the aligned PNGs.", flag_values=fv)
  flags.DEFINE_integer("size", TEMPLATE_SIZE, "Output side in pixels.", flag_values=fv)
  for name in ("src", "landmarks", "dst"):
    flags.mark_flag_as_required(name, flag_values=fv)
  rest = cli.parse(fv, argv, prog="python -m mstkd_jax.formats.align", doc=__doc__)
  if rest:
    cli.usage_error(f"unexpected arguments {rest}; give every setting as a --flag")
  try:
    summary = align_folder(fv.src, fv.landmarks, fv.dst, fv.size)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return errors.interrupted()
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())

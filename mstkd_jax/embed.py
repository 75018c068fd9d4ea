r"""Embeds a user's own aligned face images with any checkpoint, on every device.

  python -m mstkd_jax.embed --checkpoint=workdir/distill_default/student/mstkd/SL/a-KD \
      --images=faces/ --out=embeddings.npz [--flip]

--checkpoint and the model flags (--arch, --width, --embedding_size, --use_se,
--image_size) are resolved exactly as `mstkd_jax.evaluate` resolves them
(mstkd_jax.interop.resolve).

--images is a folder or a text file:
  * a folder: every image under it at any depth (extensions in
    formats.images.IMAGE_EXTENSIONS, any case), hidden files and folders (".name")
    skipped, in sorted order of their paths relative to the folder;
  * a text file: one image path a line, relative paths taken from the list file's folder;
    blank lines and lines starting with "#" are skipped.
The images must already be aligned face crops (the ArcFace 5-point template, as the models
were trained on); unaligned photos are aligned first with mstkd_jax.formats.align.

Each image is decoded to RGB (formats.images.decode_image: every JPEG/PNG mode),
resized to the model's input when its size differs (formats.faces.RESAMPLING; one warning
names the sizes found), normalized (x / 255 - 0.5) / 0.5 as evaluate does, and embedded
on every device (evaluation.embedding.embed_stream, with a progress bar on a terminal), a
chunk of CHUNK_IMAGES images at a time, so memory does not grow with the number of images.

--out gets an .npz (written atomically, by process 0) with
  embeddings: float32 [N, D], L2-normalized; with --flip the raw embeddings of the image
    and of its horizontal mirror are summed before normalizing (insightface's flip fusion,
    evaluate's "accuracy"); without it, the image's alone;
  names: str [N], each image's path relative to the folder ("/"-separated), or as the
    list file writes it; row i of embeddings is names[i].
Cosine similarity of two faces is then the dot product of their rows.

In Python: `embed(checkpoint, arch_settings, images, out)` returns a summary dict. Errors a
user can fix (no images, a listed file missing, an undecodable image, a bad checkpoint)
print one `error: ...` line naming the file and exit 2 (flags) or 1 (everything else).
"""

import os
import sys
from typing import Any, Iterator, Sequence

from absl import app, flags
import numpy as np

from mstkd_jax import errors, paths
from mstkd_jax.formats.images import IMAGE_EXTENSIONS, decode_image, is_image_name, read_image_file
from mstkd_jax.errors import UserError
from mstkd_jax.interop import command_line, resolve
from mstkd_jax.interop.command_line import FlagError

# Decoded images held in memory at a time (a multiple of the batch is used).
CHUNK_IMAGES = 2048
NORMALIZATION = "(x / 255 - 0.5) / 0.5 on RGB uint8, as evaluate and insightface"


# --- Listing ---------------------------------------------------------------------------


def _walk_folder(root: str) -> tuple[list[str], list[str]]:
  def fail(error: OSError):
    raise UserError(f"{error.filename or root}: cannot list the images folder "
                    f"({error.strerror or error})")

  found = []
  for folder, subfolders, file_names in os.walk(root, onerror=fail):
    subfolders[:] = [d for d in subfolders if not d.startswith(".")]
    for name in file_names:
      if not name.startswith(".") and is_image_name(name):
        relative = os.path.relpath(os.path.join(folder, name), root)
        found.append(relative.replace(os.sep, "/"))
  found.sort()
  if not found:
    raise UserError(f"{root}: the images folder holds no images (any of "
                    f"{', '.join(IMAGE_EXTENSIONS)} at any depth)")
  return [os.path.join(root, *name.split("/")) for name in found], found


def _read_list(list_file: str) -> tuple[list[str], list[str]]:
  try:
    with open(list_file, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as e:
    raise UserError(f"{list_file}: not a UTF-8 text file listing image paths ({e.reason} at "
                    f"byte {e.start})") from e
  except OSError as e:
    raise UserError(f"{list_file}: cannot read the image list ({e.strerror or e})") from e
  base = os.path.dirname(list_file)
  image_paths, names = [], []
  for number, line in enumerate(lines, 1):
    name = line.strip()
    if not name or name.startswith("#"):
      continue
    path = os.path.join(base, os.path.expanduser(name))
    if not os.path.isfile(path):
      what = "is a folder" if os.path.isdir(path) else "does not exist"
      raise UserError(f"{list_file} line {number}: {path} {what}; expected an image file "
                      "(relative paths are taken from the list file's folder)")
    image_paths.append(os.path.abspath(path))
    names.append(name)
  if not image_paths:
    raise UserError(f"{list_file}: the image list names no images (one path a line)")
  return image_paths, names


def list_images(images: Any) -> tuple[list[str], list[str]]:
  """The image files of --images and their names, in order.

  Args:
    images: a folder (images at any depth) or a text file of image paths (module
      docstring).
  Returns:
    (absolute paths, names): names relative to the folder, "/"-separated, or as listed.
  Raises:
    FlagError: no --images given.
    UserError: it does not exist, is an image itself, holds or lists no images, or lists
      a file that does not exist (naming the list's line).
  """
  if images is None or not os.fspath(images):
    raise FlagError("--images: expected a folder of aligned face images or a text file "
                    "listing image paths")
  path = paths.local(images, "--images")
  if os.path.isdir(path):
    return _walk_folder(path)
  if not os.path.exists(path):
    raise UserError(f"--images={os.fspath(images)}: {path} does not exist; expected a folder "
                    "of images or a text file listing image paths")
  if is_image_name(path):
    raise UserError(f"--images={os.fspath(images)}: is an image; expected a folder of images "
                    "or a text file listing image paths, one a line")
  return _read_list(path)


# --- Decoding --------------------------------------------------------------------------


def decoded_chunks(image_paths: Sequence[str], size: int, chunk: int,
                   resized: dict) -> Iterator[np.ndarray]:
  """uint8 RGB [n <= chunk, size, size, 3] arrays of the images in order; an image of
  another size is resized (formats.faces.resize_image) and counted in `resized` as
  {(height, width): images}.

  Raises:
    UserError: an image cannot be read or decoded (naming the file).
  """
  from mstkd_jax.formats import faces  # pylint: disable=g-import-not-at-top
  for start in range(0, len(image_paths), chunk):
    part = image_paths[start:start + chunk]
    out = np.empty((len(part), size, size, 3), np.uint8)
    for i, path in enumerate(part):
      image = decode_image(read_image_file(path), path)
      if image.shape[:2] != (size, size):
        resized[image.shape[:2]] = resized.get(image.shape[:2], 0) + 1
        image = faces.resize_image(image, size)
      out[i] = image
    yield out


def resize_warning(source: str, resized: dict, total: int, size: int) -> str:
  """The one warning about resized images (as evaluate words it), naming the sizes."""
  from mstkd_jax.formats import faces  # pylint: disable=g-import-not-at-top
  sizes = sorted(resized, key=lambda s: -resized[s])
  shown = ", ".join(f"{h}x{w}" for h, w in sizes[:4]) + (" ..." if len(sizes) > 4 else "")
  return (f"{source}: {sum(resized.values())} of {total} images of {shown} pixels, the model "
          f"takes {size}x{size}; resized them with {faces.RESAMPLING}")


# --- Embedding -------------------------------------------------------------------------


def embed(checkpoint: Any, arch_settings: Any, images: Any, out: Any, *, flip: bool = False,
          batch_size: int = 256, parallel=None, verbose: bool = True) -> dict:
  """Writes the L2-normalized embeddings of a folder or list of images (module docstring).

  Args:
    checkpoint: an Orbax stage workdir, model/ or checkpoints/ folder or step folder; or a
      PyTorch IResNet state_dict file (.pth).
    arch_settings: an ArchSettings or a dict of its fields; None fields (or None) come from
      the workdir's config.json, the checkpoint's shapes, or DEFAULTS.
    images: a folder of images (any depth) or a text file listing image paths.
    out: the .npz to write: "embeddings" float32 [N, D] (L2-normalized), "names" str [N].
    flip: sum the raw embeddings of each image and its mirror before normalizing.
    batch_size: images per embedding step (over all local devices).
    parallel: a mstkd_jax.train.parallel.DataParallel; default pmap over every local device.
    verbose: print the warning (stderr) and a summary line (stdout).

  Returns:
    {"path", "count", "embedding_size", "image_size", "flip", "resized" ({"HxW": images}),
    "warnings"}.

  Raises:
    FlagError: a bad setting (architecture, sizes, batch size, --images or --out missing).
    UserError: the checkpoint or an image is missing or unreadable, or there are no images.
      Nothing is written then.
  """
  explicit = resolve.as_settings(arch_settings, FlagError)
  resolve.check_settings(explicit, "--", FlagError)
  batch_size = resolve.check_positive(batch_size, "--batch_size", FlagError)
  path = command_line.output_file(out, "embeddings.npz")
  image_paths, names = list_images(images)
  model = resolve.load_model(command_line.checkpoint_path(checkpoint), explicit)

  import jax  # pylint: disable=g-import-not-at-top
  from mstkd_jax import files  # pylint: disable=g-import-not-at-top
  from mstkd_jax.evaluation import embedding  # pylint: disable=g-import-not-at-top
  from mstkd_jax.evaluation import verification  # pylint: disable=g-import-not-at-top
  if parallel is None:
    from mstkd_jax.train import parallel as parallel_lib  # pylint: disable=g-import-not-at-top
    parallel = parallel_lib.get("pmap", 0)
  size = int(model.settings.image_size)
  chunk = batch_size * max(1, CHUNK_IMAGES // batch_size)
  resized: dict = {}
  rows = []
  for emb, emb_flip in embedding.embed_stream(
      model.variables, model.module, decoded_chunks(image_paths, size, chunk, resized),
      parallel, batch_size, total=len(image_paths)):
    rows.append(verification.fuse_flip(emb, emb_flip) if flip
                else verification.l2_normalize(emb))
  embeddings = np.concatenate(rows).astype(np.float32)
  warnings = ([resize_warning(os.fspath(images), resized, len(image_paths), size)]
              if resized else [])
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.save_npz(path, {"embeddings": embeddings, "names": np.asarray(names, dtype=str)})
  summary = {"path": path, "count": len(names), "embedding_size": int(embeddings.shape[1]),
             "image_size": size, "flip": bool(flip),
             "resized": {f"{h}x{w}": n for (h, w), n in resized.items()},
             "warnings": warnings}
  if verbose:
    errors.warn_all(warnings, sys.stderr)
    print(f"Wrote {path}: {len(names)} L2-normalized embeddings of "
          f"{embeddings.shape[1]} dimensions ({resolve.describe(model.settings)}"
          f"{', image + mirror' if flip else ''}) and their names", flush=True)
  return summary


# --- Command line ----------------------------------------------------------------------


def define_flags() -> dict:
  """Defines the command's absl flags (only when run as a command); returns the holders."""
  return {
      # --checkpoint, --arch, --width, --embedding_size, --use_se, --image_size (as evaluate).
      "model": command_line.define_model_flags(),
      "images": flags.DEFINE_string("images", None, "A folder of aligned face images (any "
                                    "depth) or a text file of image paths, one a line."),
      "out": flags.DEFINE_string("out", None, "The .npz to write (embeddings, names)."),
      "flip": flags.DEFINE_boolean("flip", False, "Sum the embeddings of each image and of "
                                   "its mirror before normalizing."),
      "batch_size": flags.DEFINE_integer("batch_size", 256, "Images per embedding step."),
  }


def run(holders: dict) -> None:
  embed(holders["model"].checkpoint.value, holders["model"].settings(),
        holders["images"].value, holders["out"].value, flip=holders["flip"].value,
        batch_size=holders["batch_size"].value)


if __name__ == "__main__":
  _HOLDERS = define_flags()
  flags.mark_flags_as_required(["checkpoint", "images", "out"])
  app.run(lambda argv: command_line.run_command(argv, lambda: run(_HOLDERS)),
          flags_parser=command_line.parse_flags)

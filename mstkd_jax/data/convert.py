"""Converters between face data formats, and their command line.

python -m mstkd_jax.data.convert rfw_to_bin|tree_to_rec|rec_to_tree --src=... --dst=...
"""

import argparse
import io
import json
import os
import shutil
import sys
from typing import Sequence

from PIL import Image

from mstkd_jax.data import image_tree
from mstkd_jax.data import recordio
from mstkd_jax.data import rfw
from mstkd_jax.data import verification_bin
from mstkd_jax.errors import UserError


def _remove(path: str):
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def rfw_to_bin(src: str, dst: str, groups: Sequence[str] | None = None,
               validate: bool = True, overwrite: bool = False) -> dict:
  """Packs each RFW group as <dst>/<group>_test.bin (raw image bytes, pairs in file order)."""
  reader = rfw.RFWReader(src, groups)
  paths = {g: os.path.join(dst, f"{g}_test.bin") for g in reader.groups}
  for path in paths.values():  # Before writing anything.
    if os.path.exists(path) and not overwrite:
      raise UserError(f"{path}: already exists; pass overwrite to replace it")
  os.makedirs(dst, exist_ok=True)
  out = {}
  for group, path in paths.items():
    writer = verification_bin.VerificationBinWriter(path)
    same = 0
    try:
      for pair in reader.iter_pairs(group, validate=validate):
        writer.add_pair(pair.image1, pair.image2, pair.same)
        same += pair.same
    except BaseException:
      writer.abort()
      raise
    out[group] = {"file": path, "pairs": writer.close(), "same": same}
  return {"groups": out}


def _rec_paths(dst: str) -> tuple[str, str, str, str | None]:
  """Returns (rec, idx, names, property or None) for a .rec path or an output folder."""
  if dst.endswith(".rec"):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    rec, prop = dst, None
  else:
    os.makedirs(dst, exist_ok=True)
    rec, prop = os.path.join(dst, "train.rec"), os.path.join(dst, "property")
  stem = os.path.splitext(rec)[0]
  return rec, stem + ".idx", recordio.names_path_for(rec), prop


def tree_to_rec(src: str, dst: str, grouped: bool | None = None, validate: bool = True,
                skip_corrupt: bool = False, overwrite: bool = False) -> dict:
  """Packs an image tree as insightface train.rec/.idx (+ .identities.json with the names).

  dst is a .rec path or a folder (then <dst>/train.rec and insightface's `property` file).
  Labels are the tree's (sorted group, then identity); images keep their bytes.
  """
  reader = image_tree.ImageTreeReader(src, grouped=grouped, validate=validate,
                                      skip_corrupt=skip_corrupt)
  rec, idx, names, prop = _rec_paths(dst)
  finals = [p for p in (rec, idx, names, prop) if p]
  existing = [p for p in finals if os.path.exists(p)]
  if existing and not overwrite:
    raise UserError(f"{existing[0]}: already exists; pass overwrite to replace it")
  # Write beside the targets and rename at the end, so a failure leaves no half .rec.
  tmp = {p: p + ".partial" for p in finals}
  writer = recordio.FaceRecordIOWriter(tmp[rec], tmp[idx], tmp[names])
  sizes = set()
  try:
    for record in reader:
      if len(sizes) < 2:
        sizes.add(_image_size(record.image))
      writer.add(record.image, record.identity, record.source)
    counts = writer.finish(reader.index)
    if prop and len(sizes) == 1 and None not in sizes:
      # insightface's property file: num_classes,height,width; written only when all agree.
      h, w = sizes.pop()
      with open(tmp[prop], "w") as f:
        f.write(f"{reader.index.num_identities},{h},{w}\n")
  except BaseException:
    writer.close()
    for p in tmp.values():
      _remove(p)
    raise
  for p in finals:
    if os.path.exists(tmp[p]):
      os.replace(tmp[p], p)
    else:
      _remove(p)  # A stale `property` from an overwritten conversion.
  summary = reader.index.summary()
  summary.update(counts)
  summary.update(rec=rec, idx=idx, names=names,
                 property=prop if prop and os.path.exists(prop) else None,
                 skipped=[s for s, _ in reader.skipped])
  return summary


def _image_size(data: bytes) -> tuple[int, int] | None:
  """(height, width) from the image header only; None if unreadable."""
  try:
    with Image.open(io.BytesIO(data), formats=image_tree.DECODABLE_FORMATS) as img:
      return img.height, img.width
  except Exception:  # pylint: disable=broad-except  # Only decides whether to write `property`.
    return None


def _find_rec(src: str) -> str:
  if os.path.isdir(src):
    path = os.path.join(src, "train.rec")
    if not os.path.isfile(path):
      raise UserError(f"{src}: no train.rec in this folder; pass the .rec file itself")
    return path
  return src


def rec_to_tree(src: str, dst: str, validate: bool = True, skip_corrupt: bool = False) -> dict:
  """Unpacks an insightface RecordIO into <dst>/<group>/<identity>/<NNNN>.jpg|png.

  Folder names come from <rec>.identities.json when present, else zero-padded labels
  (groups then absent), so reading the tree back gives the same labels.
  """
  reader = recordio.FaceRecordIOReader(_find_rec(src), validate=validate,
                                       skip_corrupt=skip_corrupt)
  with reader:
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
      raise UserError(f"{dst}: already exists and is not an empty folder; expected a new "
                      "output folder")
    partial = dst.rstrip("/\\") + ".partial"
    _remove(partial)
    writer = image_tree.ImageTreeWriter(partial, reader.index)
    try:
      for record in reader:
        writer.write(record)
    except BaseException:
      _remove(partial)
      raise
    if os.path.isdir(dst):
      os.rmdir(dst)
    os.replace(partial, dst)
    index = reader.index
    keys = [(index.group_names[g] if g >= 0 else "", n)
            for n, g in zip(index.identity_names, index.identity_groups)]
    summary = index.summary()
    summary.update(written=writer.written,
                   empty_identities=[index.identity_key(i) for i in writer.empty_identities()],
                   skipped=[s for s, _ in reader.skipped],
                   # Tree labels follow sorted names; say so if the .rec numbered otherwise.
                   labels_preserved=(keys == sorted(keys) and not writer.empty_identities()
                                     and list(index.group_names) == sorted(index.group_names)))
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one conversion and prints its summary as JSON; UserErrors print without traceback."""
  parser = argparse.ArgumentParser(prog="python -m mstkd_jax.data.convert",
                                   description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  cmd = sub.add_parser("rfw_to_bin", help="RFW folder -> <dst>/<group>_test.bin")
  cmd.add_argument("--groups", default=None, help="comma-separated groups (default: all)")
  cmd = sub.add_parser("tree_to_rec", help="image tree -> train.rec/.idx")
  cmd.add_argument("--layout", choices=("auto", "grouped", "flat"), default="auto")
  cmd.add_argument("--skip_corrupt", action="store_true")
  sub.add_parser("rec_to_tree", help="train.rec/.idx -> image tree").add_argument(
      "--skip_corrupt", action="store_true")
  for p in sub.choices.values():
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--no_validate", action="store_true", help="do not decode images")
    if p.prog.endswith(("rfw_to_bin", "tree_to_rec")):
      p.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  validate = not args.no_validate
  try:
    if args.command == "rfw_to_bin":
      groups = args.groups.split(",") if args.groups else None
      summary = rfw_to_bin(args.src, args.dst, groups, validate, args.overwrite)
    elif args.command == "tree_to_rec":
      grouped = {"auto": None, "grouped": True, "flat": False}[args.layout]
      summary = tree_to_rec(args.src, args.dst, grouped, validate, args.skip_corrupt,
                            args.overwrite)
    else:
      summary = rec_to_tree(args.src, args.dst, validate, args.skip_corrupt)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Converters between face data formats, and their command line.

python -m mstkd_jax.formats.convert COMMAND --src=PATH --dst=PATH [flags]

  rfw_to_bin   RFW folder -> <dst>/<group>_test.bin   [--groups=A,B] [--overwrite]
  tree_to_rec  image tree -> train.rec/.idx   [--layout=auto|grouped|flat] [--skip_corrupt]
               [--overwrite]
  rec_to_tree  train.rec/.idx -> image tree   [--skip_corrupt] [--strict_identity_records]

Every command takes --no_validate (do not decode the images). The summary is printed as
JSON on stdout; errors print one `error: ...` line (exit 1; 2 for usage mistakes).
"""

import json
import os
import shutil
import sys
from typing import Sequence

from absl import flags

from mstkd_jax import errors
from mstkd_jax.formats import cli
from mstkd_jax.formats import image_tree, images
from mstkd_jax.formats.recordio import face_pack, identities
from mstkd_jax.formats import rfw
from mstkd_jax.formats import verification_bin
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
      raise UserError(f"{path}: already exists; pass --overwrite (overwrite=True in Python) "
                      "to replace it")
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
  return rec, stem + ".idx", identities.names_path_for(rec), prop


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
    raise UserError(f"{existing[0]}: already exists; pass --overwrite (overwrite=True in "
                    "Python) to replace it")
  # Write beside the targets and rename at the end, so a failure leaves no half .rec.
  tmp = {p: p + ".partial" for p in finals}
  writer = face_pack.FaceRecordIOWriter(tmp[rec], tmp[idx], tmp[names])
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
    return images.image_size(data, "")
  except UserError:  # Only decides whether to write `property`.
    return None


def _find_rec(src: str) -> str:
  if os.path.isdir(src):
    path = os.path.join(src, "train.rec")
    if not os.path.isfile(path):
      raise UserError(f"{src}: no train.rec in this folder; pass the .rec file itself")
    return path
  return src


def rec_to_tree(src: str, dst: str, validate: bool = True, skip_corrupt: bool = False,
                strict_identity_records: bool = False) -> dict:
  """Unpacks an insightface RecordIO into <dst>/<group>/<identity>/<NNNN>.jpg|png.

  Folder names come from <rec>.identities.json when present, else zero-padded labels
  (groups then absent), so reading the tree back gives the same labels. Each image goes
  to the identity of its own header label; identity records that disagree are counted
  ("identity_record_disagreements" in the summary, and one `warning:` line on stderr),
  or refused with strict_identity_records=True.

  Raises:
    UserError: naming the file: an unreadable or (strict) disagreeing RecordIO, a corrupt
      image (unless skip_corrupt), or a dst that exists and is not an empty folder.
  """
  reader = face_pack.FaceRecordIOReader(_find_rec(src), validate=validate,
                                       skip_corrupt=skip_corrupt,
                                       strict_identity_records=strict_identity_records)
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
                   identity_record_disagreements=reader.identity_record_disagreements,
                   empty_identities=[index.identity_key(i) for i in writer.empty_identities()],
                   skipped=[s for s, _ in reader.skipped],
                   # Tree labels follow sorted names; say so if the .rec numbered otherwise.
                   labels_preserved=(keys == sorted(keys) and not writer.empty_identities()
                                     and list(index.group_names) == sorted(index.group_names)))
  return summary


COMMANDS = ("rfw_to_bin", "tree_to_rec", "rec_to_tree")


def _define_flags(command: str, fv: flags.FlagValues):
  """The flags of one command, on `fv` (see cli: a FlagValues per call)."""
  flags.DEFINE_string("src", None, "The source folder or file.", flag_values=fv)
  flags.DEFINE_string("dst", None, "The output folder or file.", flag_values=fv)
  flags.DEFINE_boolean("no_validate", False, "Do not decode the images.", flag_values=fv)
  for name in ("src", "dst"):
    flags.mark_flag_as_required(name, flag_values=fv)
  if command == "rfw_to_bin":
    flags.DEFINE_string("groups", None, "Comma-separated groups (default: all).",
                        flag_values=fv)
  if command == "tree_to_rec":
    flags.DEFINE_enum("layout", "auto", ("auto", "grouped", "flat"),
                      "Image tree layout (default: detect).", flag_values=fv)
  if command in ("tree_to_rec", "rec_to_tree"):
    flags.DEFINE_boolean("skip_corrupt", False, "Skip undecodable images and list them, "
                         "instead of stopping.", flag_values=fv)
  if command in ("rfw_to_bin", "tree_to_rec"):
    flags.DEFINE_boolean("overwrite", False, "Replace existing outputs.", flag_values=fv)
  if command == "rec_to_tree":
    flags.DEFINE_boolean("strict_identity_records", False, "Refuse packs whose identity "
                         "records disagree with the image labels, instead of using each "
                         "image's own label and counting the disagreements.", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one conversion and prints its summary as JSON.

  Args:
    argv: COMMAND then its flags, without the program name; None reads sys.argv[1:].

  Returns:
    0 on success; 1 after printing one `error: ...` line for a UserError; 130 after one
    line for Ctrl-C (the partial files removed).

  Raises:
    SystemExit: 2 after one `error: ...` line for a usage mistake; 0 after --help.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  prog = "python -m mstkd_jax.formats.convert"
  if argv and argv[0] in cli.HELP_FLAGS:
    print(__doc__)
    sys.exit(0)
  if not argv or argv[0] not in COMMANDS:
    given = repr(argv[0]) if argv else "none"
    cli.usage_error(f"command {given}; expected one of {', '.join(COMMANDS)} first")
  command = argv[0]
  fv = flags.FlagValues()
  _define_flags(command, fv)
  rest = cli.parse(fv, argv[1:], prog=f"{prog} {command}", doc=__doc__)
  if rest:
    cli.usage_error(f"unexpected arguments {rest}; give every setting as a --flag")
  validate = not fv.no_validate
  try:
    if command == "rfw_to_bin":
      groups = fv.groups.split(",") if fv.groups else None
      summary = rfw_to_bin(fv.src, fv.dst, groups, validate, fv.overwrite)
    elif command == "tree_to_rec":
      grouped = {"auto": None, "grouped": True, "flat": False}[fv.layout]
      summary = tree_to_rec(fv.src, fv.dst, grouped, validate, fv.skip_corrupt, fv.overwrite)
    else:
      summary = rec_to_tree(fv.src, fv.dst, validate, fv.skip_corrupt,
                            fv.strict_identity_records)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return errors.interrupted()
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())

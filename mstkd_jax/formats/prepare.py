"""Prepares a face data set once as a TFDS (array_record) data set, and prints its summary.

python -m mstkd_jax.formats.prepare --format=image_tree|rfw|bin|recordio --src=PATH
    --data_dir=DIR [--name=NAME] [--image_size=N] [--groups=FILE] [--skip_corrupt]
    [--layout=auto|grouped|flat] [--strict_identity_records]

Training sets (image_tree, recordio) become <DIR>/mstkd_faces/<NAME>/1.0.0, verification
sets (rfw, bin) <DIR>/mstkd_verification/<NAME>/1.0.0 (see tfds_builders). A data set that
is already prepared is not built again.

--image_size=N stores every image at N x N (those of another size resized by the one
resizer, formats/faces.py, and stored as PNG), so that training and evaluation at that size
resize nothing. An RFW folder's loose crops are stored aligned to 112x112 with their
landmarks (test/txts/<group>/<group>_lmk.txt; images already 112x112 are taken as aligned),
then resized to --image_size if given: what `evaluate` does with the same folder.
--groups=FILE (training sets) names each identity's demographic group, for a RecordIO or
flat tree that has none (formats/groups.py: CSV `identity,group`, JSON {identity: group} or
{group: [identities]}, or a folder of <group>.txt lists).

stdout gets one line, a JSON object: {"name", "num_images", "num_identities", "groups":
{group: {"images", "identities"[, "pairs", "same"]}}, "skipped", "path", "image_size"},
counted from the prepared data; a verification set adds "alignment" ({group: {"landmarks",
"aligned", "taken_as_aligned"}}, or "none"); a RecordIO built by this run adds
"identity_record_disagreements": the images whose own label differs from their identity
record (each image's own label is used, as insightface's trainer does;
--strict_identity_records refuses such packs instead). Progress, notes, warnings and
skipped files go to stderr; errors print one `error: ...` line (exit 1; 2 for usage).
"""

import contextlib
import json
import os
import re
import sys
from typing import Callable, Sequence

from absl import flags

from mstkd_jax import errors, paths
from mstkd_jax.formats import cli
from mstkd_jax.data import pairs, prepared
from mstkd_jax.errors import UserError

FORMATS = prepared.TRAINING.formats + prepared.VERIFICATION.formats
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_EXPECTED = {
    "image_tree": "a folder <root>/<group>/<identity>/<image> or <root>/<identity>/<image>",
    "recordio": "an insightface train.rec (with train.idx beside it) or its folder",
    **{fmt: pairs.PLANNERS[fmt].expected for fmt in prepared.VERIFICATION.formats},
}


def _stderr(message: str):
  print(message, file=sys.stderr, flush=True)


def default_name(src: str) -> str:
  """A data set name from the source path: its folder or file stem, lowercased."""
  path = os.path.abspath(src).rstrip(os.sep)
  stem, ext = os.path.splitext(os.path.basename(path))
  if ext.lower() in (".rec", ".bin") and stem in ("train", "test"):
    stem = os.path.basename(os.path.dirname(path))
  elif ext.lower() not in (".rec", ".bin"):
    stem = os.path.basename(path)
  name = re.sub(r"[^a-z0-9_.+-]", "_", stem.lower()).lstrip(".-+")
  return name or "faces"


def _locate(fmt: str, src: str) -> tuple[str, str]:
  """(manual dir, file inside it or '') for a source; UserError if it is not there."""
  src = paths.local(src, "--src")
  expected = f"expected {_EXPECTED[fmt]} for --format={fmt}"
  if not os.path.exists(src):
    raise UserError(f"{src}: does not exist; {expected}")
  if fmt == "recordio":
    if os.path.isdir(src):
      if not os.path.isfile(os.path.join(src, "train.rec")):
        raise UserError(f"{src}: no train.rec in this folder; {expected}")
      return src, "train.rec"
    return os.path.dirname(src), os.path.basename(src)
  if fmt in pairs.PLANNERS and os.path.isfile(src) and pairs.PLANNERS[fmt].claims(src):
    return os.path.dirname(src), os.path.basename(src)
  if not os.path.isdir(src):
    raise UserError(f"{src}: is a file; {expected}")
  if not os.listdir(src):
    raise UserError(f"{src}: empty folder; {expected}")
  return src, ""


def prepare(fmt: str, src: str, data_dir: str, name: str | None = None,
            skip_corrupt: bool = False, grouped: bool | None = None, workers: int = 0,
            log: Callable[[str], None] = _stderr,
            strict_identity_records: bool = False, image_size: int = 0,
            groups: str | None = None) -> dict:
  """Builds the data set unless it exists; returns its summary (prepared.summary).

  Args:
    fmt: one of FORMATS.
    src: the source folder or file.
    data_dir: the TFDS data dir.
    name: data set name; default_name(src) when None.
    skip_corrupt: skip undecodable images (verification sets drop their pairs) and list
      them through `log` (the summary counts them); otherwise stop at the first one.
    grouped: image tree layout; None detects it.
    workers: image-checking threads; 0 picks min(8, CPUs).
    log: receives progress, notes and warnings.
    strict_identity_records: (recordio) refuse a pack whose identity records disagree
      with the image labels; by default the images' own labels are used, and the summary
      counts the disagreements under "identity_record_disagreements".
    image_size: store images at image_size x image_size (module docstring); 0 keeps them.
    groups: (training sets) a file or folder naming each identity's group (formats/groups.py).

  Raises:
    UserError: a bad format, name or source (naming it), or a source the readers refuse.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mstkd_jax.formats import tfds_builders  # pylint: disable=g-import-not-at-top

  if fmt not in FORMATS:
    raise UserError(f'--format={fmt!r}; expected one of {", ".join(FORMATS)}')
  manual_dir, source_file = _locate(fmt, src)
  source = os.path.normpath(os.path.join(manual_dir, source_file))
  name = default_name(src) if name is None else name
  if not _NAME.match(name):
    raise UserError(f"--name={name!r}; expected letters, digits and _ . + - (not first . + -)")
  data_dir = paths.local(data_dir, "--data_dir")
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 0 or (
      image_size % 16):
    raise UserError(f"--image_size={image_size!r}; expected a multiple of 16 (the model's "
                    "input side, e.g. 112), or 0 to keep the images' size")
  if groups:
    if prepared.kind_of(fmt) is not prepared.TRAINING:
      raise UserError(f"--groups={groups}: names the groups of a training set's identities; "
                      f"--format={fmt} is a verification set, whose groups are its own")
    groups = paths.local(groups, "--groups")
    if not os.path.exists(groups):
      raise UserError(f"--groups={groups}: does not exist; expected a CSV `identity,group`, "
                      "a JSON {identity: group} or a folder of <group>.txt identity lists")
  builder_cls = tfds_builders.BUILDERS[fmt]
  path = prepared.prepared_dir(data_dir, prepared.kind_of(fmt), name)
  if prepared.is_prepared(path):
    meta = prepared.read_metadata(path)
    log(f'{path}: already prepared (from {meta.get("source")}, '
        f'format {meta.get("source_format")}); remove that folder to prepare it again')
    if os.path.normpath(meta.get("source", "")) != source:
      log(f"note: --src={source} differs from the source it was prepared from")
    if (meta.get("image_size") or 0) != image_size or (meta.get("groups_file") or "") != (
        groups or ""):
      log(f"note: it was prepared with --image_size={meta.get('image_size') or 0} and "
          f"--groups={meta.get('groups_file') or ''}; give another --name for other settings")
    return prepared.summary(path, name)
  config = tfds_builders.SourceConfig(
      name=name, description=f"{fmt} source {source}",
      source_format=fmt, source_file=source_file, grouped=grouped,
      skip_corrupt=skip_corrupt, workers=workers, image_size=image_size,
      groups_file=groups or "")
  if fmt == "recordio" and strict_identity_records:
    from mstkd_jax.formats.recordio import face_pack  # pylint: disable=g-import-not-at-top
    with face_pack.FaceRecordIOReader(source, validate=False, strict_identity_records=True):
      pass  # Refuses before anything is built.
  log(f"preparing {name!r} from {source} ({fmt}) into {path}")
  builder = builder_cls(config=config, data_dir=data_dir)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  out = prepared.summary(path, name)
  meta = prepared.read_metadata(path)
  for warning in meta.get("warnings", []):
    log(f"warning: {warning}")
  if fmt == "recordio":
    out["identity_record_disagreements"] = meta.get("identity_record_disagreements", 0)
  if meta.get("groups_file_unused_identities"):
    log(f"warning: --groups={groups}: {meta['groups_file_unused_identities']} of its "
        "identities are not in the data set (ignored)")
  for group, done in (meta.get("alignment") or {}).items():
    log(f"{name} group {group}: {done['aligned']} images aligned to 112x112 with their 5 "
        f"landmarks ({done['landmarks']})" + (
            f", {done['taken_as_aligned']} already 112x112 taken as aligned"
            if done["taken_as_aligned"] else ""))
  skipped = meta.get("skipped", [])
  if skipped:
    log(f"skipped {len(skipped)} file(s):")
    for file, reason in skipped:
      log(f"  {file}: {reason}")
  return out


def _define_flags(fv: flags.FlagValues):
  """The command's flags, on `fv` (see cli: a FlagValues per call)."""
  flags.DEFINE_enum("format", None, FORMATS, "Source format.", flag_values=fv)
  flags.DEFINE_string("src", None, "The source folder or file.", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "The TFDS data dir.", flag_values=fv)
  flags.DEFINE_string("name", None, "Data set name (default: from --src).", flag_values=fv)
  flags.DEFINE_integer("image_size", 0, "Store images at this side (a multiple of 16, the "
                       "model's input), resized with the one resizer; 0 keeps their size.",
                       flag_values=fv)
  flags.DEFINE_string("groups", None, "Training sets: a file naming each identity's group "
                      "(CSV identity,group; JSON {identity: group} or {group: [ids]}; or a "
                      "folder of <group>.txt identity lists).", flag_values=fv)
  flags.DEFINE_boolean("skip_corrupt", False, "Skip undecodable images and list them, "
                       "instead of stopping.", flag_values=fv)
  flags.DEFINE_enum("layout", "auto", ("auto", "grouped", "flat"),
                    "Image tree layout (default: detect).", flag_values=fv)
  flags.DEFINE_boolean("strict_identity_records", False, "RecordIO: refuse packs whose "
                       "identity records disagree with the image labels, instead of using "
                       "each image's own label and counting the disagreements.",
                       flag_values=fv)
  for name in ("format", "src", "data_dir"):
    flags.mark_flag_as_required(name, flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs prepare from the command line; prints the summary as one JSON line on stdout.

  Args:
    argv: the arguments without the program name; None reads sys.argv[1:].

  Returns:
    0 on success, 1 after printing one `error: ...` line for a UserError or OSError, 130
    after one line for Ctrl-C (TFDS builds in a temporary folder, renamed when complete).

  Raises:
    SystemExit: 2 after one `error: ...` line for a usage mistake; 0 after --help.
  """
  fv = flags.FlagValues()
  _define_flags(fv)
  rest = cli.parse(fv, sys.argv[1:] if argv is None else argv,
                   prog="python -m mstkd_jax.formats.prepare", doc=__doc__)
  if rest:
    cli.usage_error(f"unexpected arguments {rest}; give every setting as a --flag")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # TFDS warns about every custom config.
  try:
    # TFDS prints its progress messages to stdout; stdout is for the JSON line alone.
    with contextlib.redirect_stdout(sys.stderr):
      out = prepare(fv.format, fv.src, fv.data_dir, name=fv.name,
                    skip_corrupt=fv.skip_corrupt,
                    grouped={"auto": None, "grouped": True, "flat": False}[fv.layout],
                    strict_identity_records=fv.strict_identity_records,
                    image_size=fv.image_size, groups=fv.groups)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return errors.interrupted()
  except OSError as e:  # Unwritable data dir, full disk: fixable, not a bug.
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(out), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

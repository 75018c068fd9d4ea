"""Prepares a face data set once as a TFDS (array_record) data set, and prints its summary.

python -m mstkd_jax.data.prepare --format=image_tree|rfw|bin|recordio --src=PATH
    --data_dir=DIR [--name=NAME] [--skip_corrupt]

Training sets (image_tree, recordio) become <DIR>/mstkd_faces/<NAME>/1.0.0, verification
sets (rfw, bin) <DIR>/mstkd_verification/<NAME>/1.0.0 (see tfds_builders). A data set that
is already prepared is not built again. stdout gets one line, a JSON object:
{"name", "num_images", "num_identities", "groups": {group: {"images", "identities"[,
"pairs", "same"]}}, "skipped", "path"}, counted from the prepared data. Progress, notes
and skipped files go to stderr; errors print one `error: ...` line (exit 1; 2 for usage).
"""

import argparse
import contextlib
import json
import os
import re
import sys
from typing import Callable, Sequence

from mstkd_jax import paths
from mstkd_jax.errors import UserError

FORMATS = ("image_tree", "recordio", "rfw", "bin")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_EXPECTED = {
    "image_tree": "a folder <root>/<group>/<identity>/<image> or <root>/<identity>/<image>",
    "recordio": "an insightface train.rec (with train.idx beside it) or its folder",
    "rfw": "the RFW folder holding test/data and test/txts",
    "bin": "an insightface verification .bin file or a folder of them",
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
  if fmt == "bin" and os.path.isfile(src):
    return os.path.dirname(src), os.path.basename(src)
  if not os.path.isdir(src):
    raise UserError(f"{src}: is a file; {expected}")
  if not os.listdir(src):
    raise UserError(f"{src}: empty folder; {expected}")
  return src, ""


def prepare(fmt: str, src: str, data_dir: str, name: str | None = None,
            skip_corrupt: bool = False, grouped: bool | None = None, workers: int = 0,
            log: Callable[[str], None] = _stderr) -> dict:
  """Builds the data set unless it exists; returns its summary (tfds_builders.summary).

  Args:
    fmt: one of FORMATS.
    src: the source folder or file.
    data_dir: the TFDS data dir.
    name: data set name; default_name(src) when None.
    skip_corrupt: skip undecodable images (verification sets drop their pairs) and list
      them through `log` (the summary counts them); otherwise stop at the first one.
    grouped: image tree layout; None detects it.
    workers: image-checking threads; 0 picks min(8, CPUs).
    log: receives progress and notes.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mstkd_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top

  if fmt not in FORMATS:
    raise UserError(f'--format={fmt!r}; expected one of {", ".join(FORMATS)}')
  manual_dir, source_file = _locate(fmt, src)
  source = os.path.normpath(os.path.join(manual_dir, source_file))
  name = default_name(src) if name is None else name
  if not _NAME.match(name):
    raise UserError(f"--name={name!r}; expected letters, digits and _ . + - (not first . + -)")
  data_dir = paths.local(data_dir, "--data_dir")
  builder_cls = tfds_builders.BUILDERS[fmt]
  path = tfds_builders.prepared_dir(data_dir, builder_cls, name)
  if tfds_builders.is_prepared(path):
    meta = tfds_builders.read_metadata(path)
    log(f'{path}: already prepared (from {meta.get("source")}, '
        f'format {meta.get("source_format")}); remove that folder to prepare it again')
    if os.path.normpath(meta.get("source", "")) != source:
      log(f"note: --src={source} differs from the source it was prepared from")
    return tfds_builders.summary(path, name)
  config = tfds_builders.SourceConfig(
      name=name, description=f"{fmt} source {source}",
      source_format=fmt, source_file=source_file, grouped=grouped,
      skip_corrupt=skip_corrupt, workers=workers)
  log(f"preparing {name!r} from {source} ({fmt}) into {path}")
  builder = builder_cls(config=config, data_dir=data_dir)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  out = tfds_builders.summary(path, name)
  skipped = tfds_builders.read_metadata(path).get("skipped", [])
  if skipped:
    log(f"skipped {len(skipped)} file(s):")
    for file, reason in skipped:
      log(f"  {file}: {reason}")
  return out


class _Parser(argparse.ArgumentParser):
  """Prints usage errors as one `error: ...` line and exits with 2."""

  def error(self, message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs prepare from the command line; prints the summary as one JSON line on stdout."""
  parser = _Parser(prog="python -m mstkd_jax.data.prepare",
                   description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--src", required=True, help="the source folder or file")
  parser.add_argument("--data_dir", required=True, help="the TFDS data dir")
  parser.add_argument("--name", default=None, help="data set name (default: from --src)")
  parser.add_argument("--skip_corrupt", action="store_true",
                      help="skip undecodable images and list them, instead of stopping")
  parser.add_argument("--layout", choices=("auto", "grouped", "flat"), default="auto",
                      help="image tree layout (default: detect)")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before TensorFlow loads.
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # TFDS warns about every custom config.
  try:
    # TFDS prints its progress messages to stdout; stdout is for the JSON line alone.
    with contextlib.redirect_stdout(sys.stderr):
      out = prepare(args.format, args.src, args.data_dir, name=args.name,
                    skip_corrupt=args.skip_corrupt,
                    grouped={"auto": None, "grouped": True, "flat": False}[args.layout])
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except OSError as e:  # Unwritable data dir, full disk: fixable, not a bug.
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(out), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

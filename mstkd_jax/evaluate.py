r"""Evaluates one face-recognition checkpoint per demographic group (insightface protocol).

  python -m mstkd_jax.evaluate --checkpoint=workdir/teacher_smoke --data=synthetic \
      --out=/tmp/eval
  python -m mstkd_jax.evaluate --checkpoint=r34.pth --arch=iresnet34 \
      --data=rfw/African_test.bin --data=rfw/Asian_test.bin --out=/tmp/eval

--checkpoint is either an Orbax checkpoint of this project (a stage workdir: its trained
model/, else the latest of its checkpoints/; a model/ or checkpoints/ folder; or one step
folder such as checkpoints/<step>; only the backbone is read) or a PyTorch
insightface/MST-KD IResNet state_dict (a file, e.g. .pth). --data (repeatable) is
an insightface verification .bin (its group is the file stem without "_test":
African_test.bin -> African), an RFW folder (test/data + test/txts, every group in it), or
the built-in synthetic set by name: `synthetic` (the workdir's configured synthetic set when
the checkpoint's config.json has one, else configs.common.synthetic_data("default")) or
`synthetic:<scale>` (configs.common.synthetic_data(scale)), cached under <out>/data unless
--data_dir. --ijb=PATH (with or without --data) adds IJB-B/C 1:1 template verification
(formats/ijb.py reads the release, evaluation/ijb_protocol.py evaluates): the loose crops are
aligned to 112x112 with their 5 landmarks, then resized to the model's input; TAR at FAR
1e-6 ... 1e-1 for flip x detector-score weighting, a section of report.json/report.md,
roc_ijb.json and roc_ijb_<IJBB|IJBC>.png. --skip_missing skips images absent from
loose_crop (listed) instead of refusing them.

Images are decoded as RGB; an RFW folder's loose crops are aligned to 112x112 with their
five landmarks from test/txts/<group>/<group>_lmk.txt (formats/align.py; images already
112x112 are taken as aligned, and a folder without that file is taken as aligned faces),
one line per group saying so on stderr and the counts in the report's data record
("alignment"). Images are then resized to the model input when their size differs
(formats/faces.py, RESAMPLING; warned once per data source) and normalized (x / 255 - 0.5) /
0.5 as insightface does. Each distinct image is embedded once, with its horizontal mirror; the
report holds flip-fused accuracy (embedding of image + embedding of mirror) and plain
(no-flip) accuracy per group, TAR@FAR, mean, STD and SER, and the global-threshold
fairness metrics. It is printed and written to --out (report.json, roc.json, report.md,
PNGs), and nothing is written there when the evaluation fails.

Model settings come from the flags when given, else (Orbax) from the workdir's
config.json, else (Orbax) from the checkpoint's shapes, else interop.resolve.DEFAULTS; a
checkpoint that does not fit is refused with the settings its shapes imply (the input size
from fc's weight). Evaluation always computes in float32. Errors a user can fix print one
`error: ...` and exit with 2 (flags) or 1 (checkpoint or data).

In Python: `evaluate(checkpoint, arch_settings, data_sources, out_dir)` returns the
report dict (see mstkd_jax.evaluation.report.build_report). The checkpoint and its model
settings are resolved by mstkd_jax.interop.resolve; the --data entries are read by
mstkd_jax.evaluate_data, through the planners of mstkd_jax.data.pairs.
"""

import dataclasses
import os
import shutil
import sys
import tempfile
from typing import Any, Mapping, Sequence

from absl import app, flags

from mstkd_jax import evaluate_data, paths
from mstkd_jax.data import pairs
from mstkd_jax.evaluate_data import NUM_FOLDS, SYNTHETIC
from mstkd_jax.formats import faces
from mstkd_jax import errors
from mstkd_jax.errors import UserError
from mstkd_jax.interop import command_line, resolve
from mstkd_jax.interop.command_line import FlagError

RESAMPLING = faces.RESAMPLING
NORMALIZATION = "(x / 255 - 0.5) / 0.5 on RGB uint8, as insightface"


# --- Evaluation ------------------------------------------------------------------------


def _evaluate_groups(model: resolve.LoadedModel, sets: Mapping[str, pairs.VerificationSet],
                     parallel, batch_size: int) -> dict:
  """Embeds each distinct image once (with its mirror), then verifies the pairs."""
  from mstkd_jax.evaluation import embedding, verification  # pylint: disable=g-import-not-at-top
  results = {}
  for group, vset in sets.items():
    emb, emb_flip = embedding.embed_images(model.variables, model.module, vset.images, parallel,
                                           batch_size)
    rows = vset.pairs.reshape(-1)
    try:
      results[group] = verification.evaluate_verification(emb[rows], emb_flip[rows],
                                                          vset.issame, num_folds=NUM_FOLDS)
    except UserError as e:
      raise UserError(f"group {group!r}: {e}") from e
  return results


def _write_report(report: dict, out_dir: str) -> dict:
  """Writes the report files into a hidden folder of out_dir, then moves them in."""
  from mstkd_jax.evaluation import report as report_lib  # pylint: disable=g-import-not-at-top
  try:
    staging = tempfile.mkdtemp(prefix=".report-", dir=out_dir)
  except OSError as e:
    raise UserError(f"--out={out_dir}: cannot write there ({e.strerror or e})") from e
  try:
    written = report_lib.write_report(report, staging)
    final = {}
    for label, path in written.items():
      final[label] = os.path.join(out_dir, os.path.basename(path))
      os.replace(path, final[label])
  except OSError as e:
    raise UserError(f"--out={out_dir}: cannot write the report ({e.strerror or e})") from e
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return final


def _warner(messages: list, verbose: bool):
  def warn(message: str) -> None:
    messages.append(message)
    if verbose:
      errors.warn(message, file=sys.stderr)
  return warn


def _noter(verbose: bool):
  def note(message: str) -> None:
    if verbose:
      print(message, file=sys.stderr, flush=True)
  return note


def evaluate(checkpoint: Any, arch_settings: Any, data_sources: Sequence[Any], out_dir: Any,
             *, name: Any = None, batch_size: int = 256, data_dir: Any = None,
             parallel=None, verbose: bool = True, ijb: Any = None,
             ijb_name: str | None = None, skip_missing: bool = False) -> dict:
  """Evaluates checkpoints on verification sets per group; writes and returns the report.

  Args:
    checkpoint: an Orbax stage workdir (its model/, else the latest checkpoints/ step), a
      model/ or checkpoints/ folder, or a step folder; or a PyTorch IResNet state_dict
      file (.pth). A list or tuple of them: one report row (and IJB row) per checkpoint.
    arch_settings: an ArchSettings or a dict of its fields; None fields (or None) are
      taken from the workdir's config.json, the checkpoint's shapes, or DEFAULTS. Given
      fields apply to every checkpoint.
    data_sources: .bin paths, RFW folders, "synthetic" / "synthetic:<scale>", or dicts
      of group -> VerificationSet (uint8 RGB images, pairs, issame); at least one, or
      none with `ijb`.
    out_dir: where report.json, roc.json, report.md and the PNGs go (created).
    name: the model's name in the report (a list: one per checkpoint); default: the
      checkpoint file's stem, or the stage workdir's folder name. Names must differ.
    batch_size: images per embedding step (over all local devices).
    data_dir: synthetic data cache; default <out_dir>/data.
    parallel: a mstkd_jax.train.parallel.DataParallel; default pmap over every local device.
    verbose: print warnings (stderr) and the result table (stdout).
    ijb: an IJBB/IJBC release folder (meta/, loose_crop/) to add 1:1 template
      verification for (report["ijb"], evaluation.ijb_protocol.report_section), or None.
    ijb_name: "IJBB" or "IJBC"; default from the folder (formats.ijb.detect_name).
    skip_missing: skip IJB images absent from loose_crop instead of refusing them.

  Returns:
    The report of `report.build_report` for {name: {group: result}}, its "config" holding
    the checkpoint, model settings (and where each came from), data sources, warnings and
    the written files; with several checkpoints config["models"] holds {name: the
    checkpoint, its format, step and settings} and the top-level checkpoint fields are the
    first one's.

  Raises:
    FlagError: a setting is invalid (unknown arch, bad size, no data sources, ...).
    UserError: a checkpoint or data problem. Nothing is left in out_dir then.
  """
  from mstkd_jax.evaluation import report as report_lib  # pylint: disable=g-import-not-at-top
  explicit = resolve.as_settings(arch_settings, FlagError)
  resolve.check_settings(explicit, "--", FlagError)
  batch_size = resolve.check_positive(batch_size, "--batch_size", FlagError)
  if isinstance(data_sources, (str, os.PathLike, Mapping)):
    data_sources = [data_sources]
  data_sources = list(data_sources or [])
  if not data_sources and not ijb:
    raise FlagError("--data: no data sources; expected at least one --data=PATH (a .bin "
                    f"file or an RFW folder), --data={SYNTHETIC}[:scale] or --ijb=PATH")
  ijb = paths.local(ijb, "--ijb") if ijb else None
  if out_dir is None or not os.fspath(out_dir):
    raise FlagError("--out: expected the folder to write the report into")
  checkpoints = ([checkpoint] if checkpoint is None or isinstance(checkpoint, (str, os.PathLike))
                 else list(checkpoint))
  if not checkpoints:
    checkpoints = [None]  # command_line.checkpoint_path names the missing flag
  names = [name] if name is None or isinstance(name, str) else list(name)
  if len(names) == 1 and names[0] is None:
    names = [None] * len(checkpoints)
  if len(names) != len(checkpoints):
    raise FlagError(f"--name: {len(names)} names for {len(checkpoints)} checkpoints; give "
                    "one --name per --checkpoint, in the same order, or none")
  for given in names:
    if given is not None and not str(given).strip():
      raise FlagError("--name: expected a non-empty model name")
  out_dir = paths.local(out_dir, "--out")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FlagError(f"--out={out_dir}: is a file; expected a folder")
  checkpoint_paths = [command_line.checkpoint_path(c) for c in checkpoints]
  for i, entry in enumerate(data_sources):
    evaluate_data.precheck(entry, i)
  data_dir = paths.local(data_dir, "--data_dir") if data_dir else (
      os.path.join(out_dir, "data"))

  # Whatever this call creates is removed again if it fails.
  created = [p for p in (out_dir, data_dir) if not os.path.exists(p)]
  messages: list[str] = []
  warn = _warner(messages, verbose)
  note = _noter(verbose)
  try:
    models = [resolve.load_model(path, explicit) for path in checkpoint_paths]
    model_names = [str(given) if given is not None else model.name
                   for given, model in zip(names, models)]
    repeated = sorted({n for n in model_names if model_names.count(n) > 1})
    if repeated:
      raise FlagError(f"--name: several checkpoints are named {repeated[0]!r}; give one "
                      "--name per --checkpoint")
    # Data sets described by a workdir config (synthetic) follow the first checkpoint's.
    sources = [evaluate_data.classify(entry, i, models[0].config, data_dir)
               for i, entry in enumerate(data_sources)]
    evaluate_data.check_unique_groups(sources)
    release = None
    if ijb:
      from mstkd_jax.formats import ijb as ijb_data  # pylint: disable=g-import-not-at-top
      from mstkd_jax.evaluation import ijb_protocol  # pylint: disable=g-import-not-at-top
      release = ijb_data.read_release(ijb, ijb_name, skip_missing, warn)
    if parallel is None:
      from mstkd_jax.train import parallel as parallel_lib  # pylint: disable=g-import-not-at-top
      parallel = parallel_lib.get("pmap", 0)
    loaded_at = {}  # the data at each input size any of the models takes
    group_results, ijb_results, model_records = {}, {}, {}
    for model, model_name in zip(models, model_names):
      size = int(model.settings.image_size)
      if size not in loaded_at:
        loaded_at[size] = evaluate_data.load_sources(sources, size, warn, note)
      pair_sets = loaded_at[size][0]
      results = _evaluate_groups(model, pair_sets, parallel, batch_size)
      if results:
        group_results[model_name] = results
      if release is not None:
        emb, emb_flip = ijb_protocol.embed_release(model.variables, model.module, release,
                                                   size, parallel, batch_size, warn)
        ijb_results[model_name] = ijb_protocol.evaluate_ijb(
            emb, emb_flip, release.scores, release.templates, release.medias,
            release.pairs, release.labels)
      model_records[model_name] = {
          "checkpoint": model.path, "checkpoint_format": model.format, "step": model.step,
          "model": dataclasses.asdict(model.settings), "model_settings_from": model.origins}
    ijb_section = None
    if release is not None:
      ijb_section = ijb_protocol.report_section(ijb_results, release.summary())
    first = model_records[model_names[0]]
    config = {
        **first, "dtype": "float32",
        "data": loaded_at[int(models[0].settings.image_size)][1], "batch_size": batch_size,
        "num_folds": NUM_FOLDS, "normalization": NORMALIZATION, "resampling": RESAMPLING,
        "flip": "accuracy: raw embeddings of image and mirror summed, then L2-normalized "
                "(insightface); accuracy_noflip: the image alone",
        "warnings": messages,
    }
    if len(models) > 1:
      config["models"] = model_records
    report = report_lib.build_report(group_results, config=config, ijb=ijb_section)
    try:
      os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
      raise UserError(f"--out={out_dir}: cannot create the folder ({e.strerror or e})") from e
    written = _write_report(report, out_dir)
  except BaseException:
    for path in reversed(created):
      shutil.rmtree(path, ignore_errors=True)
    raise
  report["config"]["files"] = written
  if verbose:
    for warning in report["warnings"]:
      errors.warn(warning)
    print(report_lib.format_table(report))
    for model_name in model_names:
      if model_name in report["models"]:
        groups = report["models"][model_name]["groups"]
        print(f"No-flip accuracy (%) of {model_name}: " + "  ".join(
            f"{g} {e['accuracy_noflip']:.2f}" for g, e in groups.items()))
    print(f"Report written to {out_dir} (report.json, report.md, roc.json, PNGs)", flush=True)
  return report


# --- Command line ----------------------------------------------------------------------

# --checkpoint, --arch, --width, --embedding_size, --use_se, --image_size (shared).
_MODEL = command_line.define_model_flags(repeatable=True)
_DATA = flags.DEFINE_multi_string(
    "data", [], "Verification data, repeatable: an insightface .bin (group = file stem "
    "without _test), an RFW folder, or synthetic[:scale].")
_OUT = flags.DEFINE_string("out", None, "Folder for report.json, report.md, roc.json, PNGs.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per embedding step.")
_NAME = flags.DEFINE_multi_string("name", [], "Model name in the report, one per --checkpoint "
                                  "(default: checkpoint file stem, or the stage workdir's "
                                  "folder name).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Synthetic data cache (default <out>/data).")
_IJB = flags.DEFINE_string("ijb", None, "IJB-B/C release folder (meta/, loose_crop/): adds "
                           "1:1 template verification, TAR at FAR 1e-6 ... 1e-1.")
_IJB_NAME = flags.DEFINE_string("ijb_name", None, "IJBB or IJBC (default: from the folder).")
_SKIP_MISSING = flags.DEFINE_boolean("skip_missing", False, "Skip IJB images absent from "
                                     "loose_crop (counted, listed) instead of stopping.")


def main(argv):
  command_line.run_command(argv, lambda: evaluate(
      _MODEL.checkpoint.value, _MODEL.settings(), _DATA.value, _OUT.value,
      name=_NAME.value or None,
      batch_size=_BATCH_SIZE.value, data_dir=_DATA_DIR.value, ijb=_IJB.value,
      ijb_name=_IJB_NAME.value, skip_missing=_SKIP_MISSING.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["out"])
  app.run(main, flags_parser=command_line.parse_flags)

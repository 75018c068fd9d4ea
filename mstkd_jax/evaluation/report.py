"""The report over models: `build_report` makes its dict (evaluation/summary.py),
`format_table` prints it (evaluation/tables.py), `write_report` writes its files: report.json,
roc.json, report.md (evaluation/markdown.py) and the PNG plots (evaluation/plots.py)."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

from mstkd_jax import files, paths
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import markdown, plots, summary
# The report's entry points, for its callers (stages, evaluate, pipeline).
from mstkd_jax.evaluation.summary import (  # pylint: disable=unused-import
    build_report, model_warnings)
from mstkd_jax.evaluation.tables import format_table  # pylint: disable=unused-import


def roc_file_name(model: str) -> str:
  """roc_<model>.png with "/" (and any other unsafe character) replaced by "_"."""
  return "roc_" + re.sub(r"[^A-Za-z0-9._+-]", "_", model) + ".png"


def _collect_roc(report: Mapping) -> dict:
  rocs = {}
  for model, entry in report["models"].items():
    per_group = {g: e["roc"] for g, e in entry["groups"].items() if "roc" in e}
    if per_group:
      rocs[model] = per_group
  return rocs


def _check_rocs(rocs: Any) -> None:
  if not isinstance(rocs, Mapping):
    raise UserError("roc_data: expected {model: {group: {'fpr': [...], 'tpr': [...]}}}")
  for model, per_group in rocs.items():
    if not isinstance(per_group, Mapping):
      raise UserError(f"roc_data[{model!r}]: expected a dict of group -> {{fpr, tpr}}")
    for group, roc in per_group.items():
      if (not isinstance(roc, Mapping) or not isinstance(roc.get("fpr"), list)
          or not isinstance(roc.get("tpr"), list) or len(roc["fpr"]) != len(roc["tpr"])):
        raise UserError(f"roc_data[{model!r}][{group!r}]: expected 'fpr' and 'tpr' lists of "
                        "equal length")


class ReportFolder:
  """The folder a report (or the report over seeds) is written into, made on creation.

  Every file is written whole (a temporary file, then a rename; a URL through epath).

  Attributes:
    out: the folder, a local path or a URL.
    written: label -> path of every file written.
    images: caption -> file name of every plot `put_image` wrote, in order, for report.md.

  Raises:
    UserError: the folder or a file cannot be written.
  """

  def __init__(self, out_dir: Any):
    self.out = paths.resolve(out_dir, "the report folder")  # a URL stays one (pathlib would not)
    files.makedirs(self.out)
    self.written: dict[str, str] = {}
    self.images: dict[str, str] = {}

  def put(self, label: str, name: str, data: bytes) -> None:
    """Writes `data` as file `name` of the folder, recorded as `label`."""
    path = os.path.join(self.out, name)
    files.write_bytes(path, data)
    self.written[label] = str(path)

  def put_json(self, label: str, name: str, value: Any, indent: int | None = None) -> None:
    """Writes `value` as JSON and a newline; NaN and infinity raise ValueError (JSON has
    neither)."""
    self.put(label, name, (json.dumps(value, indent=indent, allow_nan=False) + "\n").encode())

  def put_image(self, label: str, name: str, png: bytes, caption: str) -> None:
    """Writes the plot `png` as `name`, shown in report.md under `caption`."""
    self.put(label, name, png)
    self.images[caption] = name


def write_report(report: Mapping, out_dir: Any, roc_data: Mapping | None = None) -> dict:
  """Writes report.json, roc.json, report.md and the PNG plots into `out_dir`.

  The per-group "roc" curves are left out of report.json (400 points x 2 per group
  and model would dominate it) and written to roc.json instead, as
  {model: {group: {fpr, tpr}}}. `roc_data` (same shape) replaces the curves kept in
  the report. Every file is written atomically. A report with an "ijb" section also gets
  roc_ijb.json ({model: {variant: {fpr, tpr}}}, left out of report.json likewise) and
  roc_ijb_<name>.png.

  Returns:
    label -> written path: "json", "roc_json", "markdown", "accuracy_by_group" (when
    there are group results), "teacher_group_heatmap" (when teachers are present),
    "roc/<model>" per model, "metrics" (fairness_metrics.png, when a fairness metric is
    plotted: `fairness.Metric.plot`), "roc_ijb_json" and "roc_ijb" (with an IJB section).
  """
  folder = ReportFolder(out_dir)
  rocs = summary.jsonable(roc_data) if roc_data is not None else _collect_roc(report)
  _check_rocs(rocs)

  slim = summary.jsonable(report)
  for entry in slim["models"].values():
    for group in entry["groups"].values():
      group.pop("roc", None)
  ijb_rocs = {}  # IJB curves go to roc_ijb.json, as the groups' go to roc.json
  for model, variants in (slim.get("ijb") or {}).get("models", {}).items():
    ijb_rocs[model] = {v: e.pop("roc") for v, e in variants.items() if "roc" in e}

  folder.put_json("json", "report.json", slim, indent=2)
  if rocs:
    folder.put_json("roc_json", "roc.json", rocs)

  if report.get("ijb"):
    # pylint: disable-next=g-import-not-at-top
    from mstkd_jax.evaluation import ijb_protocol as ijb_lib
    folder.put_json("roc_ijb_json", "roc_ijb.json", ijb_rocs)
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", str(report["ijb"]["name"]))
    folder.put_image("roc_ijb", f"roc_ijb_{name}.png", ijb_lib.plot_roc(report["ijb"]),
                     f"ROC {report['ijb']['name']}")
  if report["models"]:
    folder.put_image("accuracy_by_group", "accuracy_by_group.png",
                     plots.plot_accuracy_by_group(report), "Accuracy by group")
  heatmap = plots.plot_teacher_heatmap(report)
  if heatmap is not None:
    folder.put_image("teacher_group_heatmap", "teacher_group_heatmap.png", heatmap,
                     "Teacher x group accuracy")
  used: set[str] = set()
  for model, per_group in rocs.items():
    name = roc_file_name(model)
    stem, n = name[:-4], 2
    while name in used:  # two model names may sanitize to one file name
      name, n = f"{stem}_{n}.png", n + 1
    used.add(name)
    folder.put_image(f"roc/{model}", name, plots.plot_roc(model, per_group), f"ROC {model}")
  metrics_png = plots.plot_metrics(report) if report["models"] else None
  if metrics_png is not None:
    folder.put_image("metrics", "fairness_metrics.png", metrics_png, "Fairness metrics")

  folder.put("markdown", "report.md", markdown.report_markdown(slim, folder.images).encode())
  return folder.written

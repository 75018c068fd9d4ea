"""The combined report over several training seeds: means with t-intervals, paired claims.

Each seed's run writes its own report (`summary.build_report`); `combine_reports` puts the
per-seed numbers of every model side by side and summarizes them, the per-group accuracies
and every fairness metric, as a mean with a Student-t confidence interval over seeds, and
checks the paper's claims (MST-KD: Caldeira et al., ECCV-W 2024) as paired, per-seed
differences. `write_combined` writes report.json, report.md and the PNG plots.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Sequence

import numpy as np

from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import fairness, intervals, markdown, plots, report, summary
# The entry point that prints the combined report, for its caller (pipeline).
from mstkd_jax.evaluation.tables import format_combined_table  # pylint: disable=unused-import


def _number(value: Any, where: str) -> float:
  """A report number: a float, or the strings "inf", "-inf", "nan" that summary.py writes."""
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return float(value)
  if isinstance(value, str) and value in ("inf", "-inf", "nan"):
    return float(value)
  raise UserError(f"{where}: expected a number (or 'inf'/'nan'), got {value!r}")


def _check_reports(reports: Any) -> None:
  if not isinstance(reports, Mapping) or not reports:
    raise UserError("reports: expected a non-empty dict of seed -> report (build_report)")
  for seed, rep in reports.items():
    if not isinstance(rep, Mapping) or not isinstance(rep.get("models"), Mapping):
      raise UserError(f"reports[{seed!r}]: expected a report dict with a 'models' dict "
                      "(as returned by build_report)")
    for model, entry in rep["models"].items():
      if not isinstance(entry, Mapping) or not isinstance(entry.get("groups"), Mapping):
        raise UserError(f"reports[{seed!r}]['models'][{model!r}]: expected a dict with a "
                        "'groups' dict")


def _model_order(reports: Mapping) -> tuple[list[str], list[str]]:
  """(models in every report, models missing in some), each in first-seen order."""
  seen: list[str] = []
  for rep in reports.values():
    seen.extend(m for m in rep["models"] if m not in seen)
  complete = [m for m in seen if all(m in rep["models"] for rep in reports.values())]
  return complete, [m for m in seen if m not in complete]


def _combine_model(reports: Mapping, model: str, confidence: float) -> dict:
  seeds = list(reports)
  entries = [reports[s]["models"][model] for s in seeds]
  groups = list(entries[0]["groups"])
  for seed, entry in zip(seeds, entries):
    if set(entry["groups"]) != set(groups):
      raise UserError(
          f"reports[{seed!r}]['models'][{model!r}]['groups']: has groups "
          f"{sorted(entry['groups'])} but seed {seeds[0]!r} has {sorted(groups)}; every seed "
          "must be evaluated on the same groups")

  def per_seed(get, where):
    return np.array([_number(get(e), f"reports[{s!r}]['models'][{model!r}]{where}")
                     for s, e in zip(seeds, entries)])

  out = {"groups": {}}
  for g in groups:
    acc = per_seed(lambda e, g=g: e["groups"][g].get("accuracy"),
                   f"['groups'][{g!r}]['accuracy']")
    out["groups"][g] = intervals.interval(acc, confidence)
  for m in fairness.metrics(fairness.ACCURACIES, shown=True):
    if any(m.name in e for e in entries):  # none: reports written before it was registered
      out[m.name] = intervals.interval(
          per_seed(lambda e, key=m.name: e.get(key), f"[{m.name!r}]"), confidence)
  return out


def _claim_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
  """(minuend, subtrahend) for every MST-KD student whose comparison models exist."""
  pairs = []
  for m in models:
    parts = m.split("/")
    if len(parts) != 3 or f"{parts[0]}/" != summary.MSTKD_PREFIX:
      continue
    if summary.STUDENT_ALONE in models:
      pairs.append((m, summary.STUDENT_ALONE))
    balanced = f"{summary.BALANCED_KD_PREFIX}{parts[1]}/{parts[2]}"
    if balanced in models:
      pairs.append((m, balanced))
  return pairs


def combine_reports(reports: Mapping[Any, Mapping], confidence: float = 0.95) -> dict:
  """Combines per-seed reports into means with t-intervals and the paper's paired claims.

  Args:
    reports: seed label (e.g. 0, 1, 2) -> that seed's `summary.build_report` dict. The
      order of the keys is the seed order, kept in the output.
    confidence: coverage of every interval, strictly between 0 and 1.

  Returns:
    A JSON-ready dict (non-finite numbers are the strings "inf"/"-inf"/"nan"):
    {"seeds": [...], "confidence": float,
     "models": {model: {"groups": {group: t_interval of the accuracy (%)},
                        and the t_interval of every shown ACCURACIES metric of
                        evaluation/fairness.py by name: "mean", "std", "ser", ...}},
     "claims": {"<minuend> - <subtrahend>": {"minuend", "subtrahend", and the
                paired_difference of every claimed metric by name: "mean" (the per-seed
                mean accuracy, pp), "std" (the per-seed STD, pp), ...}},
     "incomplete_models": [models missing in some seed's report, left out above]}.
    Claims: every `mstkd/<adaptor>/<kd>` minus `student_alone`, and minus
    `balanced_kd/<adaptor>/<kd>`, where both models are in every seed's report. A metric
    missing in every seed's report of a model (a report written before the metric was
    registered) is left out of that model's entry and claims.

  Raises:
    UserError: `reports` is empty or malformed, no model is in every seed's report, a
      model's groups differ between seeds, a number is missing, or `confidence` is not
      in (0, 1).
  """
  confidence = intervals.check_confidence(confidence)
  _check_reports(reports)
  complete, incomplete = _model_order(reports)
  if not complete:
    raise UserError(f"reports: no model is in every seed's report (seeds {list(reports)}; "
                    f"models {incomplete})")
  models = {m: _combine_model(reports, m, confidence) for m in complete}
  seeds = list(reports)
  claims = {}
  claimed = [m.name for m in fairness.metrics(fairness.ACCURACIES, shown=True) if m.claim]
  for minuend, subtrahend in _claim_pairs(complete):
    diffs = {}
    for key in claimed:
      if key not in models[minuend] or key not in models[subtrahend]:
        continue
      a = [_number(reports[s]["models"][minuend].get(key), f"reports[{s!r}]['models']"
                   f"[{minuend!r}][{key!r}]") for s in seeds]
      b = [_number(reports[s]["models"][subtrahend].get(key), f"reports[{s!r}]['models']"
                   f"[{subtrahend!r}][{key!r}]") for s in seeds]
      diffs[key] = intervals.paired_difference(a, b, confidence)
    claims[f"{minuend} - {subtrahend}"] = {"minuend": minuend, "subtrahend": subtrahend,
                                           **diffs}
  return summary.jsonable({
      "seeds": seeds, "confidence": confidence, "models": models, "claims": claims,
      "incomplete_models": incomplete})
def write_combined(combined: Mapping, out_dir: Any) -> dict:
  """Writes report.json, report.md, accuracy_bias.png and group_accuracy.png into `out_dir`,
  and fairness_metrics.png when a fairness metric is plotted (`fairness.Metric.plot`).

  Every file is written atomically (temporary file, then rename).

  Returns:
    label -> written path: "json", "markdown", "accuracy_bias", "group_accuracy" and
    "metrics" (with fairness_metrics.png).

  Raises:
    UserError: the folder or a file cannot be written.
  """
  folder = report.ReportFolder(out_dir)
  data = summary.jsonable(combined)
  folder.put_json("json", "report.json", data, indent=2)
  folder.put_image("accuracy_bias", "accuracy_bias.png", plots.plot_accuracy_bias(data),
                   "Accuracy vs bias")
  folder.put_image("group_accuracy", "group_accuracy.png", plots.plot_group_bars(data),
                   "Accuracy by group")
  metrics_png = plots.plot_combined_metrics(data)
  if metrics_png is not None:
    folder.put_image("metrics", "fairness_metrics.png", metrics_png, "Fairness metrics")
  folder.put("markdown", "report.md", markdown.combined_markdown(data, folder.images).encode())
  return folder.written

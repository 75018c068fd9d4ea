"""The report dict: every model's per-group results summarized by the fairness metrics, made
JSON-safe, with the warnings that a model's numbers are not to be trusted."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np

from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import fairness

# Report rows the reports single out: the teachers' (teacher x group matrix), and the
# models the paper's claims compare (report over seeds).
TEACHER_PREFIX = "teacher/"
STUDENT_ALONE = "student_alone"
MSTKD_PREFIX = "mstkd/"
BALANCED_KD_PREFIX = "balanced_kd/"
_PCT_DIGITS = 4


def jsonable(obj: Any) -> Any:
  """Plain JSON types; non-finite floats become the strings "inf", "-inf", "nan"."""
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return [jsonable(v) for v in obj.tolist()]
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    value = float(obj)
    if math.isfinite(value):
      return value
    # Standard JSON has no inf/NaN; a string keeps the meaning (e.g. SER with a 0 error).
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
  if obj is None or isinstance(obj, str):
    return obj
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  return str(obj)


def _pct(fraction: Any) -> float:
  return round(float(fraction) * 100.0, _PCT_DIGITS)


def _group_entry(model: str, group: str, res: Any) -> dict:
  if not isinstance(res, Mapping) or "accuracy" not in res:
    raise UserError(f"models[{model!r}][{group!r}]: expected the dict returned by "
                    "evaluate_verification (with an 'accuracy' key)")
  acc = float(res["accuracy"])
  noflip = float(res.get("accuracy_noflip", acc))
  tar = res.get("tar_at_far") or {}
  entry = {
      "accuracy": _pct(acc),
      "accuracy_std": _pct(res.get("accuracy_std", 0.0)),
      "accuracy_noflip": _pct(noflip),
      "accuracy_noflip_std": _pct(res.get("accuracy_noflip_std", res.get("accuracy_std", 0.0))),
      "tar_at_far": {k: _pct(v["tar"]) for k, v in tar.items()},
      "tar_at_far_detail": {k: {"tar": _pct(v["tar"]), "tar_std": _pct(v.get("tar_std", 0.0)),
                                "far": _pct(v.get("far", 0.0))} for k, v in tar.items()},
  }
  if "best_thresholds" in res:
    entry["best_thresholds"] = [round(float(t), 6) for t in res["best_thresholds"]]
  if "num_pairs" in res:
    entry["num_pairs"] = int(res["num_pairs"])
  roc = res.get("roc")
  if isinstance(roc, Mapping) and "fpr" in roc and "tpr" in roc:
    entry["roc"] = {"fpr": [float(v) for v in roc["fpr"]], "tpr": [float(v) for v in roc["tpr"]]}
  return entry


def build_report(models: Mapping[str, Mapping[str, Mapping]],
                 config: Mapping | None = None, ijb: Mapping | None = None) -> dict:
  """Summarizes per-group verification results of several models.

  Args:
    models: model name (e.g. "teacher/African", "mstkd/SL/a-KD") -> group name ->
      the dict returned by `evaluate_verification`.
    config: settings to record with the report (made JSON-safe).

  Returns:
    {"models": {model: {"groups": {group: {"accuracy", "accuracy_std",
    "accuracy_noflip", "accuracy_noflip_std", "tar_at_far": {"1e-3": ..},
    "tar_at_far_detail", "best_thresholds", "num_pairs", "roc": {fpr, tpr}}},
    every ACCURACIES metric of evaluation/fairness.py by name ("mean", "std",
    "std_sample", "ser", ...), "best_group", "worst_group", "global_threshold"}},
    "config": {...}, "warnings": model_warnings of every model}.
    Accuracies and TARs are percents rounded to 4 decimals, a metric as `fairness.stored`
    gives it (mean and STD percents, STD the population std (ddof=0); SER a ratio);
    "global_threshold" holds `fairness.global_threshold_metrics` (rates as fractions)
    when every group carries distances/issame and there are >= 2 groups, else None (with
    "global_threshold_note" saying why, when the metrics failed). Non-finite numbers are
    the strings "inf"/"nan". With `ijb` (evaluation.ijb_protocol.report_section) also "ijb": it,
    and `models` may then be empty.
  """
  if not isinstance(models, Mapping) or not (models or ijb):
    raise UserError("models: expected a non-empty dict of model name -> group results")
  out, warnings = {}, []
  for model, groups in models.items():
    if not isinstance(groups, Mapping) or not groups:
      raise UserError(f"models[{model!r}]: expected a non-empty dict of group -> results")
    entries, accs, dists = {}, {}, {}
    for group, res in groups.items():
      entries[group] = _group_entry(model, group, res)
      accs[group] = float(res["accuracy"])
      if res.get("distances") is not None and res.get("issame") is not None:
        dists[group] = (np.asarray(res["distances"]), np.asarray(res["issame"]))
    warnings += model_warnings(model, groups)  # entries checked by _group_entry above
    summary = fairness.summarize_accuracies(accs)
    global_metrics, note = None, None
    if len(dists) == len(groups) >= 2:
      try:
        global_metrics = fairness.global_threshold_metrics(dists)
      except UserError as e:
        # An optional extra (e.g. a group without impostor pairs) must not sink the report.
        note = str(e)
    out[model] = {
        "groups": entries,
        **{m.name: fairness.stored(m, summary[m.name])
           for m in fairness.metrics(fairness.ACCURACIES)},
        "best_group": summary["best_group"],
        "worst_group": summary["worst_group"],
        "global_threshold": global_metrics,
    }
    if note is not None:
      out[model]["global_threshold_note"] = note
  report = {"models": out, "config": dict(config or {}), "warnings": warnings}
  if ijb:
    # pylint: disable-next=g-import-not-at-top
    from mstkd_jax.evaluation import ijb_protocol as ijb_lib
    report["ijb"] = dict(ijb)
    report["warnings"] = warnings + ijb_lib.warnings_of(ijb)
  return jsonable(report)


# All pair distances of a group within this spread of each other: every image embeds alike.
EQUAL_DISTANCES = 1e-6
# Fewer pairs cannot tell a weak model from chance (two standard errors: 10 points at 100).
MIN_PAIRS_FOR_CHANCE = 100


def model_warnings(model: str, groups: Mapping[str, Mapping]) -> list[str]:
  """Warnings that a model's numbers are not to be trusted.

  - A group whose pair distances are all (nearly) equal: every image of it embeds alike (a
    collapsed model, or images that decode to one colour); its accuracy is chance, not a
    measurement, yet it enters mean, STD and SER.
  - A group with non-finite distances (NaN or Inf embeddings).
  - A model at chance in every group (each accuracy within two standard errors of 50%,
    the balanced pairs' chance: 0.5 + 1/sqrt(pairs), judged where a group has at least
    MIN_PAIRS_FOR_CHANCE pairs): it has diverged or learned nothing. One group near chance
    alone is not flagged: a specialized teacher may verify a group it never saw that poorly.

  Args:
    model: the model's name, for the messages.
    groups: group -> the dict of `evaluate_verification` ("accuracy" a fraction;
      "distances" and "issame" or "num_pairs" where known).

  Returns:
    One line per finding ([] for a healthy model).
  """
  warnings, at_chance = [], []
  for group, res in groups.items():
    accuracy = float(res["accuracy"])
    distances = res.get("distances")
    issame = res.get("issame")
    pairs = int(res.get("num_pairs") or (len(issame) if issame is not None else 0))
    if distances is not None and len(distances):
      distances = np.asarray(distances, np.float64)
      if not np.all(np.isfinite(distances)):
        warnings.append(f"{model}: group {group} has non-finite pair distances (NaN or Inf "
                        "embeddings: a diverged model); its accuracy is not a measurement")
        continue
      spread = float(np.ptp(distances))
      if spread <= EQUAL_DISTANCES:
        warnings.append(
            f"{model}: all {len(distances)} pair distances of group {group} are equal "
            f"(spread {spread:.1e}): every image embeds alike (a collapsed model, or "
            "images that decode to one colour); its accuracy there is chance, not a "
            "measurement")
    if pairs >= MIN_PAIRS_FOR_CHANCE and accuracy <= 0.5 + 1.0 / math.sqrt(pairs):
      at_chance.append(f"{group} {100 * accuracy:.2f}%")
  if groups and len(at_chance) == len(groups):
    warnings.append(
        f"{model} verifies at chance in every group ({', '.join(at_chance)}; each within "
        "2 standard errors of 50%): it has diverged or learned nothing, and its mean, STD "
        "and SER are not measurements")
  return warnings


def all_groups(report: Mapping) -> list[str]:
  """Every group of the report's models, in first-seen order."""
  groups: list[str] = []
  for entry in report["models"].values():
    groups.extend(g for g in entry["groups"] if g not in groups)
  return groups


def teacher_matrix(report: Mapping) -> tuple[list[str], list[str], np.ndarray] | None:
  """(teacher groups, evaluation groups, accuracy % [T, G] with NaN gaps), or None."""
  teachers = [m for m in report["models"] if m.startswith(TEACHER_PREFIX)]
  if not teachers:
    return None
  eval_groups: list[str] = []
  for m in teachers:
    eval_groups.extend(g for g in report["models"][m]["groups"] if g not in eval_groups)
  matrix = np.full((len(teachers), len(eval_groups)), np.nan)
  for i, m in enumerate(teachers):
    for j, g in enumerate(eval_groups):
      if g in report["models"][m]["groups"]:
        matrix[i, j] = float(report["models"][m]["groups"][g]["accuracy"])
  return [m[len(TEACHER_PREFIX):] for m in teachers], eval_groups, matrix

"""Cross-model evaluation report: builds the JSON-ready summary, prints tables, writes files.

Writes report.json, roc.json, report.md and PNG plots (matplotlib Agg, imported lazily).
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np

from mstkd_jax import files, paths
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import fairness, target_space

TEACHER_PREFIX = "teacher/"
_PCT_DIGITS = 4


def _jsonable(obj: Any) -> Any:
  """Plain JSON types; non-finite floats become the strings "inf", "-inf", "nan"."""
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return [_jsonable(v) for v in obj.tolist()]
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
    "mean", "std", "std_sample", "ser", "best_group", "worst_group",
    "global_threshold"}}, "config": {...}, "warnings": model_warnings of every model}.
    Accuracies, TARs, mean and STD are percents rounded to 4 decimals; STD is the population std (ddof=0); SER is a
    ratio; "global_threshold" holds `fairness.global_threshold_metrics` (rates as
    fractions) when every group carries distances/issame and there are >= 2 groups,
    else None (with "global_threshold_note" saying why, when the metrics failed).
    Non-finite numbers are the strings "inf"/"nan". With `ijb` (evaluation.ijb.
    report_section) also "ijb": it, and `models` may then be empty.
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
        "mean": _pct(summary["mean"]),
        "std": _pct(summary["std"]),
        "std_sample": None if summary["std_sample"] is None else _pct(summary["std_sample"]),
        "ser": round(summary["ser"], 4) if math.isfinite(summary["ser"]) else summary["ser"],
        "best_group": summary["best_group"],
        "worst_group": summary["worst_group"],
        "global_threshold": global_metrics,
    }
    if note is not None:
      out[model]["global_threshold_note"] = note
  report = {"models": out, "config": dict(config or {}), "warnings": warnings}
  if ijb:
    from mstkd_jax.evaluation import ijb_protocol as ijb_lib  # pylint: disable=g-import-not-at-top
    report["ijb"] = dict(ijb)
    report["warnings"] = warnings + ijb_lib.warnings_of(ijb)
  return _jsonable(report)


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


def _all_groups(report: Mapping) -> list[str]:
  groups: list[str] = []
  for entry in report["models"].values():
    groups.extend(g for g in entry["groups"] if g not in groups)
  return groups


def _fmt(value: Any, digits: int) -> str:
  if value is None:
    return "-"
  if isinstance(value, str):
    return value
  return f"{float(value):.{digits}f}"


def _main_table(report: Mapping) -> tuple[list[str], list[list[str]]]:
  groups = _all_groups(report)
  header = ["Model"] + groups + ["Mean", "STD", "SER"]
  rows = []
  for model, entry in report["models"].items():
    cells = [model]
    for g in groups:
      cells.append(_fmt(entry["groups"][g]["accuracy"], 2) if g in entry["groups"] else "-")
    cells += [_fmt(entry["mean"], 2), _fmt(entry["std"], 2), _fmt(entry["ser"], 3)]
    rows.append(cells)
  return header, rows


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


def _teacher_table(report: Mapping) -> tuple[list[str], list[list[str]]] | None:
  tm = teacher_matrix(report)
  if tm is None:
    return None
  teachers, groups, matrix = tm
  header = ["Teacher \\ eval"] + groups
  rows = [[t] + ["-" if np.isnan(v) else f"{v:.2f}" for v in matrix[i]]
          for i, t in enumerate(teachers)]
  return header, rows


def _fairness_table(report: Mapping) -> tuple[list[str], list[list[str]]] | None:
  rows = []
  for model, entry in report["models"].items():
    for key, m in (entry.get("global_threshold") or {}).items():
      fmrs = " ".join(f"{g}={_fmt(v['fmr'], 5)}" for g, v in m["groups"].items())
      fnmrs = " ".join(f"{g}={_fmt(v['fnmr'], 4)}" for g, v in m["groups"].items())
      rows.append([model, key, _fmt(m["threshold"], 4), _fmt(m["fdr"], 4), _fmt(m["garbe"], 4),
                   _fmt(m["inequity_rate"], 3), fmrs, fnmrs])
  if not rows:
    return None
  return ["Model", "FMR target", "Threshold", "FDR", "GARBE", "IR", "FMR", "FNMR"], rows


def _plain(header: list[str], rows: list[list[str]]) -> str:
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  def line(cells):
    # Left-align the first (name) column, right-align the numbers.
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
  return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _markdown(header: list[str], rows: list[list[str]]) -> str:
  def line(cells):
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
  align = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(header))) + "|"
  return "\n".join([line(header), align] + [line(r) for r in rows])


def format_table(report: Mapping) -> str:
  """Terminal tables: accuracy (%) per group with Mean, STD, SER; then teacher x group."""
  header, rows = _main_table(report)
  parts = ["Verification accuracy (%) per group", _plain(header, rows)] if rows else []
  tt = _teacher_table(report)
  if tt is not None:
    parts += ["", "Teacher x evaluation group accuracy (%)", _plain(*tt)]
  if report.get("ijb"):
    from mstkd_jax.evaluation import ijb_protocol as ijb_lib  # pylint: disable=g-import-not-at-top
    parts += ["" if parts else None, f"{report['ijb']['name']} 1:1 verification: TAR (%) "
              "at FAR", _plain(*ijb_lib.table(report["ijb"]))]
  return "\n".join(p for p in parts if p is not None)


_LEGEND = """\
- Accuracy: insightface 10-fold verification accuracy in percent (flip-fused embeddings when
  flipped images were evaluated); per fold, the threshold best on the other 9 folds.
- Mean: mean of the per-group accuracies.
- STD: population standard deviation (ddof=0) of the per-group accuracies, in percent points.
- SER (skewed error ratio): max group error / min group error, error = 100 - accuracy;
  "inf" when the smallest error is 0 (1.0 when all errors are 0).
- Global-threshold fairness: one threshold per FMR target fixed on the pooled impostor pairs of
  all groups (pooled FMR <= target); FMR/FNMR per group at that threshold (fractions);
  FDR = 1 - (0.5 max|dFMR| + 0.5 max|dFNMR|) (1 = fair); GARBE = 0.5 Gini(FMR) + 0.5 Gini(FNMR)
  (0 = fair); IR = sqrt(max/min FMR * max/min FNMR) (1 = fair, "inf" when a minimum is 0).
"""


def warnings_markdown(warnings) -> list[str]:
  """The "Warnings" section lines (none without warnings): what to read before the numbers."""
  if not warnings:
    return []
  return (["## Warnings", "", "Read these before the numbers below: a stage that has not "
           "converged, or a target space whose identities have collapsed, makes the rows "
           "that depend on it untrustworthy.", ""]
          + [f"- {w}" for w in warnings] + [""])


def _diagnostics_markdown(report: Mapping) -> list[str]:
  """Target-space and training tables from report["diagnostics"] / report["training"]."""
  parts = []
  spaces = (report.get("diagnostics") or {}).get("target_space") or {}
  if spaces:
    header, rows = target_space.format_table(spaces)
    parts += ["", "## Target-space diagnostics", "",
              "Cosines over the training images (as stored): of two images of one identity; "
              "of the centroids of two identities of one group; of two images of different "
              "identities of one group; of the centroids of identities of different groups. "
              "Separation = within identity - between images (group); below "
              f"{target_space.COLLAPSE_MARGIN} the space has collapsed. Nearest-centroid "
              "identity accuracy with leave-one-out centroids.", "",
              _markdown(header, rows)]
  students = (report.get("diagnostics") or {}).get("students") or {}
  if students:
    groups = []
    for fit in students.values():
      groups.extend(g for g in fit["verification_target_cosine"] if g not in groups)
    header = ["Student", "train"] + groups
    rows = [[m, _fmt(fit["train_target_cosine"], 3)]
            + [_fmt(fit["verification_target_cosine"].get(g), 3) for g in groups]
            for m, fit in students.items()]
    parts += ["", "## Students: mean cosine to their targets", "",
              "On a fixed sample of training images and on each group's verification "
              "images (the adaptor's space there).", "", _markdown(header, rows)]
  training = report.get("training") or {}
  if training:
    header = ["Stage", "steps", "first-epoch loss", "final-epoch loss",
              "final-epoch accuracy", "loss change, last 10% (+- s.e.)"]
    rows = [[name, str(r.get("steps", "-")), _fmt(r.get("first_epoch_loss"), 4),
             _fmt(r.get("final_epoch_loss"), 4), _fmt(r.get("final_epoch_accuracy"), 3),
             "-" if r.get("tail_loss_change") is None else
             f"{r['tail_loss_change']:+.1%} +- {r.get('tail_loss_change_se') or 0:.1%}"]
            for name, r in training.items()]
    parts += ["", "## Training", "", _markdown(header, rows)]
  return parts


def _report_markdown(report: Mapping, images: Mapping[str, str]) -> str:
  header, rows = _main_table(report)
  parts = ["# Evaluation report", ""] + warnings_markdown(report.get("warnings"))
  if rows:
    parts += ["## Verification accuracy (%) per group", "", _markdown(header, rows)]
  if report.get("ijb"):
    from mstkd_jax.evaluation import ijb_protocol as ijb_lib  # pylint: disable=g-import-not-at-top
    parts += ijb_lib.markdown(report["ijb"], _markdown)[0 if rows else 1:]
  tt = _teacher_table(report)
  if tt is not None:
    parts += ["", "## Teacher x evaluation group accuracy (%)", "", _markdown(*tt)]
  ft = _fairness_table(report)
  if ft is not None:
    parts += ["", "## Fairness at a global threshold", "", _markdown(*ft)]
  parts += _diagnostics_markdown(report)
  parts += ["", "## Legend", "", _LEGEND.rstrip()]
  if images:
    parts += ["", "## Plots", ""]
    parts += [f"![{label}]({name})" for label, name in images.items()]
  if report.get("config"):
    parts += ["", "## Config", "", "```json", json.dumps(report["config"], indent=2), "```"]
  return "\n".join(parts) + "\n"


def _png_bytes(fig) -> bytes:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  FigureCanvasAgg(fig)
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return buf.getvalue()


def plot_roc(model: str, rocs: Mapping[str, Mapping]) -> bytes:
  """PNG of the per-group ROC curves of one model (TPR vs FPR, log-scale FPR)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6, 4.5), dpi=100)
  ax = fig.add_subplot()
  lowest = 1.0
  for group, roc in rocs.items():
    fpr = np.asarray(roc["fpr"], dtype=np.float64)
    tpr = np.asarray(roc["tpr"], dtype=np.float64)
    keep = fpr > 0  # log axis: FPR 0 has no position
    if keep.any():
      order = np.argsort(fpr[keep], kind="stable")
      ax.plot(fpr[keep][order], tpr[keep][order], label=group)
      lowest = min(lowest, float(fpr[keep].min()))
  ax.set_xscale("log")
  ax.set_xlim(min(1e-4, lowest), 1.0)
  ax.set_ylim(0.0, 1.01)
  ax.set_xlabel("False positive rate")
  ax.set_ylabel("True positive rate")
  ax.set_title(f"ROC: {model}")
  ax.grid(True, which="both", alpha=0.3)
  if ax.get_lines():
    ax.legend(loc="lower right")
  fig.tight_layout()
  return _png_bytes(fig)


def distinct_colours(n: int) -> list[tuple[float, float, float]]:
  """`n` pairwise-distinct RGB colours (floats in [0, 1]) for one figure.

  tab10 for n <= 10, tab20 for n <= 20, else n hues evenly spaced around the HSV
  circle (alternating brightness so neighbours stay apart), all different.

  Raises:
    UserError: `n` is not a non-negative integer.
  """
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise UserError(f"n: expected a non-negative number of colours, got {n!r}")
  n = int(n)
  if n <= 20:
    import matplotlib  # pylint: disable=g-import-not-at-top
    colours = matplotlib.colormaps["tab10" if n <= 10 else "tab20"].colors
    return [tuple(float(c) for c in colours[i][:3]) for i in range(n)]
  # Hues i / n differ for i < n, and HSV -> RGB is one-to-one at fixed s, v > 0.
  return [colorsys.hsv_to_rgb(i / n, 0.8, 0.95 if i % 2 == 0 else 0.7) for i in range(n)]


def plot_accuracy_by_group(report: Mapping) -> bytes:
  """PNG of grouped bars: accuracy (%) per evaluation group, one bar per model."""
  return _png_bytes(_accuracy_by_group_figure(report))


def _accuracy_by_group_figure(report: Mapping):
  """The matplotlib Figure behind `plot_accuracy_by_group`; one colour per model."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  groups = _all_groups(report)
  models = list(report["models"])
  colours = distinct_colours(len(models))
  fig = Figure(figsize=(max(6.0, 1.2 * len(groups) + 4.0), 4.5), dpi=100)
  ax = fig.add_subplot()
  width = 0.8 / max(len(models), 1)
  x = np.arange(len(groups))
  values = []
  for i, m in enumerate(models):
    accs = [report["models"][m]["groups"].get(g, {}).get("accuracy", np.nan) for g in groups]
    accs = [float(a) if isinstance(a, (int, float)) else np.nan for a in accs]
    values.extend(a for a in accs if np.isfinite(a))
    ax.bar(x - 0.4 + width * (i + 0.5), accs, width, label=m, color=colours[i])
  ax.set_xticks(x)
  ax.set_xticklabels(groups)
  if values:
    ax.set_ylim(max(0.0, min(values) - 2.0), min(100.0, max(values) + 1.0) + 0.5)
  ax.set_ylabel("Accuracy (%)")
  ax.set_title("Verification accuracy by group")
  ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.tight_layout()
  return fig


def plot_teacher_heatmap(report: Mapping) -> bytes | None:
  """PNG heatmap of teacher (rows) x evaluation group (columns) accuracy, or None."""
  tm = teacher_matrix(report)
  if tm is None:
    return None
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  teachers, groups, matrix = tm
  fig = Figure(figsize=(1.3 * len(groups) + 3.0, 0.8 * len(teachers) + 2.0), dpi=100)
  ax = fig.add_subplot()
  image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", aspect="auto")
  ax.set_xticks(np.arange(len(groups)))
  ax.set_xticklabels(groups)
  ax.set_yticks(np.arange(len(teachers)))
  ax.set_yticklabels(teachers)
  ax.set_xlabel("Evaluation group")
  ax.set_ylabel("Teacher")
  lo, hi = image.get_clim()
  for i in range(len(teachers)):
    for j in range(len(groups)):
      if np.isfinite(matrix[i, j]):
        # Dark text on the bright (high) end of viridis, white on the dark end.
        bright = hi > lo and (matrix[i, j] - lo) / (hi - lo) > 0.6
        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center",
                color="black" if bright else "white", fontsize=9)
  fig.colorbar(image, ax=ax, label="Accuracy (%)")
  ax.set_title("Teacher x group accuracy (%)")
  fig.tight_layout()
  return _png_bytes(fig)


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
    "roc/<model>" per model, "roc_ijb_json" and "roc_ijb" (with an IJB section).
  """
  out = paths.resolve(out_dir, "the report folder")  # a URL stays one (pathlib would not)
  files.makedirs(out)
  rocs = _jsonable(roc_data) if roc_data is not None else _collect_roc(report)
  _check_rocs(rocs)

  slim = _jsonable(report)
  for entry in slim["models"].values():
    for group in entry["groups"].values():
      group.pop("roc", None)
  ijb_rocs = {}  # IJB curves go to roc_ijb.json, as the groups' go to roc.json
  for model, variants in (slim.get("ijb") or {}).get("models", {}).items():
    ijb_rocs[model] = {v: e.pop("roc") for v, e in variants.items() if "roc" in e}

  written: dict[str, str] = {}

  def put(label: str, name: str, data: bytes) -> None:
    path = os.path.join(out, name)
    files.write_bytes(path, data)
    written[label] = str(path)

  put("json", "report.json", (json.dumps(slim, indent=2, allow_nan=False) + "\n").encode())
  if rocs:
    put("roc_json", "roc.json", (json.dumps(rocs, allow_nan=False) + "\n").encode())

  images: dict[str, str] = {}
  if report.get("ijb"):
    from mstkd_jax.evaluation import ijb_protocol as ijb_lib  # pylint: disable=g-import-not-at-top
    put("roc_ijb_json", "roc_ijb.json", (json.dumps(ijb_rocs, allow_nan=False) + "\n").encode())
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", str(report["ijb"]["name"]))
    put("roc_ijb", f"roc_ijb_{name}.png", ijb_lib.plot_roc(report["ijb"]))
    images[f"ROC {report['ijb']['name']}"] = f"roc_ijb_{name}.png"
  if report["models"]:
    put("accuracy_by_group", "accuracy_by_group.png", plot_accuracy_by_group(report))
    images["Accuracy by group"] = "accuracy_by_group.png"
  heatmap = plot_teacher_heatmap(report)
  if heatmap is not None:
    put("teacher_group_heatmap", "teacher_group_heatmap.png", heatmap)
    images["Teacher x group accuracy"] = "teacher_group_heatmap.png"
  used: set[str] = set()
  for model, per_group in rocs.items():
    name = roc_file_name(model)
    stem, n = name[:-4], 2
    while name in used:  # two model names may sanitize to one file name
      name, n = f"{stem}_{n}.png", n + 1
    used.add(name)
    put(f"roc/{model}", name, plot_roc(model, per_group))
    images[f"ROC {model}"] = name

  put("markdown", "report.md", _report_markdown(slim, images).encode())
  return written

"""The tables of the reports as text: the terminal and markdown renderers, the report's
tables (accuracy per group with every fairness metric, teacher x group, global-threshold
fairness) and those of the report over seeds (mean ± interval, paired claims)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mstkd_jax.evaluation import fairness, summary

ACC_DIGITS = 2


def fmt(value: Any, digits: int) -> str:
  """A report number with `digits` decimals; "-" for None; a string ("inf") as it is."""
  if value is None:
    return "-"
  if isinstance(value, str):
    return value
  return f"{float(value):.{digits}f}"


def plain(header: list[str], rows: list[list[str]]) -> str:
  """A terminal table: the first (name) column left-aligned, the numbers right-aligned."""
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  def line(cells):
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
  return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def markdown(header: list[str], rows: list[list[str]]) -> str:
  """A markdown table, the first column left-aligned, "|" in a cell escaped."""
  def line(cells):
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
  align = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(header))) + "|"
  return "\n".join([line(header), align] + [line(r) for r in rows])


def _models_table(models: Mapping, group_cell, metric_cell) -> tuple[list[str], list[list[str]]]:
  """Model, a cell per group, then every shown ACCURACIES metric; "-" where one is absent."""
  groups = summary.all_groups({"models": models})
  shown = fairness.metrics(fairness.ACCURACIES, shown=True)
  header = ["Model"] + groups + [m.label for m in shown]
  rows = [[model] + [group_cell(entry["groups"][g]) if g in entry["groups"] else "-"
                     for g in groups]
          + [metric_cell(entry[m.name], m.digits) if entry.get(m.name) is not None else "-"
             for m in shown]
          for model, entry in models.items()]
  return header, rows


def main_table(report: Mapping) -> tuple[list[str], list[list[str]]]:
  """Model, accuracy (%) per group, then every shown ACCURACIES metric."""
  return _models_table(report["models"], lambda e: fmt(e["accuracy"], ACC_DIGITS), fmt)


def teacher_table(report: Mapping) -> tuple[list[str], list[list[str]]] | None:
  """Teacher (rows) x evaluation group accuracy (%), or None without teachers."""
  tm = summary.teacher_matrix(report)
  if tm is None:
    return None
  teachers, groups, matrix = tm
  header = ["Teacher \\ eval"] + groups
  rows = [[t] + ["-" if np.isnan(v) else f"{v:.2f}" for v in matrix[i]]
          for i, t in enumerate(teachers)]
  return header, rows


def fairness_table(report: Mapping) -> tuple[list[str], list[list[str]]] | None:
  """Per model and FMR target: the global threshold, every shown RATES metric, and the
  per-group FMR and FNMR; None when no model has global-threshold metrics."""
  shown = fairness.metrics(fairness.RATES, shown=True)
  rows = []
  for model, entry in report["models"].items():
    for key, m in (entry.get("global_threshold") or {}).items():
      fmrs = " ".join(f"{g}={fmt(v['fmr'], 5)}" for g, v in m["groups"].items())
      fnmrs = " ".join(f"{g}={fmt(v['fnmr'], 4)}" for g, v in m["groups"].items())
      rows.append([model, key, fmt(m["threshold"], 4)]
                  + [fmt(m.get(r.name), r.digits) for r in shown] + [fmrs, fnmrs])
  if not rows:
    return None
  return ["Model", "FMR target", "Threshold"] + [r.label for r in shown] + ["FMR", "FNMR"], rows


def format_table(report: Mapping) -> str:
  """Terminal tables: accuracy (%) per group with every shown fairness metric (Mean, STD,
  SER, ...); then teacher x group; then IJB's TAR at FAR when the report has it."""
  header, rows = main_table(report)
  parts = ["Verification accuracy (%) per group", plain(header, rows)] if rows else []
  tt = teacher_table(report)
  if tt is not None:
    parts += ["", "Teacher x evaluation group accuracy (%)", plain(*tt)]
  if report.get("ijb"):
    # pylint: disable-next=g-import-not-at-top
    from mstkd_jax.evaluation import ijb_protocol as ijb_lib
    parts += ["" if parts else None, f"{report['ijb']['name']} 1:1 verification: TAR (%) "
              "at FAR", plain(*ijb_lib.table(report["ijb"]))]
  return "\n".join(p for p in parts if p is not None)


def seed_text(combined: Mapping) -> str:
  """"3 seeds (0, 1, 2)" of a combined report."""
  seeds = combined["seeds"]
  return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})"


def percent(confidence: Any) -> str:
  """0.95 -> "95%"."""
  return f"{float(confidence) * 100:g}%"


def interval_cell(interval: Mapping, digits: int, signed: bool = False) -> str:
  """"86.42 ± 1.23"; without the "±" part when there is no interval; "inf" as is."""
  mean = interval["mean"]
  if isinstance(mean, str):
    return mean
  text = f"{float(mean):+.{digits}f}" if signed else f"{float(mean):.{digits}f}"
  if interval.get("half_width") is not None:
    text += f" ± {float(interval['half_width']):.{digits}f}"
  return text


def combined_models_table(combined: Mapping) -> tuple[list[str], list[list[str]]]:
  """Model, accuracy (%) per group, then every shown ACCURACIES metric: mean ± half width
  over seeds."""
  return _models_table(combined["models"], lambda e: interval_cell(e, ACC_DIGITS),
                       interval_cell)


def claims_table(combined: Mapping) -> tuple[list[str], list[list[str]]] | None:
  """Per claim, for every metric it compares: Δ mean ± half width and "k/n seeds agree"."""
  if not combined.get("claims"):
    return None
  claimed = [m for m in fairness.metrics(fairness.ACCURACIES, shown=True) if m.claim]
  header = ["Claim"]
  for m in claimed:
    header += [f"Δ {m.label}" + (" (pp)" if m.percent else ""), f"{m.label} agree"]
  rows = []
  for name, claim in combined["claims"].items():
    row = [name]
    for m in claimed:
      diff = claim.get(m.name)
      row += (["-", "-"] if diff is None else
              [interval_cell(diff, m.digits, signed=True),
               f"{diff['agree']}/{diff['n']} seeds agree"])
    rows.append(row)
  return header, rows


def format_combined_table(combined: Mapping) -> str:
  """Terminal tables of a `seeds.combine_reports` result.

  First the accuracy (%) per group with every shown fairness metric (Mean, STD, SER, ...)
  per model, each cell "mean ± half width" of the t-interval over seeds (no "±" part
  without an interval); then the claims: the paired difference of every claimed metric
  (mean accuracy and STD, in pp) ± interval, each with "k/n seeds agree". Models missing
  in some seed are named at the end.
  """
  conf = percent(combined["confidence"])
  parts = [f"Verification accuracy (%) per group over {seed_text(combined)}: "
           f"mean ± {conf} t-interval half width", plain(*combined_models_table(combined))]
  ct = claims_table(combined)
  if ct is not None:
    parts += ["", f"Claims: paired per-seed differences (minuend - subtrahend), mean ± {conf} "
              "t-interval half width", plain(*ct)]
  if combined.get("incomplete_models"):
    parts += ["", "Left out (missing in some seeds): " + ", ".join(combined["incomplete_models"])]
  return "\n".join(parts)

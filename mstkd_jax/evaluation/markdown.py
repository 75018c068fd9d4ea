"""report.md of the report and of the report over seeds: warnings, tables, legend (one item
per fairness metric, from its registry entry), diagnostics, plots, config."""

from __future__ import annotations

import json
from typing import Mapping

from mstkd_jax.evaluation import fairness, space_report, tables

_ACCURACY = """\
Accuracy: insightface 10-fold verification accuracy in percent (flip-fused embeddings when
flipped images were evaluated); per fold, the threshold best on the other 9 folds."""
_GLOBAL_THRESHOLD = """\
Global-threshold fairness: one threshold per FMR target fixed on the pooled impostor pairs of
all groups (pooled FMR <= target); FMR/FNMR per group at that threshold (fractions);
"""
_SEEDS_CELL = """\
Each cell: mean over seeds ± half width of the {conf} t-interval over seeds,
t_((1+c)/2, n-1) * s / sqrt(n) with s the sample standard deviation (ddof=1) of the n
per-seed values. No "±" part with one seed, or when a per-seed value is not finite."""
_SEEDS_ACCURACY = ("Accuracy: insightface 10-fold verification accuracy in percent, per group "
                   "and seed.")
_SEEDS_PAIRED = """\
Paired difference: the per-seed difference minuend - subtrahend (same seed), then its mean
± {conf} t-interval; "k/n seeds agree": the seeds whose difference has the sign of the mean
difference."""


def _item(text: str) -> str:
  """A legend item: "- " and its text, continuation lines indented by two spaces."""
  return "- " + text.replace("\n", "\n  ")


def legend() -> str:
  """The report's legend: accuracy, every shown fairness metric, the global threshold."""
  items = [_ACCURACY] + [m.legend for m in fairness.metrics(fairness.ACCURACIES, shown=True)]
  rates = [m.legend for m in fairness.metrics(fairness.RATES, shown=True)]
  if rates:
    items.append(_GLOBAL_THRESHOLD + "; ".join(rates) + ".")
  return "\n".join(_item(t) for t in items)


def combined_legend(combined: Mapping) -> str:
  """The legend of the report over seeds: the cells, accuracy, every shown ACCURACIES
  metric (its seeds wording), the paired differences."""
  conf = tables.percent(combined["confidence"])
  items = ([_SEEDS_CELL.format(conf=conf), _SEEDS_ACCURACY]
           + [m.seeds_legend or m.legend
              for m in fairness.metrics(fairness.ACCURACIES, shown=True)]
           + [_SEEDS_PAIRED.format(conf=conf)])
  return "\n".join(_item(t) for t in items)


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
    header, rows = space_report.format_table(spaces)
    parts += ["", "## Target-space diagnostics", "",
              "Cosines over the training images (as stored): of two images of one identity; "
              "of the centroids of two identities of one group; of two images of different "
              "identities of one group; of the centroids of identities of different groups. "
              "Separation = within identity - between images (group); below "
              f"{space_report.COLLAPSE_MARGIN} the space has collapsed. Nearest-centroid "
              "identity accuracy with leave-one-out centroids.", "",
              tables.markdown(header, rows)]
  students = (report.get("diagnostics") or {}).get("students") or {}
  if students:
    groups = []
    for fit in students.values():
      groups.extend(g for g in fit["verification_target_cosine"] if g not in groups)
    header = ["Student", "train"] + groups
    rows = [[m, tables.fmt(fit["train_target_cosine"], 3)]
            + [tables.fmt(fit["verification_target_cosine"].get(g), 3) for g in groups]
            for m, fit in students.items()]
    parts += ["", "## Students: mean cosine to their targets", "",
              "On a fixed sample of training images and on each group's verification "
              "images (the adaptor's space there).", "", tables.markdown(header, rows)]
  training = report.get("training") or {}
  if training:
    header = ["Stage", "steps", "first-epoch loss", "final-epoch loss",
              "final-epoch accuracy", "loss change, last 10% (+- s.e.)"]
    rows = [[name, str(r.get("steps", "-")), tables.fmt(r.get("first_epoch_loss"), 4),
             tables.fmt(r.get("final_epoch_loss"), 4), tables.fmt(r.get("final_epoch_accuracy"), 3),
             "-" if r.get("tail_loss_change") is None else
             f"{r['tail_loss_change']:+.1%} +- {r.get('tail_loss_change_se') or 0:.1%}"]
            for name, r in training.items()]
    parts += ["", "## Training", "", tables.markdown(header, rows)]
  return parts


def _plots(images: Mapping[str, str]) -> list[str]:
  if not images:
    return []
  return ["", "## Plots", ""] + [f"![{label}]({name})" for label, name in images.items()]


def report_markdown(report: Mapping, images: Mapping[str, str]) -> str:
  """report.md text of a report: warnings, tables, diagnostics, legend, `images` (label ->
  file name relative to report.md, shown as ![label](file)), config."""
  header, rows = tables.main_table(report)
  parts = ["# Evaluation report", ""] + warnings_markdown(report.get("warnings"))
  if rows:
    parts += ["## Verification accuracy (%) per group", "", tables.markdown(header, rows)]
  if report.get("ijb"):
    # pylint: disable-next=g-import-not-at-top
    from mstkd_jax.evaluation import ijb_protocol as ijb_lib
    parts += ijb_lib.markdown(report["ijb"], tables.markdown)[0 if rows else 1:]
  tt = tables.teacher_table(report)
  if tt is not None:
    parts += ["", "## Teacher x evaluation group accuracy (%)", "", tables.markdown(*tt)]
  ft = tables.fairness_table(report)
  if ft is not None:
    parts += ["", "## Fairness at a global threshold", "", tables.markdown(*ft)]
  parts += _diagnostics_markdown(report)
  parts += ["", "## Legend", "", legend()]
  parts += _plots(images)
  if report.get("config"):
    parts += ["", "## Config", "", "```json", json.dumps(report["config"], indent=2), "```"]
  return "\n".join(parts) + "\n"


def combined_markdown(combined: Mapping, images: Mapping[str, str]) -> str:
  """report.md text of a `seeds.combine_reports` result: tables, legend, then `images`.

  Args:
    combined: the dict returned by `combine_reports`.
    images: label -> image file name (relative to report.md), shown as ![label](file).
  """
  parts = (["# Evaluation report over seeds", "", f"Seeds: {tables.seed_text(combined)}.", ""]
           + warnings_markdown(combined.get("warnings"))
           + ["## Verification accuracy (%) per group", "",
              tables.markdown(*tables.combined_models_table(combined))])
  ct = tables.claims_table(combined)
  if ct is not None:
    parts += ["", "## Claims (paired per-seed differences, percent points)", "",
              tables.markdown(*ct)]
  if combined.get("incomplete_models"):
    parts += ["", "Left out (missing in some seeds): "
              + ", ".join(f"`{m}`" for m in combined["incomplete_models"])]
  parts += ["", "## Legend", "", combined_legend(combined)]
  parts += _plots(images)
  return "\n".join(parts) + "\n"

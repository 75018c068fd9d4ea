"""The PNG plots of the reports (matplotlib Agg, imported lazily): the report's ROC curves,
accuracy by group and teacher x group heatmap; the report over seeds' accuracy vs bias and
group bars with t-intervals; and, for both, one panel per plotted fairness metric."""

from __future__ import annotations

import colorsys
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import fairness, summary, tables

# Model families shown by default in `plot_group_bars`, in this order.
_KEY_FAMILIES = (summary.MSTKD_PREFIX, summary.BALANCED_KD_PREFIX, "adaptor/",
                 "balanced_adaptor/")


def png_bytes(fig) -> bytes:
  """The PNG file of a matplotlib Figure."""
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
  return roc_png(fig, ax, f"ROC: {model}", min(1e-4, lowest))


def roc_png(fig, ax, title: str, lowest_rate: float, *,
            rate_names: tuple[str, str] = ("False positive rate", "True positive rate"),
            rate_ticks: Sequence[float] | None = None, grid: str = "both",
            legend_size: str | None = None) -> bytes:
  """The PNG of `fig` once its `ax`, where ROC curves are drawn, gets the axes of a ROC.

  Args:
    fig: the matplotlib Figure of `ax`.
    ax: its Axes, the curves drawn (TPR vs FPR, FPR > 0).
    title: the Axes' title.
    lowest_rate: where the log-scale FPR axis starts (it ends at 1).
    rate_names: the x and y axis labels.
    rate_ticks: FPR values to tick instead of matplotlib's choice.
    grid: the ticks the grid follows ("major" or "both").
    legend_size: legend font size; None is matplotlib's default. The legend, at the
      lower right, is there only when a line was drawn.
  """
  ax.set_xscale("log")
  ax.set_xlim(lowest_rate, 1.0)
  if rate_ticks is not None:
    ax.set_xticks(rate_ticks)
  ax.set_ylim(0.0, 1.01)
  ax.set_xlabel(rate_names[0])
  ax.set_ylabel(rate_names[1])
  ax.set_title(title)
  ax.grid(True, which=grid, alpha=0.3)
  if ax.get_lines():
    ax.legend(loc="lower right", fontsize=legend_size)
  fig.tight_layout()
  return png_bytes(fig)


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
  return png_bytes(_accuracy_by_group_figure(report))


def _accuracy_by_group_figure(report: Mapping):
  """The matplotlib Figure behind `plot_accuracy_by_group`; one colour per model."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  groups = summary.all_groups(report)
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
  tm = summary.teacher_matrix(report)
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
  return png_bytes(fig)


def _float(value: Any) -> float:
  """A report number as a float ("inf"/"nan" strings included; None -> NaN)."""
  if value is None:
    return math.nan
  return float(value)


def _accuracy_bias_figure(combined: Mapping):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  models = list(combined["models"])
  colours = distinct_colours(len(models))
  fig = Figure(figsize=(8.5, 5.0), dpi=100)
  ax = fig.add_subplot()
  for model, colour in zip(models, colours):
    entry = combined["models"][model]
    x, y = _float(entry["mean"]["mean"]), _float(entry["std"]["mean"])
    if not (math.isfinite(x) and math.isfinite(y)):
      continue  # no position for an inf/NaN point
    ax.errorbar(x, y, xerr=entry["mean"]["half_width"], yerr=entry["std"]["half_width"],
                fmt="o", color=colour, capsize=3, label=model)
  ax.set_xlabel("Mean accuracy over groups (%)")
  ax.set_ylabel("STD of group accuracies (pp)")
  ax.set_title(f"Accuracy vs bias over {tables.seed_text(combined)}, "
               f"{tables.percent(combined['confidence'])} t-intervals")
  ax.grid(True, alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.tight_layout()
  return fig


def plot_accuracy_bias(combined: Mapping) -> bytes:
  """PNG scatter of mean accuracy (x, %) against STD (y, pp), one point per model.

  Error bars are the t-interval half widths over seeds (none with one seed); every model
  has its own colour and is named in the legend.
  """
  return png_bytes(_accuracy_bias_figure(combined))


def key_models(combined: Mapping) -> list[str]:
  """The models `plot_group_bars` shows by default: student_alone, mstkd/..., balanced_kd/...,
  adaptor/..., balanced_adaptor/..., those present, in that order."""
  models = list(combined["models"])
  out = [summary.STUDENT_ALONE] if summary.STUDENT_ALONE in models else []
  for family in _KEY_FAMILIES:
    out += [m for m in models if m.startswith(family)]
  return out


def _group_bars_figure(combined: Mapping, models: Sequence[str] | None = None):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  if models is None:
    models = key_models(combined) or list(combined["models"])
  else:
    if isinstance(models, str) or not list(models):
      raise UserError("models: expected a non-empty list of model names")
    models = list(models)
    for m in models:
      if m not in combined["models"]:
        raise UserError(f"models: {m!r} is not in the combined report (models: "
                        f"{list(combined['models'])})")
  groups = summary.all_groups({"models": {m: combined["models"][m] for m in models}})
  colours = distinct_colours(len(models))
  fig = Figure(figsize=(max(6.0, 1.4 * len(groups) + 4.5), 4.5), dpi=100)
  ax = fig.add_subplot()
  width = 0.8 / len(models)
  x = np.arange(len(groups))
  values = []
  for i, (m, colour) in enumerate(zip(models, colours)):
    cells = [combined["models"][m]["groups"].get(g) for g in groups]
    accs = [_float(c["mean"]) if c else math.nan for c in cells]
    halves = [_float(c["half_width"]) if c else math.nan for c in cells]
    values.extend(a + (h if math.isfinite(h) else 0.0) for a, h in zip(accs, halves)
                  if math.isfinite(a))
    values.extend(a - (h if math.isfinite(h) else 0.0) for a, h in zip(accs, halves)
                  if math.isfinite(a))
    has_err = any(math.isfinite(h) for h in halves)
    ax.bar(x - 0.4 + width * (i + 0.5), accs, width, label=m, color=colour,
           yerr=[h if math.isfinite(h) else 0.0 for h in halves] if has_err else None,
           error_kw={"capsize": 2, "elinewidth": 0.8})
  ax.set_xticks(x)
  ax.set_xticklabels(groups)
  if values:
    ax.set_ylim(max(0.0, min(values) - 2.0), min(100.0, max(values) + 1.0) + 0.5)
  ax.set_ylabel("Accuracy (%)")
  ax.set_title(f"Verification accuracy by group over {tables.seed_text(combined)}, "
               f"{tables.percent(combined['confidence'])} t-intervals")
  ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.tight_layout()
  return fig


def plot_group_bars(combined: Mapping, models: Sequence[str] | None = None) -> bytes:
  """PNG of grouped bars: accuracy (%) per group with t-interval error bars, one bar a model.

  Args:
    combined: the dict returned by `combine_reports`.
    models: the models to show, in order; default `key_models(combined)` (all models when
      none of those is present).

  Raises:
    UserError: `models` is empty or names a model not in `combined`.
  """
  return png_bytes(_group_bars_figure(combined, models))




def _plotted() -> list[fairness.Metric]:
  return [m for m in fairness.metrics(fairness.ACCURACIES, shown=True) if m.plot]


def _metrics_figure(models: Sequence[str], values: Mapping[str, Sequence[tuple]], title: str):
  """One panel per metric of `values` (name -> per model (value, half width or NaN)):
  a horizontal bar per model, its error bar where there is a half width."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  plotted = [m for m in _plotted() if m.name in values]
  colours = distinct_colours(len(models))
  fig = Figure(figsize=(3.6 * len(plotted) + 2.5, 0.35 * len(models) + 1.8), dpi=100)
  y = np.arange(len(models))
  for k, m in enumerate(plotted):
    ax = fig.add_subplot(1, len(plotted), k + 1)
    value, half = (np.array([_float(v) for v in column]) for column in zip(*values[m.name]))
    keep = np.isfinite(value)  # inf (e.g. a ratio with a zero error) has no bar length
    ax.barh(y[keep], value[keep], color=[c for c, ok in zip(colours, keep) if ok],
            xerr=np.where(np.isfinite(half), half, 0.0)[keep] if np.isfinite(half).any()
            else None, error_kw={"capsize": 2, "elinewidth": 0.8})
    ax.set_yticks(y)
    ax.set_yticklabels(models if k == 0 else [])
    ax.invert_yaxis()
    ax.set_title(f"{m.label} ({'lower' if m.lower_is_better else 'higher'} is better)",
                 fontsize="medium")
    ax.grid(True, axis="x", alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def metrics_figure(report: Mapping):
  """The Figure of every plotted fairness metric (`fairness.Metric.plot`) of a report, one
  panel each, one bar per model; None when no metric is plotted or no model has one."""
  models = list(report["models"])
  values = {m.name: [(report["models"][model].get(m.name), None) for model in models]
            for m in _plotted()
            if any(m.name in report["models"][model] for model in models)}
  return _metrics_figure(models, values, "Fairness metrics") if values else None


def combined_metrics_figure(combined: Mapping):
  """`metrics_figure` of a `combine_reports` result: each bar the mean over seeds, its error
  bar the t-interval half width; None when no metric is plotted or no model has one."""
  models = list(combined["models"])
  values = {}
  for m in _plotted():
    cells = [combined["models"][model].get(m.name) for model in models]
    if any(cells):
      values[m.name] = [(c["mean"], c["half_width"]) if c else (None, None) for c in cells]
  if not values:
    return None
  return _metrics_figure(models, values, f"Fairness metrics over {tables.seed_text(combined)}, "
                         f"{tables.percent(combined['confidence'])} t-intervals")


def plot_metrics(report: Mapping) -> bytes | None:
  """PNG of `metrics_figure`, or None."""
  fig = metrics_figure(report)
  return None if fig is None else png_bytes(fig)


def plot_combined_metrics(combined: Mapping) -> bytes | None:
  """PNG of `combined_metrics_figure`, or None."""
  fig = combined_metrics_figure(combined)
  return None if fig is None else png_bytes(fig)

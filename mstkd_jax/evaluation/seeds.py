"""The combined report over several training seeds: t-intervals, paired claims, tables, plots.

Each seed's run writes its own report (`report.build_report`); `combine_reports` puts the
per-seed numbers of every model side by side and summarizes them as a mean with a Student-t
confidence interval over seeds, and checks the paper's claims (MST-KD: Caldeira et al.,
ECCV-W 2024) as paired, per-seed differences. `write_combined` writes report.json, report.md
and two PNG plots (matplotlib Agg, imported lazily).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

from mstkd_jax import files, paths
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import report as report_lib

STUDENT_ALONE = "student_alone"
MSTKD_PREFIX = "mstkd/"
BALANCED_KD_PREFIX = "balanced_kd/"
# Model families shown by default in `plot_group_bars`, in this order.
_KEY_FAMILIES = ("mstkd/", "balanced_kd/", "adaptor/", "balanced_adaptor/")
_ACC_DIGITS = 2
_SER_DIGITS = 3


def _check_confidence(confidence: Any) -> float:
  if (isinstance(confidence, bool) or not isinstance(confidence, numbers.Real)
      or not 0.0 < float(confidence) < 1.0):
    raise UserError(f"confidence: expected a number strictly between 0 and 1, got "
                    f"{confidence!r}")
  return float(confidence)


def _as_vector(values: Any, name: str) -> np.ndarray:
  """`values` as a non-empty 1-D float64 array; UserError naming `name` otherwise."""
  if isinstance(values, (str, bytes)):
    raise UserError(f"{name}: expected a sequence of numbers (one per seed), got a string")
  try:
    x = np.asarray(values, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise UserError(f"{name}: expected a sequence of numbers (one per seed) ({e})") from e
  if x.ndim != 1:
    raise UserError(f"{name}: expected a 1-D sequence (one value per seed), got shape "
                    f"{x.shape}")
  if x.size == 0:
    raise UserError(f"{name}: expected at least one per-seed value, got none")
  return x


def _interval(x: np.ndarray, confidence: float) -> dict:
  n = int(x.size)
  with np.errstate(invalid="ignore"):  # inf + -inf: the mean is NaN, as it should be
    mean = float(np.mean(x))
  if n == 1 or not np.all(np.isfinite(x)):
    return {"mean": mean, "half_width": None, "low": None, "high": None, "n": n}
  s = float(np.std(x, ddof=1))
  half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * s / math.sqrt(n)
  return {"mean": mean, "half_width": half, "low": mean - half, "high": mean + half, "n": n}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
  """Mean over seeds with a two-sided Student-t confidence interval.

  mean ± t_{(1+confidence)/2, n-1} * s / sqrt(n), s the sample std (ddof=1).

  Args:
    values: 1-D sequence of n per-seed values (e.g. accuracies in percent).
    confidence: the interval's coverage, strictly between 0 and 1.

  Returns:
    {"mean", "half_width", "low", "high", "n"}: floats in the unit of `values`, n an int.
    With one value there is no interval: half_width, low and high are None. When a value
    is not finite (an SER may be inf) the mean is taken over the values as given (so it is
    inf or NaN itself, which says so) and half_width, low and high are None.

  Raises:
    UserError: `values` is empty, not 1-D or not numeric, or `confidence` is not in (0, 1).
  """
  confidence = _check_confidence(confidence)
  return _interval(_as_vector(values, "values"), confidence)


def paired_difference(a: Sequence[float], b: Sequence[float],
                      confidence: float = 0.95) -> dict:
  """Per-seed differences d = a - b summarized as a t-interval plus sign counts.

  Args:
    a: 1-D per-seed values of the minuend.
    b: 1-D per-seed values of the subtrahend, same seeds in the same order as `a`.
    confidence: the interval's coverage, strictly between 0 and 1.

  Returns:
    The `t_interval` of d ({"mean", "half_width", "low", "high", "n"}) plus "positive"
    (seeds with d > 0), "negative" (seeds with d < 0) and "agree" (seeds whose d has the
    sign of the mean difference; 0 when the mean is 0 or NaN).

  Raises:
    UserError: `a` or `b` is empty or not a 1-D numeric sequence, their lengths differ, or
      `confidence` is not in (0, 1).
  """
  confidence = _check_confidence(confidence)
  xa, xb = _as_vector(a, "a"), _as_vector(b, "b")
  if xa.size != xb.size:
    raise UserError(f"a and b: expected one value per seed in each, same seeds in the same "
                    f"order; got {xa.size} values in a and {xb.size} in b")
  with np.errstate(invalid="ignore"):  # inf - inf is NaN
    d = xa - xb
  out = _interval(d, confidence)
  sign = np.sign(out["mean"])
  out["positive"] = int(np.sum(d > 0))
  out["negative"] = int(np.sum(d < 0))
  out["agree"] = int(np.sum(np.sign(d) == sign)) if sign in (1.0, -1.0) else 0
  return out


def _number(value: Any, where: str) -> float:
  """A report number: a float, or the strings "inf", "-inf", "nan" that report.py writes."""
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
    out["groups"][g] = _interval(acc, confidence)
  for key in ("mean", "std", "ser"):
    out[key] = _interval(per_seed(lambda e, key=key: e.get(key), f"[{key!r}]"), confidence)
  return out


def _claim_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
  """(minuend, subtrahend) for every MST-KD student whose comparison models exist."""
  pairs = []
  for m in models:
    parts = m.split("/")
    if len(parts) != 3 or f"{parts[0]}/" != MSTKD_PREFIX:
      continue
    if STUDENT_ALONE in models:
      pairs.append((m, STUDENT_ALONE))
    balanced = f"{BALANCED_KD_PREFIX}{parts[1]}/{parts[2]}"
    if balanced in models:
      pairs.append((m, balanced))
  return pairs


def combine_reports(reports: Mapping[Any, Mapping], confidence: float = 0.95) -> dict:
  """Combines per-seed reports into means with t-intervals and the paper's paired claims.

  Args:
    reports: seed label (e.g. 0, 1, 2) -> that seed's `report.build_report` dict. The
      order of the keys is the seed order, kept in the output.
    confidence: coverage of every interval, strictly between 0 and 1.

  Returns:
    A JSON-ready dict (non-finite numbers are the strings "inf"/"-inf"/"nan"):
    {"seeds": [...], "confidence": float,
     "models": {model: {"groups": {group: t_interval of the accuracy (%)},
                        "mean": t_interval, "std": t_interval, "ser": t_interval}},
     "claims": {"<minuend> - <subtrahend>": {"minuend", "subtrahend",
                "mean": paired_difference of the per-seed mean accuracy (pp),
                "std": paired_difference of the per-seed STD (pp)}},
     "incomplete_models": [models missing in some seed's report, left out above]}.
    Claims: every `mstkd/<adaptor>/<kd>` minus `student_alone`, and minus
    `balanced_kd/<adaptor>/<kd>`, where both models are in every seed's report.

  Raises:
    UserError: `reports` is empty or malformed, no model is in every seed's report, a
      model's groups differ between seeds, a number is missing, or `confidence` is not
      in (0, 1).
  """
  confidence = _check_confidence(confidence)
  _check_reports(reports)
  complete, incomplete = _model_order(reports)
  if not complete:
    raise UserError(f"reports: no model is in every seed's report (seeds {list(reports)}; "
                    f"models {incomplete})")
  models = {m: _combine_model(reports, m, confidence) for m in complete}
  seeds = list(reports)
  claims = {}
  for minuend, subtrahend in _claim_pairs(complete):
    diffs = {}
    for key in ("mean", "std"):
      a = [_number(reports[s]["models"][minuend][key], f"reports[{s!r}]['models']"
                   f"[{minuend!r}][{key!r}]") for s in seeds]
      b = [_number(reports[s]["models"][subtrahend][key], f"reports[{s!r}]['models']"
                   f"[{subtrahend!r}][{key!r}]") for s in seeds]
      diffs[key] = paired_difference(a, b, confidence)
    claims[f"{minuend} - {subtrahend}"] = {"minuend": minuend, "subtrahend": subtrahend,
                                           **diffs}
  return report_lib._jsonable({  # pylint: disable=protected-access
      "seeds": seeds, "confidence": confidence, "models": models, "claims": claims,
      "incomplete_models": incomplete})


def _float(value: Any) -> float:
  """A combined-report number as a float ("inf"/"nan" strings included; None -> NaN)."""
  if value is None:
    return math.nan
  return float(value)


def _cell(interval: Mapping, digits: int, signed: bool = False) -> str:
  """"86.42 ± 1.23"; without the "±" part when there is no interval; "inf" as is."""
  mean = interval["mean"]
  if isinstance(mean, str):
    return mean
  text = f"{float(mean):+.{digits}f}" if signed else f"{float(mean):.{digits}f}"
  if interval.get("half_width") is not None:
    text += f" ± {float(interval['half_width']):.{digits}f}"
  return text


def _models_table(combined: Mapping) -> tuple[list[str], list[list[str]]]:
  groups = report_lib._all_groups(combined)  # pylint: disable=protected-access
  header = ["Model"] + groups + ["Mean", "STD", "SER"]
  rows = []
  for model, entry in combined["models"].items():
    cells = [model]
    cells += [_cell(entry["groups"][g], _ACC_DIGITS) if g in entry["groups"] else "-"
              for g in groups]
    cells += [_cell(entry["mean"], _ACC_DIGITS), _cell(entry["std"], _ACC_DIGITS),
              _cell(entry["ser"], _SER_DIGITS)]
    rows.append(cells)
  return header, rows


def _claims_table(combined: Mapping) -> tuple[list[str], list[list[str]]] | None:
  if not combined.get("claims"):
    return None
  header = ["Claim", "Δ Mean (pp)", "Mean agree", "Δ STD (pp)", "STD agree"]
  rows = []
  for name, claim in combined["claims"].items():
    row = [name]
    for key in ("mean", "std"):
      diff = claim[key]
      row += [_cell(diff, _ACC_DIGITS, signed=True),
              f"{diff['agree']}/{diff['n']} seeds agree"]
    rows.append(row)
  return header, rows


def _seed_text(combined: Mapping) -> str:
  seeds = combined["seeds"]
  return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})"


def _percent(confidence: Any) -> str:
  return f"{float(confidence) * 100:g}%"


def format_combined_table(combined: Mapping) -> str:
  """Terminal tables of a `combine_reports` result.

  First the accuracy (%) per group with Mean, STD and SER per model, each cell
  "mean ± half width" of the t-interval over seeds (no "±" part without an interval);
  then the claims: difference in mean accuracy and in STD (pp) ± interval, each with
  "k/n seeds agree". Models missing in some seed are named at the end.
  """
  conf = _percent(combined["confidence"])
  parts = [f"Verification accuracy (%) per group over {_seed_text(combined)}: "
           f"mean ± {conf} t-interval half width",
           report_lib._plain(*_models_table(combined))]  # pylint: disable=protected-access
  ct = _claims_table(combined)
  if ct is not None:
    parts += ["", f"Claims: paired per-seed differences (minuend - subtrahend), mean ± {conf} "
              "t-interval half width",
              report_lib._plain(*ct)]  # pylint: disable=protected-access
  if combined.get("incomplete_models"):
    parts += ["", "Left out (missing in some seeds): " + ", ".join(combined["incomplete_models"])]
  return "\n".join(parts)


def _legend(combined: Mapping) -> str:
  conf = _percent(combined["confidence"])
  return f"""\
- Each cell: mean over seeds ± half width of the {conf} t-interval over seeds,
  t_((1+c)/2, n-1) * s / sqrt(n) with s the sample standard deviation (ddof=1) of the n
  per-seed values. No "±" part with one seed, or when a per-seed value is not finite.
- Accuracy: insightface 10-fold verification accuracy in percent, per group and seed.
- Mean: mean of one seed's per-group accuracies.
- STD: population standard deviation (ddof=0) of one seed's per-group accuracies, in percent
  points.
- SER (skewed error ratio): max group error / min group error of one seed, error =
  100 - accuracy; "inf" when the smallest error is 0.
- Paired difference: the per-seed difference minuend - subtrahend (same seed), then its mean
  ± {conf} t-interval; "k/n seeds agree": the seeds whose difference has the sign of the mean
  difference.
"""


def combined_markdown(combined: Mapping, images: Mapping[str, str]) -> str:
  """report.md text of a `combine_reports` result: tables, legend, then `images`.

  Args:
    combined: the dict returned by `combine_reports`.
    images: label -> image file name (relative to report.md), shown as ![label](file).
  """
  md = report_lib._markdown  # pylint: disable=protected-access
  parts = (["# Evaluation report over seeds", "", f"Seeds: {_seed_text(combined)}.", ""]
           + report_lib.warnings_markdown(combined.get("warnings"))
           + ["## Verification accuracy (%) per group", "", md(*_models_table(combined))])
  ct = _claims_table(combined)
  if ct is not None:
    parts += ["", "## Claims (paired per-seed differences, percent points)", "", md(*ct)]
  if combined.get("incomplete_models"):
    parts += ["", "Left out (missing in some seeds): "
              + ", ".join(f"`{m}`" for m in combined["incomplete_models"])]
  parts += ["", "## Legend", "", _legend(combined).rstrip()]
  if images:
    parts += ["", "## Plots", ""]
    parts += [f"![{label}]({name})" for label, name in images.items()]
  return "\n".join(parts) + "\n"


def _accuracy_bias_figure(combined: Mapping):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  models = list(combined["models"])
  colours = report_lib.distinct_colours(len(models))
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
  ax.set_title(f"Accuracy vs bias over {_seed_text(combined)}, "
               f"{_percent(combined['confidence'])} t-intervals")
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
  return report_lib._png_bytes(_accuracy_bias_figure(combined))  # pylint: disable=protected-access


def key_models(combined: Mapping) -> list[str]:
  """The models `plot_group_bars` shows by default: student_alone, mstkd/..., balanced_kd/...,
  adaptor/..., balanced_adaptor/..., those present, in that order."""
  models = list(combined["models"])
  out = [STUDENT_ALONE] if STUDENT_ALONE in models else []
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
  groups = report_lib._all_groups({"models": {m: combined["models"][m] for m in models}})
  colours = report_lib.distinct_colours(len(models))
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
  ax.set_title(f"Verification accuracy by group over {_seed_text(combined)}, "
               f"{_percent(combined['confidence'])} t-intervals")
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
  return report_lib._png_bytes(_group_bars_figure(combined, models))  # pylint: disable=protected-access


def write_combined(combined: Mapping, out_dir: Any) -> dict:
  """Writes report.json, report.md, accuracy_bias.png and group_accuracy.png into `out_dir`.

  Every file is written atomically (temporary file, then rename).

  Returns:
    label -> written path: "json", "markdown", "accuracy_bias", "group_accuracy".

  Raises:
    UserError: the folder or a file cannot be written.
  """
  out = paths.resolve(out_dir, "the report folder")  # a URL stays one (pathlib would not)
  files.makedirs(out)
  data = report_lib._jsonable(combined)  # pylint: disable=protected-access
  written: dict[str, str] = {}

  def put(label: str, name: str, content: bytes) -> None:
    path = os.path.join(out, name)
    files.write_bytes(path, content)
    written[label] = str(path)

  put("json", "report.json", (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())
  images = {"Accuracy vs bias": "accuracy_bias.png", "Accuracy by group": "group_accuracy.png"}
  put("accuracy_bias", "accuracy_bias.png", plot_accuracy_bias(data))
  put("group_accuracy", "group_accuracy.png", plot_group_bars(data))
  put("markdown", "report.md", combined_markdown(data, images).encode())
  return written

"""Across-group fairness metrics, and the one registry the reports read them from.

Every metric is a function registered with `metric`: of the per-group accuracies (mean, STD,
SER) or of the per-group FMR/FNMR at one global threshold (FDR, GARBE, IR). Registered, it
appears in report.json, the tables and legend of the printed and markdown reports and, for
the accuracy metrics, in the report over seeds (mean ± interval; paired differences where
`claim`) and the metrics plot (where `plot`).
Pure numpy. Rates and accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mstkd_jax.errors import UserError
from mstkd_jax.evaluation.verification import far_key

ACCURACIES = "accuracies"
RATES = "rates"


@dataclasses.dataclass(frozen=True)
class Metric:
  """A registered fairness metric and how the reports show it.

  Attributes:
    name: its key in report.json (a model's entry, or a global-threshold entry for rates).
    label: its column header and plot title.
    compute: of=ACCURACIES: (accuracies [G] float64 fractions) -> float or None; of=RATES:
      (fmrs [G], fnmrs [G], alpha) -> float, alpha the weight of FMR (FNMR gets 1 - alpha).
    of: ACCURACIES or RATES, the per-group results it is a function of.
    legend: what it is, for the report's legend, with a newline where a line breaks; a
      rate metric's is one clause of the global-threshold item.
    seeds_legend: the legend of the report over seeds, where the wording differs.
    percent: its value is a fraction shown in percent (points): x 100 in the reports.
    digits: decimals in the tables.
    lower_is_better: its direction (shown on its plot).
    shown: False keeps it in report.json only (no table, seeds report, legend or plot).
    claim: the report over seeds compares models on it (paired per-seed differences).
    plot: it gets a panel in the metrics plot of the report and of the report over seeds.
  The report over seeds, its claims and the metrics plot take the ACCURACIES metrics; a
  RATES metric is one per FMR target, in the report's global-threshold table.
  """
  name: str
  label: str
  compute: Callable[..., Any]
  of: str = ACCURACIES
  legend: str = ""
  seeds_legend: str = ""
  percent: bool = False
  digits: int = 3
  lower_is_better: bool = True
  shown: bool = True
  claim: bool = False
  plot: bool = True


# name -> Metric, in the order of the report's columns.
METRICS: dict[str, Metric] = {}


def metric(name: str, label: str, **fields) -> Callable:
  """Decorator registering a function as the fairness metric `name` (fields of `Metric`).

  Raises:
    UserError: `name` is registered already, or `of` is not ACCURACIES or RATES.
  """
  if name in METRICS:
    raise UserError(f"fairness metric {name!r}: registered already (evaluation/fairness.py)")
  if fields.get("of", ACCURACIES) not in (ACCURACIES, RATES):
    raise UserError(f"fairness metric {name!r}: of={fields['of']!r}, expected "
                    f"{ACCURACIES!r} or {RATES!r}")

  def register(compute: Callable) -> Callable:
    METRICS[name] = Metric(name, label, compute, **fields)
    return compute
  return register


def metrics(of: str, *, shown: bool | None = None) -> list[Metric]:
  """The registered metrics of one kind (ACCURACIES or RATES) in order; with `shown`, only
  those whose `shown` is that."""
  return [m for m in METRICS.values() if m.of == of and shown in (None, m.shown)]


def stored(m: Metric, value: Any) -> Any:
  """`value` of `m` as a report stores it: in percent when `m.percent`, rounded to 4
  decimals when finite; None stays None."""
  if value is None:
    return None
  value = float(value)
  if m.percent:
    value *= 100.0
  return round(value, 4) if math.isfinite(value) else value


# Mean and STD are plotted against each other in the report over seeds (accuracy vs bias).
@metric("mean", "Mean", percent=True, digits=2, lower_is_better=False, claim=True,
        legend="Mean: mean of the per-group accuracies.",
        seeds_legend="Mean: mean of one seed's per-group accuracies.", plot=False)
def mean_accuracy(acc: np.ndarray) -> float:
  return float(acc.mean())


@metric("std", "STD", percent=True, digits=2, claim=True,
        legend="STD: population standard deviation (ddof=0) of the per-group accuracies, in "
        "percent points.",
        seeds_legend="STD: population standard deviation (ddof=0) of one seed's per-group "
        "accuracies, in percent\npoints.", plot=False)
def std_accuracy(acc: np.ndarray) -> float:
  """The headline "STD": population standard deviation (ddof=0) of the accuracies."""
  return float(acc.std(ddof=0))


@metric("std_sample", "STD (ddof=1)", percent=True, digits=2, shown=False)
def sample_std_accuracy(acc: np.ndarray) -> float | None:
  """Sample standard deviation (ddof=1) of the accuracies; None for a single group."""
  return float(acc.std(ddof=1)) if acc.size > 1 else None


# Not plotted: one perfect group makes it inf, and a bar cannot show that.
@metric("ser", "SER", digits=3, plot=False,
        legend="SER (skewed error ratio): max group error / min group error, error = 100 - "
        "accuracy;\n\"inf\" when the smallest error is 0 (1.0 when all errors are 0).",
        seeds_legend="SER (skewed error ratio): max group error / min group error of one "
        "seed, error =\n100 - accuracy; \"inf\" when the smallest error is 0.")
def skewed_error_ratio(acc: np.ndarray) -> float:
  """max_g error_g / min_g error_g, error_g = 1 - acc_g: the Skewed Error Ratio of Wang and
  Deng, "Mitigating Bias in Face Recognition Using Skewness-Aware Reinforcement Learning",
  CVPR 2020. A zero smallest error gives inf, except when every error is zero: then 1.0
  (no skew)."""
  err = 1.0 - acc
  if err.min() > 0.0:
    return float(err.max() / err.min())
  return 1.0 if err.max() == 0.0 else math.inf


def summarize_accuracies(per_group: Mapping[str, float]) -> dict:
  """Every ACCURACIES metric of per-group verification accuracies, and the extreme groups.

  Accuracies are FRACTIONS in [0, 1] (not percents). Returns {metric name: value} for
  every registered ACCURACIES metric (mean, std, std_sample, ser, ...: fractions, SER a
  ratio), plus best_group / worst_group: highest / lowest accuracy (first in order on ties).

  Raises:
    UserError: no group, or an accuracy that is not a number in [0, 1].
  """
  if not per_group:
    raise UserError("per_group: expected at least one group accuracy, got none")
  names = list(per_group)
  acc = np.empty(len(names), dtype=np.float64)
  for i, name in enumerate(names):
    value = per_group[name]
    try:
      acc[i] = float(value)
    except (TypeError, ValueError):
      raise UserError(f"accuracy of group {name!r}: expected a number, got {value!r}") from None
    if not 0.0 <= acc[i] <= 1.0:
      raise UserError(f"accuracy of group {name!r}: expected a fraction in [0, 1], got {value!r} "
                      "(divide percents by 100)")
  out = {m.name: m.compute(acc) for m in metrics(ACCURACIES)}
  out["best_group"] = names[int(np.argmax(acc))]
  out["worst_group"] = names[int(np.argmin(acc))]
  return out


def _rates(values: Sequence[float], name: str) -> np.ndarray:
  x = np.asarray(values, dtype=np.float64).reshape(-1)
  if x.size < 2:
    raise UserError(f"{name}: expected rates of at least 2 groups, got {x.size}")
  if not np.all(np.isfinite(x)) or np.any(x < 0):
    raise UserError(f"{name}: expected finite, non-negative rates, got {x.tolist()}")
  return x


@metric("fdr", "FDR", of=RATES, digits=4, lower_is_better=False,
        legend="FDR = 1 - (0.5 max|dFMR| + 0.5 max|dFNMR|) (1 = fair)")
def fdr(fmrs: Sequence[float], fnmrs: Sequence[float], alpha: float = 0.5,
        beta: float | None = None) -> float:
  """Fairness Discrepancy Rate, de Freitas Pereira and Marcel, "Fairness in Biometrics:
  a figure of merit to assess biometric verification systems", IEEE T-BIOM 2021.

  FDR = 1 - (alpha * A + beta * B), A = max_{i,j} |FMR_i - FMR_j| = max FMR - min FMR,
  B = max_{i,j} |FNMR_i - FNMR_j|; beta defaults to 1 - alpha, as in the paper. 1 =
  perfectly fair.
  """
  x, y = _rates(fmrs, "fmrs"), _rates(fnmrs, "fnmrs")
  beta = 1.0 - alpha if beta is None else beta
  return float(1.0 - (alpha * (x.max() - x.min()) + beta * (y.max() - y.min())))


def gini(values: Sequence[float]) -> float:
  """Sample-corrected Gini coefficient used by GARBE (Howard et al., 2022).

  G = n / (n - 1) * sum_i sum_j |x_i - x_j| / (2 n^2 mean(x)), over all ordered
  pairs (i, j). All-zero input (mean 0) gives 0: every group is equal.
  """
  x = _rates(values, "values")
  n = x.size
  mean = x.mean()
  if mean == 0.0:
    return 0.0
  total = np.abs(x[:, None] - x[None, :]).sum()
  return float(n / (n - 1) * total / (2.0 * n * n * mean))


@metric("garbe", "GARBE", of=RATES, digits=4,
        legend="GARBE = 0.5 Gini(FMR) + 0.5 Gini(FNMR)\n(0 = fair)")
def garbe(fmrs: Sequence[float], fnmrs: Sequence[float], alpha: float = 0.5) -> float:
  """Gini Aggregation Rate for Biometric Equitability, Howard, Laird, Rubin, Sirotin,
  Tipton and Vemury, "Evaluating proposed fairness models for face recognition
  algorithms", 2022 (arXiv 2203.05051).

  GARBE = alpha * G(FMR) + (1 - alpha) * G(FNMR), G = `gini`. 0 = perfectly fair.
  """
  return float(alpha * gini(fmrs) + (1.0 - alpha) * gini(fnmrs))


def _max_min_ratio(x: np.ndarray) -> float:
  if x.min() > 0.0:
    return float(x.max() / x.min())
  # A zero minimum: all-zero rates are equal (1.0); otherwise the ratio is unbounded.
  return 1.0 if x.max() == 0.0 else math.inf


@metric("inequity_rate", "IR", of=RATES, digits=3,
        legend='IR = sqrt(max/min FMR * max/min FNMR) (1 = fair, "inf" when a minimum is 0)')
def inequity_rate(fmrs: Sequence[float], fnmrs: Sequence[float], alpha: float = 0.5,
                  beta: float | None = None) -> float:
  """Inequity Rate: P. Grother's (NIST FRVT) proposal for ISO/IEC 19795-10, as stated
  and analysed in Howard et al., "Evaluating proposed fairness models for face
  recognition algorithms", 2022.

  IR = (max_i FMR_i / min_j FMR_j)^alpha * (max_i FNMR_i / min_j FNMR_j)^beta, beta
  defaulting to 1 - alpha; 1 = fair.
  Zero minima, handled explicitly (no epsilon added): a ratio whose rates are all 0 is
  1.0 (the groups are equal), a ratio with min 0 and max > 0 is inf, so IR is inf.
  """
  x, y = _rates(fmrs, "fmrs"), _rates(fnmrs, "fnmrs")
  a, b = _max_min_ratio(x), _max_min_ratio(y)
  beta = 1.0 - alpha if beta is None else beta
  if math.isinf(a) or math.isinf(b):
    return math.inf
  return float(a ** alpha * b ** beta)


def global_threshold(impostor_distances: np.ndarray, target_fmr: float) -> float:
  """Distance threshold whose FMR on `impostor_distances` is at most `target_fmr`.

  A pair is accepted ("same") when distance < threshold, so FMR(t) = #{d < t} / N.
  With the impostor distances sorted, s_0 <= ... <= s_{N-1}, and k = floor(target * N)
  (a 1e-9 slack absorbs float rounding of the product), the threshold is s_k: the
  largest threshold accepting at most k impostors. With ties at s_k fewer than k may
  be accepted, so FMR <= target always. k >= N (target 1) accepts every impostor.
  """
  d = np.sort(np.asarray(impostor_distances, dtype=np.float64))
  n = d.size
  k = int(math.floor(target_fmr * n + 1e-9))
  if k >= n:
    return float(np.nextafter(d[-1], np.inf))
  return float(d[k])


def global_threshold_metrics(per_group: Mapping[str, tuple[Any, Any]],
                             target_fmrs: Sequence[float] = (1e-3, 1e-2), *,
                             alpha: float = 0.5) -> dict:
  """Per-group FMR/FNMR at one global threshold per target FMR, plus every RATES metric.

  The threshold is fixed on the POOLED impostor distances of all groups
  (`global_threshold`: pooled FMR <= target, as close as the data allow); every group
  is then measured at that same threshold: FMR_g = impostors with d < t / impostors,
  FNMR_g = genuine pairs with d >= t / genuine pairs.

  Args:
    per_group: group -> (distances [P], issame [P]); at least 2 groups, each with
      genuine and impostor pairs.
    target_fmrs: pooled FMR targets in (0, 1].
    alpha: weight of FMR in the RATES metrics (FNMR gets 1 - alpha).

  Returns:
    {far_key(target): {"target_fmr", "threshold", "pooled_fmr", "pooled_fnmr",
     "groups": {g: {"fmr", "fnmr"}}, and every RATES metric by name: "fdr", "garbe",
     "inequity_rate", ...}}.
  """
  if len(per_group) < 2:
    raise UserError(f"per_group: expected at least 2 groups, got {len(per_group)}")
  genuine, impostor = {}, {}
  for name, pair in per_group.items():
    try:
      dist, same = pair
    except (TypeError, ValueError):
      raise UserError(f"per_group[{name!r}]: expected (distances, issame)") from None
    dist = np.asarray(dist, dtype=np.float64)
    same = np.asarray(same)
    if dist.ndim != 1 or dist.shape != same.shape:
      raise UserError(f"per_group[{name!r}]: expected distances and issame of equal 1-D shape, "
                      f"got {dist.shape} and {same.shape}")
    if not np.all(np.isfinite(dist)):
      raise UserError(f"per_group[{name!r}]: distances must be finite, found NaN or inf")
    same = same.astype(bool)
    if same.all() or not same.any():
      raise UserError(f"per_group[{name!r}]: expected both genuine and impostor pairs")
    genuine[name], impostor[name] = dist[same], dist[~same]
  pooled_imp = np.concatenate(list(impostor.values()))
  pooled_gen = np.concatenate(list(genuine.values()))

  out = {}
  for target in target_fmrs:
    target = float(target)
    if not 0.0 < target <= 1.0:
      raise UserError(f"target_fmrs: expected rates in (0, 1], got {target}")
    t = global_threshold(pooled_imp, target)
    groups = {name: {"fmr": float(np.mean(impostor[name] < t)),
                     "fnmr": float(np.mean(genuine[name] >= t))} for name in per_group}
    fmrs = [g["fmr"] for g in groups.values()]
    fnmrs = [g["fnmr"] for g in groups.values()]
    out[far_key(target)] = {
        "target_fmr": target,
        "threshold": t,
        "pooled_fmr": float(np.mean(pooled_imp < t)),
        "pooled_fnmr": float(np.mean(pooled_gen >= t)),
        "groups": groups,
        **{m.name: m.compute(fmrs, fnmrs, alpha) for m in metrics(RATES)},
    }
  return out

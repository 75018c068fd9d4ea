"""Across-group fairness metrics: accuracy spread (STD, SER) and FMR/FNMR-based FDR, GARBE, IR.

Pure numpy. Rates and accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from mstkd_jax.errors import UserError
from mstkd_jax.evaluation.verification import far_key


def summarize_accuracies(per_group: Mapping[str, float]) -> dict:
  """Mean, STD and SER of per-group verification accuracies.

  Accuracies are FRACTIONS in [0, 1] (not percents). With error_g = 1 - acc_g:
    std        = population std of the accuracies (ddof=0), the headline "STD";
    std_sample = sample std (ddof=1); None for a single group;
    ser        = max_g error_g / min_g error_g, the Skewed Error Ratio of Wang and
                 Deng, "Mitigating Bias in Face Recognition Using Skewness-Aware
                 Reinforcement Learning", CVPR 2020. A zero smallest error gives
                 inf, except when every error is zero: then 1.0 (no skew).
  best_group / worst_group: highest / lowest accuracy (first in order on ties).
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
  err = 1.0 - acc
  if err.min() > 0.0:
    ser = float(err.max() / err.min())
  else:
    ser = 1.0 if err.max() == 0.0 else math.inf
  return {
      "mean": float(acc.mean()),
      "std": float(acc.std(ddof=0)),
      "std_sample": float(acc.std(ddof=1)) if acc.size > 1 else None,
      "ser": ser,
      "best_group": names[int(np.argmax(acc))],
      "worst_group": names[int(np.argmin(acc))],
  }


def _rates(values: Sequence[float], name: str) -> np.ndarray:
  x = np.asarray(values, dtype=np.float64).reshape(-1)
  if x.size < 2:
    raise UserError(f"{name}: expected rates of at least 2 groups, got {x.size}")
  if not np.all(np.isfinite(x)) or np.any(x < 0):
    raise UserError(f"{name}: expected finite, non-negative rates, got {x.tolist()}")
  return x


def fdr(fmrs: Sequence[float], fnmrs: Sequence[float], alpha: float = 0.5,
        beta: float = 0.5) -> float:
  """Fairness Discrepancy Rate, de Freitas Pereira and Marcel, "Fairness in Biometrics:
  a figure of merit to assess biometric verification systems", IEEE T-BIOM 2021.

  FDR = 1 - (alpha * A + beta * B), A = max_{i,j} |FMR_i - FMR_j| = max FMR - min FMR,
  B = max_{i,j} |FNMR_i - FNMR_j|; the paper uses beta = 1 - alpha. 1 = perfectly fair.
  """
  x, y = _rates(fmrs, "fmrs"), _rates(fnmrs, "fnmrs")
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


def inequity_rate(fmrs: Sequence[float], fnmrs: Sequence[float], alpha: float = 0.5,
                  beta: float = 0.5) -> float:
  """Inequity Rate: P. Grother's (NIST FRVT) proposal for ISO/IEC 19795-10, as stated
  and analysed in Howard et al., "Evaluating proposed fairness models for face
  recognition algorithms", 2022.

  IR = (max_i FMR_i / min_j FMR_j)^alpha * (max_i FNMR_i / min_j FNMR_j)^beta; 1 = fair.
  Zero minima, handled explicitly (no epsilon added): a ratio whose rates are all 0 is
  1.0 (the groups are equal), a ratio with min 0 and max > 0 is inf, so IR is inf.
  """
  x, y = _rates(fmrs, "fmrs"), _rates(fnmrs, "fnmrs")
  a, b = _max_min_ratio(x), _max_min_ratio(y)
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
  """Per-group FMR/FNMR at one global threshold per target FMR, plus FDR, GARBE, IR.

  The threshold is fixed on the POOLED impostor distances of all groups
  (`global_threshold`: pooled FMR <= target, as close as the data allow); every group
  is then measured at that same threshold: FMR_g = impostors with d < t / impostors,
  FNMR_g = genuine pairs with d >= t / genuine pairs.

  Args:
    per_group: group -> (distances [P], issame [P]); at least 2 groups, each with
      genuine and impostor pairs.
    target_fmrs: pooled FMR targets in (0, 1].
    alpha: weight of FMR in FDR, GARBE and IR (FNMR gets 1 - alpha).

  Returns:
    {far_key(target): {"target_fmr", "threshold", "pooled_fmr", "pooled_fnmr",
     "groups": {g: {"fmr", "fnmr"}}, "fdr", "garbe", "inequity_rate"}}.
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
        "fdr": fdr(fmrs, fnmrs, alpha, 1.0 - alpha),
        "garbe": garbe(fmrs, fnmrs, alpha),
        "inequity_rate": inequity_rate(fmrs, fnmrs, alpha, 1.0 - alpha),
    }
  return out

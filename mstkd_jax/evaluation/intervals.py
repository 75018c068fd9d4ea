"""Means over training seeds with Student-t confidence intervals, and paired per-seed
differences: the statistics of the report over seeds."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np
from scipy import stats

from mstkd_jax.errors import UserError


def check_confidence(confidence: Any) -> float:
  """`confidence` as a float; UserError unless strictly between 0 and 1."""
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


def interval(x: np.ndarray, confidence: float) -> dict:
  """`t_interval` of a checked 1-D float64 array and a checked confidence."""
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
  confidence = check_confidence(confidence)
  return interval(_as_vector(values, "values"), confidence)


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
  confidence = check_confidence(confidence)
  xa, xb = _as_vector(a, "a"), _as_vector(b, "b")
  if xa.size != xb.size:
    raise UserError(f"a and b: expected one value per seed in each, same seeds in the same "
                    f"order; got {xa.size} values in a and {xb.size} in b")
  with np.errstate(invalid="ignore"):  # inf - inf is NaN
    d = xa - xb
  out = interval(d, confidence)
  sign = np.sign(out["mean"])
  out["positive"] = int(np.sum(d > 0))
  out["negative"] = int(np.sum(d < 0))
  out["agree"] = int(np.sum(np.sign(d) == sign)) if sign in (1.0, -1.0) else 0
  return out


"""Tests for the across-group fairness metrics on hand-worked examples (evaluation/fairness.py)."""

import math

import numpy as np
import pytest

from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import fairness as F


def test_summarize_accuracies():
  # acc = 0.95, 0.90, 0.85 -> mean 0.90; deviations +-0.05, 0.
  # population std = sqrt((0.0025 + 0 + 0.0025) / 3) = sqrt(0.005 / 3) = 0.0408248...
  # sample std = sqrt(0.005 / 2) = 0.05.
  # errors 0.05, 0.10, 0.15 -> SER = 0.15 / 0.05 = 3.
  s = F.summarize_accuracies({"a": 0.95, "b": 0.90, "c": 0.85})
  assert s["mean"] == pytest.approx(0.90)
  assert s["std"] == pytest.approx(math.sqrt(0.005 / 3))
  assert s["std_sample"] == pytest.approx(0.05)
  assert s["ser"] == pytest.approx(3.0)
  assert (s["best_group"], s["worst_group"]) == ("a", "c")


def test_summarize_accuracies_edge_cases():
  # A perfect group: min error 0 -> SER inf; all perfect -> 1.0; one group -> no sample std.
  assert F.summarize_accuracies({"a": 1.0, "b": 0.9})["ser"] == math.inf
  assert F.summarize_accuracies({"a": 1.0, "b": 1.0})["ser"] == 1.0
  assert F.summarize_accuracies({"a": 0.9})["std_sample"] is None
  with pytest.raises(UserError, match="group 'b'.*fraction"):
    F.summarize_accuracies({"a": 0.9, "b": 95.0})
  with pytest.raises(UserError, match="per_group"):
    F.summarize_accuracies({})


# FMR = [0.001, 0.003, 0.002], FNMR = [0.05, 0.02, 0.10] (three groups).
FMRS = [0.001, 0.003, 0.002]
FNMRS = [0.05, 0.02, 0.10]


def test_fdr():
  # A = 0.003 - 0.001 = 0.002; B = 0.10 - 0.02 = 0.08;
  # FDR = 1 - (0.5 * 0.002 + 0.5 * 0.08) = 1 - 0.041 = 0.959.
  assert F.fdr(FMRS, FNMRS) == pytest.approx(0.959)
  # alpha = 1: only FMR counts -> 1 - 0.002.
  assert F.fdr(FMRS, FNMRS, alpha=1.0, beta=0.0) == pytest.approx(0.998)


def test_gini_and_garbe():
  # Gini([1, 3, 2]): ordered-pair |differences| 2,1,2,1,1,1 -> sum 8; mean 2; n = 3:
  # 3/2 * 8 / (2 * 9 * 2) = 3/2 * 2/9 = 1/3. FMRS is the same shape scaled -> 1/3.
  assert F.gini([1, 3, 2]) == pytest.approx(1 / 3)
  assert F.gini(FMRS) == pytest.approx(1 / 3)
  # Gini(FNMRS): unordered differences 0.03, 0.05, 0.08 -> ordered sum 0.32;
  # mean 0.17/3; 2 n^2 mean = 18 * 0.17/3 = 1.02; 3/2 * 0.32/1.02 = 8/17.
  assert F.gini(FNMRS) == pytest.approx(8 / 17)
  # GARBE = 0.5 * 1/3 + 0.5 * 8/17 = 41/102 = 0.40196...
  assert F.garbe(FMRS, FNMRS) == pytest.approx(41 / 102)
  assert F.gini([0.0, 0.0]) == 0.0
  assert F.gini([0.2, 0.2, 0.2]) == 0.0


def test_inequity_rate():
  # max/min FMR = 0.003/0.001 = 3; max/min FNMR = 0.10/0.02 = 5; IR = 3^0.5 * 5^0.5 = sqrt(15).
  assert F.inequity_rate(FMRS, FNMRS) == pytest.approx(math.sqrt(15))
  # A zero minimum with a non-zero maximum is unbounded; all-zero rates count as equal.
  assert F.inequity_rate([0.0, 0.01], FNMRS) == math.inf
  assert F.inequity_rate([0.0, 0.0], [0.02, 0.10]) == pytest.approx(math.sqrt(5))
  with pytest.raises(UserError, match="at least 2 groups"):
    F.inequity_rate([0.1], [0.1])


def _groups():
  # Group A: impostors 0.5 1.0 1.5 2.0 2.5, genuine 0.2 0.4 1.2;
  # group B: impostors 0.3 0.9 1.7 2.2 2.8, genuine 0.6 1.6 2.6.
  a_imp, a_gen = [0.5, 1.0, 1.5, 2.0, 2.5], [0.2, 0.4, 1.2]
  b_imp, b_gen = [0.3, 0.9, 1.7, 2.2, 2.8], [0.6, 1.6, 2.6]
  return {
      "A": (np.array(a_imp + a_gen), np.array([False] * 5 + [True] * 3)),
      "B": (np.array(b_gen + b_imp), np.array([True] * 3 + [False] * 5)),
  }


def test_global_threshold_metrics_hand_example():
  # Pooled impostors sorted: 0.3 0.5 0.9 1.0 1.5 1.7 2.0 2.2 2.5 2.8 (N = 10).
  m = F.global_threshold_metrics(_groups(), target_fmrs=(0.2, 0.5, 1e-3))
  # Target 0.2: k = 2 -> threshold s_2 = 0.9; accepted (d < 0.9): 0.3, 0.5 -> pooled 0.2.
  # A: FMR 1/5 (0.5), FNMR 1/3 (1.2 >= 0.9); B: FMR 1/5 (0.3), FNMR 2/3 (1.6, 2.6).
  # FDR = 1 - (0 + 0.5 * 1/3) = 5/6. Gini(FMR) = 0; Gini([1/3, 2/3]): ordered sum 2/3,
  # mean 1/2, 2 n^2 mean = 4 -> (2/3)/4 = 1/6, * n/(n-1) = 2 -> 1/3; GARBE = 0.5 * 1/3 = 1/6.
  # IR = 1^0.5 * 2^0.5 = sqrt(2).
  r = m["2e-1"]
  assert r["threshold"] == 0.9
  assert r["pooled_fmr"] == pytest.approx(0.2)
  assert r["pooled_fnmr"] == pytest.approx(3 / 6)
  assert r["groups"]["A"] == pytest.approx({"fmr": 0.2, "fnmr": 1 / 3})
  assert r["groups"]["B"] == pytest.approx({"fmr": 0.2, "fnmr": 2 / 3})
  assert r["fdr"] == pytest.approx(5 / 6)
  assert r["garbe"] == pytest.approx(1 / 6)
  assert r["inequity_rate"] == pytest.approx(math.sqrt(2))
  # Target 0.5: k = 5 -> threshold 1.7. A: FMR 3/5 (0.5 1.0 1.5), FNMR 0;
  # B: FMR 2/5 (0.3 0.9), FNMR 1/3 (2.6). FDR = 1 - (0.5*0.2 + 0.5*1/3) = 11/15.
  # Gini([0.6, 0.4]) = 2 * 0.4 / (8 * 0.5) = 0.2; Gini([0, 1/3]) = 2 * (2/3) / (8/6) = 1;
  # GARBE = 0.5 * 0.2 + 0.5 * 1 = 0.6; IR = inf (FNMR minimum is 0).
  r = m["5e-1"]
  assert r["threshold"] == 1.7
  assert r["groups"]["A"] == pytest.approx({"fmr": 0.6, "fnmr": 0.0})
  assert r["groups"]["B"] == pytest.approx({"fmr": 0.4, "fnmr": 1 / 3})
  assert r["fdr"] == pytest.approx(11 / 15)
  assert r["garbe"] == pytest.approx(0.6)
  assert r["inequity_rate"] == math.inf
  # Target 1e-3: k = floor(0.01) = 0 -> threshold = smallest impostor 0.3, FMR 0.
  assert m["1e-3"]["threshold"] == 0.3
  assert m["1e-3"]["pooled_fmr"] == 0.0


def test_global_threshold_ties():
  # Impostors 0.5 0.5 0.5 1.0, target 0.25: k = 1 -> threshold s_1 = 0.5, and
  # d < 0.5 accepts none, so FMR = 0 <= 0.25 (a tie never pushes FMR above target).
  assert F.global_threshold(np.array([1.0, 0.5, 0.5, 0.5]), 0.25) == 0.5
  # Target 1 accepts every impostor.
  t = F.global_threshold(np.array([1.0, 0.5]), 1.0)
  assert t > 1.0 and np.all(np.array([1.0, 0.5]) < t)


def test_global_threshold_validation():
  g = _groups()
  with pytest.raises(UserError, match="at least 2 groups"):
    F.global_threshold_metrics({"A": g["A"]})
  with pytest.raises(UserError, match="'B'.*genuine and impostor"):
    F.global_threshold_metrics({"A": g["A"], "B": (np.ones(3), np.ones(3, bool))})
  with pytest.raises(UserError, match="'B'.*equal 1-D shape"):
    F.global_threshold_metrics({"A": g["A"], "B": (np.ones(3), np.ones(4, bool))})
  with pytest.raises(UserError, match="target_fmrs"):
    F.global_threshold_metrics(g, target_fmrs=(0.0,))

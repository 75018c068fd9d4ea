"""Tests for the combined report over training seeds (evaluation/seeds.py, its statistics in
intervals.py) and the plots of both reports (plots.py)."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import intervals
from mstkd_jax.evaluation import plots as P
from mstkd_jax.evaluation import report as R
from mstkd_jax.evaluation import seeds as S

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GROUPS = ("African", "Asian", "Caucasian")


def _fake(acc):
  """The keys of an evaluate_verification result that build_report needs."""
  return {"accuracy": acc, "accuracy_std": 0.01,
          "tar_at_far": {"1e-3": {"tar": acc - 0.1, "tar_std": 0.02, "far": 0.001}}}


def _models(accs):
  return {m: {g: _fake(a) for g, a in zip(GROUPS, values)} for m, values in accs.items()}


def _seed_reports():
  """Three seeds; `adaptor/DuL` is missing in seed 2, so it is left out."""
  per_seed = [
      {"student_alone": (0.90, 0.92, 0.95), "mstkd/SL/a-KD": (0.93, 0.94, 0.96),
       "balanced_kd/SL/a-KD": (0.92, 0.935, 0.955), "adaptor/SL": (0.91, 0.93, 0.95),
       "adaptor/DuL": (0.90, 0.90, 0.90)},
      {"student_alone": (0.89, 0.93, 0.94), "mstkd/SL/a-KD": (0.935, 0.945, 0.955),
       "balanced_kd/SL/a-KD": (0.925, 0.93, 0.96), "adaptor/SL": (0.905, 0.935, 0.955),
       "adaptor/DuL": (0.91, 0.91, 0.91)},
      {"student_alone": (0.91, 0.92, 0.96), "mstkd/SL/a-KD": (0.925, 0.94, 0.965),
       "balanced_kd/SL/a-KD": (0.915, 0.94, 0.95), "adaptor/SL": (0.915, 0.925, 0.945)},
  ]
  return {seed: R.build_report(_models(accs)) for seed, accs in enumerate(per_seed)}


def _distinct(colours):
  return len({tuple(round(float(c), 6) for c in colour[:3]) for colour in colours})


def test_t_interval_matches_scipy_ttest_1samp():
  x = np.random.default_rng(0).normal(90.0, 2.0, size=5)
  got = intervals.t_interval(x)
  low, high = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
  assert got["mean"] == pytest.approx(np.mean(x))
  assert (got["low"], got["high"]) == pytest.approx((low, high))
  assert got["half_width"] == pytest.approx((high - low) / 2)
  assert got["n"] == 5
  low90, high90 = stats.ttest_1samp(x, 0.0).confidence_interval(0.90)
  got90 = intervals.t_interval(x, 0.90)
  assert (got90["low"], got90["high"]) == pytest.approx((low90, high90))


def test_t_interval_one_seed_has_no_interval():
  assert intervals.t_interval([86.5]) == {"mean": 86.5, "half_width": None, "low": None,
                                          "high": None, "n": 1}


def test_t_interval_non_finite_keeps_mean_and_drops_interval():
  got = intervals.t_interval([1.5, float("inf"), 2.0])
  assert got["mean"] == float("inf") and got["half_width"] is None and got["n"] == 3


def test_t_interval_bad_input_raises_user_error():
  with pytest.raises(UserError, match="values"):
    intervals.t_interval([])
  for confidence in (0.0, 1.0, 1.5, True):
    with pytest.raises(UserError, match="confidence"):
      intervals.t_interval([1.0, 2.0], confidence)


def test_paired_difference_matches_scipy_ttest_rel():
  rng = np.random.default_rng(1)
  a, b = rng.normal(94.0, 1.0, size=6), rng.normal(93.0, 1.0, size=6)
  got = intervals.paired_difference(a, b)
  low, high = stats.ttest_rel(a, b).confidence_interval(0.95)
  assert (got["low"], got["high"]) == pytest.approx((low, high))
  assert got["mean"] == pytest.approx(np.mean(a - b))
  assert got["n"] == 6


def test_paired_difference_sign_counts():
  # d = (+1, +2, -0.5, 0): mean +0.625; two seeds agree, one disagrees, one ties.
  got = intervals.paired_difference([91.0, 92.0, 89.5, 90.0], [90.0, 90.0, 90.0, 90.0])
  assert (got["positive"], got["negative"], got["agree"], got["n"]) == (2, 1, 2, 4)
  # d = (-1, -3, +0.5): mean -1.167; the two negative seeds agree.
  got = intervals.paired_difference([1.0, 2.0, 3.5], [2.0, 5.0, 3.0])
  assert (got["positive"], got["negative"], got["agree"]) == (1, 2, 2)
  # A zero mean difference agrees with no seed.
  assert intervals.paired_difference([1.0, 3.0], [2.0, 2.0])["agree"] == 0


def test_paired_difference_length_mismatch_raises_user_error():
  with pytest.raises(UserError, match="3 values in a and 2 in b"):
    intervals.paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])


def test_combine_reports_keys_claims_and_missing_models():
  reports = _seed_reports()
  combined = S.combine_reports(reports)
  json.dumps(combined, allow_nan=False)
  assert combined["seeds"] == [0, 1, 2] and combined["confidence"] == 0.95
  assert list(combined["models"]) == ["student_alone", "mstkd/SL/a-KD",
                                      "balanced_kd/SL/a-KD", "adaptor/SL"]
  assert combined["incomplete_models"] == ["adaptor/DuL"]
  entry = combined["models"]["mstkd/SL/a-KD"]
  assert set(entry) == {"groups", "mean", "std", "ser"}
  assert list(entry["groups"]) == list(GROUPS)
  assert set(entry["groups"]["Asian"]) == {"mean", "half_width", "low", "high", "n"}
  assert entry["groups"]["Asian"]["mean"] == pytest.approx(np.mean([94.0, 94.5, 94.0]))
  per_seed_std = [reports[s]["models"]["mstkd/SL/a-KD"]["std"] for s in range(3)]
  assert entry["std"]["mean"] == pytest.approx(np.mean(per_seed_std))
  assert entry["std"]["half_width"] == pytest.approx(
      stats.t.ppf(0.975, 2) * np.std(per_seed_std, ddof=1) / np.sqrt(3))

  assert set(combined["claims"]) == {"mstkd/SL/a-KD - student_alone",
                                     "mstkd/SL/a-KD - balanced_kd/SL/a-KD"}
  claim = combined["claims"]["mstkd/SL/a-KD - balanced_kd/SL/a-KD"]
  assert claim["minuend"] == "mstkd/SL/a-KD"
  assert claim["subtrahend"] == "balanced_kd/SL/a-KD"
  means = {m: [reports[s]["models"][m]["mean"] for s in range(3)]
           for m in ("mstkd/SL/a-KD", "balanced_kd/SL/a-KD")}
  expected = intervals.paired_difference(means["mstkd/SL/a-KD"], means["balanced_kd/SL/a-KD"])
  assert claim["mean"] == pytest.approx(expected)
  assert set(claim["std"]) >= {"mean", "half_width", "positive", "negative", "agree", "n"}


def test_combine_reports_without_balanced_kd_has_only_the_student_alone_claim():
  reports = _seed_reports()
  for rep in reports.values():
    del rep["models"]["balanced_kd/SL/a-KD"]
  assert list(S.combine_reports(reports)["claims"]) == ["mstkd/SL/a-KD - student_alone"]


def test_combine_reports_inf_ser_in_one_seed():
  reports = _seed_reports()
  reports[1] = R.build_report(_models({"student_alone": (1.0, 0.92, 0.95),
                                       "mstkd/SL/a-KD": (0.93, 0.94, 0.96),
                                       "balanced_kd/SL/a-KD": (0.92, 0.935, 0.955),
                                       "adaptor/SL": (0.91, 0.93, 0.95)}))
  assert reports[1]["models"]["student_alone"]["ser"] == "inf"
  combined = S.combine_reports(reports)
  json.dumps(combined, allow_nan=False)
  ser = combined["models"]["student_alone"]["ser"]
  assert ser["mean"] == "inf" and ser["half_width"] is None
  assert "inf" in S.format_combined_table(combined)


def test_combine_reports_bad_input_raises_user_error():
  with pytest.raises(UserError, match="reports"):
    S.combine_reports({})
  with pytest.raises(UserError, match=r"reports\[0\]"):
    S.combine_reports({0: {"no_models": {}}})
  a = R.build_report(_models({"m": (0.9, 0.9, 0.9)}))
  b = R.build_report(_models({"n": (0.9, 0.9, 0.9)}))
  with pytest.raises(UserError, match="no model is in every seed"):
    S.combine_reports({0: a, 1: b})


def test_format_combined_table_cells_and_claims():
  text = S.format_combined_table(S.combine_reports(_seed_reports()))
  lines = text.splitlines()
  assert lines[1].split()[:4] == ["Model", *GROUPS]
  row = next(line for line in lines if line.startswith("mstkd/SL/a-KD "))
  # Asian: 94.0, 94.5, 94.0 -> mean 94.1667, s = 0.2887, t(0.975, 2) = 4.3027 -> 0.717.
  assert "94.17 ± 0.72" in row
  assert "Claims" in text
  claim_row = next(line for line in lines if line.startswith("mstkd/SL/a-KD - student_alone"))
  assert "seeds agree" in claim_row and "±" in claim_row
  assert "Left out (missing in some seeds): adaptor/DuL" in text


def test_format_combined_table_one_seed_has_no_plus_minus():
  text = S.format_combined_table(S.combine_reports({0: _seed_reports()[0]}))
  cells = [line for line in text.splitlines() if "t-interval" not in line]  # not the titles
  assert cells and not any("±" in line for line in cells)
  assert "1/1 seeds agree" in text


def test_write_combined_files(tmp_path):
  combined = S.combine_reports(_seed_reports())
  out = tmp_path / "combined"
  written = S.write_combined(combined, out)
  expected = {"report.json", "report.md", "accuracy_bias.png", "group_accuracy.png"}
  assert sorted(os.listdir(out)) == sorted(expected)  # no temporary files left
  assert set(written) == {"json", "markdown", "accuracy_bias", "group_accuracy"}
  assert json.loads((out / "report.json").read_text()) == combined
  for name in ("accuracy_bias.png", "group_accuracy.png"):
    assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
  md = (out / "report.md").read_text()
  assert "| mstkd/SL/a-KD |" in md and "seeds agree" in md
  assert "t-interval" in md and "population standard deviation" in md
  assert "![Accuracy vs bias](accuracy_bias.png)" in md


def test_group_bars_default_models_and_distinct_colours():
  combined = S.combine_reports(_seed_reports())
  assert P.key_models(combined) == ["student_alone", "mstkd/SL/a-KD", "balanced_kd/SL/a-KD",
                                    "adaptor/SL"]
  ax = P._group_bars_figure(combined).axes[0]
  colours = [c.patches[0].get_facecolor() for c in ax.containers if hasattr(c, "patches")]
  assert len(colours) == 4 and _distinct(colours) == 4
  with pytest.raises(UserError, match="'nope'"):
    P.plot_group_bars(combined, ["nope"])


def test_accuracy_bias_plot_one_seed_renders():
  png = P.plot_accuracy_bias(S.combine_reports({7: _seed_reports()[0]}))
  assert png[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("n", [3, 10, 15, 25])
def test_distinct_colours_are_pairwise_distinct(n):
  colours = P.distinct_colours(n)
  assert len(colours) == n and _distinct(colours) == n


def test_accuracy_by_group_15_models_use_15_colours():
  accs = {f"model_{i}": (0.90 + 0.002 * i, 0.91, 0.92) for i in range(15)}
  fig = P._accuracy_by_group_figure(R.build_report(_models(accs)))
  ax = fig.axes[0]
  per_model = [{tuple(p.get_facecolor()) for p in c.patches} for c in ax.containers]
  assert len(per_model) == 15 and all(len(colours) == 1 for colours in per_model)
  assert _distinct([next(iter(colours)) for colours in per_model]) == 15
  assert P.plot_accuracy_by_group(R.build_report(_models(accs)))[:8] == PNG_SIGNATURE

"""A fairness metric registered in evaluation/fairness.py, and nowhere else, appears in the
report (report.json, report.md, the printed table), the report over seeds (mean ± interval,
paired claims) and the plots."""

import json

import numpy as np
import pytest
from scipy import stats

from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import fairness as F
from mstkd_jax.evaluation import markdown
from mstkd_jax.evaluation import plots as P
from mstkd_jax.evaluation import report as R
from mstkd_jax.evaluation import seeds as S
from mstkd_jax.evaluation import tables

GROUPS = ("African", "Asian", "Caucasian")
# Per seed, per model: accuracy fractions of GROUPS.
ACCS = [{"student_alone": (0.90, 0.92, 0.95), "mstkd/SL/a-KD": (0.93, 0.94, 0.96)},
        {"student_alone": (0.89, 0.93, 0.94), "mstkd/SL/a-KD": (0.935, 0.945, 0.955)},
        {"student_alone": (0.91, 0.92, 0.96), "mstkd/SL/a-KD": (0.925, 0.94, 0.965)}]


def _results(accs):
  """What build_report needs of an evaluate_verification result."""
  return {g: {"accuracy": a, "accuracy_std": 0.01,
              "tar_at_far": {"1e-3": {"tar": a - 0.1, "tar_std": 0.02, "far": 0.001}}}
          for g, a in zip(GROUPS, accs)}


def _check_panel(fig, widths):
  """`fig` has one panel, for "range", with these bar lengths (one per model)."""
  ax, = fig.axes
  assert ax.get_title() == "Range (lower is better)"
  np.testing.assert_allclose([bar.get_width() for bar in ax.patches], widths, atol=1e-4)


def _spread(accs) -> float:
  """The made-up metric, in percent points, computed here independently."""
  return 100.0 * (max(accs) - min(accs))


@pytest.fixture
def range_metric(monkeypatch):
  """Registers "range" (best minus worst group accuracy) for one test only."""
  monkeypatch.setattr(F, "METRICS", dict(F.METRICS))

  @F.metric("range", "Range", percent=True, digits=2, claim=True,
            legend="Range: best minus worst group accuracy, in percent\npoints.")
  def accuracy_range(acc: np.ndarray) -> float:
    return float(acc.max() - acc.min())
  return accuracy_range


def test_a_registered_metric_is_in_the_report_its_files_and_the_printed_table(range_metric,
                                                                                tmp_path):
  report = R.build_report({m: _results(a) for m, a in ACCS[0].items()})
  for model, accs in ACCS[0].items():
    assert report["models"][model]["range"] == pytest.approx(_spread(accs), abs=1e-4)
  lines = R.format_table(report).splitlines()
  assert lines[1].split() == ["Model", *GROUPS, "Mean", "STD", "SER", "Range"]
  assert lines[3].split()[-1] == "5.00"  # student_alone: 95 - 90

  written = R.write_report(report, tmp_path)
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["models"]["mstkd/SL/a-KD"]["range"] == pytest.approx(3.0, abs=1e-4)
  md = (tmp_path / "report.md").read_text()
  assert "| Model | African | Asian | Caucasian | Mean | STD | SER | Range |" in md
  assert "| student_alone | 90.00 | 92.00 | 95.00 | 92.33 | 2.05 | 2.000 | 5.00 |" in md
  assert "- Range: best minus worst group accuracy, in percent\n  points.\n" in md
  assert written["metrics"].endswith("fairness_metrics.png")
  assert "![Fairness metrics](fairness_metrics.png)" in md

  _check_panel(P.metrics_figure(report), [_spread(a) for a in ACCS[0].values()])


def test_a_registered_metric_is_in_the_report_over_seeds(range_metric, tmp_path):
  reports = {seed: R.build_report({m: _results(a) for m, a in accs.items()})
             for seed, accs in enumerate(ACCS)}
  combined = S.combine_reports(reports)
  per_seed = {m: np.array([_spread(ACCS[s][m]) for s in range(3)]) for m in ACCS[0]}
  t = stats.t.ppf(0.975, 2)
  for model, x in per_seed.items():
    cell = combined["models"][model]["range"]
    assert cell["mean"] == pytest.approx(x.mean(), abs=1e-4)
    assert cell["half_width"] == pytest.approx(t * x.std(ddof=1) / np.sqrt(3), abs=1e-4)
  d = per_seed["mstkd/SL/a-KD"] - per_seed["student_alone"]
  claim = combined["claims"]["mstkd/SL/a-KD - student_alone"]["range"]
  assert claim["mean"] == pytest.approx(d.mean(), abs=1e-4)
  assert claim["half_width"] == pytest.approx(t * d.std(ddof=1) / np.sqrt(3), abs=1e-4)
  assert (claim["negative"], claim["agree"]) == (3, 3)  # the student's range is wider

  text = S.format_combined_table(combined)
  assert text.splitlines()[1].split()[-1] == "Range"
  assert "Δ Range (pp)" in text and "Range agree" in text
  written = S.write_combined(combined, tmp_path)
  assert json.loads((tmp_path / "report.json").read_text()) == combined
  md = (tmp_path / "report.md").read_text()
  assert "| Mean | STD | SER | Range |" in md and "| Δ Range (pp) | Range agree |" in md
  assert "- Range: best minus worst group accuracy" in md
  assert written["metrics"].endswith("fairness_metrics.png")
  assert "![Fairness metrics](fairness_metrics.png)" in md

  _check_panel(P.combined_metrics_figure(combined), [x.mean() for x in per_seed.values()])


def test_seed_reports_written_before_a_metric_was_registered_combine_without_it(monkeypatch):
  reports = {seed: R.build_report({m: _results(a) for m, a in accs.items()})
             for seed, accs in enumerate(ACCS)}
  monkeypatch.setattr(F, "METRICS", dict(F.METRICS))
  F.metric("range", "Range", claim=True, legend="Range.")(lambda acc: 0.0)
  combined = S.combine_reports(reports)
  assert "range" not in combined["models"]["student_alone"]
  assert "range" not in combined["claims"]["mstkd/SL/a-KD - student_alone"]
  assert S.format_combined_table(combined).splitlines()[3].split()[-1] == "-"


def test_a_registered_rates_metric_is_in_the_global_threshold_table(monkeypatch):
  monkeypatch.setattr(F, "METRICS", dict(F.METRICS))
  F.metric("fmr_spread", "FMR spread", of=F.RATES, digits=4,
           legend="FMR spread = max FMR - min FMR (0 = fair)")(
               lambda fmrs, fnmrs, alpha: float(np.max(fmrs) - np.min(fmrs)))
  # Two groups: impostor distances 0.1, 0.3 (A) and 0.2, 0.4 (B); target FMR 0.5 pools
  # 4 impostors, k = 2: threshold 0.3 accepts A's 0.1 and B's 0.2 -> FMR A 0.5, B 0.5.
  per_group = {"A": ([0.1, 0.3, 0.05], [False, False, True]),
               "B": ([0.2, 0.4, 0.05], [False, False, True])}
  entry = F.global_threshold_metrics(per_group, target_fmrs=(0.5,))["5e-1"]
  assert entry["groups"]["A"]["fmr"] == entry["groups"]["B"]["fmr"] == 0.5
  assert entry["fmr_spread"] == 0.0
  report = {"models": {"m": {"groups": {}, "global_threshold": {"5e-1": entry}}}}
  header, rows = tables.fairness_table(report)
  assert header[3:7] == ["FDR", "GARBE", "IR", "FMR spread"]
  assert rows[0][6] == "0.0000"
  assert markdown.legend().endswith("; FMR spread = max FMR - min FMR (0 = fair).")


def test_a_metric_name_is_registered_once(monkeypatch):
  monkeypatch.setattr(F, "METRICS", dict(F.METRICS))
  with pytest.raises(UserError, match="'ser': registered already"):
    F.metric("ser", "SER again")
  with pytest.raises(UserError, match="of='groups'"):
    F.metric("x", "X", of="groups")

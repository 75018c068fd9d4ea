"""Tests for the report builder (evaluation/summary.py), its terminal table (tables.py), its
markdown (markdown.py) and its file writer (report.py)."""

import json
import math
import os

import numpy as np
import pytest

from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import markdown
from mstkd_jax.evaluation import report as R
from mstkd_jax.evaluation import summary
from mstkd_jax.evaluation.verification import evaluate_verification

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GROUPS = ("African", "Asian", "Caucasian")


def _fake(acc):
  """The keys of an evaluate_verification result that the table needs."""
  return {"accuracy": acc, "accuracy_std": 0.01, "accuracy_noflip": acc - 0.001,
          "accuracy_noflip_std": 0.01,
          "tar_at_far": {"1e-3": {"tar": acc - 0.1, "tar_std": 0.02, "far": 0.001}}}


def _real(seed, noise):
  rng = np.random.default_rng(seed)
  pairs, dim = 100, 16
  issame = np.arange(pairs) % 2 == 0
  emb = rng.normal(size=(2 * pairs, dim))
  emb[1::2][issame] = emb[0::2][issame] + noise * rng.normal(size=(issame.sum(), dim))
  return evaluate_verification(emb, emb + 0.05 * rng.normal(size=emb.shape), issame)


def _two_models():
  return {
      "student_alone": {g: _fake(a) for g, a in zip(GROUPS, (0.90, 0.92, 0.95))},
      "mstkd/SL/a-KD": {g: _fake(a) for g, a in zip(GROUPS, (0.93, 0.94, 0.96))},
  }


def test_report_json_shape():
  models = {"teacher/African": {g: _real(i, 0.5 + 0.3 * i) for i, g in enumerate(GROUPS)},
            "student_alone": {g: _real(10 + i, 0.9) for i, g in enumerate(GROUPS)}}
  report = R.build_report(models, {"backbone": "iresnet34", "folds": (10,)})
  json.dumps(report, allow_nan=False)  # JSON-ready: no numpy, no inf/NaN
  assert report["config"] == {"backbone": "iresnet34", "folds": [10]}
  entry = report["models"]["teacher/African"]
  assert list(entry["groups"]) == list(GROUPS)
  src = models["teacher/African"]["Asian"]
  group = entry["groups"]["Asian"]
  assert group["accuracy"] == round(src["accuracy"] * 100, 4)
  assert group["accuracy_std"] == round(src["accuracy_std"] * 100, 4)
  assert group["accuracy_noflip"] == round(src["accuracy_noflip"] * 100, 4)
  assert group["tar_at_far"] == {k: round(v["tar"] * 100, 4)
                                 for k, v in src["tar_at_far"].items()}
  assert set(group["tar_at_far"]) == {"1e-3", "1e-2"}
  assert len(group["roc"]["fpr"]) == len(group["roc"]["tpr"]) == 400
  accs = [models["teacher/African"][g]["accuracy"] * 100 for g in GROUPS]
  assert entry["mean"] == pytest.approx(np.mean(accs), abs=1e-4)
  assert entry["std"] == pytest.approx(np.std(accs), abs=1e-4)  # population std
  assert isinstance(entry["ser"], (float, str))
  gt = entry["global_threshold"]
  assert set(gt) == {"1e-3", "1e-2"}
  assert set(gt["1e-2"]) >= {"threshold", "groups", "fdr", "garbe", "inequity_rate"}
  assert set(gt["1e-2"]["groups"]) == set(GROUPS)


def test_format_table_two_models_three_groups():
  text = R.format_table(R.build_report(_two_models()))
  lines = text.splitlines()
  assert lines[0] == "Verification accuracy (%) per group"
  assert lines[1].split() == ["Model", *GROUPS, "Mean", "STD", "SER"]
  # student_alone: 90, 92, 95 -> mean 92.333; deviations -2.333, -0.333, 2.667,
  # squares sum 12.667, / 3 = 4.222 -> STD 2.055; errors 10, 8, 5 -> SER 10/5 = 2.
  assert lines[3].split() == ["student_alone", "90.00", "92.00", "95.00", "92.33", "2.05",
                              "2.000"]
  # mstkd: 93, 94, 96 -> mean 94.333; squares 1.778 + 0.111 + 2.778 = 4.667, / 3 = 1.556
  # -> STD 1.247; errors 7, 6, 4 -> SER 7/4 = 1.75.
  assert lines[4].split() == ["mstkd/SL/a-KD", "93.00", "94.00", "96.00", "94.33", "1.25",
                              "1.750"]
  assert "Teacher" not in text
  assert len(lines) == 5


def test_teacher_matrix():
  models = {
      "teacher/African": {"African": _fake(0.95), "Asian": _fake(0.90)},
      "student_alone": {"African": _fake(0.91), "Asian": _fake(0.92)},
      "teacher/Asian": {"African": _fake(0.89), "Asian": _fake(0.96)},
  }
  report = R.build_report(models)
  teachers, groups, matrix = summary.teacher_matrix(report)
  assert teachers == ["African", "Asian"] and groups == ["African", "Asian"]
  np.testing.assert_allclose(matrix, [[95.0, 90.0], [89.0, 96.0]])
  text = R.format_table(report)
  tail = text.split("Teacher x evaluation group accuracy (%)\n")[1].splitlines()
  assert tail[0].split() == ["Teacher", "\\", "eval", "African", "Asian"]
  assert tail[2].split() == ["African", "95.00", "90.00"]
  assert tail[3].split() == ["Asian", "89.00", "96.00"]
  assert summary.teacher_matrix(R.build_report(_two_models())) is None


def test_write_report_files(tmp_path):
  models = {
      "teacher/African": {"African": _real(0, 0.5), "Asian": _real(1, 0.9)},
      "teacher/Asian": {"African": _real(2, 0.9), "Asian": _real(3, 0.5)},
      "mstkd/SL/a-KD": {"African": _real(4, 0.6), "Asian": _real(5, 0.6)},
  }
  report = R.build_report(models, {"seed": 0})
  out = tmp_path / "new" / "dir"
  written = R.write_report(report, out)
  expected = {"report.json", "roc.json", "report.md", "accuracy_by_group.png",
              "teacher_group_heatmap.png", "roc_teacher_African.png", "roc_teacher_Asian.png",
              "roc_mstkd_SL_a-KD.png"}
  assert sorted(os.listdir(out)) == sorted(expected)  # no temporary files left
  assert {os.path.basename(p) for p in written.values()} == expected
  assert written["roc/mstkd/SL/a-KD"] == str(out / "roc_mstkd_SL_a-KD.png")
  for name in expected:
    if name.endswith(".png"):
      assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
  saved = json.loads((out / "report.json").read_text())
  assert "roc" not in saved["models"]["mstkd/SL/a-KD"]["groups"]["Asian"]
  assert saved["models"]["mstkd/SL/a-KD"]["mean"] == report["models"]["mstkd/SL/a-KD"]["mean"]
  rocs = json.loads((out / "roc.json").read_text())
  assert len(rocs["teacher/Asian"]["African"]["fpr"]) == 400
  md = (out / "report.md").read_text()
  assert "| mstkd/SL/a-KD |" in md
  assert "population standard deviation" in md and "max group error / min group error" in md
  assert "![Teacher x group accuracy](teacher_group_heatmap.png)" in md


def test_write_report_without_roc_or_teachers(tmp_path):
  written = R.write_report(R.build_report(_two_models()), tmp_path)
  assert sorted(os.listdir(tmp_path)) == ["accuracy_by_group.png", "report.json", "report.md"]
  assert set(written) == {"json", "markdown", "accuracy_by_group"}


def test_write_report_unwritable(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(UserError, match=str(blocker / "sub")):
    R.write_report(R.build_report(_two_models()), blocker / "sub")


def test_build_report_validation_and_inf():
  with pytest.raises(UserError, match="'m'.*'g'.*accuracy"):
    R.build_report({"m": {"g": {"acc": 0.9}}})
  with pytest.raises(UserError, match="models"):
    R.build_report({})
  # A perfect group makes SER infinite: stored as the JSON-safe string "inf".
  report = R.build_report({"m": {"a": _fake(1.0), "b": _fake(0.9)}})
  assert report["models"]["m"]["ser"] == "inf"
  assert "inf" in R.format_table(report)
  assert math.isfinite(report["models"]["m"]["std"])


def test_write_report_roc_data_argument(tmp_path):
  roc = {"fpr": [0.0, 0.01, 0.1, 1.0], "tpr": [0.0, 0.8, 0.95, 1.0]}
  written = R.write_report(R.build_report(_two_models()), tmp_path,
                           roc_data={"student_alone": {"African": roc}})
  assert (tmp_path / "roc_student_alone.png").read_bytes()[:8] == PNG_SIGNATURE
  assert json.loads((tmp_path / "roc.json").read_text()) == {"student_alone": {"African": roc}}
  assert "roc/student_alone" in written
  with pytest.raises(UserError, match=r"roc_data\['m'\]\['g'\]"):
    R.write_report(R.build_report(_two_models()), tmp_path, roc_data={"m": {"g": {"fpr": [0]}}})


def test_global_threshold_failure_is_noted_not_fatal():
  good = _real(0, 0.5)
  only_genuine = dict(good, issame=np.ones_like(good["issame"]))
  entry = R.build_report({"m": {"a": good, "b": only_genuine}})["models"]["m"]
  assert entry["global_threshold"] is None
  assert "genuine and impostor" in entry["global_threshold_note"]


def _verification(kind: str, pairs: int = 300, dim: int = 16):
  from mstkd_jax.evaluation import verification  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  issame = np.arange(pairs) % 2 == 0
  if kind == "collapsed":     # every image embeds alike (e.g. a diverged, huge-LR model)
    emb = np.ones((2 * pairs, dim), np.float32)
  elif kind == "random":      # no identity information: chance
    emb = rng.normal(size=(2 * pairs, dim)).astype(np.float32)
  else:                       # same pairs close, different pairs random
    first = rng.normal(size=(pairs, dim))
    second = np.where(issame[:, None], first + 0.1 * rng.normal(size=(pairs, dim)),
                      rng.normal(size=(pairs, dim)))
    emb = np.stack([first, second], axis=1).reshape(2 * pairs, dim).astype(np.float32)
  return verification.evaluate_verification(emb, emb, issame)


def test_collapsed_and_chance_models_are_named_in_the_warnings():
  results = {"collapsed": {"group_a": _verification("collapsed"),
                           "group_b": _verification("good")},
             "chance": {"group_a": _verification("random"), "group_b": _verification("random")},
             "one_weak_group": {"group_a": _verification("random"),
                                "group_b": _verification("good")},
             "healthy": {"group_a": _verification("good")}}
  assert results["collapsed"]["group_a"]["accuracy"] == 0.5
  report = R.build_report(results)
  warnings = report["warnings"]
  assert len(warnings) == 2, warnings
  assert warnings[0].startswith("collapsed: all 300 pair distances of group group_a are "
                                "equal")
  assert warnings[1].startswith("chance verifies at chance in every group (group_a ")
  assert R.model_warnings("healthy", results["healthy"]) == []
  assert R.model_warnings("one_weak_group", results["one_weak_group"]) == []
  # Too few pairs to tell a weak model from chance; NaN embeddings are always named.
  few = {"group_a": _verification("random", pairs=40)}
  assert R.model_warnings("few", few) == []
  diverged = dict(_verification("good"))
  diverged["distances"] = np.full_like(diverged["distances"], np.nan)
  assert R.model_warnings("diverged", {"group_a": diverged}) == [
      "diverged: group group_a has non-finite pair distances (NaN or Inf embeddings: a "
      "diverged model); its accuracy is not a measurement"]
  assert "## Warnings" in markdown.report_markdown(report, {})

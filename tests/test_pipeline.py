"""The recipe as a graph of stages: runs end to end, skips finished stages, refuses stale ones."""

import json
import os

import numpy as np
import pytest

from configs import distill
from mstkd_jax import pipeline
from mstkd_jax.errors import UserError


def tiny_config():
  c = distill.smoke()
  c.num_devices = 1
  return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("recipe"))
  return workdir, pipeline.run(tiny_config(), workdir)


def test_report_holds_every_model_of_the_recipe(finished):
  workdir, report = finished
  assert list(report["models"]) == [
      "teacher/group_a", "teacher/group_b", "adaptor/SL", "mstkd/SL/a-KD",
      "balanced_teacher/0", "balanced_teacher/1", "balanced_adaptor/SL",
      "balanced_kd/SL/a-KD", "student_alone"]
  for model in report["models"].values():
    assert set(model["groups"]) == {"group_a", "group_b"}
    assert {"mean", "std", "ser"} <= set(model)
  for name in ("report.json", "report.md", "accuracy_by_group.png"):
    assert os.path.exists(os.path.join(workdir, "report", name))


def test_every_stage_is_marked_finished_after_its_outputs(finished):
  workdir, _ = finished
  for stage in ("teacher/group_a", "extract/specialized", "adaptor/balanced/SL",
                "student/mstkd/SL/a-KD", "student/student_alone", "report"):
    with open(os.path.join(workdir, stage, "stage.json")) as f:
      assert json.load(f)["finished"]
  targets = np.load(os.path.join(workdir, "adaptor/specialized/SL/targets.npy"))
  assert targets.shape == (2 * 8 * 6, 2, 16)
  np.testing.assert_allclose(np.linalg.norm(targets, axis=-1), 1.0, rtol=1e-5)
  embeddings = np.load(os.path.join(workdir, "extract/specialized/teacher_embeddings.npy"))
  assert embeddings.shape == (96, 2, 2, 16)


def test_rerun_skips_finished_stages(finished, capsys):
  workdir, report = finished
  again = pipeline.run(tiny_config(), workdir)
  out = capsys.readouterr().out
  assert "[pipeline] stage" not in out
  assert again["models"]["student_alone"] == report["models"]["student_alone"]


def test_changed_config_of_a_finished_stage_is_refused_naming_fields(finished):
  workdir, _ = finished
  config = tiny_config()
  config.student.kd_weight = 5.0
  with pytest.raises(UserError, match=r"'student/mstkd/SL/a-KD' was made with another config "
                                      r"\(student.kd_weight: 10000.0 -> 5.0\).*"
                                      r"--config.force=student/mstkd/SL/a-KD"):
    pipeline.run(config, workdir)


def test_only_a_stage_whose_inputs_are_missing_names_them(tmp_path):
  config = tiny_config()
  config.only = "adaptor/specialized/SL"
  with pytest.raises(UserError, match=r"needs the outputs of \['extract/specialized'\]"):
    pipeline.run(config, str(tmp_path))


def test_unknown_stage_name_lists_the_stages(tmp_path):
  config = tiny_config()
  config.force = "teacher/group_q"
  with pytest.raises(UserError, match=r"no such stage; the stages are \['teacher/group_a'"):
    pipeline.run(config, str(tmp_path))


def test_balanced_split_is_equal_disjoint_and_complete():
  parts = pipeline.balanced_split(12, 3, seed=0)
  assert [len(p) for p in parts] == [4, 4, 4]
  assert sorted(np.concatenate(parts)) == list(range(12))
  assert [list(p) for p in parts] == [list(p) for p in pipeline.balanced_split(12, 3, 0)]
  # BUPT-Balancedface's 27,997 identities: 7,000 + 3 x 6,999, as the authors' baseline.
  parts = pipeline.balanced_split(27_997, 4, seed=0)
  assert [len(p) for p in parts] == [7000, 6999, 6999, 6999]
  assert len(np.unique(np.concatenate(parts))) == 27_997
  with pytest.raises(UserError, match="cannot split 3 training identities into 4 parts"):
    pipeline.balanced_split(3, 4, seed=0)


def test_target_orientation_reaches_the_adaptor_and_kd_students(tmp_path):
  from mstkd_jax.data import sources  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.data.data_dir = str(tmp_path / "data")
  train_set = sources.training_set(config.data, str(tmp_path))
  config.target_orientation = "stored"
  stages = {s.name: s.config for s in pipeline.build(config, str(tmp_path), train_set)}
  assert stages["adaptor/specialized/SL"].adaptor.orientation == "stored"
  assert stages["student/mstkd/SL/a-KD"].student.orientation == "stored"
  assert stages["student/student_alone"].student.orientation == "as_fed"
  config.target_orientation = "mirror"
  with pytest.raises(UserError, match="target_orientation='mirror': expected one of"):
    pipeline.build(config, str(tmp_path), train_set)

"""The recipe as a graph of stages: runs end to end, skips finished stages, refuses stale ones."""

import json
import os
import shutil

import numpy as np
import pytest

from configs import distill
from mstkd_jax import pipeline
from mstkd_jax.errors import UserError
from mstkd_jax.stages import recipe
from mstkd_jax.train import build


@pytest.fixture
def finished(tiny_recipe):
  return tiny_recipe  # (conftest: the tiny recipe, run once per test session)


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
  assert embeddings.shape == (96, 2, 2 * 16)     # both teachers' 16-D embeddings, concatenated


def test_rerun_skips_finished_stages(finished, capsys):
  workdir, report = finished
  again = pipeline.run(distill.get_config("tiny"), workdir)
  out = capsys.readouterr().out
  assert "[pipeline] stage" not in out
  assert again["models"]["student_alone"] == report["models"]["student_alone"]


def test_changed_config_of_a_finished_stage_is_refused_naming_fields(finished):
  workdir, _ = finished
  config = distill.get_config("tiny")
  config.student.kd.weight = 5.0
  with pytest.raises(UserError, match=r"'student/mstkd/SL/a-KD' was made with another config "
                                      r"\(student.kd.weight: 10000.0 -> 5.0\).*"
                                      r"--config.force=student/mstkd/SL/a-KD"):
    pipeline.run(config, workdir)


def _auto_dtypes(config):
  for section in (config.teacher, config.student):
    section.model.dtype = "auto"
  return config


def test_auto_dtype_is_recorded_resolved_so_on_a_cpu_it_is_the_float32_run(finished, capsys):
  workdir, report = finished          # trained with model.dtype="float32"
  again = pipeline.run(_auto_dtypes(distill.get_config("tiny")), workdir)
  assert "[pipeline] stage" not in capsys.readouterr().out
  assert again["models"]["student_alone"] == report["models"]["student_alone"]


def test_auto_dtype_on_another_platform_is_refused_saying_how_to_go_on(finished,
                                                                       monkeypatch):
  workdir, _ = finished
  monkeypatch.setattr(build.jax, "default_backend", lambda: "gpu")
  with pytest.raises(UserError, match=r"'teacher/group_a' was made with another config "
                                      r"\(model.dtype: 'float32' -> 'bfloat16'\).*"
                                      r'model.dtype "auto" is bfloat16 on TPUs and GPUs and '
                                      r"float32 on CPUs"):
    pipeline.run(_auto_dtypes(distill.get_config("tiny")), workdir)


def test_only_a_stage_whose_inputs_are_missing_names_them(tmp_path):
  config = distill.get_config("tiny")
  config.only = "adaptor/specialized/SL"
  with pytest.raises(UserError, match=r"needs the outputs of \['extract/specialized'\]"):
    pipeline.run(config, str(tmp_path))


def test_unknown_stage_name_lists_the_stages(tmp_path):
  config = distill.get_config("tiny")
  config.force = "teacher/group_q"
  with pytest.raises(UserError, match=r"no such stage; the stages are \['teacher/group_a'"):
    pipeline.run(config, str(tmp_path))


def test_balanced_split_is_equal_disjoint_and_complete():
  parts = recipe.balanced_split(12, 3, seed=0)
  assert [len(p) for p in parts] == [4, 4, 4]
  assert sorted(np.concatenate(parts)) == list(range(12))
  assert [list(p) for p in parts] == [list(p) for p in recipe.balanced_split(12, 3, 0)]
  # BUPT-Balancedface's 27,997 identities: 7,000 + 3 x 6,999, as the authors' baseline.
  parts = recipe.balanced_split(27_997, 4, seed=0)
  assert [len(p) for p in parts] == [7000, 6999, 6999, 6999]
  assert len(np.unique(np.concatenate(parts))) == 27_997
  with pytest.raises(UserError, match="cannot split 3 training identities into 4 parts"):
    recipe.balanced_split(3, 4, seed=0)


def test_target_orientation_reaches_the_adaptor_and_kd_students(tmp_path):
  from mstkd_jax.data import sources  # pylint: disable=g-import-not-at-top
  config = distill.get_config("tiny")
  config.data.data_dir = str(tmp_path / "data")
  train_set = sources.training_set(config.data, str(tmp_path))
  config.target_orientation = "stored"
  stages = {s.name: s.config for s in pipeline.make_stages(config, str(tmp_path), train_set)}
  assert stages["adaptor/specialized/SL"].adaptor.orientation == "stored"
  assert stages["student/mstkd/SL/a-KD"].student.orientation == "stored"
  assert "orientation" not in stages["student/student_alone"].student   # no targets to orient
  config.target_orientation = "mirror"
  with pytest.raises(UserError, match="target_orientation='mirror': expected one of"):
    pipeline.make_stages(config, str(tmp_path), train_set)


def test_report_carries_convergence_diagnostics_and_warnings_first(finished):
  workdir, report = finished
  trained = {"teacher/group_a", "balanced_teacher/1", "adaptor/specialized/SL",
             "student/mstkd/SL/a-KD", "student/student_alone"}
  assert trained <= set(report["training"])
  for record in report["training"].values():
    assert {"final_epoch_loss", "final_epoch_accuracy", "tail_loss_change"} <= set(record)
  spaces = report["diagnostics"]["target_space"]
  assert set(spaces) == {"extract/specialized (concatenated teacher embeddings)",
                         "adaptor/specialized/SL (targets)",
                         "extract/balanced (concatenated teacher embeddings)",
                         "adaptor/balanced/SL (targets)"}
  assert {"within_identity", "between_identities_same_group", "between_groups",
          "nearest_centroid_accuracy"} <= set(spaces["adaptor/specialized/SL (targets)"])
  fit = report["diagnostics"]["students"]["mstkd/SL/a-KD"]
  assert -1 <= fit["train_target_cosine"] <= 1 and fit["num_train_images"] == 96
  assert set(fit["verification_target_cosine"]) == {"group_a", "group_b"}
  # The smoke networks are far from converged (2 epochs): the report says so first.
  assert any(w.startswith("teacher/group_a has not converged") for w in report["warnings"])
  with open(os.path.join(workdir, "report", "report.md")) as f:
    markdown = f.read()
  assert markdown.index("## Warnings") < markdown.index("## Verification accuracy")
  assert "## Target-space diagnostics" in markdown and "## Training" in markdown


def _two_seeds():
  config = distill.get_config("tiny")
  config.seeds = 2
  return config


@pytest.mark.slow
def test_seeds_run_once_each_and_end_with_the_combined_report(finished, tmp_path, capsys):
  # Seed 0 of a 2-seed run is the single run of the same config: copied in, it is skipped
  # as finished, and only seed 1 trains.
  shutil.copytree(finished[0], tmp_path / "seed_0", ignore=shutil.ignore_patterns("data"))
  combined = pipeline.run(_two_seeds(), str(tmp_path))
  out = capsys.readouterr().out
  assert "[pipeline] stage teacher/group_a" in out and out.count("[pipeline] stage report") == 1
  assert combined["seeds"] == [0, 1]
  for seed in (0, 1):
    with open(tmp_path / f"seed_{seed}" / "report" / "report.json") as f:
      assert json.load(f)["config"]["seed"] == seed
  with open(tmp_path / "seed_1" / "teacher" / "group_a" / "config.json") as f:
    assert json.load(f)["seed"] == 1
  assert os.listdir(tmp_path / "data")  # one data folder for every seed
  assert not os.path.exists(tmp_path / "seed_1" / "data")
  entry = combined["models"]["mstkd/SL/a-KD"]
  assert {"groups", "mean", "std", "ser"} <= set(entry)
  assert entry["mean"]["n"] == 2 and entry["mean"]["half_width"] is not None
  claims = combined["claims"]
  assert set(claims) == {"mstkd/SL/a-KD - student_alone", "mstkd/SL/a-KD - balanced_kd/SL/a-KD"}
  for claim in claims.values():
    assert {"mean", "std"} <= set(claim) and {"low", "high", "agree"} <= set(claim["mean"])
  assert combined["warnings"] and combined["warnings"][0].startswith("seed 0: ")
  for name in ("report.json", "report.md", "accuracy_bias.png", "group_accuracy.png"):
    assert os.path.exists(tmp_path / "report" / name)
  with open(tmp_path / "report" / "report.json") as f:
    assert json.load(f)["claims"].keys() == claims.keys()

  again = pipeline.run(_two_seeds(), str(tmp_path))
  out = capsys.readouterr().out
  assert "mstkd/SL/a-KD - student_alone" in out and "±" in out
  assert "[pipeline] stage" not in out          # both seeds finished: nothing reruns
  assert again["models"] == combined["models"]

  changed = _two_seeds()
  changed.student.kd.weight = 5.0
  with pytest.raises(UserError, match=r"the seed folder .*seed_0 holds a run of another "
                                      r"config \(student.kd.weight: 10000.0 -> 5.0\)"):
    pipeline.run(changed, str(tmp_path))


@pytest.mark.parametrize("seeds", [0, -1])
def test_seeds_must_be_a_positive_integer(tmp_path, seeds):
  config = distill.get_config("tiny")
  config.seeds = seeds
  with pytest.raises(UserError, match=r"config field seeds=.*: expected an integer >= 1"):
    pipeline.run(config, str(tmp_path))


def test_a_bad_evaluation_field_stops_before_any_stage_runs(tmp_path, capsys):
  config = distill.get_config("tiny")
  config.student.train.eval_every = -5
  with pytest.raises(UserError, match=r"student.train.eval_every=-5: expected an integer"):
    pipeline.run(config, str(tmp_path))
  assert "[pipeline] stage" not in capsys.readouterr().out


def _copy(finished, tmp_path) -> str:
  workdir = str(tmp_path / "copy")
  shutil.copytree(finished[0], workdir)
  return workdir


def test_damaged_outputs_rerun_that_stage_and_everything_after(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  targets = os.path.join(workdir, "adaptor", "specialized", "SL", "targets.npy")
  size = os.path.getsize(targets)
  with open(targets, "r+b") as f:  # same size, garbage rows after the header
    f.seek(size // 2)
    f.write(b"\x7f" * 64)
  again = pipeline.run(distill.get_config("tiny"), workdir)
  out = capsys.readouterr().out
  assert ("adaptor/specialized/SL will rerun: its outputs are damaged (targets.npy changed "
          "since the stage finished)") in out
  assert "student/mstkd/SL/a-KD will rerun: an earlier stage it reads reruns" in out
  ran = [line.split()[2] for line in out.splitlines() if line.startswith("[pipeline] stage ")]
  assert ran == ["adaptor/specialized/SL", "student/mstkd/SL/a-KD", "report"]
  assert again["models"] == finished[1]["models"]  # repaired, to the same numbers


def test_missing_outputs_are_named(tmp_path):
  from mstkd_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(tmp_path / "model")
  (tmp_path / "model" / "a.bin").write_bytes(b"abc")
  (tmp_path / "results.json").write_text("{}")
  record = workdir_lib.output_record(str(tmp_path))
  assert set(record) == {"model/a.bin", "results.json"}
  assert workdir_lib.damaged_output(str(tmp_path), record) is None
  (tmp_path / "model" / "a.bin").write_bytes(b"abd")
  assert "model/a.bin changed" in workdir_lib.damaged_output(str(tmp_path), record)
  (tmp_path / "model" / "a.bin").write_bytes(b"ab")
  assert "model/a.bin has 2 bytes, 3 when" in workdir_lib.damaged_output(str(tmp_path), record)
  shutil.rmtree(tmp_path / "model")
  assert workdir_lib.damaged_output(str(tmp_path), record) == "model/a.bin is missing"


def test_an_interrupted_force_stays_forced(finished, tmp_path, capsys, monkeypatch):
  workdir = _copy(finished, tmp_path)
  config = distill.get_config("tiny")
  config.force = "student/mstkd/SL/a-KD"

  class Interrupt(Exception):
    pass

  def interrupted(*args, **kwargs):
    raise Interrupt()

  original = pipeline.Stage.run_in
  monkeypatch.setattr(pipeline.Stage, "run_in", interrupted)
  with pytest.raises(Interrupt):
    pipeline.run(config, workdir)
  monkeypatch.setattr(pipeline.Stage, "run_in", original)
  capsys.readouterr()
  again = pipeline.run(distill.get_config("tiny"), workdir)   # no --config.force now
  ran = [line.split()[2] for line in capsys.readouterr().out.splitlines()
         if line.startswith("[pipeline] stage ")]
  assert ran == ["student/mstkd/SL/a-KD", "report"]
  assert again["models"] == finished[1]["models"]


def test_a_force_whose_inputs_are_missing_removes_nothing(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  os.remove(os.path.join(workdir, "extract", "specialized", "stage.json"))
  config = distill.get_config("tiny")
  config.force = config.only = "adaptor/specialized/SL"
  with pytest.raises(UserError, match=r"needs the outputs of \['extract/specialized'\]"):
    pipeline.run(config, workdir)
  assert os.path.exists(os.path.join(workdir, "adaptor", "specialized", "SL", "targets.npy"))


def test_a_changed_set_of_models_rebuilds_the_report_instead_of_refusing(finished, tmp_path,
                                                                         capsys):
  workdir = _copy(finished, tmp_path)
  config = distill.get_config("tiny")
  config.student_alone = False
  report = pipeline.run(config, workdir)
  out = capsys.readouterr().out
  assert "report will rerun: the models it reports changed" in out
  assert [l for l in out.splitlines() if l.startswith("[pipeline] stage ")] == [
      l for l in out.splitlines() if l.startswith("[pipeline] stage report")]
  assert "student_alone" not in report["models"]
  assert report["models"]["mstkd/SL/a-KD"] == finished[1]["models"]["mstkd/SL/a-KD"]


@pytest.mark.parametrize("batch", [-32, 0])
def test_a_batch_that_is_not_positive_stops_before_any_stage_runs(tmp_path, capsys, batch):
  config = distill.get_config("tiny")
  config.adaptor.train.batch_size = batch
  with pytest.raises(UserError, match=rf"config field adaptor.train.batch_size={batch}: "
                                      r"expected a positive integer"):
    pipeline.run(config, str(tmp_path))
  assert "[pipeline] stage" not in capsys.readouterr().out


def test_a_finished_run_in_a_read_only_workdir_prints_its_report(finished, tmp_path, capsys,
                                                                 monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  import filelock  # pylint: disable=g-import-not-at-top
  from mstkd_jax import main, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = _copy(finished, tmp_path)

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  # Root ignores file modes, so the read-only file system is simulated where it is felt.
  monkeypatch.setattr(filelock.FileLock, "acquire", read_only)
  monkeypatch.setattr(workdir_lib, "prepare", read_only)
  report = main.run(distill.get_config("tiny"), workdir)
  out = capsys.readouterr().out
  assert "is read-only (Read-only file system): not locked" in out
  assert "[pipeline] stage" not in out and "student_alone" in out
  assert report["models"] == finished[1]["models"]


# Points inside every kind of stage, in run order: training (a checkpoint save in flight),
# the model save of a finished teacher, extraction writing its cache, the adaptor writing
# its targets, a student's training, and the report between two of its files.
KILL_POINTS = [
    ("mstkd_jax.train.checkpoints:Checkpoints.save", "after", 2, "teacher/group_a"),
    ("mstkd_jax.workdir:save_model", "after", 1, "teacher/group_a"),
    ("mstkd_jax.stages.extract:_embed_training_set", "before", 2, ""),
    ("mstkd_jax.stages.adaptor:_map", "before", 5, ""),
    ("mstkd_jax.train.checkpoints:Checkpoints.save", "after", 1, "student/mstkd"),
    ("mstkd_jax.files:write_bytes", "before", 1, "report.md"),
]


@pytest.mark.slow
def test_a_run_killed_inside_every_kind_of_stage_resumes_to_the_same_numbers(finished,
                                                                            tmp_path):
  """SIGKILL at each point in turn (each rerun resumes what the last one left), then a
  plain rerun: the report equals the uninterrupted run's, digit for digit."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "killed")
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_at.py")
  for target, when, n, substring in KILL_POINTS:
    result = subprocess.run([sys.executable, script, workdir, target, when, str(n), substring],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == -9, (target, result.stdout[-1500:], result.stderr[-1500:])
  report = pipeline.run(distill.get_config("tiny"), workdir)
  assert report["models"] == finished[1]["models"]
  with open(os.path.join(workdir, "report", "report.md")) as f, \
       open(os.path.join(finished[0], "report", "report.md")) as g:
    assert f.read() == g.read().replace(finished[0], workdir)  # (the config names its folder)

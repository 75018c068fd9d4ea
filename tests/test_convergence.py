"""Convergence records and the not-converged warning (train/convergence.py), on hand-made
histories checked against scipy, and on a deliberately starved teacher."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from mstkd_jax.stages import shared, teacher
from mstkd_jax.train import convergence
from tests.test_teacher_stage import tiny_config


def test_tail_change_is_the_least_squares_fall_over_the_last_tenth():
  rng = np.random.default_rng(0)
  losses = 10.0 * np.exp(-np.arange(200) / 60.0) + 0.05 * rng.normal(size=200)
  tail = losses[-20:]
  fit = stats.linregress(np.arange(20), tail)
  change, error = convergence.tail_change(losses)
  assert change == pytest.approx(fit.slope * 19 / np.mean(tail), rel=1e-9)
  assert error == pytest.approx(fit.stderr * 19 / np.mean(tail), rel=1e-9)
  assert change < 0


def test_tail_change_needs_three_steps():
  assert convergence.tail_change([3.0, 2.0]) is None
  assert convergence.tail_change([3.0, 2.0, 1.0]) == pytest.approx((-2.0 / 2.0, 0.0))


def test_a_noisy_flat_tail_is_not_a_fall():
  # 9 steps of per-step noise around a flat loss: a steep fitted fall, within the noise.
  tail = [9.5, 6.2, 8.9, 7.1, 8.4, 6.0, 7.7, 6.4, 6.9]
  change, error = convergence.tail_change(tail, fraction=1.0)
  assert change < -convergence.STILL_FALLING and change > -convergence.NOISE_SE * error
  summary = convergence.summarize({"loss": [8.0] * 81 + tail}, steps_per_epoch=9)
  assert convergence.problems(summary) == []


def test_summarize_takes_first_and_last_epoch_means():
  history = {"loss": [9.0, 7.0, 5.0, 3.0, 1.0, 2.0], "accuracy": [0.1, 0.2, 0.5, 0.7, 0.9, 1.0]}
  summary = convergence.summarize(history, steps_per_epoch=2)
  assert summary["steps"] == 6
  assert summary["first_epoch_loss"] == pytest.approx(8.0)
  assert summary["lowest_epoch_loss"] == pytest.approx(1.5)
  assert summary["final_epoch_loss"] == pytest.approx(1.5)
  assert summary["final_epoch_accuracy"] == pytest.approx(0.95)
  assert convergence.summarize({"loss": [1.0, 1.0, 1.0]}, 1)["final_epoch_accuracy"] is None


def _flat(n=100, level=2.0, accuracy=None):
  history = {"loss": list(level + 0.01 * np.sin(np.arange(n)))}
  if accuracy is not None:
    history["accuracy"] = [accuracy] * n
  return convergence.summarize(history, steps_per_epoch=10)


def test_a_flat_loss_with_high_accuracy_has_converged():
  assert convergence.problems(_flat(accuracy=0.97)) == []
  assert convergence.warning("teacher/group_a", _flat(accuracy=0.97), "x.epochs") is None
  assert convergence.warning("student/mstkd/SL/a-KD", _flat(), "x.epochs") is None  # no acc.


def test_low_training_accuracy_warns_naming_stage_and_field():
  warning = convergence.warning("adaptor/specialized/SL", _flat(level=33.0, accuracy=0.58),
                                "adaptor.train.epochs")
  assert warning.startswith("adaptor/specialized/SL has not converged")
  assert "training accuracy in the last epoch is 0.58" in warning
  assert "Raise adaptor.train.epochs" in warning


def test_a_loss_still_falling_warns_and_a_rising_one_too():
  falling = convergence.summarize({"loss": list(np.linspace(20.0, 10.0, 100))}, 10)
  assert "still fell by" in convergence.problems(falling)[0]
  # A KD loss that rose from 13 to 20 while the LR decayed, flat at the end.
  rising = convergence.summarize({"loss": list(np.linspace(13.0, 20.0, 80)) + [20.0] * 20},
                                 10)
  assert convergence.problems(rising) == [
      "its loss rose to 20 in the last epoch from an epoch mean of 13.4 (more than 10% "
      "above it)"]
  # Just inside both bounds: no warning.
  gentle = convergence.summarize({"loss": list(np.linspace(10.4, 10.0, 100))}, 10)
  assert convergence.problems(gentle) == []


def _recipe_teacher_config(**train):
  """configs/teacher.py:tiny as the recipe hands a teacher its config: without `stage`, its
  train section being the recipe's teacher.train."""
  config = tiny_config(**train)
  del config["stage"]
  return config


def test_messages_name_the_train_section_as_the_config_file_does():
  for config, section in ((tiny_config(), "train"), (_recipe_teacher_config(), "teacher.train")):
    stage = shared.StageRun(config, "", "teacher/group_a", None, None, "teacher")
    assert stage.settings(96).train_section == section


def test_a_starved_teacher_warns_and_records_it(tmp_path, capsys):
  workdir = str(tmp_path / "starved")
  result = teacher.run(_recipe_teacher_config(epochs=1.0), workdir)
  out = capsys.readouterr().out
  assert "warning: teacher/group_a has not converged" in out
  assert "Raise teacher.train.epochs" in out
  with open(os.path.join(workdir, "results.json")) as f:
    record = json.load(f)["training"]
  assert record == result["training"]
  assert record["steps"] == 3 and len(record["warnings"]) == 1
  assert record["final_epoch_accuracy"] < convergence.MIN_TRAIN_ACCURACY


def test_the_same_teacher_trained_to_convergence_does_not_warn(tmp_path, capsys):
  config = tiny_config(epochs=40.0, log_every=40, checkpoint_every=1000)
  config.optim.lr_decay_epochs = (30, 38)
  result = teacher.run(config, str(tmp_path))
  assert "warning:" not in capsys.readouterr().out
  assert result["training"]["warnings"] == []
  assert result["training"]["final_epoch_accuracy"] >= convergence.MIN_TRAIN_ACCURACY

"""Verification during training (train.eval_every): logged at the right steps, the
parameters bit-identical to a run without it, selection only on a held-out split."""

import json
import os
import re

import jax
import numpy as np
import pytest

from mstkd_jax.errors import UserError
from mstkd_jax.stages import teacher
from tests.test_teacher_stage import tiny_config


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  return teacher.run(tiny_config(), str(tmp_path_factory.mktemp("plain")))


def test_eval_every_logs_at_its_steps_and_leaves_parameters_bit_identical(plain, tmp_path,
                                                                          capsys):
  watched = teacher.run(tiny_config(eval_every=4), str(tmp_path))
  out = capsys.readouterr().out
  steps = [int(s) for s in re.findall(r"\[teacher/group_a\] step (\d+) verification "
                                      r"accuracy: group_a \d+\.\d\d%  group_b", out)]
  assert steps == [4, 8, 12]                      # 12 steps in all
  for a, b in zip(jax.tree.leaves(plain["state"].params),
                  jax.tree.leaves(watched["state"].params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(plain["state"].batch_stats),
                  jax.tree.leaves(watched["state"].batch_stats)):
    np.testing.assert_array_equal(a, b)


def test_selection_on_the_test_pairs_is_refused(tmp_path):
  with pytest.raises(UserError, match=r"train.select='validation' needs a held-out "
                                      r"validation split"):
    teacher.run(tiny_config(eval_every=4, select="validation"), str(tmp_path))


@pytest.mark.parametrize("field, value, message", [
    ("eval_every", -1, r"train.eval_every=-1: expected an integer >= 0"),
    ("select", "best", r"train.select='best': expected one of \('last', 'validation'\)"),
])
def test_bad_evaluation_fields_are_refused(tmp_path, field, value, message):
  with pytest.raises(UserError, match=message):
    teacher.run(tiny_config(**{field: value}), str(tmp_path))


def test_selection_on_the_validation_split_keeps_the_best_state(tmp_path, capsys):
  config = tiny_config(eval_every=3, select="validation")
  config.data.synthetic.update(validation_identities_per_group=4,
                               validation_pairs_per_group=20)
  result = teacher.run(config, str(tmp_path))
  out = capsys.readouterr().out
  accuracies = {int(step): float(mean) for step, mean in re.findall(
      r"step (\d+) validation accuracy: .*\(mean (\d+\.\d\d)%\)", out)}
  assert sorted(accuracies) == [3, 6, 9, 12]
  with open(os.path.join(tmp_path, "results.json")) as f:
    results = json.load(f)
  best_step = max(accuracies, key=lambda s: (accuracies[s], -s))  # first of the best
  assert results["step"] == results["selected"]["step"] == best_step
  assert 100 * results["selected"]["mean_accuracy"] == pytest.approx(accuracies[best_step],
                                                                     abs=0.006)
  assert set(result["verification"]) == {"group_a", "group_b"}

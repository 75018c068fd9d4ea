"""The teacher stage over the one training loop: outputs, resume, refusals."""

import json
import os

import jax
import numpy as np
import pytest

from configs import teacher as teacher_config
from mstkd_jax.data import input_pipeline
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import embedding
from mstkd_jax.stages import teacher
from mstkd_jax.train import checkpoints as checkpoints_lib


def tiny_config(**train):
  """configs/teacher.py:tiny with these `train` fields changed."""
  c = teacher_config.get_config("tiny")
  c.train.update(**train)
  return c


class Interrupt(Exception):
  pass


def _params(state):
  return jax.tree.leaves(state.params)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  return workdir, teacher.run(tiny_config(), workdir)


def test_writes_config_checkpoints_events_and_results(uninterrupted, capsys):
  workdir, result = uninterrupted
  assert int(result["state"].step) == 12            # 48 images / 16 x 4 epochs
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["width"] == 4
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6", "9"]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert set(results["verification"]) == {"group_a", "group_b"}


def test_rerun_of_a_finished_run_does_nothing_but_say_so(uninterrupted, capsys, monkeypatch):
  workdir, result = uninterrupted

  def no_embedding(*args, **kwargs):
    raise AssertionError("a finished run's verification pairs were embedded again")

  monkeypatch.setattr(embedding, "verification_embeddings", no_embedding)
  again = teacher.run(tiny_config(), workdir)
  out = capsys.readouterr().out
  assert "already finished" in out and "(saved at step 12)" in out
  for a, b in zip(_params(result["state"]), _params(again["state"])):
    np.testing.assert_array_equal(a, b)
  for group, first in result["verification"].items():
    assert again["verification"][group]["accuracy"] == first["accuracy"]


def test_interrupted_run_resumes_bit_identical(uninterrupted, tmp_path, monkeypatch, capsys):
  _, reference = uninterrupted
  workdir = str(tmp_path)
  original = input_pipeline.train_batches

  def dying_after_seven_batches(*args, **kwargs):
    for i, batch in enumerate(original(*args, **kwargs)):
      if i == 7:
        raise Interrupt()
      yield batch
  monkeypatch.setattr(input_pipeline, "train_batches", dying_after_seven_batches)
  with pytest.raises(Interrupt):
    teacher.run(tiny_config(), workdir)
  monkeypatch.setattr(input_pipeline, "train_batches", original)
  latest = checkpoints_lib.Checkpoints(os.path.join(workdir, "checkpoints")).latest_step()
  assert latest in (3, 6)
  resumed = teacher.run(tiny_config(), workdir)
  assert f"resuming from step {latest}" in capsys.readouterr().out
  for a, b in zip(_params(reference["state"]), _params(resumed["state"])):
    np.testing.assert_array_equal(a, b)


def test_changed_config_in_the_same_workdir_is_refused(uninterrupted):
  workdir, _ = uninterrupted
  config = tiny_config()
  config.model.width = 8
  with pytest.raises(UserError, match=r"model.width: 4 -> 8"):
    teacher.run(config, workdir)


def test_checkpoint_of_another_shape_is_refused_naming_the_mismatch(uninterrupted):
  workdir, result = uninterrupted
  checkpoints = checkpoints_lib.Checkpoints(os.path.join(workdir, "checkpoints"))
  state = result["state"]
  wider = state.replace(params=jax.tree.map(lambda x: np.zeros(x.shape[:-1] + (x.shape[-1] + 1,),
                                                               x.dtype), state.params))
  with pytest.raises(UserError, match=r"(?s)another model.*params/backbone/conv1/kernel: "
                     r"checkpoint \(3, 3, 3, 4\) vs model \(3, 3, 3, 5\)"):
    checkpoints.restore(12, wider)


def test_unknown_group_is_refused(tmp_path):
  config = tiny_config()
  config.teacher.group = "group_z"
  with pytest.raises(UserError, match=r"unknown group 'group_z'.*group_a"):
    teacher.run(config, str(tmp_path))


def test_batch_not_divisible_by_devices_is_refused(tmp_path):
  config = tiny_config(batch_size=15)
  config.num_devices = 2
  with pytest.raises(UserError, match="batch_size=15 must be divisible"):
    teacher.run(config, str(tmp_path))


def test_unwritable_workdir_is_refused(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(UserError, match="cannot be written"):
    teacher.run(tiny_config(), str(blocker / "workdir"))


def test_a_second_run_in_its_own_process_is_bit_identical_and_quiet(uninterrupted, tmp_path):
  """The determinism we promise: the same config and seed on the same machine give the same
  bits, here through `python -m mstkd_jax.main` in a fresh process (its own compilation)
  against the in-process run. The child runs with TensorFlow's environment variables unset
  and prints nothing on stderr: TensorFlow (tf.data, the TensorBoard writer) and absl log
  no line there (mstkd_jax/__init__.py)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from mstkd_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir, result = uninterrupted
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS",
                      "JAX_COMPILATION_CACHE_DIR")}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  again = str(tmp_path / "again")
  done = subprocess.run([sys.executable, "-m", "mstkd_jax.main",
                         "--config=configs/teacher.py:tiny", f"--workdir={again}"],
                        cwd=root, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stderr == ""
  variables = {"params": result["state"].params["backbone"],
               "batch_stats": result["state"].batch_stats}
  loaded = workdir_lib.load_model(again, variables, "teacher")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(variables),
                          jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))
  with open(os.path.join(workdir, "results.json")) as f, \
       open(os.path.join(again, "results.json")) as g:
    first, second = json.load(f), json.load(g)
  assert second["verification"] == first["verification"]

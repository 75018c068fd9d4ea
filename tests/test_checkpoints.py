"""Checkpoints: the history and the best state inside Orbax's steps, damaged steps skipped,
NaN/Inf refused at load time; for resume (the loop, saved models) and for evaluation."""

import glob
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mstkd_jax import workdir as workdir_lib
from mstkd_jax.errors import UserError
from mstkd_jax.interop import orbax_checkpoint
from mstkd_jax.train import (checkpoints as checkpoints_lib, loop, parallel, state as state_lib,
                             step_folders)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per-step training losses of the toy run: epoch (2 steps) means 5, 1, 3, 2, 1, 4. The best
# epoch is the 2nd (step 4); the 5th ties with it and, not lower, is not chosen.
LOSSES = np.asarray([5, 5, 1, 1, 3, 3, 2, 2, 1, 1, 4, 4], np.float32)


class Interrupt(Exception):
  pass


def _step(state, batch, rng):
  """Adds the batch mean to w; the loss of the update from step t is LOSSES[t]."""
  del rng
  new = state.replace(step=state.step + 1,
                      params={"w": state.params["w"] + jnp.mean(batch["x"]),
                              "noise": state.params["noise"]})
  return new, {"loss": jnp.asarray(LOSSES)[state.step], "accuracy": 0.5 + 0 * state.step}


def _batches(stop_after=None):
  def batches(start):
    for i, step in enumerate(range(start, 100)):
      if stop_after is not None and i == stop_after:
        raise Interrupt()
      yield {"x": np.full((1, 2), float(step), np.float32)}
  return batches


def _init():
  # "noise" is large enough to be stored in Orbax's data files, not inline in its index.
  noise = np.random.default_rng(0).normal(size=2000).astype(np.float32)
  return state_lib.TrainState(step=np.zeros((), np.int32),
                              params={"w": np.zeros(3, np.float32), "noise": noise},
                              batch_stats={}, opt_state=optax.EmptyState())


def _train(workdir, stop_after=None, select_best_epoch=True, keep=1):
  settings = loop.LoopSettings(name="toy", total_steps=12, steps_per_epoch=2,
                               images_per_step=2, log_every=3, checkpoint_every=4,
                               keep_checkpoints=keep, select_best_epoch=select_best_epoch)
  return loop.train(workdir=str(workdir), settings=settings, init_state=_init(),
                    step_fn=_step, batches=_batches(stop_after),
                    parallel=parallel.get("pmap", 1), rng=np.zeros(2, np.uint32))


def _steps(workdir):
  checkpoints = checkpoints_lib.Checkpoints(os.path.join(workdir, "checkpoints"))
  try:
    return checkpoints.manager.all_steps()
  finally:
    checkpoints.close()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return str(workdir), _train(workdir)


# --- The loss history and the best epoch inside the checkpoints --------------------------


def test_history_is_saved_inside_the_checkpoint_and_read_back(uninterrupted):
  workdir, _ = uninterrupted
  assert not os.path.exists(os.path.join(workdir, "loss_history.json"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "12", "history"))
  assert loop.load_history(workdir) == {"loss": LOSSES.tolist(), "accuracy": [0.5] * 12}


def test_best_epoch_is_kept_by_orbax_next_to_the_latest_step(uninterrupted):
  workdir, final = uninterrupted
  # keep_checkpoints=1: the newest step (resume) and the best candidate (step 4) are kept.
  assert _steps(workdir) == [4, 12]
  assert not os.path.exists(os.path.join(workdir, "best"))
  assert not os.path.exists(os.path.join(workdir, "best.json"))
  best, info = loop.load_best(workdir, loop.best_variables(_init()))
  assert info == {"step": 4, "score": 1.0, "epoch": 2, "mean_loss": 1.0}
  np.testing.assert_array_equal(best["params"]["w"], np.full(3, 0 + 1 + 2 + 3, np.float32))
  np.testing.assert_array_equal(final.params["w"], np.full(3, sum(range(12)), np.float32))


def test_resumed_run_has_the_history_and_best_state_of_an_uninterrupted_one(uninterrupted,
                                                                            tmp_path):
  reference_dir, reference = uninterrupted
  with pytest.raises(Interrupt):
    _train(tmp_path, stop_after=10)
  resumed = _train(tmp_path)
  np.testing.assert_array_equal(resumed.params["w"], reference.params["w"])
  assert loop.load_history(str(tmp_path)) == loop.load_history(reference_dir)
  template = loop.best_variables(_init())
  assert loop.load_best(str(tmp_path), template)[1] == loop.load_best(reference_dir,
                                                                      template)[1]


@pytest.mark.parametrize("damage,message", [
    (lambda losses: losses[:2], "the loss history holds 2 'loss' values for 4 steps"),
    (lambda losses: losses[:1] + [float("nan")] + losses[2:],
     "the loss history's 'loss' of step 2 is nan"),
])
def test_a_history_shorter_than_its_step_or_holding_nan_is_refused_naming_the_step(
    tmp_path, damage, message):
  with pytest.raises(Interrupt):
    _train(tmp_path, stop_after=7, select_best_epoch=False)  # a checkpoint at step 4
  item = os.path.join(tmp_path, "checkpoints", "4", "history", "metadata")
  with open(item) as f:
    record = json.load(f)
  record["metrics"]["loss"] = damage(record["metrics"]["loss"])
  with open(item, "w") as f:
    json.dump(record, f)
  source = os.path.join(tmp_path, "checkpoints", "4")
  for call in (lambda: _train(tmp_path, select_best_epoch=False),
               lambda: loop.load_history(str(tmp_path))):
    with pytest.raises(UserError) as info:
      call()
    assert str(info.value).startswith(f"{source}: {message}; expected ")
    assert "delete that checkpoint step to resume from an earlier one" in str(info.value)


# --- Damaged steps -------------------------------------------------------------------------


def _remove_commit_marker(step_dir):
  """An uncommitted step: no commit marker, or (Orbax versions that write none on local
  disks, e.g. 0.11.36) no commit time in its _CHECKPOINT_METADATA."""
  marker = os.path.join(step_dir, step_folders.COMMIT_MARKER)
  if os.path.exists(marker):
    os.remove(marker)
    return
  metadata = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  with open(metadata) as f:
    record = json.load(f)
  assert record.pop("commit_timestamp_nsecs", None)
  with open(metadata, "w") as f:
    json.dump(record, f)


def _remove_array_data(step_dir):
  files = glob.glob(os.path.join(step_dir, checkpoints_lib.STATE, "ocdbt.process_*", "d", "*"))
  assert files
  for path in files:
    os.remove(path)


def _remove_item_metadata(step_dir):
  os.remove(os.path.join(step_dir, checkpoints_lib.STATE, step_folders.ITEM_METADATA))


DAMAGES = [_remove_commit_marker, _remove_array_data, _remove_item_metadata]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__[1:])
def test_damaged_newest_step_is_skipped_on_resume_with_one_warning(uninterrupted, tmp_path,
                                                                    capsys, damage):
  reference_dir, reference = uninterrupted
  with pytest.raises(Interrupt):
    _train(tmp_path, stop_after=10, keep=3)          # checkpoints 2 (best), 4, 8
  damage(os.path.join(tmp_path, "checkpoints", "8"))
  capsys.readouterr()
  resumed = _train(tmp_path, keep=3)
  captured = capsys.readouterr()
  warnings = [line for line in captured.err.splitlines() if "checkpoints/8 " in line]
  assert len(warnings) == 1, captured.err
  assert warnings[0].startswith(f"warning: skipping the damaged checkpoint {tmp_path}/"
                                "checkpoints/8 (")
  assert warnings[0].endswith(f"); using step 4; moved it to {tmp_path}/checkpoints/8.damaged")
  assert "Traceback" not in captured.err
  assert "resuming from step 4 of 12" in captured.out
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "8.damaged"))
  np.testing.assert_array_equal(resumed.params["w"], reference.params["w"])
  assert loop.load_history(str(tmp_path)) == loop.load_history(reference_dir)
  assert loop.load_best(str(tmp_path), loop.best_variables(_init()))[1]["step"] == 4


def _our_warnings(capsys) -> list[str]:
  """This project's warning lines on stderr (Orbax's own log lines left out)."""
  return [line for line in capsys.readouterr().err.splitlines()
          if line.startswith("warning: ")]


def _saved_steps(directory, steps=(3, 7), state=None):
  checkpoints = checkpoints_lib.Checkpoints(directory)
  for step in steps:
    checkpoints.save(step, state if state is not None else _backbone_state(step))
  checkpoints.wait()
  return checkpoints


def test_restore_latest_skips_damaged_steps_and_refuses_when_none_is_complete(tmp_path,
                                                                                capsys):
  directory = str(tmp_path / "checkpoints")
  _saved_steps(directory).close()
  _remove_array_data(os.path.join(directory, "7"))
  checkpoints = checkpoints_lib.Checkpoints(directory)
  step, state, history = checkpoints.restore_latest(_backbone_state(0))
  assert (step, history) == (3, None)
  np.testing.assert_array_equal(state["params"]["backbone"]["conv1"]["kernel"],
                                _backbone_state(3)["params"]["backbone"]["conv1"]["kernel"])
  err = _our_warnings(capsys)
  assert len(err) == 1 and err[0].startswith(f"warning: skipping the damaged checkpoint "
                                             f"{directory}/7 (")
  _remove_commit_marker(os.path.join(directory, "3"))
  with pytest.raises(UserError) as e:
    checkpoints.restore_latest(_backbone_state(0))
  checkpoints.close()
  message = str(e.value)
  assert "\n" not in message and len(message) < 600
  assert message.startswith(f"{directory}: holds no complete checkpoint (damaged steps: 7 (")
  assert "3 (no commit marker commit_success.txt)" in message


def test_saved_model_with_a_damaged_step_is_refused_in_one_line(tmp_path):
  variables = {"params": {"w": np.random.default_rng(0).normal(size=2000).astype(np.float32)}}
  workdir_lib.save_model(str(tmp_path), 5, variables)
  _remove_array_data(os.path.join(tmp_path, "model", "5"))
  with pytest.raises(UserError, match=r"^\S+/model/5: cannot restore the checkpoint \("
                     r"[^\n]*\)$"):
    workdir_lib.load_model(str(tmp_path), variables, "teacher")


# --- NaN and Inf -----------------------------------------------------------------------


def _backbone_state(step):
  rng = np.random.default_rng(step)
  return {"step": np.asarray(step, np.int32),
          "params": {"backbone": {"conv1": {"kernel": rng.normal(size=(3, 3, 8, 32))
                                            .astype(np.float32)},
                                  "fc": {"kernel": rng.normal(size=(8, 4)).astype(np.float32)}},
                     "head": {"kernel": rng.normal(size=(4, 5)).astype(np.float32)}},
          "batch_stats": {"backbone": {"bn": {"mean": rng.normal(size=4).astype(np.float32),
                                              "var": np.ones(4, np.float32)}}}}


def test_checkpoint_holding_nan_is_refused_naming_the_folder_and_the_tensor(tmp_path):
  diverged = _backbone_state(7)
  diverged["params"]["backbone"]["fc"]["kernel"][2, 1] = np.nan
  diverged["params"]["head"]["kernel"][0, 0] = np.inf
  directory = str(tmp_path / "checkpoints")
  checkpoints = _saved_steps(directory, steps=(7,), state=diverged)
  expected = (rf"^{re.escape(directory)}/7: the checkpoint holds NaN in params/backbone/fc/kernel "
              r"\(1 of 32 values; a diverged run\?\)")
  with pytest.raises(UserError, match=expected):
    checkpoints.restore_tree(7, _backbone_state(0))
  with pytest.raises(UserError, match=expected):
    checkpoints.restore_latest(_backbone_state(0))
  checkpoints.close()
  with pytest.raises(UserError, match=expected):
    orbax_checkpoint.load_backbone_variables(directory)


def test_checkpoint_holding_inf_in_a_train_state_is_refused(tmp_path):
  state = _init().replace(params={"noise": _init().params["noise"],
                                  "w": np.asarray([0.0, np.inf, 1.0], np.float32)})
  checkpoints = _saved_steps(str(tmp_path), steps=(2,), state=state)
  with pytest.raises(UserError, match=r"/2: the checkpoint holds Inf in params/w "):
    checkpoints.restore(2, _init())
  checkpoints.close()


# --- Evaluation ------------------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__[1:])
def test_evaluation_reads_the_newest_complete_step(tmp_path, capsys, damage):
  directory = str(tmp_path / "run" / "checkpoints")
  _saved_steps(directory).close()
  damage(os.path.join(directory, "7"))
  variables, info = orbax_checkpoint.load_backbone_variables(str(tmp_path / "run"))
  assert info.step == 3
  np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"],
                                _backbone_state(3)["params"]["backbone"]["conv1"]["kernel"])
  err = _our_warnings(capsys)
  assert len(err) == 1, err
  assert err[0].startswith(f"warning: skipping the damaged checkpoint {directory}/7 (")


def test_evaluation_of_only_damaged_steps_prints_one_line_and_no_traceback(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _saved_steps(directory).close()
  _remove_array_data(os.path.join(directory, "7"))
  _remove_commit_marker(os.path.join(directory, "3"))
  script = ("import sys\n"
            "from mstkd_jax.errors import UserError\n"
            "from mstkd_jax.interop import orbax_checkpoint\n"
            "try:\n"
            f"  orbax_checkpoint.load_backbone_variables({directory!r})\n"
            "except UserError as e:\n"
            "  print(f'error: {e}', file=sys.stderr)\n"
            "  sys.exit(1)\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines()
           if line.startswith(("warning: skipping", "error:"))]
  assert lines[-1].startswith(f"error: {directory}: holds no complete checkpoint step "
                              "(damaged: 7 (ValueError: ")
  assert "3 (no commit marker commit_success.txt)" in lines[-1]
  assert len(lines) == 3  # skipping 7, skipping 3, the error
  for word in ("Traceback", "Event loop is closed"):
    assert word not in result.stderr
  # The explicitly named step is not replaced by another one.
  with pytest.raises(UserError, match=r"^\S+/7: cannot restore from the Orbax checkpoint"):
    orbax_checkpoint.load_backbone_variables(os.path.join(directory, "7"))


@pytest.mark.parametrize("where", ["save", "wait_until_finished"])
def test_a_failed_checkpoint_save_is_one_line_naming_the_folder(tmp_path, monkeypatch, where):
  import errno  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def disk_full(*args, **kwargs):
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:  # as tensorstore/Orbax re-raise it from their threads
      raise RuntimeError("Error writing the array data: [...] kilobytes of detail") from e

  monkeypatch.setattr(ocp.CheckpointManager, where, disk_full)
  with pytest.raises(UserError) as e:
    _train(tmp_path)
  message = str(e.value)
  assert message.startswith(f"cannot write the checkpoint {tmp_path}/checkpoints")
  assert "(ENOSPC: No space left on device)" in message and "\n" not in message


@pytest.mark.parametrize("mode", ["fails", "hangs"])
def test_a_fault_in_a_background_save_ends_the_run_promptly_in_one_line(tmp_path, mode):
  """An asynchronous save whose commit raises ENOSPC, or never completes while the run
  fails in the main thread: the process ends within seconds of its error line, non-zero,
  with the error in one line and no traceback (tests/async_save_fault.py injects them)."""
  import time  # pylint: disable=g-import-not-at-top
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "async_save_fault.py"), mode,
       str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300,
      check=False)
  ended = time.time()
  assert result.returncode == 1, result.stderr[-2000:]
  failed_at = float(re.search(r"failed at ([0-9.]+)", result.stdout).group(1))
  # The shutdown grace (2 s here), the pending-save wait (2 s) and the interpreter's exit,
  # JAX's and Orbax's teardown: 9 s once on Python 3.12 with the suite sharing 2 cores with
  # three training runs, hence 20 s of margin. What this guards against holds the process
  # for the injected commit's hour ("hangs") or until a scheduler kills it.
  assert ended - failed_at < 2.0 + 2.0 + 20.0
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
  ours = [line for line in result.stderr.splitlines()
          if line.startswith(("error:", "warning:"))]
  if mode == "fails":
    assert ours == [f"error: cannot write the checkpoint {tmp_path}/run/checkpoints/4 "
                    "(ENOSPC: No space left on device)"]
  else:
    assert ours == [f"warning: a checkpoint save in {tmp_path}/run/checkpoints did not "
                    "finish within 2 s and was left behind (a later run skips its "
                    "uncommitted step)", "error: injected failure in the main thread"]

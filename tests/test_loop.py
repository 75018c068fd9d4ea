"""The training loop: the divergence stop names the step and keeps the last good checkpoint;
frozen networks reach the step as one named pytree."""

import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mstkd_jax.errors import UserError
from mstkd_jax.train import checkpoints as checkpoints_lib, loop, parallel, state as state_lib


def _step(state, batch, rng):
  """Adds the batch mean to w; the loss is NaN from step 5 on (a step sees state.step 4)."""
  del rng
  new = state.replace(step=state.step + 1,
                      params={"w": state.params["w"] + jnp.mean(batch["x"])})
  loss = jnp.where(state.step >= 4, jnp.nan, 1.0 / (1.0 + state.step))
  return new, {"loss": loss}


def _batches(start):
  for step in range(start, 100):
    yield {"x": np.full((1, 2), float(step), np.float32)}


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
  init = state_lib.TrainState(step=np.zeros((), np.int32), params={"w": np.zeros(3, np.float32)},
                              batch_stats={}, opt_state=optax.EmptyState())
  settings = loop.LoopSettings(name="toy", total_steps=10, steps_per_epoch=5,
                               images_per_step=2, log_every=10, checkpoint_every=2)
  with pytest.raises(loop.TrainingDiverged,
                     match=r"\[toy\] the loss became nan at step 5; the last good checkpoint "
                     r"is step 4 in .*checkpoints \(kept intact\)"):
    loop.train(workdir=str(tmp_path), settings=settings, init_state=init, step_fn=_step,
               batches=_batches, parallel=parallel.get("pmap", 1), rng=np.zeros(2, np.uint32))
  checkpoints = checkpoints_lib.Checkpoints(os.path.join(tmp_path, "checkpoints"))
  assert checkpoints.latest_step() == 4
  restored = checkpoints.restore(4, init)
  np.testing.assert_array_equal(restored.params["w"], np.full(3, 0 + 1 + 2 + 3, np.float32))


@pytest.mark.parametrize("kind", parallel.KINDS)
def test_frozen_networks_reach_the_step_as_one_named_pytree(tmp_path, kind):
  frozen = {"teachers": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "adaptor": {"b": np.full(3, 0.5, np.float32)}}

  def step(state, batch, rng, frozen):
    del batch, rng
    shift = jnp.sum(frozen["teachers"]["w"], axis=0) + frozen["adaptor"]["b"]
    return state.replace(step=state.step + 1, params={"w": state.params["w"] + shift}), {
        "loss": jnp.float32(1.0)}

  init = state_lib.TrainState(step=np.zeros((), np.int32), params={"w": np.zeros(3, np.float32)},
                              batch_stats={}, opt_state=optax.EmptyState())
  settings = loop.LoopSettings(name="toy", total_steps=2, steps_per_epoch=2,
                               images_per_step=2, log_every=1, checkpoint_every=2)
  final = loop.train(workdir=str(tmp_path), settings=settings, init_state=init, step_fn=step,
                     batches=_batches, parallel=parallel.get(kind, 1),
                     rng=np.zeros(2, np.uint32), frozen=frozen)
  np.testing.assert_array_equal(final.params["w"], 2 * np.asarray([3.5, 5.5, 7.5], np.float32))


def test_steps_for_refuses_a_data_set_smaller_than_a_batch():
  assert loop.steps_for(100, 32, 2.5) == (3, 8)
  with pytest.raises(loop.UserError, match="fewer than one global batch of 64"):
    loop.steps_for(10, 64, 1.0)


def test_a_metrics_folder_that_cannot_be_written_is_one_line(tmp_path):
  from mstkd_jax.train import writers  # pylint: disable=g-import-not-at-top
  (tmp_path / "a_file").write_text("")
  with pytest.raises(UserError) as info:
    writers.create_writer(str(tmp_path / "a_file" / "logs"), just_logging=False)
  message = str(info.value)
  assert message.startswith(f"cannot write the metrics in {tmp_path}/a_file/logs (")
  assert "is not a directory" in message and "\n" not in message and "{{" not in message


def test_a_metrics_write_failing_in_the_writer_thread_stops_the_run_in_one_line(
    tmp_path, monkeypatch):
  """clu's asynchronous writer re-raises TensorFlow's disk-full error (which has no errno)
  at a later call: the run stops with one line naming the folder and ENOSPC."""
  from clu import asynclib  # pylint: disable=g-import-not-at-top
  from mstkd_jax.train import writers  # pylint: disable=g-import-not-at-top

  class DiskFull:
    def write_scalars(self, step, scalars):
      del step, scalars
      raise asynclib.AsyncError(
          "{{function_node __wrapped__FlushSummaryWriter_device_/job:localhost}} "
          "/w/events.out.tfevents.1; No space left on device\n\tFailed to flush 3 events")

    def flush(self):
      pass

  monkeypatch.setattr(writers, "create_writer", lambda logdir, just_logging: (
      writers.CheckedWriter(DiskFull(), logdir)))
  init = state_lib.TrainState(step=np.zeros((), np.int32), params={"w": np.zeros(3, np.float32)},
                              batch_stats={}, opt_state=optax.EmptyState())
  settings = loop.LoopSettings(name="toy", total_steps=4, steps_per_epoch=2,
                               images_per_step=2, log_every=2, checkpoint_every=2)
  with pytest.raises(UserError) as info:  # (_step's loss is finite for these 4 steps)
    loop.train(workdir=str(tmp_path), settings=settings, init_state=init, step_fn=_step,
               batches=_batches, parallel=parallel.get("pmap", 1), rng=np.zeros(2, np.uint32))
  assert str(info.value) == (f"cannot write the metrics in {tmp_path} "
                             "(ENOSPC: No space left on device)")

"""The training loop: the divergence stop (a NaN loss, or a NaN/Inf state about to be saved)
names the step and keeps the last good checkpoint; out of memory is one line; frozen
networks reach the step as one named pytree."""

import os

import jax
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


def _sgd_step(tx):
  """Least squares on w -> 1 with `tx`; the loss is that of the state the step starts from."""
  def step(state, batch, rng):
    del batch, rng
    loss, grads = jax.value_and_grad(lambda p: jnp.sum((p["w"] - 1.0) ** 2))(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), {"loss": loss}
  return step


def test_a_state_made_inf_by_a_huge_learning_rate_is_not_saved_and_is_named(tmp_path):
  """From step 3 on the LR is 3e38: step 3 starts from a finite state (its loss is finite)
  and leaves w at -inf. The checkpoint of step 3 is refused, naming the tensor and the step;
  step 2's stays the last."""
  tx = optax.sgd(lambda count: jnp.where(count >= 2, 3e38, 0.1))
  params = {"w": np.zeros(3, np.float32)}
  init = state_lib.TrainState(step=np.zeros((), np.int32), params=params, batch_stats={},
                              opt_state=jax.tree.map(np.asarray, tx.init(params)))
  settings = loop.LoopSettings(name="toy", total_steps=10, steps_per_epoch=5,
                               images_per_step=2, log_every=10, checkpoint_every=1)
  with pytest.raises(loop.TrainingDiverged) as info:
    loop.train(workdir=str(tmp_path), settings=settings, init_state=init,
               step_fn=_sgd_step(tx), batches=_batches, parallel=parallel.get("pmap", 1),
               rng=np.zeros(2, np.uint32))
  assert str(info.value) == (
      "[toy] the training state became Inf in params/w (3 of 3 values) at step 3 while the "
      f"loss was still finite; the last good checkpoint is step 2 in {tmp_path}/checkpoints "
      "(kept intact). Lower the learning rate (optim.base_lr) or check the data.")
  checkpoints = checkpoints_lib.Checkpoints(os.path.join(tmp_path, "checkpoints"))
  assert checkpoints.latest_step() == 2
  assert np.isfinite(checkpoints.restore(2, init).params["w"]).all()


def test_out_of_memory_in_a_step_is_one_line_saying_what_to_lower(tmp_path, monkeypatch):
  """XLA's error as a GPU allocator words it, raised by the step (simulated: a real one
  would take the machine's memory): one line with the size and the fields to lower."""
  def out_of_memory(*args):
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.\n"
        "BufferAssignment OOM Debugging.\n" + "allocation details\n" * 40)

  monkeypatch.setattr(parallel.DataParallel, "wrap", lambda self, fn: out_of_memory)
  init = state_lib.TrainState(step=np.zeros((), np.int32), params={"w": np.zeros(3, np.float32)},
                              batch_stats={}, opt_state=optax.EmptyState())
  settings = loop.LoopSettings(name="student/mstkd/SL/a-KD", total_steps=4, steps_per_epoch=2,
                               images_per_step=512, train_section="student.train")
  with pytest.raises(UserError) as info:
    loop.train(workdir=str(tmp_path), settings=settings, init_state=init, step_fn=_step,
               batches=_batches, parallel=parallel.get("pmap", 1), rng=np.zeros(2, np.uint32),
               frozen={"teachers": {"w": np.zeros(2, np.float32)}})
  assert str(info.value) == (
      "[student/mstkd/SL/a-KD] out of memory in training step 1 (an allocation of 16.0 GiB "
      "did not fit); lower student.train.batch_size (now 512) or the image size "
      "(data.synthetic.image_size, data.tfds.image_size), or run the teachers ahead of time "
      "(student.targets='cached') instead of in every step")


@pytest.mark.parametrize("message,expected", [
    ("RESOURCE_EXHAUSTED: Out of memory allocating 1099511627776 bytes.",
     "an allocation of 1.0 TiB did not fit"),                      # XLA:CPU
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
     "hbm. Used 20.29G of 15.48G hbm. Exceeded hbm capacity by 4.81G.",
     "it needs 20.3 GiB of hbm where the device has 15.5 GiB"),    # a TPU compilation
    ("RESOURCE_EXHAUSTED: Error allocating device buffer: Attempting to allocate 8.00G. That "
     "was not possible. There are 2.75G free.; (0x0x0_HBM0)",
     "an allocation of 8.0 GiB did not fit in the 2.8 GiB free"),  # a TPU at run time
    ("RESOURCE_EXHAUSTED: Failed to allocate request for 16.00GiB (17179869184B) on device "
     "ordinal 0", "an allocation of 16.0 GiB did not fit"),        # a GPU at compile time
    ("INTERNAL: something else", None),
])
def test_out_of_memory_errors_say_how_much_did_not_fit(message, expected):
  from mstkd_jax import errors  # pylint: disable=g-import-not-at-top
  assert errors.out_of_memory(jax.errors.JaxRuntimeError(message)) == expected

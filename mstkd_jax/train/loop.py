"""The one training loop every stage uses: resume, step, log, check for divergence, checkpoint.

Stages differ only in the step function, the initial state and the batches they hand in.
The RNG of step t is fold_in(rng, t) inside the step and the input pipeline is a pure
function of the step, so a run restored from a checkpoint continues bit for bit. The loop
stops on a NaN/Inf loss or state (the last good checkpoint is kept), a signal (the step it
reached is saved first: train/interrupts.py) and an out-of-memory error (one line).
"""

import dataclasses
import datetime
import math
import os
import sys
import time
from typing import Callable, Iterator

import jax
import numpy as np

from mstkd_jax import errors
from mstkd_jax.errors import UserError
from mstkd_jax.train import (checkpoints as checkpoints_lib, history as history_lib,
                             interrupts, tree_checks, writers)
from mstkd_jax.train.checkpoints import Checkpoints
from mstkd_jax.train.parallel import DataParallel

# The stages read a finished loop's history and best state from here.
best_variables, load_best, load_history = (
    history_lib.best_variables, history_lib.load_best, history_lib.load_history)


class TrainingDiverged(UserError):
  """The loss became NaN or Inf."""


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  name: str                 # shown in progress lines, e.g. "teacher/group_a"
  total_steps: int
  steps_per_epoch: int
  images_per_step: int      # global batch, for img/s
  log_every: int = 50
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  # Keep the state of the epoch with the lowest mean training loss (read it with `load_best`).
  select_best_epoch: bool = False
  train_section: str = "train"  # the config's name for it ("student.train"), for messages


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """Verification after every `every`-th step: `fn(host TrainState)` returns {group:
  accuracy in [0, 1]}, written as "<label>/<group>" and "<label>/mean". With `select` the
  state of the best mean accuracy is kept (`load_best`); otherwise training reads nothing
  it computes, so the parameters are bit for bit those of a run without it."""
  fn: Callable
  every: int
  label: str = "verification"
  select: bool = False


def _prefetch(iterator, parallel: DataParallel, size: int = 2):
  """Puts the next `size` batches on the devices while the current step runs."""
  queue = []
  for batch in iterator:
    queue.append(parallel.shard(batch))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


class _Progress:
  """Fetches per-step metrics, checks them, writes them and prints one line per window."""

  def __init__(self, settings: LoopSettings, writer, start_step: int, history: dict):
    self.settings = settings
    self.writer = writer
    self.pending = []           # [(step, device metrics)] not yet fetched
    self.window_start = (time.perf_counter(), start_step)
    self.history = history     # {metric: per-step values}, [t - 1] being step t's

  def add(self, step: int, metrics) -> None:
    self.pending.append((step, metrics))

  def flush(self, step: int, parallel: DataParallel, checkpoint_hint: str) -> None:
    """Fetches pending metrics; raises TrainingDiverged at the first non-finite loss."""
    if not self.pending:
      return
    fetched = [(s, parallel.unreplicate(m)) for s, m in self.pending]
    self.pending = []
    for s, m in fetched:
      if not np.isfinite(m["loss"]):
        raise TrainingDiverged(
            f"[{self.settings.name}] the loss became {m['loss']} at step {s}; "
            f"{checkpoint_hint}. Lower the learning rate (optim.base_lr) or check the data.")
      for key in history_lib.HISTORY_METRICS:
        if key in m:
          self.history.setdefault(key, []).append(float(m[key]))
    means = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
    now, then = time.perf_counter(), self.window_start
    steps_per_s = (step - then[1]) / max(now - then[0], 1e-9)
    self.window_start = (now, step)
    self.writer.write_scalars(step, means | {"steps_per_sec": steps_per_s})
    total = self.settings.total_steps
    epoch = min(step / self.settings.steps_per_epoch, total / self.settings.steps_per_epoch)
    eta = datetime.timedelta(seconds=int(max((total - step) / max(steps_per_s, 1e-9), 0)))
    extra = " ".join(f"{k} {v:.4g}" for k, v in means.items() if k not in ("loss", "lr"))
    print(f"[{self.settings.name}] step {step}/{total} (epoch {epoch:.2f}) "
          f"loss {means['loss']:.4f} {extra} lr {means.get('lr', float('nan')):.4g} | "
          f"{steps_per_s:.2f} steps/s {steps_per_s * self.settings.images_per_step:.0f} img/s"
          f" | ETA {eta}", flush=True)


def _history_record(history: dict, step: int, parallel: DataParallel) -> dict:
  """What a checkpoint keeps of the history: a copy (the save is asynchronous and the lists
  keep growing), the step, and the device layout that wrote it."""
  return {"step": step, "metrics": {k: list(v) for k, v in history.items()},
          "devices": parallel.device_count, "processes": jax.process_count()}


def _layout(devices: int, processes: int) -> str:
  return (f"{devices} device{'s' * (devices != 1)} in {processes} "
          f"process{'es' * (processes != 1)}")


def _print_layout_change(name: str, saved: dict, parallel: DataParallel) -> None:
  """Prints a line where the run resumes on another device layout than the checkpoint's."""
  now = {"devices": parallel.device_count, "processes": jax.process_count()}
  if saved and saved != now:
    print(f"[{name}] the checkpoint was written on {_layout(**saved)}; resuming on "
          f"{_layout(**now)}: the training state is replicated"
          + (" (the class centres, saved whole, are split anew over the devices)"
             if getattr(parallel, "class_shards", None) else "")
          + " and the global batch is unchanged, so it carries over as it is (sums over "
          "the batch may differ in float rounding).", flush=True)


def train(*, workdir: str, settings: LoopSettings, init_state, step_fn: Callable,
          batches: Callable[[int], Iterator[dict]], parallel: DataParallel, rng,
          frozen: dict | None = None, evaluation: Evaluation | None = None):
  """Trains `init_state` to `settings.total_steps`, resuming from `workdir/checkpoints`.

  Args:
    workdir: the stage's folder (checkpoints/ and TensorBoard events go there).
    settings: steps, logging and checkpoint cadence.
    init_state: host TrainState of a fresh run (also the template checkpoints restore into).
    step_fn: per-device `(state, batch, rng[, frozen]) -> (state, metrics)`.
    batches: `batches(start_step)` yields host batches [local_devices, per_device, ...]
      for steps start_step, start_step + 1, ... (a pure function of the step).
    parallel: how steps are mapped over devices.
    rng: base key; the step folds in its step number.
    frozen: networks the step reads but never trains, as one host pytree (e.g.
      {"teachers": ..., "adaptor": ...}), replicated to every device; or None.
    evaluation: verification during training, or None.
  Returns:
    The final TrainState on the host.
  Raises:
    TrainingDiverged: a loss, or the state to be saved, became NaN or Inf.
    interrupts.Interrupted: a signal stopped the run (once the step it reached is saved).
    UserError: the checkpoints hold another model, NaN/Inf, only damaged steps or a
      damaged history; the input pipeline ended early; a step ran out of memory.
  """
  if settings.select_best_epoch and evaluation is not None and evaluation.select:
    raise ValueError("select the best epoch by its loss or by evaluation, not both")
  checkpoints = Checkpoints(f"{workdir}/checkpoints", keep=settings.keep_checkpoints)
  writer = None
  completed = False
  total = settings.total_steps
  step = last_saved = None
  try:
    start, state, record = checkpoints.restore_latest(init_state, set_aside=True)
    step = last_saved = start = start or 0
    if start >= total:
      print(f"[{settings.name}] already finished: checkpoint at step {start} of {total} in "
            f"{checkpoints.directory}; nothing to do.", flush=True)
      completed = True
      return state
    if start:
      print(f"[{settings.name}] resuming from step {start} of {total} "
            f"({checkpoints.directory}).", flush=True)
    history, saved_layout = history_lib.read(
        record, start, os.path.join(checkpoints.directory, str(start)))
    if start:
      _print_layout_change(settings.name, saved_layout, parallel)

    writer = writers.create_writer(workdir, just_logging=jax.process_index() > 0)
    progress = _Progress(settings, writer, start, history)
    selects = settings.select_best_epoch or (evaluation is not None and evaluation.select)
    best = checkpoints.best() if selects else None
    best_score = math.inf if best is None else best[1]["score"]  # to beat; lower is better
    p_step = parallel.wrap(step_fn)
    device_state = parallel.replicate(state)
    device_args = parallel.replicate((rng,) if frozen is None else (rng, frozen))

    def hint():
      if last_saved:
        return (f"the last good checkpoint is step {last_saved} in {checkpoints.directory} "
                "(kept intact)")
      return "no checkpoint was written yet"

    def save(host_state, candidate=None):
      # Every loss up to here was finite (flush checked); parameters or BatchNorm
      # statistics can still overflow while the loss is finite.
      found = tree_checks.first_non_finite(host_state)
      if found is not None:
        tensor, kind, bad, size = found
        raise TrainingDiverged(
            f"[{settings.name}] the training state became {kind} in {tensor} ({bad} of "
            f"{size} values) at step {step} while the loss was still finite; {hint()}. "
            "Lower the learning rate (optim.base_lr) or check the data.")
      checkpoints.save(step, host_state, history=_history_record(history, step, parallel),
                       candidate=candidate)

    for batch in _prefetch(batches(start), parallel):
      if step >= total:
        break
      device_state, metrics = p_step(device_state, batch, *device_args)
      # From here until its checkpoint, a signal waits for the end of the step.
      interrupts.unsaved(True)
      step += 1
      progress.add(step, metrics)
      is_checkpoint = step % settings.checkpoint_every == 0 or step == total
      is_epoch_end = settings.select_best_epoch and step % settings.steps_per_epoch == 0
      is_eval = evaluation is not None and evaluation.every and step % evaluation.every == 0
      if step % settings.log_every == 0 or is_checkpoint or is_epoch_end or is_eval:
        progress.flush(step, parallel, hint())
      host_state = candidate = None
      if is_epoch_end:
        mean = float(np.mean(history["loss"][-settings.steps_per_epoch:]))
        candidate = {"score": mean, "epoch": step // settings.steps_per_epoch,
                     "mean_loss": mean}
      if is_eval:
        host_state = parallel.unreplicate(device_state)
        mean, accuracy = _evaluate(evaluation, settings, step, host_state, writer)
        if evaluation.select:
          candidate = {"score": -mean, "epoch": step / settings.steps_per_epoch,
                       "mean_accuracy": mean, "accuracy": accuracy}
      if candidate is not None and not candidate["score"] < best_score:
        candidate = None  # only a state better than every earlier one becomes a candidate
      if is_checkpoint or candidate is not None:
        # Every process saves (Orbax synchronizes them); the scores, hence the
        # candidates, are the same on every process.
        save(parallel.unreplicate(device_state) if host_state is None else host_state,
             candidate)
        last_saved = step
        interrupts.unsaved(False)
        if candidate is not None:
          best_score = candidate["score"]
      signum = interrupts.stop_requested()  # every process, every step (a sync point)
      if signum is not None:
        progress.flush(step, parallel, hint())
        if last_saved < step:
          save(parallel.unreplicate(device_state))
          last_saved = step
        _stop(settings, signum, step, checkpoints)
    if step < total:
      raise UserError(f"[{settings.name}] the input pipeline ended at step {step} of {total}")
    completed = True
  except interrupts.Interrupted as e:
    if e.located:
      raise
    raise interrupts.Interrupted(e.signum, _where_stopped(
        settings, e.signum, step, last_saved, checkpoints.directory), located=True) from None
  except Exception as e:  # pylint: disable=broad-except
    memory = errors.out_of_memory(e)
    if memory is None:
      raise
    raise UserError(_out_of_memory_message(settings, step, memory, frozen)) from e
  finally:
    interrupts.unsaved(False)
    if completed:
      checkpoints.wait()
      checkpoints.close()
      if writer is not None:
        writer.flush()
    else:  # the run's own error is the one reported; pending saves get a bounded wait
      checkpoints.abandon(sys.exc_info()[1])
      if writer is not None:
        try:
          writer.flush()
        except UserError as e:
          if str(e) != str(sys.exc_info()[1]):
            checkpoints_lib.warn(str(e))
  return parallel.unreplicate(device_state)


def _stop(settings: LoopSettings, signum: int, step: int, checkpoints: Checkpoints) -> None:
  """Raises Interrupted once the checkpoint of `step` is saved (a bounded wait)."""
  where = (f"[{settings.name}] stopped by {interrupts.signal_name(signum)} at step {step} "
           f"of {settings.total_steps}")
  why = checkpoints.settle()
  if why is None:
    message = (f"{where}; its checkpoint is saved in {checkpoints.directory}: rerun the "
               "same command to resume")
  else:
    message = (f"{where}; {why}: rerun the same command to resume from the newest "
               "complete checkpoint")
  raise interrupts.Interrupted(signum, message, located=True)


def _where_stopped(settings: LoopSettings, signum: int, step: int | None,
                   last_saved: int | None, directory: str) -> str:
  """The line of a signal that stopped the loop with no step left unsaved."""
  where = f"[{settings.name}] stopped by {interrupts.signal_name(signum)}"
  if step is None:
    return f"{where} while restoring its checkpoint: rerun the same command to resume"
  if not step and not last_saved:
    return f"{where} before its first step: rerun the same command to start it again"
  if last_saved == step:
    return (f"{where} at step {step} of {settings.total_steps}, which its checkpoint in "
            f"{directory} holds: rerun the same command to resume")
  return (f"{where} at step {step} of {settings.total_steps} before its checkpoint was "
          "saved (a second signal): rerun the same command to resume from its newest "
          f"complete checkpoint in {directory}")


def _out_of_memory_message(settings: LoopSettings, step: int | None, memory: str,
                           frozen: dict | None) -> str:
  """One line for an out-of-memory error in a step: what did not fit, what to lower."""
  online = frozen is not None and "teachers" in frozen
  return (f"[{settings.name}] out of memory in training step {(step or 0) + 1} ({memory}); "
          f"lower {settings.train_section}.batch_size (now {settings.images_per_step}) or the "
          "image size (data.synthetic.image_size, data.tfds.image_size)"
          + (", or run the teachers ahead of time (student.targets='cached') instead of "
             "in every step" if online else ""))


def _evaluate(evaluation: Evaluation, settings: LoopSettings, step: int, state,
              writer) -> tuple[float, dict]:
  """Runs, writes and prints `evaluation`; returns (mean accuracy, {group: accuracy})."""
  accuracy = {g: float(a) for g, a in evaluation.fn(state).items()}
  mean = float(np.mean(list(accuracy.values())))
  writer.write_scalars(step, {f"{evaluation.label}/{g}": a for g, a in accuracy.items()}
                       | {f"{evaluation.label}/mean": mean})
  groups = "  ".join(f"{g} {100 * a:.2f}%" for g, a in accuracy.items())
  print(f"[{settings.name}] step {step} {evaluation.label} accuracy: {groups}  "
        f"(mean {100 * mean:.2f}%)", flush=True)
  return mean, accuracy


def steps_for(num_examples: int, global_batch: int, epochs: float) -> tuple[int, int]:
  """(steps_per_epoch, total_steps) for `epochs` passes over `num_examples`, dropping the tail."""
  steps_per_epoch = num_examples // global_batch
  if steps_per_epoch == 0:
    raise UserError(f"the training set has {num_examples} examples, fewer than one global "
                    f"batch of {global_batch}; lower train.batch_size")
  return steps_per_epoch, max(1, math.ceil(epochs * steps_per_epoch))

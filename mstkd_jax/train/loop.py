"""The one training loop every stage uses: resume, step, log, check for divergence, checkpoint.

Stages differ only in the step function, the initial state and the batches they hand in.
The RNG of step t is fold_in(rng, t) inside the step and the input pipeline is a pure
function of the step, so a run restored from a checkpoint continues bit for bit.
"""

import dataclasses
import datetime
import json
import math
import os
import sys
import time
from typing import Callable, Iterator

import jax
import numpy as np

from mstkd_jax.errors import UserError
from mstkd_jax.train import writers
from mstkd_jax.train.checkpoints import Checkpoints
from mstkd_jax.train.parallel import DataParallel


# The per-step metrics kept in <workdir>/loss_history.json (convergence.summarize reads them).
HISTORY_METRICS = ("loss", "accuracy")


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
  # Keep the parameters of the epoch with the lowest mean training loss in <workdir>/best
  # (the adaptor's model selection); read them back with `load_best`.
  select_best_epoch: bool = False
  # The config field that sets this stage's length, named by the convergence warning.
  epochs_field: str = "train.epochs"


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """Verification during training (`train.eval_every`): `fn(host TrainState)` returns
  {group: accuracy in [0, 1]}; it runs after every `every`-th step, its accuracies go to
  the writer as "<label>/<group>" (and "<label>/mean") and to the progress output. With
  `select` the state of the best mean accuracy so far is kept in <workdir>/best (read it
  back with `load_best`); otherwise the evaluation only watches: training reads nothing
  it computes, so the parameters are the same, bit for bit, with it or without it."""
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


def _format_eta(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class _Progress:
  """Fetches per-step metrics, checks them, writes them and prints one line per window."""

  def __init__(self, settings: LoopSettings, writer, start_step: int, history: dict):
    self.settings = settings
    self.writer = writer
    self.pending = []           # [(step, device metrics)] not yet fetched
    self.window_start = (time.perf_counter(), start_step)
    # Per-step "loss" (and "accuracy" where the step reports it): history[k][t - 1] is
    # step t's value.
    self.history = history

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
      for key in HISTORY_METRICS:
        if key in m:
          self.history.setdefault(key, []).append(float(m[key]))
    means = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
    self.writer.write_scalars(step, means)
    now, then = time.perf_counter(), self.window_start
    steps_per_s = (step - then[1]) / max(now - then[0], 1e-9)
    self.window_start = (now, step)
    total = self.settings.total_steps
    epoch = min(step / self.settings.steps_per_epoch, total / self.settings.steps_per_epoch)
    extra = " ".join(f"{k} {v:.4g}" for k, v in means.items() if k not in ("loss", "lr"))
    print(f"[{self.settings.name}] step {step}/{total} (epoch {epoch:.2f}) "
          f"loss {means['loss']:.4f} {extra} lr {means.get('lr', float('nan')):.4g} | "
          f"{steps_per_s:.2f} steps/s {steps_per_s * self.settings.images_per_step:.0f} img/s"
          f" | ETA {_format_eta((total - step) / max(steps_per_s, 1e-9))}", flush=True)


def _history_path(workdir: str) -> str:
  return os.path.join(workdir, "loss_history.json")


def _load_history(workdir: str, step: int) -> tuple[dict, dict]:
  """Per-step metrics of steps 1..step ({"loss": [...], "accuracy": [...]}) as saved with
  the checkpoints ({} if none), and the devices and processes of the run that saved them
  ({} if not recorded)."""
  try:
    with open(_history_path(workdir)) as f:
      record = json.load(f)
    metrics = record.get("metrics") or {"loss": record["losses"]}
    history = {k: [float(x) for x in v[:step]] for k, v in metrics.items()}
  except FileNotFoundError:
    return {}, {}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{_history_path(workdir)} is unreadable ({e}); delete it to resume "
                    "without the loss history") from e
  layout = {k: record[k] for k in ("devices", "processes") if k in record}
  return history, layout


def load_history(workdir: str) -> dict:
  """Every per-step metric the loop saved in `workdir` ({} when it trained nothing)."""
  return _load_history(workdir, sys.maxsize)[0]


def _layout(devices: int, processes: int) -> str:
  return (f"{devices} device{'s' * (devices != 1)} in {processes} "
          f"process{'es' * (processes != 1)}")


def _resume_note(name: str, saved: dict, parallel: DataParallel) -> str | None:
  """The log line of a resumption on another device layout than the checkpoint's."""
  now = {"devices": parallel.device_count, "processes": jax.process_count()}
  if not saved or saved == now:
    return None
  return (f"[{name}] the checkpoint was written on {_layout(**saved)}; resuming on "
          f"{_layout(**now)}: the training state is replicated and the global batch is "
          "unchanged, so it carries over as it is (sums over the batch may differ in "
          "float rounding).")


def _write_json(path: str, value) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f)
  os.replace(path + ".tmp", path)


class _Best:
  """Keeps the variables of the best state seen so far in <workdir>/best and its record in
  best.json ({"step", "epoch", "score", ...}); lower scores are better. A resumed run takes
  the best so far from best.json."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.checkpoints = Checkpoints(os.path.join(workdir, "best"), keep=1)
    self.score = float("inf")
    try:
      with open(os.path.join(workdir, "best.json")) as f:
        self.score = float(json.load(f)["score"])
    except FileNotFoundError:
      pass
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UserError(f"{workdir}/best.json is unreadable ({e}); delete it and best/ to "
                      "resume (the best state is then chosen again from here on)") from e

  def consider(self, step: int, score: float, state_fn, record: dict) -> None:
    if not score < self.score:
      return
    self.score = score
    # Every process saves (Orbax synchronizes them); the scores, hence the choice, are the
    # same on every process.
    self.checkpoints.save(step, best_variables(state_fn()))
    self.checkpoints.wait()
    if jax.process_index() == 0:
      _write_json(os.path.join(self.workdir, "best.json"),
                  {"step": step, "score": score, **record})

  def close(self):
    self.checkpoints.close()


def best_variables(state) -> dict:
  """What a select_best_epoch run keeps of a state: params (and batch_stats if any)."""
  out = {"params": state.params}
  if state.batch_stats:
    out["batch_stats"] = state.batch_stats
  return out


def load_best(workdir: str, template) -> tuple[dict, dict]:
  """(`best_variables` of the best state, best.json), restored into `template`'s shapes."""
  try:
    with open(os.path.join(workdir, "best.json")) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"no best-epoch record in {workdir} ({e}); rerun its stage") from e
  checkpoints = Checkpoints(os.path.join(workdir, "best"), keep=1)
  try:
    return checkpoints.restore_tree(info["step"], template), info
  finally:
    checkpoints.close()


def train(*, workdir: str, settings: LoopSettings, init_state, step_fn: Callable,
          batches: Callable[[int], Iterator[dict]], parallel: DataParallel, rng,
          extra_args: tuple = (), evaluation: Evaluation | None = None):
  """Trains `init_state` to `settings.total_steps`, resuming from `workdir/checkpoints`.

  Args:
    workdir: the stage's folder (checkpoints/ and TensorBoard events go there).
    settings: steps, logging and checkpoint cadence.
    init_state: host TrainState of a fresh run (also the template checkpoints restore into).
    step_fn: per-device `(state, batch, rng, *extra_args) -> (state, metrics)`.
    batches: `batches(start_step)` yields host batches [local_devices, per_device, ...]
      for steps start_step, start_step + 1, ... (a pure function of the step).
    parallel: how steps are mapped over devices.
    rng: base key; the step folds in its step number.
    extra_args: host pytrees replicated to every device and passed after the rng (frozen
      networks, ...).
    evaluation: verification during training (see `Evaluation`), or None.
  Returns:
    The final TrainState on the host.
  """
  checkpoints = Checkpoints(f"{workdir}/checkpoints", keep=settings.keep_checkpoints)
  total = settings.total_steps
  start = checkpoints.latest_step() or 0
  state = init_state
  if start:
    state = checkpoints.restore(start, init_state)
    if start >= total:
      print(f"[{settings.name}] already finished: checkpoint at step {start} of {total} in "
            f"{checkpoints.directory}; nothing to do.", flush=True)
      checkpoints.close()
      return state
    print(f"[{settings.name}] resuming from step {start} of {total} "
          f"({checkpoints.directory}).", flush=True)

  is_main = jax.process_index() == 0
  history, saved_layout = _load_history(workdir, start)
  note = _resume_note(settings.name, saved_layout, parallel) if start else None
  if note:
    print(note, flush=True)
  writer = writers.create_writer(workdir, just_logging=not is_main)
  report = writers.create_progress_reporter(total, writer, settings.log_every)
  progress = _Progress(settings, writer, start, history)
  if settings.select_best_epoch and evaluation is not None and evaluation.select:
    raise ValueError("select the best epoch by its loss or by evaluation, not both")
  selects = settings.select_best_epoch or (evaluation is not None and evaluation.select)
  best = _Best(workdir) if selects else None
  host_state = lambda: parallel.unreplicate(device_state)
  p_step = parallel.wrap(step_fn)
  device_state = parallel.replicate(state)
  device_args = parallel.replicate((rng,) + tuple(extra_args))
  last_saved = start

  def hint():
    if last_saved:
      return (f"the last good checkpoint is step {last_saved} in {checkpoints.directory} "
              "(kept intact)")
    return "no checkpoint was written yet"

  try:
    step = start
    for batch in _prefetch(batches(start), parallel):
      if step >= total:
        break
      device_state, metrics = p_step(device_state, batch, *device_args)
      step += 1
      progress.add(step, metrics)
      if report is not None:
        report(step)
      is_checkpoint = step % settings.checkpoint_every == 0 or step == total
      is_epoch_end = settings.select_best_epoch and step % settings.steps_per_epoch == 0
      is_eval = evaluation is not None and evaluation.every and step % evaluation.every == 0
      if step % settings.log_every == 0 or is_checkpoint or is_epoch_end or is_eval:
        progress.flush(step, parallel, hint())
      if is_epoch_end:
        epoch = step // settings.steps_per_epoch
        mean = float(np.mean(history["loss"][-settings.steps_per_epoch:]))
        best.consider(step, mean, host_state, {"epoch": epoch, "mean_loss": mean})
      if is_eval:
        _evaluate(evaluation, settings, step, host_state(), writer, best)
      if is_checkpoint:
        # Every loss up to here was finite (flush checked), so this state is good. The
        # history goes first: a checkpoint never lacks the losses that led to it.
        if is_main:
          _write_json(_history_path(workdir), {
              "step": step, "metrics": history, "devices": parallel.device_count,
              "processes": jax.process_count()})
        checkpoints.save(step, parallel.unreplicate(device_state))
        last_saved = step
    if step < total:
      raise UserError(f"[{settings.name}] the input pipeline ended at step {step} of {total}")
  finally:
    checkpoints.wait()
    checkpoints.close()
    if best is not None:
      best.close()
    writer.flush()
  return parallel.unreplicate(device_state)


def _evaluate(evaluation: Evaluation, settings: LoopSettings, step: int, state, writer,
              best: _Best | None) -> None:
  """Runs `evaluation` on the state after `step`: writer, progress line, best state."""
  accuracy = {g: float(a) for g, a in evaluation.fn(state).items()}
  mean = float(np.mean(list(accuracy.values())))
  writer.write_scalars(step, {f"{evaluation.label}/{g}": a for g, a in accuracy.items()}
                       | {f"{evaluation.label}/mean": mean})
  groups = "  ".join(f"{g} {100 * a:.2f}%" for g, a in accuracy.items())
  print(f"[{settings.name}] step {step} {evaluation.label} accuracy: {groups}  "
        f"(mean {100 * mean:.2f}%)", flush=True)
  if best is not None:
    best.consider(step, -mean, lambda: state,
                  {"epoch": step / settings.steps_per_epoch, "mean_accuracy": mean,
                   "accuracy": accuracy})


def steps_for(num_examples: int, global_batch: int, epochs: float) -> tuple[int, int]:
  """(steps_per_epoch, total_steps) for `epochs` passes over `num_examples`, dropping the tail."""
  steps_per_epoch = num_examples // global_batch
  if steps_per_epoch == 0:
    raise UserError(f"the training set has {num_examples} examples, fewer than one global "
                    f"batch of {global_batch}; lower train.batch_size")
  return steps_per_epoch, max(1, math.ceil(epochs * steps_per_epoch))

"""The per-step history saved in every checkpoint, and the best state a selecting run keeps.

A history record is {"step": t, "metrics": {"loss": [t floats], "accuracy": [...]},
"devices", "processes"}: value k - 1 of a metric is step k's.
"""

import math
import os

from mstkd_jax import files
from mstkd_jax.errors import UserError
from mstkd_jax.train.checkpoints import Checkpoints

# The per-step metrics kept with every checkpoint (convergence.summarize reads them).
HISTORY_METRICS = ("loss", "accuracy")


def _damaged(source: str, what: str) -> UserError:
  return UserError(f'{source}: the loss history{what}; expected {{"step": t, "metrics": '
                   '{"loss": [one finite value per step], ...}}; delete that checkpoint step '
                   "to resume from an earlier one, or the stage folder to train it again")


def read(record: dict | None, step: int | None, source: str) -> tuple[dict, dict]:
  """(metrics of steps 1..step, {"devices", "processes"} of the run that saved them) out of
  a history record ({}, {} where there is none); `step` None: the record's own "step".

  Raises:
    UserError: naming `source`: the record is not a history, a metric holds fewer values
      than `step`, or NaN or Inf (the loop saves finite losses only).
  """
  if record is None:
    return {}, {}
  if not isinstance(record, dict):
    raise _damaged(source, f" is a JSON {type(record).__name__}")
  metrics = record.get("metrics")
  if step is None and isinstance(record.get("step"), int):
    step = record["step"]
  if not isinstance(metrics, dict):
    raise _damaged(source, f' holds "metrics" of type {type(metrics).__name__}')
  history = {}
  for name, values in metrics.items():
    if not isinstance(values, list) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
      raise _damaged(source, f"'s {name!r} is not a list of numbers")
    values = [float(x) for x in values[:step]]
    if step is not None and len(values) < step:
      raise _damaged(source, f" holds {len(values)} {name!r} values for {step} steps")
    bad = next((k for k, x in enumerate(values) if not math.isfinite(x)), None)
    if bad is not None:
      raise _damaged(source, f"'s {name!r} of step {bad + 1} is {values[bad]}")
    history[name] = values
  layout = {k: record[k] for k in ("devices", "processes") if k in record}
  return history, layout


def load_history(workdir: str) -> dict:
  """The per-step metrics of `workdir`'s newest checkpoint ({} when it trained nothing);
  UserError where the history is damaged (`read`)."""
  directory = os.path.join(workdir, "checkpoints")
  record, source = None, directory
  if files.isdir(directory):
    checkpoints = Checkpoints(directory)
    try:
      step = checkpoints.latest_step()
      if step is not None:
        record, source = checkpoints.history(step), os.path.join(directory, str(step))
    finally:
      checkpoints.close()
  return read(record, None, source)[0]


def best_variables(state) -> dict:
  """What a selecting run keeps of a state: params (and batch_stats if any)."""
  return {"params": state.params} | (
      {"batch_stats": state.batch_stats} if state.batch_stats else {})


def load_best(workdir: str, template) -> tuple[dict, dict]:
  """(`best_variables` of the best state, its record {"step", "score" (lower is better),
  "epoch", and "mean_loss" or "mean_accuracy" and "accuracy"}), in `template`'s shapes.

  Raises:
    UserError: no best state was recorded, or it cannot be read.
  """
  directory = os.path.join(workdir, "checkpoints")
  if files.isdir(directory):
    checkpoints = Checkpoints(directory)
    try:
      best = checkpoints.best()
      if best is not None:
        step, info = best
        return checkpoints.restore_variables(step, template), info
    finally:
      checkpoints.close()
  raise UserError(f"no best state recorded in {directory}; rerun its stage")


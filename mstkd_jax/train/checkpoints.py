"""Orbax checkpoints of the full training state, with the loss history and the best state.

A step folder holds the TrainState in the item "default", the per-step history in the JSON
item "history" and Orbax's "metrics"; `step` is also the data position. One
CheckpointManager keeps the newest `keep` steps and the best candidate (BestN over the
metric "score", lower is better). Damaged steps are skipped with a warning.

The states are host (numpy) arrays, so a checkpoint restores onto any number of devices or
processes. In a multi-host run every process saves and restores (Orbax synchronizes them;
process 0 writes the arrays), so the workdir must be a folder every host sees.
"""

import math
import os
import sys
import threading
from typing import Mapping

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from mstkd_jax import errors, files, paths
from mstkd_jax.errors import UserError
from mstkd_jax.train import parallel as parallel_lib
from mstkd_jax.train.step_folders import (STATE, DamagedCheckpoint, ERROR_CHARS, damage,
                                          quiet_closed_loop_callbacks, restore_partial,
                                          save_error)
from mstkd_jax.train.tree_checks import check_finite, flat_shapes, shape_mismatches

HISTORY = "history"         # the item of the per-step history (JSON)
# How long a failing run waits for its pending background saves before leaving them behind.
PENDING_SAVE_TIMEOUT_S = 20.0


def warn(message: str) -> None:
  """One warning line on stderr (process 0 only)."""
  if jax.process_index() == 0:
    errors.warn(message, file=sys.stderr)


def _rank(metrics) -> float:
  """Orbax's best_fn (best_mode "max"): candidates by -score; other steps never best."""
  if isinstance(metrics, Mapping) and isinstance(metrics.get("score"), (int, float)):
    return -float(metrics["score"])
  return -math.inf


def _abstract(template):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                      template)


class Checkpoints:
  """Saves and restores TrainStates under `directory` (one Orbax CheckpointManager)."""

  def __init__(self, directory: str, keep: int = 3):
    """`directory`: a local folder or a URL (gs://bucket/run/checkpoints); UserError naming
    it where it cannot be made or listed (an OS error, or a URL's storage error)."""
    self.directory = paths.resolve(directory, "the checkpoint folder")
    policies = ocp.checkpoint_managers
    preservation = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=_rank, n=1, keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(
        create=True, best_fn=_rank, best_mode="max", preservation_policy=preservation)
    try:
      self.manager = ocp.CheckpointManager(
          epath.Path(self.directory), options=options,
          item_handlers={STATE: ocp.StandardCheckpointHandler(),
                         HISTORY: ocp.JsonCheckpointHandler()})
    except OSError as e:
      raise UserError(f"cannot open the checkpoint folder {self.directory} "
                      f"({files.os_error_reason(e)})") from e
    except Exception as e:  # pylint: disable=broad-except; a URL's storage library errors
      if not paths.is_url(self.directory):
        raise
      raise files.url_error(self.directory, e, "open") from e
    self._warned = set()
    self._pending = None  # the step of the save in flight, if any
    self._stuck = None    # why `settle` gave up on a save (it then waits no more)
    self._failure = None  # the UserError of the last failed save `settle` saw
    # Orbax logs a failed background save with a traceback per thread; `wait` reports it
    # in one line.
    errors.drop_logged_tracebacks("orbax")

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    """The newest complete step, or None; warns once of each newer damaged step."""
    damaged, latest = [], None
    for step in reversed(self.manager.all_steps()):
      reason = damage(self._step_dir(step))
      if reason is None:
        latest = step
        break
      damaged.append((step, reason))
    using = "no complete step" if latest is None else f"using step {latest}"
    for step, reason in damaged:
      if step not in self._warned:
        self._warned.add(step)
        warn(f"skipping the damaged checkpoint {self._step_dir(step)} ({reason}); {using}")
    return latest

  def save(self, step: int, state, *, history: dict | None = None,
           candidate: dict | None = None) -> None:
    """Saves `state` (and `history`, JSON) as `step`, asynchronously. `candidate`
    ({"score": lower is better, ...}) makes it a best-state candidate (`best()`)."""
    self.wait()  # as Orbax would inside save, but a failure names the step it belongs to
    items = {STATE: ocp.args.StandardSave(state)}
    if history is not None:
      items[HISTORY] = ocp.args.JsonSave(history)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items),
                        metrics={"step": int(step), **(candidate or {})})
    except Exception as e:  # pylint: disable=broad-except
      raise save_error(self._step_dir(step), e) from e
    self._pending = step

  def wait(self) -> None:
    """Waits for the asynchronous save; UserError naming its step folder if it failed."""
    pending, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      where = self.directory if pending is None else self._step_dir(pending)
      raise save_error(where, e) from e

  def close(self) -> None:
    self.manager.close()

  def settle(self) -> str | None:
    """Waits at most PENDING_SAVE_TIMEOUT_S for the pending save; returns None where it
    finished, else why not in one line (its failure, or that it was left behind, its step
    uncommitted: later calls then return at once). Never raises."""
    if self._stuck is not None:
      return self._stuck
    outcome = {}

    def finish():
      try:
        self.wait()
      except UserError as e:
        outcome["error"] = e
      except Exception as e:  # pylint: disable=broad-except
        outcome["error"] = UserError(files.error_line(e, ERROR_CHARS))
    thread = threading.Thread(target=finish, name="settle-checkpoints", daemon=True)
    thread.start()
    thread.join(PENDING_SAVE_TIMEOUT_S)
    if thread.is_alive():
      self._stuck = (f"a checkpoint save in {self.directory} did not finish within "
                     f"{PENDING_SAVE_TIMEOUT_S:g} s and was left behind (a later run skips its "
                     "uncommitted step)")
      return self._stuck
    self._failure = outcome.get("error")
    return None if self._failure is None else str(self._failure)

  def abandon(self, error: BaseException | None = None) -> None:
    """Ends pending saves when the run is failing anyway with `error`: `settle`, then close.
    Never raises, so the run's own error is the one reported; a failed or stuck save is a
    warning line (unless its failure is `error` again), a stuck step stays uncommitted."""
    stuck = self._stuck is not None
    why = self.settle()
    if why is None:
      try:
        self.close()
      except Exception as e:  # pylint: disable=broad-except
        warn(files.error_line(e, ERROR_CHARS))
      return
    failure = self._failure
    if not stuck and not (error is not None and failure is not None and (
        failure.__cause__ is error.__cause__ or str(failure) == str(error))):
      warn(why)

  def best(self) -> tuple[int, dict] | None:
    """(step, record) of the best candidate saved ({"step", "score", ...}), or None."""
    step = self.manager.best_step()
    if step is None or _rank(record := self.manager.metrics(step)) == -math.inf:
      return None
    return step, dict(record)

  def stored_tree(self, step: int):
    """The stored TrainState tree of `step` as Orbax metadata (shapes and dtypes)."""
    try:
      return self.manager.item_metadata(step)[STATE].tree
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpoint(self._step_dir(step), "cannot read the checkpoint", e) from e

  def restore_tree(self, step: int, template):
    """Restores `step` into `template`'s structure without `restore`'s shape check;
    DamagedCheckpoint where it cannot be read, UserError where it holds NaN or Inf."""
    return check_finite(self._restore_item(
        step, STATE, ocp.args.StandardRestore(_abstract(template)),
        "cannot restore the checkpoint"), self._step_dir(step))

  def restore(self, step: int, template):
    """`restore_tree` after checking the shapes of params and batch_stats (TrainState
    attributes, or keys) against `template`'s: UserError naming the differences."""
    stored = self.stored_tree(step)
    problems = []
    for part in ("params", "batch_stats"):
      expected = (template.get(part) if isinstance(template, Mapping)
                  else getattr(template, part, None))
      problems += shape_mismatches(flat_shapes(expected or {}, f"{part}/"),
                                   flat_shapes(stored.get(part) or {}, f"{part}/"))
    if problems:
      raise UserError(
          f"the checkpoint {self._step_dir(step)} was written for another model than this "
          "config builds:\n  " + "\n  ".join(problems)
          + "\nUse another --workdir, or delete that checkpoint directory to start over.")
    return self.restore_tree(step, template)

  def history(self, step: int) -> dict | None:
    """The history item of `step`, or None; DamagedCheckpoint where it is unreadable."""
    if not files.isdir(os.path.join(self._step_dir(step), HISTORY)):
      return None
    return self._restore_item(step, HISTORY, ocp.args.JsonRestore(),
                              "cannot read the checkpoint's history")

  def _restore_item(self, step: int, item: str, args, what: str):
    """Restores one item of `step`; DamagedCheckpoint ("<step folder>: <what> (...)")."""
    quiet_closed_loop_callbacks()
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpoint(self._step_dir(step), what, e) from e

  def restore_latest(self, template, *, set_aside: bool = False):
    """(step, state, history) of the newest step that restores, or (None, template, None).

    Newer damaged steps are skipped with a warning; with `set_aside` (the training loop,
    which writes those steps again) they are renamed <step>.damaged. UserError where every
    step is damaged, or as `restore` raises it.
    """
    damaged = []
    for step in reversed(self.manager.all_steps()):
      reason = damage(self._step_dir(step))
      if reason is None:
        try:
          state = self.restore(step, template)
          history = self.history(step)
        except DamagedCheckpoint as e:
          reason = e.reason
        else:
          moved = self._set_aside([s for s, _ in damaged]) if set_aside else {}
          for bad, why in damaged:
            self._warned.add(bad)
            warn(f"skipping the damaged checkpoint {self._step_dir(bad)} ({why}); using "
                 f"step {step}" + (f"; {moved[bad]}" if bad in moved else ""))
          return step, state, history
      damaged.append((step, reason))
    if damaged:
      names = ", ".join(f"{s} ({r})" for s, r in damaged)
      raise UserError(f"{self.directory}: holds no complete checkpoint (damaged steps: "
                      f"{names}); delete that folder to start over")
    return None, template, None

  def _set_aside(self, steps: list[int]) -> dict[int, str]:
    """Renames damaged step folders to <step>.damaged (process 0) so they can be written
    again; returns {step: what was done}. In a URL folder they are removed instead (an
    object store would copy every object to rename a folder)."""
    if not steps:
      return {}
    # Every process has looked at the (shared) steps before process 0 moves any.
    parallel_lib.sync_hosts(f"damaged checkpoints found in {self.directory}")
    moved = {}
    for step in steps:
      if paths.is_url(self.directory):
        moved[step] = "removed it"
        if jax.process_index() == 0:
          files.rmtree(self._step_dir(step))
        continue
      target, n = f"{self._step_dir(step)}.damaged", 1
      while os.path.exists(target):
        n += 1
        target = f"{self._step_dir(step)}.damaged{n}"
      moved[step] = f"moved it to {target}"
      if jax.process_index() == 0:
        os.rename(self._step_dir(step), target)
    parallel_lib.sync_hosts(f"checkpoints set aside in {self.directory}")
    self.manager.reload()
    return moved

  def restore_variables(self, step: int, template: dict) -> dict:
    """Restores `template`'s entries ({"params", "batch_stats"}, nested dicts) out of the
    TrainState of `step`, leaving the optimiser state unread; DamagedCheckpoint where it
    cannot be read or holds other shapes, UserError where it holds NaN or Inf."""
    path = self._step_dir(step)
    return check_finite(restore_partial(os.path.join(path, STATE), _abstract(template), path),
                        path)

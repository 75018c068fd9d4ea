"""Orbax checkpoints of the full training state, with the loss history and the best state.

A step folder holds the TrainState (params, batch_stats, opt_state, step) in the item
"default" (the folder Orbax gives a single item, so a model/ folder and a checkpoint
written before the other items read alike) and, as the loop saves them, the per-step
history in the JSON item "history" and Orbax's "metrics" item. `step` is also the data
position, so restoring it resumes the input pipeline exactly.

One CheckpointManager keeps what a run needs: the newest `keep` steps (resume) and the one
best candidate (Orbax's BestN preservation over the metric "score", lower is better; the
loop saves a candidate only when it beats every earlier one). Damaged steps (no commit
marker, an unreadable item, missing array data) are skipped with a warning; restored
states are checked for NaN and Inf.

The states are host (numpy) arrays, the same on every device, so a checkpoint restores
onto any number of devices or processes. In a multi-host run every process creates the
manager, saves and restores (Orbax synchronizes them; process 0 writes the arrays, every
process reads them), so the workdir must be a folder every host sees.
"""

import math
import os
import sys
import threading
from typing import Any, Mapping

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mstkd_jax import files, paths
from mstkd_jax import errors
from mstkd_jax.errors import UserError
from mstkd_jax.train import parallel as parallel_lib

STATE = "default"           # the item folder of the TrainState (Orbax's single-item name)
HISTORY = "history"         # the item folder of the per-step history (JSON)
COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last, into a finished step
ITEM_METADATA = "_METADATA"           # Orbax writes it into every finished PyTree item
_STEP_METADATA = "_CHECKPOINT_METADATA"
# Orbax's and tensorstore's messages run to kilobytes: the first line, cut to this length.
ERROR_CHARS = 200
# How long a failing run waits for its pending background saves before leaving them behind.
PENDING_SAVE_TIMEOUT_S = 20.0


class DamagedCheckpoint(UserError):
  """A step folder that cannot be read: interrupted copy or save, missing files."""

  def __init__(self, path: str, what: str, error: BaseException):
    self.reason = files.error_line(error, ERROR_CHARS)
    super().__init__(f"{path}: {what} ({self.reason})")


def flat_shapes(tree, prefix=""):
  """Nested dict of arrays or Orbax ArrayMetadata -> {"a/b/c": shape}."""
  out = {}
  if isinstance(tree, Mapping):
    for key, value in tree.items():
      out.update(flat_shapes(value, f"{prefix}{key}/"))
  elif tree is not None:
    out[prefix.rstrip("/")] = tuple(tree.shape)
  return out


def shape_mismatches(expected: dict, found: dict, limit: int = 8) -> list[str]:
  """Readable differences between two {path: shape} maps (missing, unexpected, mis-shaped)."""
  lines = [f"missing {k} {expected[k]}" for k in sorted(set(expected) - set(found))]
  lines += [f"unexpected {k} {found[k]}" for k in sorted(set(found) - set(expected))]
  lines += [f"{k}: checkpoint {found[k]} vs model {expected[k]}"
            for k in sorted(set(expected) & set(found)) if expected[k] != found[k]]
  if len(lines) > limit:
    lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
  return lines


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def first_non_finite(tree) -> tuple[str, str, int, int] | None:
  """(tensor path "params/backbone/conv1/kernel", "NaN" or "Inf", how many values, of how
  many) of the first floating-point leaf of `tree` (numpy or JAX arrays) holding NaN or
  Inf, in pytree order; None where every value is finite."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.asarray(leaf)
    if not jnp.issubdtype(array.dtype, jnp.inexact):
      continue
    finite = np.isfinite(array)
    if not finite.all():
      bad = array[~finite]
      kind = "NaN" if np.isnan(bad).any() else "Inf"
      return "/".join(_key_name(k) for k in path), kind, int(bad.size), int(array.size)
  return None


def check_finite(tree, source: str) -> None:
  """Refuses a restored tree holding NaN or Inf (a diverged run), naming the first tensor.

  Args:
    tree: the restored pytree (numpy or JAX arrays; integer leaves are skipped).
    source: the checkpoint folder, for the message.

  Raises:
    UserError: "<source>: the checkpoint holds NaN in params/backbone/conv1/kernel ...".
  """
  found = first_non_finite(tree)
  if found is not None:
    name, kind, bad, size = found
    raise UserError(
        f"{source}: the checkpoint holds {kind} in {name} ({bad} of {size} "
        "values; a diverged run?); use an earlier step or retrain with a lower LR")


def _save_error(path: str, error: BaseException) -> UserError:
  """One line for a failed save: the OS error (ENOSPC, EACCES, EROFS, ...) where one is in
  the exception's chain, else the first line of Orbax's or tensorstore's message."""
  cause = error
  while cause is not None and not isinstance(cause, OSError):
    cause = cause.__cause__ or cause.__context__
  reason = (files.os_error_reason(cause) if isinstance(cause, OSError) and cause.errno
            else files.error_line(error, ERROR_CHARS))
  return UserError(f"cannot write the checkpoint {path} ({reason})")


def quiet_closed_loop_callbacks() -> None:
  """Drops Python's "Exception ignored ... RuntimeError: Event loop is closed" reports.

  When an Orbax read fails (a damaged step), tensorstore still completes the reads in
  flight and calls back into the asyncio loop Orbax has already closed; Python prints each
  such callback as an unraisable exception with a traceback (0-10 of them), after the
  failure was caught and reported in one line. This wraps sys.unraisablehook (once per
  process, before the first read) to drop exactly those; every other report goes through.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    previous(unraisable)
  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


def _commit_timestamp(step_dir: str) -> bool:
  try:
    record = files.read_json(os.path.join(step_dir, _STEP_METADATA), missing=None)
    return bool(record.get("commit_timestamp_nsecs"))
  except (UserError, AttributeError):
    return False


def damage(step_dir: str, item: str = STATE) -> str | None:
  """Why `step_dir` is not a complete Orbax step (None where it looks complete).

  Complete: `item` holds its _METADATA, and the step is committed: it holds Orbax's commit
  marker, or (Orbax versions that left none on local disks: no marker in any item either)
  its _CHECKPOINT_METADATA records a commit time. Missing array files show only when the
  arrays are read (`Checkpoints.restore_latest` tries the step).
  """
  if not files.isfile(os.path.join(step_dir, item, ITEM_METADATA)):
    return f"no {item}/{ITEM_METADATA}"
  if files.isfile(os.path.join(step_dir, COMMIT_MARKER)):
    return None
  try:
    names = files.listdir(step_dir)
  except OSError as e:
    return f"unreadable folder: {e.strerror or e}"
  except UserError as e:
    return f"unreadable folder: {e}"
  items_marked = any(files.isfile(os.path.join(step_dir, name, COMMIT_MARKER))
                     for name in names)
  if items_marked or not _commit_timestamp(step_dir):
    return f"no commit marker {COMMIT_MARKER}"
  return None


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
    """Keeps the newest `keep` steps and the best candidate (see the module docstring).
    `directory` is a local folder or a URL (gs://bucket/run/checkpoints; Orbax reads and
    writes it through etils.epath and tensorstore).

    Raises:
      UserError: the folder cannot be made or listed (an OS error, or a URL's storage
        error such as missing credentials), naming it.
    """
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
    # Orbax logs a failed background save with a traceback per thread; `wait` (or the
    # next save) reports the same exception in one line.
    errors.drop_logged_tracebacks("orbax")

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    """The newest complete step (None where there is none); newer damaged steps are
    skipped with one warning line each (once per step and instance)."""
    damaged = []
    latest = None
    for step in reversed(self.manager.all_steps()):
      reason = damage(self._step_dir(step))
      if reason is None:
        latest = step
        break
      damaged.append((step, reason))
    for step, reason in damaged:
      if step not in self._warned:
        self._warned.add(step)
        warn(f"skipping the damaged checkpoint {self._step_dir(step)} ({reason}); "
             + (f"using step {latest}" if latest is not None else "no complete step"))
    return latest

  def save(self, step: int, state, *, history: dict | None = None,
           candidate: dict | None = None) -> None:
    """Saves `state` (and `history`, JSON) as `step`, asynchronously.

    `candidate` ({"score": lower is better, ...}) makes the step a best-state candidate: it
    is kept while no later candidate scores lower; `best()` returns it with its record.
    """
    self.wait()  # as Orbax would inside save, but a failure names the step it belongs to
    items = {STATE: ocp.args.StandardSave(state)}
    if history is not None:
      items[HISTORY] = ocp.args.JsonSave(history)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items),
                        metrics={"step": int(step), **(candidate or {})})
    except Exception as e:  # pylint: disable=broad-except
      raise _save_error(self._step_dir(step), e) from e
    self._pending = step

  def wait(self) -> None:
    """Waits for the asynchronous save; UserError naming its step folder if it failed."""
    pending, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      where = self.directory if pending is None else self._step_dir(pending)
      raise _save_error(where, e) from e

  def close(self) -> None:
    self.manager.close()

  def settle(self, timeout_s: float | None = None) -> str | None:
    """Waits at most `timeout_s` seconds (default PENDING_SAVE_TIMEOUT_S) for the pending
    save; returns None where it finished, else why not, in one line (its failure, or that
    it did not finish in time: it is then left behind, its step uncommitted, and later
    calls return at once). Never raises."""
    if self._stuck is not None:
      return self._stuck
    timeout_s = PENDING_SAVE_TIMEOUT_S if timeout_s is None else timeout_s
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
    thread.join(timeout_s)
    if thread.is_alive():
      self._stuck = (f"a checkpoint save in {self.directory} did not finish within "
                     f"{timeout_s:g} s and was left behind (a later run skips its "
                     "uncommitted step)")
      return self._stuck
    self._failure = outcome.get("error")
    return None if self._failure is None else str(self._failure)

  def abandon(self, error: BaseException | None = None, timeout_s: float | None = None
              ) -> None:
    """Ends pending saves when the run is failing anyway (`error` is its failure): waits
    for them at most `timeout_s` seconds (`settle`), then closes. Never raises, so the
    run's own error is the one reported.

    A save that fails is reported as one warning line, unless its failure is `error` seen
    again. A save that does not finish in time (a commit waiting on something that will not
    come) is left behind with a warning: its step stays uncommitted, and the next run
    skips it as damaged.
    """
    stuck = self._stuck is not None
    why = self.settle(timeout_s)
    if why is None:
      try:
        self.close()
      except Exception as e:  # pylint: disable=broad-except
        warn(files.error_line(e, ERROR_CHARS))
      return
    failure = self._failure
    seen = stuck or (error is not None and failure is not None and (
        failure.__cause__ is error.__cause__ or str(failure) == str(error)))
    if not seen:
      warn(why)

  def best(self) -> tuple[int, dict] | None:
    """(step, record) of the best candidate saved ({"step", "score", ...}), or None."""
    step = self.manager.best_step()
    if step is None:
      return None
    record = self.manager.metrics(step)
    if _rank(record) == -math.inf:
      return None
    return step, dict(record)

  def stored_tree(self, step: int):
    """The stored TrainState tree of `step` as Orbax metadata (shapes and dtypes)."""
    try:
      return self.manager.item_metadata(step)[STATE].tree
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpoint(self._step_dir(step), "cannot read the checkpoint", e) from e

  def restore_tree(self, step: int, template):
    """Restores `step` into the structure of `template` without the TrainState shape check.

    Raises:
      DamagedCheckpoint: the step cannot be read.
      UserError: it holds NaN or Inf.
    """
    path = self._step_dir(step)
    quiet_closed_loop_callbacks()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          **{STATE: ocp.args.StandardRestore(_abstract(template))}))[STATE]
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpoint(path, "cannot restore the checkpoint", e) from e
    check_finite(restored, path)
    return restored

  def restore(self, step: int, template):
    """Restores `step` into the structure of `template` (host arrays), checking the shapes
    of its params and batch_stats (attributes of a TrainState, or keys) first.

    Raises:
      DamagedCheckpoint: the step cannot be read.
      UserError: its shapes differ from `template`'s, or it holds NaN or Inf.
    """
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
    """The history item of `step` (None where the step has none).

    Raises:
      DamagedCheckpoint: the item is there but unreadable.
    """
    if not files.isdir(os.path.join(self._step_dir(step), HISTORY)):
      return None
    quiet_closed_loop_callbacks()
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          **{HISTORY: ocp.args.JsonRestore()}))[HISTORY]
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpoint(self._step_dir(step), "cannot read the checkpoint's history",
                              e) from e

  def restore_latest(self, template, *, set_aside: bool = False):
    """(step, state, history) of the newest step that restores, or (None, template, None).

    Damaged newer steps are skipped with one warning line each; with `set_aside` (the
    training loop, which will write those steps again) they are renamed <step>.damaged.

    Raises:
      UserError: every step is damaged (one line naming them), a step of another model,
        or NaN/Inf in the newest readable step.
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
    """Renames damaged step folders to <step>.damaged (process 0), so the run can write
    those steps again (Orbax then lists the others only); returns {step: new folder}. In a
    URL folder (an object store cannot rename a folder: it would copy every object) they
    are removed instead: {step: "removed it"}."""
    if not steps:
      return {}
    # Every process has looked at the steps (the same ones: the folder is shared) before
    # process 0 moves any.
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
    """Restores the entries of `template` ({"params", "batch_stats"}, as nested dicts) out
    of the TrainState of `step` (Orbax partial restore: the optimiser state is not read).

    Raises:
      DamagedCheckpoint: the step cannot be read or does not hold `template`'s shapes.
      UserError: it holds NaN or Inf.
    """
    path = self._step_dir(step)
    restored = restore_partial(os.path.join(path, STATE), _abstract(template), path)
    check_finite(restored, path)
    return restored


def restore_partial(item_dir: str, abstract: Any, source: str):
  """Restores the subtrees `abstract` names (jax.ShapeDtypeStruct leaves) out of the PyTree
  item `item_dir`, as numpy arrays, leaving the rest of it unread.

  Raises:
    DamagedCheckpoint: the item cannot be read, lacks a subtree or holds other shapes.
  """
  quiet_closed_loop_callbacks()
  handler = ocp.PyTreeCheckpointHandler()
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
  try:
    restored = handler.restore(epath.Path(item_dir), args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise DamagedCheckpoint(source, "cannot restore from the Orbax checkpoint", e) from e
  finally:
    handler.close()
  return jax.tree.map(np.asarray, restored)

"""An Orbax step folder on disk: whether it is complete (`damage`), one item of it read
without a CheckpointManager (`restore_partial`), and Orbax's failures in one line."""

import os
import sys
from typing import Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from mstkd_jax import files
from mstkd_jax.errors import UserError

# The TrainState's item: Orbax's single-item name, so a model/ folder saved as one item
# reads like a training checkpoint's state.
STATE = "default"
COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last, into a finished step
ITEM_METADATA = "_METADATA"           # Orbax writes it into every finished PyTree item
_STEP_METADATA = "_CHECKPOINT_METADATA"
# Orbax's and tensorstore's messages run to kilobytes: the first line, cut to this length.
ERROR_CHARS = 200


class DamagedCheckpoint(UserError):
  """A step folder that cannot be read (interrupted copy or save, missing files)."""

  def __init__(self, path: str, what: str, error: BaseException):
    self.reason = files.error_line(error, ERROR_CHARS)
    super().__init__(f"{path}: {what} ({self.reason})")


def save_error(path: str, error: BaseException) -> UserError:
  """One line for a failed save: the OS error (ENOSPC, EACCES, ...) in the exception's
  chain, else the first line of Orbax's or tensorstore's message."""
  cause = error
  while cause is not None and not isinstance(cause, OSError):
    cause = cause.__cause__ or cause.__context__
  reason = (files.os_error_reason(cause) if isinstance(cause, OSError) and cause.errno
            else files.error_line(error, ERROR_CHARS))
  return UserError(f"cannot write the checkpoint {path} ({reason})")


def quiet_closed_loop_callbacks() -> None:
  """Drops Python's "Exception ignored ... Event loop is closed" reports (once per process):
  after a failed Orbax read, tensorstore's reads in flight call back into the asyncio loop
  Orbax has closed, and Python would print a traceback for each."""
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

  Complete: `item` holds its _METADATA, and the step holds Orbax's commit marker or (Orbax
  versions that left none on local disks, in no item either) its _CHECKPOINT_METADATA
  records a commit time. Missing array files show only when the arrays are read."""
  if not files.isfile(os.path.join(step_dir, item, ITEM_METADATA)):
    return f"no {item}/{ITEM_METADATA}"
  if files.isfile(os.path.join(step_dir, COMMIT_MARKER)):
    return None
  try:
    names = files.listdir(step_dir)
  except (OSError, UserError) as e:
    return f"unreadable folder: {getattr(e, 'strerror', None) or e}"
  items_marked = any(files.isfile(os.path.join(step_dir, name, COMMIT_MARKER))
                     for name in names)
  if items_marked or not _commit_timestamp(step_dir):
    return f"no commit marker {COMMIT_MARKER}"
  return None


def restore_partial(item_dir: str, abstract: Any, source: str):
  """Restores the subtrees `abstract` names (jax.ShapeDtypeStruct leaves) out of the PyTree
  item `item_dir` as numpy arrays, leaving the rest unread; DamagedCheckpoint naming
  `source` where it cannot be read, lacks a subtree or holds other shapes."""
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

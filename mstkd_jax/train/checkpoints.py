"""Orbax checkpoints of the full training state, with a shape check before restoring.

A checkpoint holds the TrainState (params, batch_stats, opt_state, step); `step` is also
the data position, so restoring it resumes the input pipeline exactly.

The states are host (numpy) arrays, the same on every device, so a checkpoint restores
onto any number of devices or processes. In a multi-host run every process creates the
manager, saves and restores (Orbax synchronizes them; process 0 writes the arrays, every
process reads them), so the workdir must be a folder every host sees.
"""

import os
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from mstkd_jax.errors import UserError


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


class Checkpoints:
  """Saves and restores TrainStates under `directory` (an Orbax CheckpointManager)."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def restore_tree(self, step: int, template):
    """Restores `step` into the structure of `template` without the TrainState shape check."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                            template)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"cannot restore the checkpoint {self.directory}/{step}: {e}") from e

  def restore(self, step: int, template):
    """Restores `step` into the structure of `template` (host arrays), checking shapes first."""
    path = os.path.join(self.directory, str(step))
    try:
      stored = self.manager.item_metadata(step).tree
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"cannot read the checkpoint {path}: {e}") from e
    problems = []
    for part in ("params", "batch_stats"):
      problems += shape_mismatches(flat_shapes(getattr(template, part), f"{part}/"),
                                   flat_shapes(stored.get(part) or {}, f"{part}/"))
    if problems:
      raise UserError(
          f"the checkpoint {path} was written for another model than this config builds:\n  "
          + "\n  ".join(problems)
          + "\nUse another --workdir, or delete that checkpoint directory to start over.")
    return self.restore_tree(step, template)

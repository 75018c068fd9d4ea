"""A toy training run with an injected fault in its asynchronous checkpoint saves, ended
as `mstkd_jax.main` ends a failed run (used by tests/test_checkpoints.py in a subprocess).

  python tests/async_save_fault.py fails WORKDIR  # the 2nd save's commit raises ENOSPC
  python tests/async_save_fault.py hangs WORKDIR  # the 1st save never commits; the run
                                                  # then fails in the main thread

Prints "error: ..." as main does and exits through main.exit_promptly, with the pending-
save wait and the shutdown grace cut to 2 s each.
"""

import errno
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mstkd_jax import main  # pylint: disable=g-import-not-at-top,wrong-import-position
from mstkd_jax.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position
from mstkd_jax.train import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    checkpoints, loop, parallel, state as state_lib)

MODE, WORKDIR = sys.argv[1], sys.argv[2]
checkpoints.PENDING_SAVE_TIMEOUT_S = 2.0
main.EXIT_GRACE_S = 2.0
_saves = []
_original_save = ocp.StandardCheckpointHandler.async_save


class _Commit:
  """A commit future of the faulty save: raises ENOSPC, or never completes."""

  def result(self, timeout=None):
    del timeout
    if MODE == "hangs":
      time.sleep(3600)
    time.sleep(0.2)
    raise OSError(errno.ENOSPC, "No space left on device")


async def _async_save(self, *args, **kwargs):
  futures = list(await _original_save(self, *args, **kwargs) or [])
  _saves.append(1)
  return futures + [_Commit()] if len(_saves) == (1 if MODE == "hangs" else 2) else futures


ocp.StandardCheckpointHandler.async_save = _async_save
_original_record = loop._history_record  # pylint: disable=protected-access


def _record(*args, **kwargs):
  if MODE == "hangs" and _saves:
    raise UserError("injected failure in the main thread")
  return _original_record(*args, **kwargs)


loop._history_record = _record  # pylint: disable=protected-access


def _step(state, batch, rng):
  del rng
  w = state.params["w"] + jnp.mean(batch["x"])
  return state.replace(step=state.step + 1, params={"w": w}), {"loss": jnp.float32(1.0)}


def _batches(start):
  for step in range(start, 1000):
    time.sleep(0.05)  # the saves run in the background while the loop goes on
    yield {"x": np.full((1, 2), float(step), np.float32)}


try:
  loop.train(workdir=WORKDIR, settings=loop.LoopSettings(
      name="toy", total_steps=40, steps_per_epoch=5, images_per_step=2, log_every=100,
      checkpoint_every=2),
             init_state=state_lib.TrainState(
                 step=np.zeros((), np.int32), params={"w": np.zeros(3, np.float32)},
                 batch_stats={}, opt_state=optax.EmptyState()),
             step_fn=_step, batches=_batches, parallel=parallel.get("pmap", 1),
             rng=np.zeros(2, np.uint32))
except UserError as e:
  print(f"error: {e}", file=sys.stderr)
  print(f"failed at {time.time():.3f}", flush=True)
  main.exit_promptly(1)
print("finished without the fault", flush=True)

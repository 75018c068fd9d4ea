"""Stopping a run on SIGTERM or SIGINT without losing its work.

Preemption (Cloud TPU/GCE, SLURM, Kubernetes) sends SIGTERM, then SIGKILL after a grace
period (30 s by default on GCE and Kubernetes); Ctrl-C sends SIGINT. Under `handled()`, a
signal while a training loop holds unsaved steps (`unsaved(True)`) is only noted: the loop
saves the step it is in and raises `Interrupted` (`stop_requested`). Anywhere else, and on
a second signal, `Interrupted` is raised at once.

The entry point ends the process with `Interrupted.code` through `exit_now`, which skips
interpreter shutdown: XLA keeps compiling on its own threads after a signal interrupts the
wait for it, and tearing the runtime down under that compilation crashes (SIGSEGV).

Several processes (jax.distributed): JAX's preemption notifier takes SIGTERM (SIGINT is
passed on to it as SIGTERM) and `stop_requested` is JAX's sync point, true at the same step
on every process. Outside a training loop such a run does not stop on SIGTERM (JAX holds
it) until the scheduler kills it.
"""

import contextlib
import os
import signal
import sys

_state = {
    "signal": None,      # the first signal received (its number), None before any
    "unsaved": False,    # a training loop holds steps no checkpoint holds
    "handled": False,    # `handled()` is in force
    "checks": 0,         # calls of `stop_requested` (the multi-host sync point's step id)
}


class Interrupted(KeyboardInterrupt):
  """The run was stopped by a signal (a KeyboardInterrupt: `except Exception` misses it).

  Attributes:
    signum: the signal's number.
    code: the exit status, 128 + signum as a shell reports it (143 SIGTERM, 130 SIGINT).
    located: whether the message already says where the run stopped.
  """

  def __init__(self, signum: int, message: str = "", located: bool = False):
    super().__init__(message or f"stopped by {signal_name(signum)}; rerun the same command "
                     "to resume (a training stage goes on from its newest checkpoint, any "
                     "other stage starts again)")
    self.signum = signum
    self.code = 128 + signum
    self.located = located


def signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


def _handler(signum, frame) -> None:
  del frame
  if _state["signal"] is None:
    _state["signal"] = signum
    if _state["unsaved"]:
      if signum == signal.SIGINT and _distributed_preemption():
        # Every process must stop at the same step: JAX's notifier tells them all.
        signal.raise_signal(signal.SIGTERM)
      return
  raise Interrupted(signum)


@contextlib.contextmanager
def handled():
  """Handles SIGTERM and SIGINT in the block (main thread only)."""
  previous = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
  _state.update(signal=None, unsaved=False, handled=True)
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _state.update(signal=None, handled=False, unsaved=False)


def unsaved(value: bool) -> None:
  """Whether the training loop holds steps no checkpoint holds (a signal then waits)."""
  _state["unsaved"] = bool(value)


def received() -> int | None:
  """The number of the first signal received under `handled()`, or None."""
  return _state["signal"]


def _distributed_preemption() -> bool:
  """Whether JAX runs several processes with its preemption sync manager (which holds
  SIGTERM unless jax_enable_preemption_service is off)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None
  except (ImportError, AttributeError):  # another JAX layout: the public sync point only
    import jax  # pylint: disable=g-import-not-at-top
    return jax.distributed.is_initialized()


def stop_requested() -> int | None:
  """The signal to stop on after the current step, or None. Call it at every step of every
  process: in a multi-process run it is JAX's preemption sync point."""
  _state["checks"] += 1
  if _distributed_preemption():
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if multihost_utils.reached_preemption_sync_point(_state["checks"]):
      return _state["signal"] or signal.SIGTERM
    return None
  return _state["signal"] if _state["handled"] else None


def exit_now(code: int) -> None:
  """Flushes stdout and stderr and ends the process with `code`, without interpreter
  shutdown (see above); the run's lock goes with the process."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access

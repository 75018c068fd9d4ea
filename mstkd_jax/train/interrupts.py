"""Stopping a run on SIGTERM or SIGINT without losing its work.

Cloud TPU/GCE preemption, SLURM (`scancel`, `--signal=TERM@<seconds>`) and Kubernetes send
SIGTERM, then SIGKILL after a grace period (30 s by default on GCE and Kubernetes, SLURM's
KillWait); Ctrl-C sends SIGINT. With `handled()` in force (the command line's entry point):

* While a training loop holds steps that no checkpoint holds yet (`unsaved(True)`), a signal
  is only noted: the loop finishes the step it is in, saves a checkpoint of it, waits a
  bounded time for its saves and raises `Interrupted` (`stop_requested`).
* Anywhere else (set-up, XLA compilation of a first step, extraction, evaluation, the
  report) `Interrupted` is raised at once: a training stage goes on from its newest
  checkpoint when the command is run again, any other stage starts again.
* A second signal raises `Interrupted` at once, wherever the run is.

The entry point prints the exception's one line and ends the process with
`Interrupted.code` (128 + the signal's number: 143 for SIGTERM, 130 for SIGINT, as a shell
reports a process a signal ended) through `exit_now`, which skips interpreter shutdown:
XLA keeps compiling on its own threads after a signal interrupts the wait for it, and
tearing down the runtime under that compilation crashes the process (SIGSEGV).

Several processes (jax.distributed): JAX's own preemption notifier takes SIGTERM on each
host and tells every process; `stop_requested` asks JAX's sync point
(`multihost_utils.reached_preemption_sync_point`), which turns true at the same step on
every process, so all of them save that step and stop. SIGINT on one host is passed on as a
SIGTERM to that notifier. Outside a training loop a multi-host run does not stop on a
SIGTERM (JAX's notifier holds it) until the scheduler kills it.
"""

import contextlib
import os
import signal
import sys

# The signals a run stops on.
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_state = {
    "signal": None,      # the first signal received (its number), None before any
    "unsaved": False,    # a training loop holds steps no checkpoint holds
    "handled": False,    # `handled()` is in force
    "checks": 0,         # calls of `stop_requested` (the multi-host sync point's step id)
}


class Interrupted(KeyboardInterrupt):
  """The run was stopped by a signal. A KeyboardInterrupt, so that `except Exception` in
  library code does not swallow it.

  Attributes:
    signum: the signal's number.
    code: the exit status the entry point ends with (128 + signum).
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
  """"SIGTERM" for signal.SIGTERM's number."""
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


def _handler(signum, frame) -> None:
  del frame
  first = _state["signal"] is None
  if first:
    _state["signal"] = signum
  if first and _state["unsaved"]:
    if signum == signal.SIGINT and _distributed_preemption():
      # Every process must stop at the same step: JAX's notifier (which holds SIGTERM in
      # a multi-process run) tells them all.
      signal.raise_signal(signal.SIGTERM)
    return
  raise Interrupted(signum)


@contextlib.contextmanager
def handled():
  """Installs the handler of SIGTERM and SIGINT for the block (main thread only), then
  restores the previous ones."""
  previous = {s: signal.signal(s, _handler) for s in SIGNALS}
  _state.update(signal=None, unsaved=False, handled=True)
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _state.update(signal=None, handled=False, unsaved=False)


def unsaved(value: bool) -> None:
  """Tells the handler whether the training loop holds steps no checkpoint holds (then a
  signal waits for the loop's `stop_requested`)."""
  _state["unsaved"] = bool(value)


def received() -> int | None:
  """The number of the first signal received under `handled()`, or None."""
  return _state["signal"]


def _distributed_preemption() -> bool:
  """Whether JAX runs several processes with its preemption sync manager (which holds
  SIGTERM: jax.distributed.initialize installs it unless jax_enable_preemption_service
  is off)."""
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
  """The signal a training loop must stop on after its current step, or None. Call it at
  every step of every process (in a multi-process run it is JAX's preemption sync point,
  which every process must reach in step: it returns SIGTERM at the same call everywhere).
  """
  _state["checks"] += 1
  if _distributed_preemption():
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if multihost_utils.reached_preemption_sync_point(_state["checks"]):
      return _state["signal"] or signal.SIGTERM
    return None
  return _state["signal"] if _state["handled"] else None


def exit_now(code: int) -> None:
  """Ends the process with `code` after flushing stdout and stderr, without interpreter
  shutdown (see the module docstring): what the run wrote is on disk, its lock goes with
  the process, its in-flight saves were waited for (a bounded time) where it stopped."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access

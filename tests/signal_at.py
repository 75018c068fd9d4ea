"""Runs the command line (`python -m mstkd_jax.main`) on a config and holds it at one point,
for a test to send it a signal there (SIGTERM as a preemption sends it, or Ctrl-C's SIGINT).

  python tests/signal_at.py WORKDIR CONFIG MODULE:ATTR before|after|during N [SUBSTRING]

MODULE:ATTR names a function or method (e.g. mstkd_jax.stages.extract:_embed_training_set).
At its N-th call whose first or second argument contains SUBSTRING (for an object: its
`directory`, its `settings.name`, or an MLIR module's name), the process prints
"paused at <MODULE:ATTR>" and waits (up to 120 s) for a signal, before or after the call.
`during`: the call itself runs and the process sends itself SIGINT 0.5 s into it (XLA
compiling, for jax._src.compiler:backend_compile_and_load). Used by
tests/test_interrupts.py.
"""

import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from mstkd_jax import main
from mstkd_jax.train import interrupts
import fault_points

WORKDIR, CONFIG, TARGET, WHEN, N = sys.argv[1:6]
N = int(N)
SUBSTRING = sys.argv[6] if len(sys.argv) > 6 else ""
calls = []


def _label(arg) -> str:
  """What SUBSTRING is looked for in: a checkpoint manager's folder, a loop reporter's
  stage name, an MLIR module's name (XLA compilation), or the argument itself."""
  settings = getattr(arg, "settings", None)
  operation = getattr(arg, "operation", None)
  if operation is not None and "sym_name" in operation.attributes:
    return str(operation.attributes["sym_name"])
  return str(getattr(arg, "directory", None) or getattr(settings, "name", None) or arg)


def _pause():
  print(f"paused at {TARGET}", flush=True)
  deadline = time.monotonic() + 120
  # The signal's handler raises here, or (in a training step) only notes the signal.
  while interrupts.received() is None and time.monotonic() < deadline:
    time.sleep(0.01)


def patched(original, *args, **kwargs):
  hit = any(SUBSTRING in _label(arg) for arg in args[:2]) or not (args or SUBSTRING)
  if hit:
    calls.append(1)
  hit = hit and len(calls) == N
  if hit and WHEN == "before":
    _pause()
  if hit and WHEN == "during":
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
  result = original(*args, **kwargs)
  if hit and WHEN == "after":
    _pause()
  return result


# A function, so that a method replaced stays a method (bound to its object).
fault_points.replace(TARGET, lambda original: lambda *a, **k: patched(original, *a, **k))
sys.argv = [sys.argv[0], f"--config={CONFIG}", f"--workdir={WORKDIR}"]
app.run(main.main, flags_parser=main.parse_flags)

"""Runs the tiny recipe (configs/distill.py:tiny) in WORKDIR and kills the process (SIGKILL,
as a preemption or the OOM killer would) at one point inside a stage.

  python tests/kill_at.py WORKDIR MODULE:ATTR [before|after] N [SUBSTRING]

MODULE:ATTR names a function or method (e.g. mstkd_jax.train.checkpoints:Checkpoints.save);
the process is killed just before or just after its N-th call whose first argument (or,
for a method, its object's `directory`) contains SUBSTRING. Used by tests/test_pipeline.py.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import distill  # pylint: disable=g-import-not-at-top,wrong-import-position
from mstkd_jax import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
import fault_points  # pylint: disable=g-import-not-at-top,wrong-import-position

WORKDIR, TARGET, WHEN, N = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
SUBSTRING = sys.argv[5] if len(sys.argv) > 5 else ""
calls = []


def _kill():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def patched(original, *args, **kwargs):
  first = args[0] if args else ""
  if SUBSTRING in str(getattr(first, "directory", first)):
    calls.append(1)
    if len(calls) == N and WHEN == "before":
      _kill()
  result = original(*args, **kwargs)
  if SUBSTRING in str(getattr(first, "directory", first)) and len(calls) == N:
    _kill()  # (WHEN == "after")
  return result


# A function, so that a method replaced stays a method (bound to its object).
fault_points.replace(TARGET, lambda original: lambda *a, **k: patched(original, *a, **k))
pipeline.run(distill.get_config("tiny"), WORKDIR)
print("finished without being killed", flush=True)

"""Runs the tiny recipe (configs/distill.py:tiny) in WORKDIR and kills the process (SIGKILL,
as a preemption or the OOM killer would) at one point inside a stage.

  python tests/kill_at.py WORKDIR MODULE:ATTR [before|after] N [SUBSTRING]

MODULE:ATTR names a function or method (e.g. mstkd_jax.train.checkpoints:Checkpoints.save);
the process is killed just before or just after its N-th call whose first argument (or,
for a method, its object's `directory`) contains SUBSTRING. Used by tests/test_pipeline.py.
"""

import importlib
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import distill  # pylint: disable=g-import-not-at-top,wrong-import-position
from mstkd_jax import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position

WORKDIR, TARGET, WHEN, N = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
SUBSTRING = sys.argv[5] if len(sys.argv) > 5 else ""
module_name, _, attr_path = TARGET.partition(":")
owner = importlib.import_module(module_name)
*parents, attr = attr_path.split(".")
for parent in parents:
  owner = getattr(owner, parent)
original = getattr(owner, attr)
calls = []


def _kill():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def patched(*args, **kwargs):
  first = args[0] if args else ""
  if SUBSTRING in str(getattr(first, "directory", first)):
    calls.append(1)
    if len(calls) == N and WHEN == "before":
      _kill()
  result = original(*args, **kwargs)
  if SUBSTRING in str(getattr(first, "directory", first)) and len(calls) == N:
    _kill()  # (WHEN == "after")
  return result


setattr(owner, attr, patched)
pipeline.run(distill.get_config("tiny"), WORKDIR)
print("finished without being killed", flush=True)

"""What the fault-injection scripts (kill_at.py, signal_at.py) share: replacing the function
or method a "module:Class.attr" names."""

import importlib
from typing import Callable


def replace(target: str, make: Callable[[Callable], Callable]) -> None:
  """Replaces the function `target` ("mstkd_jax.train.checkpoints:Checkpoints.save") by
  `make(original)`."""
  module_name, _, attr_path = target.partition(":")
  owner = importlib.import_module(module_name)
  *parents, attr = attr_path.split(".")
  for parent in parents:
    owner = getattr(owner, parent)
  setattr(owner, attr, make(getattr(owner, attr)))

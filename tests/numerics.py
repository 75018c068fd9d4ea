"""Bounds for the tests that compute the same numbers two ways in float32, and a recorder
of the differences they see.

Two runs that differ only in how the work is split (1 or 8 devices, pmap or shard_map, a
replicated or class-sharded head, 1 or 2 processes, cached or online targets) add the same
terms in another order. Each float32 rounding is off by at most half an ulp, EPS32 / 2
relative; a sum of n terms in another order moves by up to about n * EPS32 of the sum of
the terms' magnitudes; training steps feed those differences back in. XLA's CPU code also
changes with the instruction set (AVX-512, AVX2, SSE4.2: other vector widths, other
association of reductions, FMA or not), so one machine's difference is not another's.

The bounds are written as multiples of EPS32 next to their reason and the differences
measured on each XLA code path; run the suite with
  MSTKD_TEST_DIFFS=diffs.jsonl XLA_FLAGS=--xla_cpu_max_isa=AVX2 python -m pytest -q tests
to append every checked difference (test, what, difference, bound) to diffs.jsonl.
"""

import json
import math
import os

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)   # 2**-23 = 1.19e-7


def reorder_bound(terms: int, steps: int = 1, logit_scale: float = 0.0,
                  margin: float = 4.0) -> float:
  """Bound on the relative difference of two float32 computations that add the same values
  in another order, over `steps` training steps.

  XLA reduces by trees: a sum of `terms` values rounds log2(terms) times on each path, each
  time by at most EPS32 relative, so one reduction of them moves by up to
  log2(terms) * EPS32. Where logits scaled by `logit_scale` (a margin head's s) go through
  exp() (softmax), an absolute rounding of logit_scale * EPS32 in a logit becomes that
  relative error of the softmax and of every gradient after it. A training step repeats
  this once per step: the bound is margin * steps * (log2(terms) + logit_scale) * EPS32,
  `margin` standing for the few reductions a step chains and for the gain of the updates.
  """
  return margin * steps * (math.log2(terms) + logit_scale) * EPS32


def tree_difference(a, b) -> float:
  """max |a - b| over the leaves of two trees of the same shape, relative to the largest |a|
  of the whole tree.

  Per-leaf scales would not do: some leaves are mathematically zero and hold only float
  noise whose value depends on the summation order (the running mean of a sum of two
  BatchNorm outputs, the gradient of a BatchNorm bias that another BatchNorm follows).
  """
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  scale = max(float(np.abs(np.asarray(x, np.float64)).max()) for x in leaves_a)
  return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
             for x, y in zip(leaves_a, leaves_b)) / scale


def difference(actual, expected) -> float:
  """max over elements of |actual - expected| / |expected| (arrays or numbers)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected) / np.abs(expected)))


def check(what: str, value: float, bound: float) -> None:
  """Asserts value <= bound, and records both where MSTKD_TEST_DIFFS names a file."""
  path = os.environ.get("MSTKD_TEST_DIFFS")
  if path:
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    with open(path, "a") as f:
      f.write(json.dumps({"test": test, "what": what, "difference": value, "bound": bound,
                          "xla_flags": os.environ.get("XLA_FLAGS", "")}) + "\n")
  assert value <= bound, f"{what}: difference {value:.3g} > bound {bound:.3g}"


def check_tree(what: str, a, b, bound: float) -> None:
  """check(what, tree_difference(a, b), bound)."""
  check(what, tree_difference(a, b), bound)

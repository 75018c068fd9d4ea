"""Checks of a pytree: its shapes against the model's, and NaN or Inf (a diverged run)."""

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

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


def first_non_finite(tree) -> tuple[str, str, int, int] | None:
  """(path "params/backbone/conv1/kernel", "NaN" or "Inf", bad values, all values) of the
  first floating-point leaf holding NaN or Inf, in pytree order; None if all are finite."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.asarray(leaf)
    if not jnp.issubdtype(array.dtype, jnp.inexact):
      continue
    finite = np.isfinite(array)
    if not finite.all():
      bad = array[~finite]
      kind = "NaN" if np.isnan(bad).any() else "Inf"
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      return name, kind, int(bad.size), int(array.size)
  return None


def check_finite(tree, source: str):
  """Returns `tree`; UserError naming `source` (the checkpoint) and its first NaN/Inf tensor."""
  found = first_non_finite(tree)
  if found is not None:
    name, kind, bad, size = found
    raise UserError(
        f"{source}: the checkpoint holds {kind} in {name} ({bad} of {size} "
        "values; a diverged run?); use an earlier step or retrain with a lower LR")
  return tree

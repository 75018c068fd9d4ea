"""One rule between our Flax backbones' variables and their PyTorch state_dicts.

Our backbones name their submodules after the PyTorch modules (models/iresnet.py,
models/mobilefacenet.py), so that a Flax path maps to a torch key by one rule, with a short
list of exceptions per backbone (a `Layout`):
  module names   "layer1_0" -> "layer1.0", "layers_3" -> "layers.3" (a trailing _<n> is a
                 torch list index), other names unchanged, unless the Layout renames them;
  leaves         kernel -> weight (conv HWIO <-> OIHW, dense [in, out] <-> [out, in]),
                 scale -> weight, alpha (PReLU) -> weight, mean -> running_mean,
                 var -> running_var, bias -> bias;
  BatchNorm      PyTorch's num_batches_tracked is written as 0 and ignored when read.
A new backbone is its model file plus a Layout (renames, the state_dict order, and any
tensor whose layout the rule does not cover).
"""

import dataclasses
import re
import types
from typing import Any, Callable, Mapping, NamedTuple

from flax import traverse_util
import flax.core
import numpy as np

from mstkd_jax.errors import UserError

_LEAVES = {"kernel": "weight", "scale": "weight", "alpha": "weight", "bias": "bias",
           "mean": "running_mean", "var": "running_var"}
_INDEXED = re.compile(r"(.+)_(\d+)")
LEAF_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

Convert = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one backbone's Flax variables map to its PyTorch state_dict.

  Attributes:
    family: the network's name in messages ("IResNet").
    renames: Flax module name -> torch module path where the _<n> rule does not apply.
    torch_order: sort key putting torch keys in the order PyTorch's state_dict has them.
    special: (flax module path, leaf, Flax shape, params, feature_hw) -> (torch shape,
      to_flax, to_torch) for a tensor whose layout the rule does not cover, else None.
    fixed_ones: params -> {torch key: shape} of tensors PyTorch holds fixed at 1 and we do
      not hold (written as ones, checked when read).
    fixed_reason: why, for the message refusing other values.
  """
  family: str
  renames: Mapping[str, str]
  torch_order: Callable[[str], Any]
  special: Callable[..., tuple[tuple[int, ...], Convert, Convert] | None] = (
      lambda *args: None)
  fixed_ones: Callable[[dict], dict[str, tuple[int, ...]]] = lambda params: {}
  fixed_reason: str = ""


class Entry(NamedTuple):
  """One tensor: where it lives in Flax, its torch name and shape, and the converters."""
  flax_path: tuple[str, ...]  # (collection, module, ..., leaf)
  torch_key: str
  torch_shape: tuple[int, ...]
  to_flax: Convert
  to_torch: Convert


def torch_module(layout: Layout, flax_modules: tuple[str, ...]) -> str:
  """The torch module path of a Flax module path ("layers_3", "layers_0" -> "layers.3.layers.0")."""
  parts = []
  for name in flax_modules:
    indexed = _INDEXED.fullmatch(name)
    parts.append(layout.renames.get(name) or (f"{indexed[1]}.{indexed[2]}" if indexed else name))
  return ".".join(parts)


def flax_modules(layout: Layout, torch_path: str) -> tuple[str, ...]:
  """The Flax module path of a torch module path: `torch_module` reversed."""
  tokens, names = torch_path.split("."), []
  renamed = sorted(((v.split("."), k) for k, v in layout.renames.items()), key=lambda x: -len(x[0]))
  i = 0
  while i < len(tokens):
    for parts, flax_name in renamed:
      if tokens[i:i + len(parts)] == parts:
        names.append(flax_name)
        i += len(parts)
        break
    else:
      if i + 1 < len(tokens) and tokens[i + 1].isdigit():
        names.append(f"{tokens[i]}_{tokens[i + 1]}")
        i += 2
      else:
        names.append(tokens[i])
        i += 1
  return tuple(names)


def entries(layout: Layout, variables, feature_hw=None) -> list[Entry]:
  """Every tensor of the backbone's variables (arrays or shapes) with its torch counterpart.

  Raises:
    ValueError: the variables hold a collection other than params and batch_stats, or a
      tensor the rule and the layout do not cover.
  """
  variables = flax.core.unfreeze(variables)
  if set(variables) - {"params", "batch_stats"} or "params" not in variables:
    raise ValueError(f"expected {layout.family} variables with 'params' and 'batch_stats', "
                     f"got collections {sorted(variables)}")
  found = []
  for path, leaf in traverse_util.flatten_dict(variables).items():
    modules, name = path[1:-1], path[-1]
    shape = tuple(leaf.shape)
    converted = layout.special(modules, name, shape, variables["params"], feature_hw)
    if converted is None:
      converted = _standard(name, shape)
    if converted is None or name not in _LEAVES:
      raise ValueError(f"no PyTorch counterpart for {layout.family} variable "
                       f"{'/'.join(path)} of shape {shape}")
    torch_shape, to_flax, to_torch = converted
    key = f"{torch_module(layout, modules)}.{_LEAVES[name]}"
    found.append(Entry(path, key, torch_shape, to_flax, to_torch))
  return found


def _standard(name: str, shape: tuple[int, ...]):
  same = lambda x: x
  if name == "kernel" and len(shape) == 4:  # Conv: HWIO here, OIHW in PyTorch.
    return ((shape[3], shape[2], shape[0], shape[1]), lambda x: x.transpose(2, 3, 1, 0),
            lambda x: x.transpose(3, 2, 0, 1))
  if name == "kernel" and len(shape) == 2:  # Dense: [in, out] here, [out, in] in PyTorch.
    return (shape[1], shape[0]), lambda x: x.T, lambda x: x.T
  if len(shape) == 1:
    return shape, same, same
  return None


def flax_shapes(layout: Layout, state_dict: Mapping[str, Any]) -> dict:
  """The params a state_dict's shapes give, as nested dicts of objects with a `.shape`
  (what the describe functions read): torch names and layouts turned into ours, 1-D
  weights as "scale". Tensors the rule cannot place are left out."""
  reverse = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
  flat = {}
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition(".")
    shape = tuple(np.shape(value))
    if leaf == "weight" and len(shape) in (2, 4):
      name = "kernel"
      shape = (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape[::-1]
    elif leaf in reverse and len(shape) == 1:
      name = reverse[leaf]
    else:
      continue
    flat[flax_modules(layout, module) + (name,)] = types.SimpleNamespace(shape=shape)
  return traverse_util.unflatten_dict(flat)


def _listing(title, lines, limit=12) -> str:
  shown = "\n    ".join(lines[:limit])
  more = f"\n    ... and {len(lines) - limit} more" if len(lines) > limit else ""
  return f"\n  {title} ({len(lines)}):\n    {shown}{more}"


def import_variables(layout: Layout, state_dict: Mapping[str, np.ndarray], template_variables,
                     *, source: str, feature_hw=None,
                     check: Callable[[Mapping[str, np.ndarray], str], None] | None = None,
                     hint: Callable[[Mapping[str, Any]], str] | None = None
                     ) -> dict[str, Any]:
  """Converts a PyTorch state_dict into Flax variables shaped like `template_variables`.

  `check(tensors, source)` (e.g. the finite check) sees the tensors used, in torch order,
  once their names and shapes fit; `hint(state_dict)` is a line added to the refusal of a
  state_dict that does not fit (what it looks like).

  Raises:
    UserError: names missing, unexpected or mis-shaped tensors (all in one message, "...
      does not fit this <family>", with the hint), or a fixed tensor not ones.
  """
  found = entries(layout, template_variables, feature_hw)
  params = flax.core.unfreeze(template_variables)["params"]
  expected = {e.torch_key: e.torch_shape for e in found}
  fixed = layout.fixed_ones(params)
  expected.update(fixed)
  missing = [k for k in expected if k not in state_dict]
  unexpected = [k for k in state_dict
                if k not in expected and not k.endswith(".num_batches_tracked")]
  misshaped = [f"{k}: expected {expected[k]}, found {tuple(np.shape(state_dict[k]))}"
               for k in sorted(expected, key=layout.torch_order)
               if k in state_dict and tuple(np.shape(state_dict[k])) != expected[k]]
  if missing or unexpected or misshaped:
    message = f"{source} does not fit this {layout.family} ({len(expected)} tensors expected)"
    for title, keys in (("missing keys", sorted(missing, key=layout.torch_order)),
                        ("unexpected keys", sorted(unexpected, key=layout.torch_order)),
                        ("mis-shaped keys", misshaped)):
      if keys:
        message += _listing(title, keys)
    raise UserError(message + (f"\n  {hint(state_dict)}" if hint else ""))
  if check is not None:
    check({k: state_dict[k] for k in sorted(expected, key=layout.torch_order)}, source)
  for key in fixed:
    value = np.asarray(state_dict[key], np.float64)
    if not np.allclose(value, 1.0, rtol=0.0, atol=1e-6):
      raise UserError(f"{source}: {key} must be all ones ({layout.fixed_reason}), found "
                      f"values in [{value.min():.6g}, {value.max():.6g}]")
  flat = {}
  template = traverse_util.flatten_dict(flax.core.unfreeze(template_variables))
  for entry in found:
    value = np.asarray(state_dict[entry.torch_key]).astype(template[entry.flax_path].dtype)
    flat[entry.flax_path] = np.asarray(entry.to_flax(value), order="C")
  return traverse_util.unflatten_dict(flat)


def export_variables(layout: Layout, variables, feature_hw=None) -> dict[str, np.ndarray]:
  """Converts Flax variables into the PyTorch state_dict, in PyTorch's order, float32;
  adds every BatchNorm's num_batches_tracked (int64 0) and the layout's fixed ones."""
  state_dict = {}
  flat = traverse_util.flatten_dict(flax.core.unfreeze(variables))
  for entry in entries(layout, variables, feature_hw):
    value = np.asarray(flat[entry.flax_path], np.float32)
    state_dict[entry.torch_key] = np.asarray(entry.to_torch(value), order="C")
  for key in list(state_dict):
    if key.endswith(".running_var"):
      state_dict[key[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  for key, shape in layout.fixed_ones(flax.core.unfreeze(variables)["params"]).items():
    state_dict[key] = np.ones(shape, np.float32)
  return {k: state_dict[k] for k in sorted(state_dict, key=layout.torch_order)}

"""The backbone families interop knows, and what a checkpoint's shapes say it is.

A family is a module with FAMILY (its name), ARCHS (its registered model names), LAYOUT
(torch_names.Layout), is_params(params), describe(params) -> dict and summary(dict) -> str:
torch_iresnet and torch_mbf. `describe_*` work on our variables (an Orbax checkpoint) and
on PyTorch state_dicts (their shapes turned into ours by the family's layout) alike.
"""

from typing import Any, Mapping

from mstkd_jax.errors import UserError
from mstkd_jax.interop import torch_iresnet, torch_mbf, torch_names

FAMILIES = (torch_iresnet, torch_mbf)
SETTINGS = ("arch", "width", "embedding_size", "use_se", "image_size")


def of_arch(arch: str):
  """The family of a registered backbone name.

  Raises:
    UserError: no family has it.
  """
  for family in FAMILIES:
    if arch in family.ARCHS:
      return family
  raise UserError(f"arch={arch!r}: no PyTorch mapping; expected one of "
                  f"{[a for f in FAMILIES for a in f.ARCHS]}")


def of_params(params: Mapping) -> Any:
  """The family whose params these are (Flax names), or None."""
  for family in FAMILIES:
    if isinstance(params, Mapping) and family.is_params(params):
      return family
  return None


def of_state_dict(state_dict: Mapping[str, Any]) -> tuple[Any, dict]:
  """(family, its params' shapes) of a PyTorch state_dict, or (None, {})."""
  for family in FAMILIES:
    params = torch_names.flax_shapes(family.LAYOUT, state_dict)
    if family.is_params(params):
      return family, params
  return None, {}


def _describe(family, params, what: str) -> dict:
  try:
    return family.describe(params)
  except (KeyError, TypeError, ValueError, AttributeError, IndexError, UserError) as e:
    raise UserError(f"{what} look like a {family.FAMILY} but are incomplete ({e}); expected "
                    f"every layer of mstkd_jax's {family.FAMILY}") from e


def describe_variables(variables: Mapping) -> dict:
  """The settings a backbone's variables' shapes imply: the family's `describe` dict
  ({"name", "stage_depths", "width", "embedding_size", "use_se", "image_size", ...}).

  Raises:
    UserError: the variables are no known backbone's.
  """
  params = variables.get("params", {})
  family = of_params(params)
  if family is None:
    raise UserError(f"the restored parameters are no known backbone's (params has "
                    f"{sorted(params)[:8]}); expected an IResNet (conv1, ..., fc) or a "
                    "MobileFaceNet (layers_0, ..., conv_sep, features)")
  return _describe(family, params, "the restored parameters")


def describe_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """As `describe_variables`, for a PyTorch state_dict (insightface or arcface_torch names).

  Raises:
    UserError: the state_dict is no known backbone's.
  """
  family, params = of_state_dict(state_dict)
  if family is None:
    raise UserError("the state_dict is no known backbone's; expected an insightface IResNet "
                    "(conv1, layer1.0..., bn2, fc, features) or an arcface_torch "
                    "MobileFaceNet (layers.0..., conv_sep, features)")
  return _describe(family, params, "the state_dict's tensors")


def looks_like(state_dict: Mapping[str, Any]) -> str:
  """One line saying what backbone a state_dict seems to hold, for error messages."""
  family, params = of_state_dict(state_dict)
  try:
    if family is None:
      raise UserError("no IResNet or MobileFaceNet layers")
    return "the checkpoint looks like: " + family.summary(
        _describe(family, params, "its tensors"))
  except UserError as e:
    keys = list(state_dict)
    return (f"the checkpoint looks like no known backbone ({e}); its first keys: "
            f"{', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")


def inferred_settings(state_dict: Mapping[str, Any]) -> dict:
  """{"arch", "width", "embedding_size", "use_se", "image_size"} that the shapes imply;
  {} when they name no registered backbone (unknown family, depths, blocks or scale).
  image_size is left out where the last map is not square."""
  try:
    shapes = describe_state_dict(state_dict)
  except UserError:
    return {}
  if shapes["name"] is None:
    return {}
  settings = {"arch": shapes["name"], **{k: shapes[k] for k in SETTINGS[1:]}}
  return {k: v for k, v in settings.items() if v is not None}

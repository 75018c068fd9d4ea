"""Model registry: `create(name, **kwargs)` builds any model of the project by name.

A new model is one `register` call in its own file, not an `if` here.
"""

import functools
from typing import Callable

from mstkd_jax.errors import UserError
from mstkd_jax.models import adaptor, heads, iresnet, mobilefacenet

_REGISTRY: dict[str, Callable] = {}
_BACKBONES: list[str] = []


def register(name: str, constructor: Callable, backbone: bool = False) -> None:
  """Adds `constructor` under `name`; a `backbone` maps images to embeddings (it takes
  width, embedding_size, use_se, dropout, dtype and axis_name, as the model config gives)."""
  if name in _REGISTRY:
    raise ValueError(f"model {name!r} is already registered")
  _REGISTRY[name] = constructor
  if backbone:
    _BACKBONES.append(name)


def names() -> list[str]:
  return sorted(_REGISTRY)


def backbone_names() -> list[str]:
  """The registered image -> embedding networks (IResNets, MobileFaceNets)."""
  return sorted(_BACKBONES)


def create(name: str, **kwargs):
  """Returns the Flax module registered under `name`, built with `kwargs`."""
  if name not in _REGISTRY:
    raise UserError(f"unknown model name {name!r}; expected one of {names()}")
  try:
    return _REGISTRY[name](**kwargs)
  except (TypeError, ValueError) as e:
    raise UserError(f"model {name!r} does not take these settings {sorted(kwargs)}: {e}") from e


for _name, _depths in iresnet.DEPTHS.items():
  register(_name, functools.partial(iresnet.IResNet, stage_depths=_depths), backbone=True)
for _name, (_blocks, _scale) in mobilefacenet.ARCHS.items():
  register(_name, functools.partial(mobilefacenet.MobileFaceNet, blocks=_blocks,
                                    scale=_scale), backbone=True)
register("margin_head", heads.MarginHead)
register("adaptor", adaptor.Adaptor)

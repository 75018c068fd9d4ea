"""MobileFaceNet (models/mobilefacenet.py) <-> arcface_torch's PyTorch state_dict, and what
an mbf's shapes say about it.

arcface_torch's names ("layers.3.layers.0.layers.1.running_mean", "conv_sep.layers.0.weight",
"features.layers.2.weight", ...) follow from ours by torch_names' rule alone: no renames,
and the embedding's linear layer sees a 1x1 map, so its input order needs no permutation.
"""

from mstkd_jax.interop import torch_names
from mstkd_jax.models import mobilefacenet

FAMILY = "MobileFaceNet"
ARCHS = tuple(mobilefacenet.ARCHS)

_TOP_ORDER = ("layers", "conv_sep", "features")


def torch_order(key: str):
  """Sort key of PyTorch's state_dict order: modules as registered (layers.0 ... layers.7,
  conv_sep, features; list indices numerically), then parameters and buffers."""
  *modules, leaf = key.split(".")
  top = _TOP_ORDER.index(modules[0]) if modules and modules[0] in _TOP_ORDER else 3
  path = tuple((0, int(m), "") if m.isdigit() else (1, 0, m) for m in modules[1:])
  return (top, path, torch_names.LEAF_ORDER.index(leaf)
          if leaf in torch_names.LEAF_ORDER else len(torch_names.LEAF_ORDER), key)


LAYOUT = torch_names.Layout(family=FAMILY, renames={}, torch_order=torch_order)


def is_params(params) -> bool:
  """Whether Flax params (or `torch_names.flax_shapes`) are a MobileFaceNet's."""
  return all(k in params for k in ("layers_0", "conv_sep", "features"))


def describe(params) -> dict:
  """The settings an mbf's params' shapes imply: {"name" ("mbf", "mbf_large", or None for
  other blocks and scales), "stage_depths" (its blocks), "scale", "width",
  "embedding_size", "use_se" (False), "image_size" (16 x the global depthwise kernel's
  side; None where it is not square)}.

  Raises:
    KeyError: a layer is missing.
  """
  width = params["conv_sep"]["layers_0"]["kernel"].shape[-1] // 8
  scale = params["layers_0"]["layers_0"]["kernel"].shape[-1] // max(width, 1)
  stem = params.get("layers_1", {})
  first = 1 if "kernel" in stem.get("layers_0", {}) else len(stem)
  blocks = (first,) + tuple(len(params.get(f"layers_{i}", {})) for i in (3, 5, 7))
  kh, kw = params["features"]["layers_0"]["layers_0"]["kernel"].shape[:2]
  names = {arch: name for name, arch in mobilefacenet.ARCHS.items()}
  return {"name": names.get((blocks, scale)), "stage_depths": blocks, "scale": scale,
          "width": width, "embedding_size": params["features"]["layers_2"]["kernel"].shape[1],
          "use_se": False, "image_size": 16 * kh if kh == kw else None}


def summary(shapes: dict) -> str:
  """One line of `describe`'s dict, as error messages show what a checkpoint looks like."""
  name = f" ({shapes['name']})" if shapes["name"] else ""
  size = shapes["image_size"]
  return (f"MobileFaceNet blocks {shapes['stage_depths']}, scale {shapes['scale']}{name}, "
          f"width {shapes['width']}, embedding_size {shapes['embedding_size']}, "
          + (f"input size {size}" if size else "a non-square input"))

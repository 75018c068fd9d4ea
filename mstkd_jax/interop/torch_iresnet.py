"""IResNet (models/iresnet.py) <-> insightface/MST-KD PyTorch state_dict: the exceptions to
torch_names' rule, and what an IResNet's shapes say about it."""

import math
import re

from mstkd_jax.errors import UserError
from mstkd_jax.interop import torch_names
from mstkd_jax.models import iresnet

FAMILY = "IResNet"
ARCHS = tuple(iresnet.DEPTHS)

# PyTorch state_dict order: registration order of modules, then parameters and buffers.
_TOP_ORDER = ("conv1", "bn1", "prelu", "layer", "bn2", "fc", "features")
_BLOCK_ORDER = ("bn1", "conv1", "bn2", "prelu", "conv2", "bn3", "downsample.0",
                "downsample.1", "se_block.fc1", "se_block.fc2")


def _rank(name: str, order: tuple[str, ...]) -> int:
  return order.index(name) if name in order else len(order)


def torch_order(key: str):
  """Sort key putting torch names in the order a PyTorch IResNet's state_dict has them."""
  module, _, leaf = key.rpartition(".")
  leaf_rank = _rank(leaf, torch_names.LEAF_ORDER)
  block = re.match(r"layer(\d+)\.(\d+)\.(.*)", module)
  if block:
    stage, index, inner = block.groups()
    return (_rank("layer", _TOP_ORDER), int(stage), int(index), _rank(inner, _BLOCK_ORDER),
            leaf_rank, key)
  return (_rank(module, _TOP_ORDER), 0, 0, 0, leaf_rank, key)


def _fc_layout(params, kernel_shape, feature_hw):
  """Returns (height, width, channels) of the feature map flattened into fc."""
  channels = params["bn2"]["scale"].shape[0]
  if feature_hw is None:
    side = math.isqrt(kernel_shape[0] // channels)
    feature_hw = (side, side)
  height, width = feature_hw
  if height * width * channels != kernel_shape[0]:
    raise UserError(
        f"fc takes {kernel_shape[0]} inputs, not a {height}x{width}x{channels} feature map; "
        f"pass feature_hw=(height, width) of the last feature map (input size / 16)")
  return height, width, channels


def _special(modules, name, shape, params, feature_hw):
  """fc's kernel: PyTorch flattens the last map CHW and stores [out, in]; we flatten HWC
  and store [in, out]."""
  if modules != ("fc",) or name != "kernel":
    return None
  h, w, c = _fc_layout(params, shape, feature_hw)
  out = shape[1]
  to_flax = lambda x: x.reshape(out, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, out)
  to_torch = lambda x: x.reshape(h, w, c, out).transpose(3, 2, 0, 1).reshape(out, c * h * w)
  return (out, shape[0]), to_flax, to_torch


LAYOUT = torch_names.Layout(
    family=FAMILY,
    renames={"downsample_conv": "downsample.0", "downsample_bn": "downsample.1",
             "se": "se_block"},
    torch_order=torch_order,
    special=_special,
    # insightface's `features` BatchNorm1d has its weight fixed to 1 (requires_grad=False).
    fixed_ones=lambda params: {"features.weight": tuple(params["features"]["bias"].shape)},
    fixed_reason="insightface fixes it to 1; our embedding BatchNorm has no scale")


def is_params(params) -> bool:
  """Whether Flax params (or `torch_names.flax_shapes`) are an IResNet's."""
  return all(k in params for k in ("conv1", "bn2", "fc"))


def describe(params) -> dict:
  """The settings an IResNet's params' shapes imply (as orbax_checkpoint.describe_iresnet):
  {"name" (None for unknown depths), "stage_depths", "width", "embedding_size", "use_se",
  "image_size" (None when fc's input is not a square feature map of the last stage)}."""
  from mstkd_jax.interop import orbax_checkpoint  # pylint: disable=g-import-not-at-top
  return orbax_checkpoint.describe_iresnet({"params": params})


def summary(shapes: dict) -> str:
  """One line of `describe`'s dict, as error messages show what a checkpoint looks like."""
  depths = shapes["stage_depths"]
  return (f"stage depths {depths}" + (f" ({shapes['name']})" if shapes["name"] else "")
          + f", width {shapes['width']}, embedding_size {shapes['embedding_size']}, "
          f"use_se={shapes['use_se']}")

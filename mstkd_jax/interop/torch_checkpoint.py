"""PyTorch `.pth` backbone checkpoints (insightface / MST-KD IResNets, arcface_torch's
MobileFaceNet) in and out, without PyTorch.

The file format (a restricted reader that runs no code, and the writer) is pth_format.py;
the name and layout mapping is torch_names.py's rule with one Layout per backbone
(torch_iresnet.py, torch_mbf.py); backbones.py says what a state_dict's shapes are. Here:
finding the state_dict in what a file holds, refusing NaN/Inf at load, and the import,
export and load functions, per backbone and for any.
"""

import os
import sys
from typing import Any, Callable, Mapping

import flax.core
import ml_dtypes
import numpy as np

from mstkd_jax.errors import UserError
from mstkd_jax.interop import backbones, pth_format, torch_iresnet, torch_mbf, torch_names

save_state_dict = pth_format.save_state_dict


# Where trainers keep the model's state_dict inside a larger checkpoint dict, most
# specific first: arcface_torch's resume checkpoint (checkpoint_gpu_<rank>.pt) holds
# state_dict_backbone next to state_dict_softmax_fc, optimizer and scheduler states; others
# use state_dict (Lightning, timm), model / model_state_dict (torchvision references, the
# PyTorch tutorials), net / network, or backbone.
STATE_DICT_KEYS = ("state_dict_backbone", "backbone", "state_dict", "model_state_dict",
                   "model", "net", "network", "module")
_MODULE_PREFIX = "module."  # DataParallel / DistributedDataParallel parameter names.


def _is_tensor_dict(obj) -> bool:
  return isinstance(obj, dict) and all(isinstance(v, np.ndarray) for v in obj.values())


def _find_state_dict(path: str, obj, where: tuple[str, ...] = ()
                     ) -> tuple[dict, tuple[str, ...]]:
  """Returns (the state_dict in `obj`, the keys leading to it: () when it is `obj`)."""
  if not isinstance(obj, dict):
    raise UserError(f"{path}: expected a state_dict (a dict of tensors), found a "
                    f"{type(obj).__name__}" + (f" under {_key_path(where)}" if where else ""))
  if _is_tensor_dict(obj):
    return obj, where
  for key in STATE_DICT_KEYS:
    if isinstance(obj.get(key), dict):
      return _find_state_dict(path, obj[key], where + (key,))
  holders = [repr(k) for k, v in obj.items() if _is_tensor_dict(v) and v]
  others = [repr(k) for k, v in obj.items() if not isinstance(v, np.ndarray)]
  found = (f"dicts of tensors under {', '.join(holders[:10])}" if holders else
           f"non-tensor entries {', '.join(others[:10])}{' ...' if len(others) > 10 else ''}")
  place = f" (under {_key_path(where)})" if where else ""
  raise UserError(f"{path}: expected a state_dict (a dict of tensors) or a dict holding one "
                  f"under one of {', '.join(repr(k) for k in STATE_DICT_KEYS)}{place}, found "
                  f"{found}")


def _key_path(keys: tuple[str, ...]) -> str:
  return "".join(f"[{k!r}]" for k in keys)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
  """Reads a PyTorch zip-format .pth state_dict, running no code; also says where it was.

  The state_dict is the file's object itself, or the one under the first of
  STATE_DICT_KEYS a checkpoint dict holds (recursively; e.g. arcface_torch's resume
  checkpoint: ['state_dict_backbone']). Whatever else the file holds (optimizer and
  scheduler states, epoch, ...) is read with the same restricted unpickler and dropped.
  The "module." prefix of DataParallel/DistributedDataParallel models is stripped.

  Args:
    path: the .pth file (as written by `torch.save`, PyTorch >= 1.6).

  Returns:
    (state_dict in file order with tensors as numpy arrays of their dtype (bfloat16 as
    ml_dtypes.bfloat16), a note such as "state_dict under ['state_dict_backbone'],
    'module.' prefix removed"; "" when the file is a plain state_dict).

  Raises:
    UserError: the file is missing, truncated, holds no state_dict, or its pickle names
      any global other than torch tensor/storage rebuilders and collections.OrderedDict.
  """
  path = os.fspath(path)
  obj = pth_format.read_object(path)
  state_dict, where = _find_state_dict(path, obj)
  if not all(isinstance(k, str) for k in state_dict):
    raise UserError(f"{path}: expected string keys in the state_dict"
                    + (f" under {_key_path(where)}" if where else ""))
  notes = [f"state_dict under {_key_path(where)}"] if where else []
  if state_dict and all(k.startswith(_MODULE_PREFIX) for k in state_dict):
    state_dict = {k[len(_MODULE_PREFIX):]: v for k, v in state_dict.items()}
    notes.append(f"{_MODULE_PREFIX!r} prefix removed")
  return dict(state_dict), ", ".join(notes)


def check_finite(tensors: Mapping[str, np.ndarray], source: str) -> None:
  """Refuses NaN or Inf in the floating-point `tensors` (a diverged run), naming the first.

  Args:
    tensors: name -> array, checked in order (float16/32/64, bfloat16 and complex; integer
      and bool arrays are skipped).
    source: the file, for the message.

  Raises:
    UserError: "<source>: the checkpoint holds NaN in layer1.0.conv1.weight (3 of 1728
      values; a diverged run?); ...".
  """
  for key, value in tensors.items():
    array = np.asarray(value)
    if not (array.dtype.kind in "fc" or array.dtype == ml_dtypes.bfloat16):
      continue
    finite = np.isfinite(array)
    if not finite.all():
      bad = array[~finite]
      kind = "NaN" if np.isnan(bad).any() else "Inf"
      raise UserError(f"{source}: the checkpoint holds {kind} in {key} ({bad.size} of "
                      f"{array.size} values; a diverged run?); expected finite weights: use "
                      "an earlier checkpoint")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch zip-format .pth state_dict as numpy arrays, running no code from it.

  As `read_state_dict`, without the note: a checkpoint dict is searched for the
  state_dict under STATE_DICT_KEYS and the "module." prefix is stripped.

  Args:
    path: the .pth file (as written by `torch.save`, PyTorch >= 1.6).

  Returns:
    The state_dict in file order; tensors keep their dtype (bfloat16 as ml_dtypes.bfloat16).

  Raises:
    UserError: the file is missing, truncated, not a state_dict, or its pickle names any
      global other than torch tensor/storage rebuilders and collections.OrderedDict.
  """
  return read_state_dict(path)[0]


# --- Backbones -------------------------------------------------------------------------


def _family_of(template_variables):
  params = flax.core.unfreeze(template_variables).get("params", {})
  family = backbones.of_params(params)
  if family is None:
    raise ValueError(f"no PyTorch mapping for a model with params {sorted(params)[:8]}")
  return family


def import_backbone(state_dict: Mapping[str, np.ndarray], template_variables, *,
                    source: str = "state_dict",
                    feature_hw: tuple[int, int] | None = None) -> dict[str, Any]:
  """Converts a PyTorch state_dict into the Flax variables of the backbone `template`
  describes (an IResNet: insightface/MST-KD names; a MobileFaceNet: arcface_torch's).

  Args:
    state_dict: from `load_state_dict` (names like layer1.0.conv1.weight).
    template_variables: variables of the target model (`model.init` or `jax.eval_shape`);
      they fix the expected names, shapes and dtypes.
    source: what to call the state_dict in error messages (e.g. its file name).
    feature_hw: an IResNet's last feature map (height, width); default square (7x7 at
      112x112).

  Returns:
    {"params": ..., "batch_stats": ...} as nested dicts of numpy arrays.

  Raises:
    UserError: names missing, unexpected or mis-shaped tensors (all in one message, with
      what the state_dict looks like), NaN or Inf in a tensor (the first named), or an
      IResNet features.weight other than ones (our embedding BatchNorm has no scale).
  """
  return torch_names.import_variables(
      _family_of(template_variables).LAYOUT, state_dict, template_variables, source=source,
      feature_hw=feature_hw, check=check_finite, hint=backbones.looks_like)


def export_backbone(variables, *,
                    feature_hw: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """Converts our Flax backbone's variables into its PyTorch state_dict.

  Adds what PyTorch has and we do not: every BatchNorm's num_batches_tracked (int64 0)
  and, for an IResNet, features.weight (ones).

  Args:
    variables: {"params": ..., "batch_stats": ...} of an IResNet or a MobileFaceNet.
    feature_hw: an IResNet's last feature map (height, width); default square.

  Returns:
    The state_dict in PyTorch's order, float32 arrays (shapes as in PyTorch).
  """
  return torch_names.export_variables(_family_of(variables).LAYOUT, variables, feature_hw)


def _note_to_stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def load_backbone(path: str | os.PathLike, template_variables, *,
                  feature_hw: tuple[int, int] | None = None,
                  log: Callable[[str], None] | None = _note_to_stderr) -> dict[str, Any]:
  """Reads a .pth backbone checkpoint into Flax variables shaped like `template_variables`.

  Args:
    path: a state_dict, or a checkpoint dict holding one (see `read_state_dict`).
    template_variables: variables of the target model (see `import_backbone`).
    feature_hw: an IResNet's last feature map (height, width); default square.
    log: receives one line saying where the state_dict was found, when it was not the
      file's object itself (default: stderr; None: silent).

  Returns:
    {"params": ..., "batch_stats": ...} as nested dicts of numpy arrays.

  Raises:
    UserError: as `read_state_dict` and `import_backbone`; messages name the file and key.
  """
  path = os.fspath(path)
  state_dict, note = read_state_dict(path)
  if note and log is not None:
    log(f"note: {path}: using the {note}")
  source = f"{path} ({note})" if note else path
  return import_backbone(state_dict, template_variables, source=source,
                         feature_hw=feature_hw)


def _only(family, template_variables):
  if _family_of(template_variables) is not family:
    raise ValueError(f"expected the variables of a {family.FAMILY}")
  return template_variables


def import_iresnet(state_dict, template_variables, **kwargs) -> dict[str, Any]:
  """`import_backbone` for an IResNet template."""
  return import_backbone(state_dict, _only(torch_iresnet, template_variables), **kwargs)


def export_iresnet(variables, **kwargs) -> dict[str, np.ndarray]:
  """`export_backbone` of an IResNet's variables (insightface/MST-KD names)."""
  return export_backbone(_only(torch_iresnet, variables), **kwargs)


def load_iresnet(path, template_variables, **kwargs) -> dict[str, Any]:
  """`load_backbone` into an IResNet template."""
  return load_backbone(path, _only(torch_iresnet, template_variables), **kwargs)


def import_mbf(state_dict, template_variables, **kwargs) -> dict[str, Any]:
  """`import_backbone` for a MobileFaceNet template (arcface_torch names)."""
  return import_backbone(state_dict, _only(torch_mbf, template_variables), **kwargs)


def export_mbf(variables) -> dict[str, np.ndarray]:
  """`export_backbone` of a MobileFaceNet's variables (arcface_torch names)."""
  return export_backbone(_only(torch_mbf, variables))


def load_mbf(path, template_variables, **kwargs) -> dict[str, Any]:
  """`load_backbone` into a MobileFaceNet template."""
  return load_backbone(path, _only(torch_mbf, template_variables), **kwargs)


def infer_settings(path: str | os.PathLike, *,
                   log: Callable[[str], None] | None = _note_to_stderr) -> dict[str, Any]:
  """The backbone settings a .pth's shapes imply, for a command given no --arch.

  Returns:
    {"arch", "width", "embedding_size", "use_se", "image_size"} (image_size left out
    where the last feature map is not square); {} where the shapes name no registered
    backbone (then nothing is printed and the caller's defaults apply).

  Raises:
    UserError: the file cannot be read (as `read_state_dict`).
  """
  path = os.fspath(path)
  settings = backbones.inferred_settings(read_state_dict(path)[0])
  if settings and log is not None:
    log(f"note: {path}: no --arch given; its shapes say "
        + " ".join(f"{k}={v}" for k, v in settings.items()))
  return settings

"""Reads the backbone of an Orbax checkpoint written by this project's stages.

A stage writes <workdir>/config.json, <workdir>/checkpoints/<step>/default (an Orbax
PyTree of its TrainState: {step, params: {"backbone": ..., "head": ...}, batch_stats,
opt_state}) and, once trained, <workdir>/model/<step>/default (the network alone:
{params, batch_stats}). Evaluation needs only the backbone, so only its params and
batch_stats are restored (Orbax partial restore, the restore target built from the
checkpoint's own metadata): the head and optimiser shapes need not be known.

A folder of steps resolves to its newest complete step: damaged newer ones (an interrupted
copy or save: no commit marker, no metadata, missing array data) are skipped with one
warning line each. Restored arrays are checked for NaN and Inf.
"""

import dataclasses
import math
import os
import re
from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp

from mstkd_jax import paths
from mstkd_jax import files
from mstkd_jax.errors import UserError
from mstkd_jax.models import iresnet
from mstkd_jax.train import checkpoints, step_folders, tree_checks

# The item folder of the training state (or of the network alone, in model/).
ITEM_NAME = step_folders.STATE
# Orbax writes this file into every item folder it finishes.
_ITEM_METADATA = step_folders.ITEM_METADATA
# Folders of a stage workdir that hold Orbax steps, the preferred (the trained model) first.
STEP_FOLDERS = ("model", "checkpoints")
_EXPECTED = ("expected an Orbax checkpoint of this project: a stage workdir, its model/ or "
             "checkpoints/ folder, or one step folder such as checkpoints/<step>")


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """Where the restored backbone came from.

  Attributes:
    path: the step folder that was read (e.g. <workdir>/model/<step>).
    step: the training step of that checkpoint, or None when its folder name is no number.
    workdir: the stage workdir (the folder above model/ or checkpoints/), or None.
    config: the workdir's config.json as a dict, or None when there is none.
    name: a model name for reports: the workdir's folder name (else the step folder's).
  """
  path: str
  step: int | None
  workdir: str | None
  config: dict | None
  name: str


def _is_item(folder: str) -> bool:
  return files.isfile(os.path.join(folder, _ITEM_METADATA))


def _steps(folder: str) -> list[int]:
  """Step folders under a checkpoints/ folder, oldest first (Orbax's temporary folders and
  set-aside damaged ones have no plain number), complete or not."""
  try:
    names = files.listdir(folder)
  except OSError as e:
    raise UserError(f"{folder}: cannot list the checkpoint folder ({e.strerror or e})") from e
  return sorted(int(n) for n in names
                if n.isdigit() and files.isdir(os.path.join(folder, n, ITEM_NAME)))


def locate(path: Any) -> tuple[str, str | None]:
  """(step folder, workdir or None) of a workdir, a model/ or checkpoints/ folder or a step.

  A folder of steps resolves to its newest complete step (damaged newer ones are skipped
  with a warning); a stage workdir to that of its model/ folder (the trained network) when
  there is one, else of its checkpoints/.
  """
  candidates, workdir, _ = _candidates(path)
  complete = [step_dir for step_dir, reason in candidates if reason is None]
  if not complete:
    raise _none_complete(candidates)
  return complete[0], workdir


def _candidates(path: Any) -> tuple[list[tuple[str, str | None]], str | None, bool]:
  """([(step folder, why it is damaged or None)], newest first; workdir or None; whether
  `path` named the step itself).

  Raises:
    UserError: the path is missing or a file, or holds no step folder.
  """
  path = paths.resolve(path, "checkpoint")
  if not files.exists(path):
    raise UserError(f"{path}: checkpoint does not exist; {_EXPECTED}")
  if not files.isdir(path):
    raise UserError(f"{path}: is a file; {_EXPECTED} (PyTorch .pth files are read by "
                    "interop.torch_checkpoint)")
  if _is_item(path):  # The item folder itself: <step>/default.
    candidates, explicit = [(os.path.dirname(path), None)], True
  elif _is_item(os.path.join(path, ITEM_NAME)):
    candidates, explicit = [(path, None)], True
  elif files.isdir(os.path.join(path, ITEM_NAME)):  # A step folder whose item is damaged.
    raise UserError(f"{path}: a damaged checkpoint step ({step_folders.damage(path)}, as after "
                    f"an interrupted copy or save); {_EXPECTED}")
  else:
    folders = [os.path.join(path, name) for name in STEP_FOLDERS] + [path]
    found = [(folder, _steps(folder)) for folder in folders if files.isdir(folder)]
    found = [(folder, steps) for folder, steps in found if steps]
    if not found:
      raise UserError(f"{path}: holds no finished checkpoint step (no "
                      f"<step>/{ITEM_NAME}/{_ITEM_METADATA}); {_EXPECTED}")
    folder, steps = found[0]
    step_dirs = [os.path.join(folder, str(step)) for step in reversed(steps)]
    candidates = [(step_dir, step_folders.damage(step_dir)) for step_dir in step_dirs]
    explicit = False
  parent = os.path.dirname(candidates[0][0])
  workdir = os.path.dirname(parent) if os.path.basename(parent) in STEP_FOLDERS else None
  return candidates, workdir, explicit


def _none_complete(candidates: list) -> UserError:
  damaged = ", ".join(f"{os.path.basename(d)} ({reason})" for d, reason in candidates)
  return UserError(f"{os.path.dirname(candidates[0][0])}: holds no complete checkpoint step "
                   f"(damaged: {damaged}); {_EXPECTED}")


def _read_config(workdir: str | None) -> dict | None:
  if workdir is None:
    return None
  path = os.path.join(workdir, "config.json")
  if not files.isfile(path):
    return None
  config = files.read_json(path, "the config.json a stage writes (or remove it and give "
                           "the model flags)")
  if not isinstance(config, dict):
    raise UserError(f"{path}: holds a {type(config).__name__}; expected a JSON object")
  return config


def _abstract(tree):
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def _backbone_subtrees(tree: Any, source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Paths of the backbone params and batch stats inside the stored TrainState tree."""
  params = tree.get("params") if isinstance(tree, dict) else None
  if not isinstance(params, dict):
    raise UserError(f"{source}: holds no 'params'; {_EXPECTED}")
  if isinstance(params.get("backbone"), dict):
    params_path = ("params", "backbone")
  elif "conv1" in params or "conv_sep" in params:  # A bare IResNet or MobileFaceNet.
    params_path = ("params",)
  else:
    raise UserError(f"{source}: holds no backbone parameters (params has "
                    f"{sorted(params)}); expected params['backbone'] of an IResNet")
  stats = tree.get("batch_stats")
  if not isinstance(stats, dict) or not stats:
    raise UserError(f"{source}: holds no backbone batch_stats; expected the BatchNorm "
                    "statistics of an IResNet")
  stats_path = ("batch_stats", "backbone") if isinstance(stats.get("backbone"), dict) else (
      "batch_stats",)
  return params_path, stats_path


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _nest(path, value) -> dict:
  for key in reversed(path):
    value = {key: value}
  return value


def _merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for key, value in b.items():
    out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) else value
  return out


def load_backbone_variables(path: Any) -> tuple[dict, CheckpointInfo]:
  """Restores an IResNet's {"params", "batch_stats"} (numpy) from a stage's checkpoint.

  Args:
    path: a stage workdir (its model/, else its checkpoints/), a model/ or checkpoints/
      folder (the latest step is read), or one step folder such as checkpoints/<step>
      (or that step's item folder, .../<step>/default).

  Returns:
    (variables, info): variables = {"params": backbone params, "batch_stats": ...}
    as nested dicts of numpy arrays; info, a CheckpointInfo.

  Raises:
    UserError: the path is missing or not such a checkpoint, the checkpoint cannot be
      read, or the workdir's config.json is unreadable.
  """
  candidates, workdir, explicit = _candidates(path)
  for i, (step_dir, reason) in enumerate(candidates):
    if reason is None:
      try:
        variables = _restore_backbone(step_dir)
        break
      except step_folders.DamagedCheckpoint as e:
        if explicit:
          raise
        candidates[i] = (step_dir, e.reason)
        reason = e.reason
    then = (f"trying step {os.path.basename(candidates[i + 1][0])}"
            if i + 1 < len(candidates) else "no older step")
    checkpoints.warn(f"skipping the damaged checkpoint {step_dir} ({reason}); {then}")
  else:
    raise _none_complete(candidates)
  base = os.path.basename(step_dir)
  name = os.path.basename(workdir) if workdir else os.path.basename(os.path.dirname(step_dir))
  info = CheckpointInfo(path=step_dir, step=int(base) if base.isdigit() else None,
                        workdir=workdir, config=_read_config(workdir), name=name or base)
  return variables, info


def _restore_backbone(step_dir: str) -> dict:
  """{"params", "batch_stats"} of the backbone in the step folder `step_dir` (numpy).

  Raises:
    DamagedCheckpoint: the step cannot be read (metadata or array data missing).
    UserError: it holds no backbone, or NaN/Inf.
  """
  item_dir = os.path.join(step_dir, ITEM_NAME)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(epath.Path(item_dir)).tree
  except Exception as e:  # pylint: disable=broad-except
    raise step_folders.DamagedCheckpoint(
        step_dir, "cannot read the Orbax checkpoint metadata", e) from e
  finally:
    handler.close()
  params_path, stats_path = _backbone_subtrees(tree, step_dir)
  item = _merge(_nest(params_path, _abstract(_get(tree, params_path))),
                _nest(stats_path, _abstract(_get(tree, stats_path))))
  restored = step_folders.restore_partial(item_dir, item, step_dir)
  tree_checks.check_finite(restored, step_dir)
  return {"params": _get(restored, params_path), "batch_stats": _get(restored, stats_path)}


def describe_iresnet(variables: dict) -> dict:
  """The IResNet settings the variables' shapes imply.

  Returns:
    {"name": "iresnet34" (or None for unknown depths), "stage_depths", "width",
     "embedding_size", "use_se", "image_size" (None when fc's input is not a square
     feature map of the last stage)}.

  Raises:
    UserError: the variables are not an IResNet's (no conv1, fc or bn2).
  """
  params = variables.get("params", {})
  try:
    width = int(params["conv1"]["kernel"].shape[-1])
    fc_in, embedding_size = (int(d) for d in params["fc"]["kernel"].shape)
    channels = int(params["bn2"]["scale"].shape[0])
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"the restored parameters are not an IResNet's (missing {e}); expected "
                    "conv1, fc and bn2 as mstkd_jax.models.iresnet names them") from e
  blocks: dict[int, int] = {}
  use_se = False
  for key, value in params.items():
    match = re.fullmatch(r"layer(\d+)_(\d+)", key)
    if match:
      blocks[int(match[1])] = blocks.get(int(match[1]), 0) + 1
      use_se = use_se or "se" in value
  depths = tuple(blocks[s] for s in sorted(blocks))
  names = {d: n for n, d in iresnet.DEPTHS.items()}
  side = math.isqrt(fc_in // channels) if channels else 0
  image_size = side * 16 if side and side * side * channels == fc_in else None
  return {"name": names.get(depths), "stage_depths": depths, "width": width,
          "embedding_size": embedding_size, "use_se": use_se, "image_size": image_size}

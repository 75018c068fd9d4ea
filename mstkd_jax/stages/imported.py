"""Networks made elsewhere that a recipe stage imports instead of training: the entries of a
checkpoints folder (teacher.checkpoints, adaptor.checkpoints and their balanced_ twins).

An entry is named after what it stands for (a group, a balanced part, an adaptor kind): a
stage folder of this project (Orbax) or a `<name>.pth` / `<name>.pt` PyTorch state_dict (an
insightface or arcface_torch IResNet or MobileFaceNet; the authors' SL or DuL adaptor).
"""

import hashlib
import json
import os
from typing import Sequence

import numpy as np

from mstkd_jax import files, paths, workdir as workdir_lib
from mstkd_jax.errors import UserError
from mstkd_jax.interop import backbones, orbax_checkpoint, resolve, torch_checkpoint
from mstkd_jax.train import checkpoints as checkpoints_lib, tree_checks

PYTORCH_SUFFIXES = (".pth", ".pt")


def entries(folder: str, field: str, needed: Sequence[str], what: str,
            allowed: Sequence[str] | None = None) -> dict[str, str]:
  """{name: path} of the entries of `folder` (config `field`) for every name in `needed`.

  `what` says what a name is, for messages ("group", "adaptor kind"); `allowed` are the
  names an entry may have (default: `needed`).

  Raises:
    UserError: the folder is missing, holds something that is no entry, two entries for
      one name, an entry for a name not allowed, or none for a needed name.
  """
  path = paths.resolve(folder, f"config field {field}")
  if not files.isdir(path):
    raise UserError(f"config field {field}={folder!r}: {path} is not a folder; expected "
                    f"one entry per {what}: a stage folder or a .pth/.pt file named after it")
  found = {}
  for name in sorted(files.listdir(path)):
    name = name.rstrip("/")
    if name.startswith("."):
      continue
    full = os.path.join(path, name)
    stem, suffix = os.path.splitext(name)
    if files.isdir(full):
      stem = name
    elif suffix not in PYTORCH_SUFFIXES:
      raise UserError(f"config field {field}: {full} is neither a folder nor a .pth/.pt "
                      f"file; expected one entry per {what}, named after it")
    if stem in found:
      raise UserError(f"config field {field}: {found[stem]} and {full} are both for "
                      f"{what} {stem!r}; keep one")
    found[stem] = full
  unknown = sorted(set(found) - set(allowed or needed))
  if unknown:
    raise UserError(f"config field {field}: {path} holds {what} {unknown}, which the "
                    f"recipe does not have; expected entries for {list(needed)}")
  missing = [n for n in needed if n not in found]
  if missing:
    raise UserError(f"config field {field}: {path} has no entry for {what} {missing}; "
                    f"expected a folder or a .pth/.pt file for each of {list(needed)}")
  return {n: found[n] for n in needed}


def digest(path: str) -> str:
  """sha256 of what importing `path` reads: a .pth/.pt file, or the output record of a
  folder's Orbax step folder (so a moved folder keeps its digest)."""
  if files.isdir(path):
    step_dir, _ = orbax_checkpoint.locate(path)
    record = workdir_lib.output_record(step_dir)
  else:
    record = workdir_lib.file_record(path)
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def describe_section(model: dict) -> str:
  """A model section in one phrase, e.g. "iresnet18 width=8 embedding_size=128 use_se=False"
  (then any other field but dtype and dropout)."""
  order = [f for f in resolve.FIELDS if f in model] + sorted(
      set(model) - set(resolve.FIELDS) - {"name", "dtype", "dropout"})
  return " ".join([str(model.get("name", ""))] + [f"{k}={model[k]}" for k in order]).strip()


def load_backbone(path: str, template: dict, model: dict, image_shape: tuple, field: str
                  ) -> tuple[dict, dict]:
  """(variables, record) of the backbone entry `path`, checked against the network of the
  section's `model` fields (whose `template` variables give the shapes and dtypes) for
  images of `image_shape` (H, W, 3); `field` names the config field in messages.

  Returns:
    ({"params", "batch_stats"} as numpy arrays, {"from": path, "format": "orbax" |
    "pytorch", "step": the source's step or None, "sha256": `digest`}).

  Raises:
    UserError: the file cannot be read, or it does not fit the network (saying what the
      section builds and what the checkpoint looks like).
  """
  section = f"{describe_section(model)} (the network of {field}'s section)"
  if files.isdir(path):
    variables, info = orbax_checkpoint.load_backbone_variables(path)
    record = {"from": path, "format": "orbax", "step": info.step}
    shapes = _known_shapes(lambda: backbones.describe_variables(variables))
  else:
    try:
      backbones.of_arch(str(model.get("name")))
    except UserError as e:
      raise UserError(f"{path}: a .pth/.pt teacher needs a network with a PyTorch mapping, "
                      f"but its section builds {section} ({e}); or give an Orbax stage "
                      "folder") from e
    state_dict, note = torch_checkpoint.read_state_dict(path)
    record = {"from": path, "format": "pytorch", "step": None}
    shapes = _known_shapes(lambda: backbones.describe_state_dict(state_dict))
  size = shapes and shapes["image_size"]
  if size and (size, size) != tuple(image_shape[:2]):
    raise UserError(f"{path}: this teacher takes {size}x{size} images (what its last layers' "
                    f"shapes imply), the training images are {image_shape[0]}x"
                    f"{image_shape[1]}; teachers and student must see one image size: "
                    "prepare the data at that size, or use teachers made for it")
  looks = (f"it looks like: {resolve.describe(resolve.shape_settings(shapes))}" if shapes
           else "")
  if not files.isdir(path):
    try:
      variables = torch_checkpoint.import_backbone(
          state_dict, template, source=f"{path} ({note})" if note else path,
          feature_hw=(image_shape[0] // 16, image_shape[1] // 16))
    except UserError as e:
      raise UserError(f"{path}: the checkpoint does not fit {section}; "
                      f"{looks or backbones.looks_like(state_dict)}") from e
  problems = tree_checks.shape_mismatches(tree_checks.flat_shapes(template),
                                          tree_checks.flat_shapes(variables))
  if problems:   # an unknown backbone: its first differences instead of what it looks like
    raise UserError(f"{path}: the checkpoint does not fit {section}; "
                    + (looks or "; ".join(problems[:3])))
  variables = {part: _cast_like(template[part], variables[part]) for part in template}
  return variables, {**record, "sha256": digest(path)}


def _known_shapes(describe) -> dict | None:
  """describe()'s description of a known backbone family, or None for another network."""
  try:
    return describe()
  except UserError:
    return None


def _cast_like(template, tree):
  """`tree` (nested dicts of arrays) with the dtypes of `template`'s leaves."""
  if isinstance(template, dict):
    return {k: _cast_like(template[k], tree[k]) for k in template}
  return np.asarray(tree).astype(np.asarray(template).dtype)


def load_adaptor(path: str, template: dict, kind: str, field: str) -> tuple[dict, dict]:
  """({"params"} of the adaptor entry `path`, record), checked against `template`'s `kind`
  network. A .pth/.pt entry (interop/torch_adaptor.py) must be of that kind (a DuL one
  serves DLDPO too: they differ only in training).

  Raises:
    UserError: the checkpoint cannot be read, is of another kind, or does not fit (one line).
  """
  kernel = template["params"]["fc1"]["kernel"]
  section = (f"a {kind} adaptor from {kernel.shape[0]} teacher inputs to {kernel.shape[1]} "
             f"(adaptor.model of {field}'s section)")
  if files.isdir(path):
    store = checkpoints_lib.Checkpoints(os.path.join(path, "model"), keep=1)
    try:
      step = store.latest_step()
      if step is None:
        raise UserError(f"{path}: no adaptor under {path}/model; expected an adaptor stage "
                        "folder of this project")
      found = tree_checks.flat_shapes(store.stored_tree(step).get("params") or {})
    finally:
      store.close()
    record = {"from": path, "format": "orbax", "step": step}
    load = lambda: workdir_lib.load_model(path, template, path)
  else:
    from mstkd_jax.interop import torch_adaptor  # pylint: disable=g-import-not-at-top
    found_kind, variables, ignored = torch_adaptor.load_adaptor(path, kernel.shape[0])
    if ignored:
      print(f"note: {path}: ignored the parameters the adaptor does not use: "
            f"{', '.join(ignored)}", flush=True)
    if found_kind != kind and not (found_kind == "DuL" and kind == "DLDPO"):
      raise UserError(f"{path} holds a {found_kind} adaptor; this stage imports {kind}: name "
                      f"the file {found_kind}.pth, or run the adaptor kind {found_kind}")
    found = tree_checks.flat_shapes(variables["params"])
    record = {"from": path, "format": "pytorch", "step": None, "ignored_keys": list(ignored)}
    load = lambda: {"params": _cast_like(template["params"], variables["params"])}
  problems = tree_checks.shape_mismatches(
      tree_checks.flat_shapes(template["params"]), found)
  if problems:
    raise UserError(f"{path}: the adaptor does not fit {section}: " + "; ".join(problems[:3]))
  return load(), {**record, "sha256": digest(path)}


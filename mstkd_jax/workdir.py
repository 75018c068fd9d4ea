"""Files of a run: the workdir check, config diffs, atomic writes, JSON, caches and models.

Every file a stage, the pipeline or a command writes goes through `atomic_path` (a unique
temporary name renamed over the target once it is complete), so a file with its final name
is always whole, and two processes never share a temporary file. Reads of JSON go through
`read_json`, which names the file in its one-line error.
"""

import contextlib
import json
import os
import tempfile
import time
from typing import Iterator

import jax
import numpy as np

from mstkd_jax import paths
from mstkd_jax.errors import UserError
from mstkd_jax.train import parallel as parallel_lib
from mstkd_jax.train.checkpoints import Checkpoints, flat_shapes, shape_mismatches

# Fields that steer how a run is carried out but not what it computes: they may change
# between a run and its resumption.
RUN_CONTROL_FIELDS = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                      "train.eval_batch_size", "train.eval_every", "parallelism",
                      "num_devices", "data.data_dir", "only", "force", "extract.teacher_dirs",
                      "student.teacher_dirs", "student.adaptor_dir", "adaptor.extract_dir")


# ------------------------------------------------------------------------- config diffs

def flatten(tree, prefix: str = "") -> dict:
  """{"a.b.c": leaf} of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_dict(config) -> dict:
  """The config as JSON-compatible nested dicts (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config))


def changed_fields(old: dict, new: dict, ignore=RUN_CONTROL_FIELDS) -> list[str]:
  """"field: old -> new" for every flattened field that differs, `ignore`d fields (and
  their sub-fields) left out; a field only one side has shows as '<absent>'."""
  old_flat, new_flat = flatten(old), flatten(new)
  keys = sorted(set(old_flat) | set(new_flat))
  return [f"{k}: {old_flat.get(k, '<absent>')!r} -> {new_flat.get(k, '<absent>')!r}"
          for k in keys if old_flat.get(k) != new_flat.get(k)
          and not any(k == f or k.startswith(f + ".") for f in ignore)]


# ------------------------------------------------------------------------------ workdir

def prepare(config, workdir: str, refuse_changes: bool = True) -> str:
  """Creates `workdir`, refuses one holding a run of another config, writes config.json.

  With refuse_changes=False (the pipeline's root, whose stages check their own configs)
  config.json just records the latest run. Returns the absolute workdir; only process 0
  writes.

  Raises:
    UserError: the workdir cannot be written, is not shared by every host of a multi-host
      run, or (refuse_changes) holds a config.json of another config.
  """
  workdir = paths.local(workdir, "workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=workdir, prefix=".write_probe.")  # unique per process
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UserError(f"the workdir {workdir} cannot be written: {e.strerror or e}") from e
  if jax.process_count() > 1:
    _check_shared(workdir)
  path = os.path.join(workdir, "config.json")
  new = config_dict(config)
  if refuse_changes and os.path.exists(path):
    old = read_json(path, "a readable config.json; move it away or use another --workdir")
    changes = changed_fields(old, new)
    if changes:
      raise UserError(
          f"{workdir} holds a run of another config (its config.json differs in: "
          + "; ".join(changes) + "). Use another --workdir, or the same settings to resume.")
  if jax.process_index() == 0:
    write_json(path, new, sort_keys=True)
  return workdir


def _check_shared(workdir: str) -> None:
  """Refuses a multi-host workdir that is not one folder every process sees (NFS, a
  mounted bucket): Orbax checkpoints and process 0's outputs would be missing elsewhere."""
  nonce = int(parallel_lib.broadcast_from_main(np.int32(time.time_ns() % 2**31)))
  probe = os.path.join(workdir, f".shared_probe_{nonce}")
  if jax.process_index() == 0:
    with open(probe, "w") as f:
      f.write("ok")
  parallel_lib.sync_hosts(f"shared probe {nonce} written")
  blind = np.flatnonzero(~parallel_lib.gather_hosts(np.array([os.path.exists(probe)])))
  parallel_lib.sync_hosts(f"shared probe {nonce} read")
  if jax.process_index() == 0:
    os.remove(probe)
  if len(blind):
    raise UserError(f"the workdir {workdir} is not shared: processes {blind.tolist()} do not "
                    "see the files process 0 writes there; a multi-host run needs a folder "
                    "every host sees (NFS, a mounted bucket)")


# ----------------------------------------------------------------------- atomic writing

@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a unique temporary file name next to `path` (ending in `suffix`, e.g. ".npz"
  where a writer appends one otherwise); once the block ends without an error the file is
  renamed over `path`, else removed. An earlier file at `path` stays until then."""
  directory, name = os.path.split(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=f".tmp{suffix}")
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, value, sort_keys: bool = False) -> None:
  """Writes `value` as indented JSON, atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(value, f, indent=2, sort_keys=sort_keys)


def read_json(path: str, expected: str = "readable JSON", missing=UserError):
  """The JSON value in `path`.

  Args:
    path: the file.
    expected: what the file should be, for the error message.
    missing: returned where the file does not exist; the default, UserError, raises.

  Raises:
    UserError: the file is missing (unless `missing` is given) or is not valid JSON.
  """
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    if missing is UserError:
      raise UserError(f"{path} is missing; expected {expected}") from e
    return missing
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}); expected {expected}") from e


def save_npz(path: str, arrays: dict) -> None:
  """np.savez of `arrays` to `path`, atomically."""
  with atomic_path(path, suffix=".npz") as tmp:
    np.savez(tmp, **arrays)


@contextlib.contextmanager
def npy_writer(path: str, shape: tuple, dtype=np.float32, enabled: bool = True):
  """Yields a memory-mapped array [shape] to fill in chunks; it becomes the .npy `path` only
  when the block ends without an error (an earlier file there stays until then), so arrays
  larger than memory are written whole or not at all. Yields None where not `enabled`
  (processes other than 0)."""
  if not enabled:
    yield None
    return
  with atomic_path(path, suffix=".npy") as tmp:
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
    try:
      yield array
      array.flush()
    finally:
      del array


# ------------------------------------------------------------------------------ models

def save_model(workdir: str, step: int, variables: dict) -> None:
  """The trained network's variables ({"params", "batch_stats"}) under <workdir>/model.

  Every process calls it (Orbax synchronizes them); process 0 writes the host arrays.
  """
  checkpoints = Checkpoints(os.path.join(workdir, "model"), keep=1)
  checkpoints.save(step, variables)
  checkpoints.wait()
  checkpoints.close()


def model_step(workdir: str) -> int | None:
  """The step of the model saved under <workdir>/model (None where there is none)."""
  checkpoints = Checkpoints(os.path.join(workdir, "model"), keep=1)
  try:
    return checkpoints.latest_step()
  finally:
    checkpoints.close()


def load_model(workdir: str, template: dict, stage: str) -> dict:
  """Variables saved by `save_model`, shaped like `template`.

  Raises:
    UserError: there is no model (naming `stage` to run first) or its shapes differ from
      `template`'s (each difference listed).
  """
  checkpoints = Checkpoints(os.path.join(workdir, "model"), keep=1)
  try:
    step = checkpoints.latest_step()
    if step is None:
      raise UserError(f"no trained model in {workdir}/model: run the stage {stage!r} first")
    problems = []
    stored = checkpoints.manager.item_metadata(step).tree
    for part in template:
      problems += shape_mismatches(flat_shapes(template[part], f"{part}/"),
                                   flat_shapes(stored.get(part) or {}, f"{part}/"))
    if problems:
      raise UserError(f"the model in {workdir}/model does not match this config:\n  "
                      + "\n  ".join(problems))
    return checkpoints.restore_tree(step, template)
  finally:
    checkpoints.close()


# ----------------------------------------------------------------------------- results

def write_results(workdir: str, name: str, step: int, results: dict,
                  record: dict | None = None) -> None:
  """<workdir>/results.json (process 0): the model, its step, the per-group verification
  summary and the entries of `record`."""
  if jax.process_index() != 0:
    return
  summary = {g: {k: r[k] for k in ("accuracy", "accuracy_std", "accuracy_noflip")}
             for g, r in results.items()}
  write_json(os.path.join(workdir, "results.json"),
             {"model": name, "step": int(step), "verification": summary, **(record or {})})


def read_results(workdir: str) -> dict:
  """The results.json a stage wrote ({} where it wrote none)."""
  return read_json(os.path.join(workdir, "results.json"), "the results.json of a stage; "
                   "rerun its stage", missing={})

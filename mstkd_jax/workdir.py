"""The files of a run: the workdir check, config diffs and history, the lock and trained
models (results.json, stage.json and output records: mstkd_jax/records.py).

A workdir may be a URL (gs://bucket/run): its files go through mstkd_jax.files and Orbax,
and it is not locked (an object store has no file lock: one run per bucket workdir is the
user's job).
"""

import contextlib
import errno
import json
import os
import socket
import time

import jax
import numpy as np

from mstkd_jax import errors, files, paths, records
from mstkd_jax.errors import UserError
from mstkd_jax.train import parallel as parallel_lib
from mstkd_jax.train.checkpoints import Checkpoints
from mstkd_jax.train.tree_checks import flat_shapes, shape_mismatches

# Re-exported: the stages and the pipeline read and write these records through here.
damaged_output, file_record, output_record = (
    records.damaged_output, records.file_record, records.output_record)
read_results, read_stage_record, write_results = (
    records.read_results, records.read_stage_record, records.write_results)

# Fields that steer how a run is carried out but not what it computes: they may change
# between a run and its resumption. head.shard_classes (each role's, in the recipe) is the
# layout of the class centres, saved whole either way; head.sample_rate changes the numbers.
RUN_CONTROL_FIELDS = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                      "train.eval_batch_size", "train.eval_every", "parallelism",
                      "num_devices", "data.data_dir", "cache_dir", "only", "force",
                      "head.shard_classes", "teacher.head.shard_classes",
                      "adaptor.head.shard_classes", "student.head.shard_classes")


# ------------------------------------------------------------------------- config diffs

# Config fields added after runs were recorded without them ({flattened path: the value
# that computes what those runs computed}, e.g. "train.label_smoothing", and
# "student.train.label_smoothing" in the recipe's root config). At that value a field is
# left out of what is compared and fingerprinted, so old records still match. Register a
# field here in the change that adds it to configs/, never one already recorded.
NEW_FIELD_DEFAULTS: dict[str, object] = {}


def flatten(tree, prefix: str = "") -> dict:
  """{"a.b.c": leaf} of a nested dict, less NEW_FIELD_DEFAULTS fields at their value."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  if prefix:
    return out
  return {k: v for k, v in out.items()
          if not (k in NEW_FIELD_DEFAULTS and _same(v, NEW_FIELD_DEFAULTS[k]))}


def _same(value, default) -> bool:
  """Equal as JSON values (1 == 1.0, but True is not 1)."""
  return (type(value) is bool) == (type(default) is bool) and value == default


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
  """Creates `workdir`, refuses one holding a run of another config, writes config.json
  (process 0); returns the absolute workdir. With refuse_changes=False (the pipeline's root,
  whose stages check their own configs) config_history.jsonl also gets a line for the run.

  Raises:
    UserError: the workdir cannot be written, is not shared by every host of a multi-host
      run, or (refuse_changes) holds a config.json of another config.
  """
  workdir = paths.resolve(workdir, "workdir")
  refuse_a_file(workdir)
  probe = os.path.join(workdir, f".write_probe.{socket.gethostname()}.{os.getpid()}."
                                f"{time.time_ns()}")  # unique per process
  try:
    files.makedirs(workdir)
    files.write_bytes(probe, b"ok")
    files.remove(probe)
  except UserError as e:
    cause = e.__cause__
    reason = (files.os_error_reason(cause) if isinstance(cause, OSError) and cause.errno
              else files.error_line(cause) if cause is not None else str(e))
    raise UserError(f"the workdir {workdir} cannot be written ({reason})") from e
  if jax.process_count() > 1 and not paths.is_url(workdir):  # a URL is shared by nature
    check_shared(workdir)
  path = os.path.join(workdir, "config.json")
  new = config_dict(config)
  if refuse_changes:
    old = files.read_json(path, "a readable config.json; move it away or use another "
                          "--workdir", missing=None)
    changes = changed_fields(old, new) if old is not None else []
    if changes:
      raise UserError(
          f"{workdir} holds a run of another config (its config.json differs in: "
          + "; ".join(changes) + "). Use another --workdir, or the same settings to resume.")
  if jax.process_index() == 0:
    files.write_json(path, new, sort_keys=True)
    if not refuse_changes:
      _append_history(workdir, new)
  return workdir


HISTORY_FILE = "config_history.jsonl"


def _append_history(workdir: str, config: dict) -> None:
  """Appends a JSON line (time, host, PID, config) to <workdir>/config_history.jsonl,
  writing the file again whole (atomically). A line that is not a JSON object (a run killed
  while writing it) is dropped with a warning, so that no record runs into the next."""
  path = os.path.join(workdir, HISTORY_FILE)
  try:
    lines = files.read_bytes(path).decode("utf-8", errors="replace").splitlines()
  except FileNotFoundError:
    lines = []
  kept = [line for line in lines if _json_object(line)]
  damaged = [n + 1 for n, line in enumerate(lines) if line.strip() and not _json_object(line)]
  if damaged:
    errors.warn(f"{path}: dropped line{'s' * (len(damaged) > 1)} "
                f"{', '.join(map(str, damaged))}, which {'are' if len(damaged) > 1 else 'is'} "
                "not a whole record (a run interrupted while writing it)")
  line = json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "host": socket.gethostname(), "pid": os.getpid(), "config": config},
                    sort_keys=True)
  files.write_bytes(path, "".join(f"{x}\n" for x in kept + [line]).encode("utf-8"))


def _json_object(line: str) -> bool:
  try:
    return isinstance(json.loads(line), dict)
  except ValueError:
    return False


def refuse_a_file(workdir: str) -> None:
  """UserError where the local `workdir` is an existing file."""
  if not paths.is_url(workdir) and os.path.isfile(workdir):
    raise UserError(f"the workdir {workdir} is a file; expected a folder (give another "
                    "--workdir, or move that file away)")


def check_shared(folder: str, what: str = "the workdir") -> None:
  """UserError (naming `what` and the processes) where, in a multi-host run, not every
  process sees a probe file that process 0 writes in the local `folder`."""
  nonce = int(parallel_lib.broadcast_from_main(np.int32(time.time_ns() % 2**31)))
  probe = os.path.join(folder, f".shared_probe_{nonce}")
  if jax.process_index() == 0:
    files.write_bytes(probe, b"ok")
  parallel_lib.sync_hosts(f"shared probe {nonce} written")
  blind = np.flatnonzero(~parallel_lib.gather_hosts(np.array([os.path.exists(probe)])))
  parallel_lib.sync_hosts(f"shared probe {nonce} read")
  if jax.process_index() == 0:
    files.remove(probe)
  if len(blind):
    raise UserError(f"{what} {folder} is not shared: processes {blind.tolist()} do not "
                    "see the files process 0 writes there; a multi-host run needs a folder "
                    "every host sees (NFS, a mounted bucket)")


# -------------------------------------------------------------------------------- lock

LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.holder"


@contextlib.contextmanager
def locked(workdir: str, enabled: bool = True):
  """Holds <workdir>/.lock for the block: one run per workdir at a time.

  An OS file lock (filelock), released on any exit, kill -9 included: never stale. The
  holder's PID, host and start time go next to it for the message a second run stops with.
  Multi-host runs: enabled on process 0 only. A read-only workdir (a finished run may still
  print its report) and a URL workdir (an object store has no file lock) run unlocked.

  Raises:
    UserError: another process holds the lock (naming its PID and host), or the lock
      cannot be taken for another OS error.
  """
  if not enabled:
    yield
    return
  if paths.is_url(workdir):
    print(f"[workdir] {workdir} is a URL: not locked (an object store has no file lock); "
          "run one run at a time in it", flush=True)
    yield
    return
  import filelock  # pylint: disable=g-import-not-at-top
  refuse_a_file(workdir)
  lock = filelock.FileLock(os.path.join(workdir, LOCK_FILE), timeout=0)
  try:
    os.makedirs(workdir, exist_ok=True)
    lock.acquire()
  except filelock.Timeout:
    raise UserError(f"the workdir {workdir} is in use by {_holder(workdir)}; wait for it "
                    "to finish, or use another --workdir") from None
  except OSError as e:
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
      # Nothing to guard; anything that writes stops with its own one-line error.
      print(f"[workdir] {workdir} is read-only ({e.strerror}): not locked", flush=True)
      yield
      return
    raise UserError(f"cannot lock the workdir {workdir} ({e.strerror or e})") from e
  holder = os.path.join(workdir, HOLDER_FILE)
  try:
    files.write_json(holder, {"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    yield
  finally:
    with contextlib.suppress(OSError):
      os.remove(holder)
    lock.release()


def _holder(workdir: str, wait_s: float = 3.0) -> str:
  """"process PID on HOST, started ..." of the lock's holder, which writes that just after
  taking the lock: a run that lost a race waits `wait_s` for it. A record that is damaged or
  of a process no longer running on this host gives "another process"."""
  deadline = time.monotonic() + wait_s
  while True:
    try:
      record = files.read_json(os.path.join(workdir, HOLDER_FILE), missing={})
    except UserError:  # damaged: it may be written again by the holder in a moment
      record = {}
    pid, host = record.get("pid"), record.get("host")
    if (isinstance(pid, int) and isinstance(host, str) and host
        and (host != socket.gethostname() or _alive(pid))):
      return f"process {pid} on {host}, started {record.get('started', '?')}"
    if time.monotonic() >= deadline:
      return "another process"
    time.sleep(0.05)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    pass  # exists, owned by another user
  return True


# ------------------------------------------------------------------------------ models

def save_model(workdir: str, step: int, variables: dict) -> None:
  """Saves the network's variables ({"params", "batch_stats"}) under <workdir>/model; every
  process calls it."""
  checkpoints = Checkpoints(os.path.join(workdir, "model"), keep=1)
  checkpoints.save(step, variables)
  checkpoints.wait()
  checkpoints.close()


def model_step(workdir: str) -> int | None:
  """The step of the model saved under <workdir>/model (None where there is none)."""
  with contextlib.closing(Checkpoints(os.path.join(workdir, "model"), keep=1)) as checkpoints:
    return checkpoints.latest_step()


def load_model(workdir: str, template: dict, stage: str) -> dict:
  """Variables saved by `save_model`, shaped like `template`.

  Raises:
    UserError: there is no model (naming `stage` to run first) or its shapes differ from
      `template`'s (each difference listed).
  """
  with contextlib.closing(Checkpoints(os.path.join(workdir, "model"), keep=1)) as checkpoints:
    step = checkpoints.latest_step()
    if step is None:
      raise UserError(f"no trained model in {workdir}/model: run the stage {stage!r} first")
    stored = checkpoints.stored_tree(step)
    problems = [p for part in template
                for p in shape_mismatches(flat_shapes(template[part], f"{part}/"),
                                          flat_shapes(stored.get(part) or {}, f"{part}/"))]
    if problems:
      raise UserError(f"the model in {workdir}/model does not match this config:\n  "
                      + "\n  ".join(problems))
    return checkpoints.restore_tree(step, template)

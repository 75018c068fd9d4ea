"""The records a run reads back: a stage's results.json, the pipeline's stage.json and the
record of a finished stage's output files (sizes and digests) it holds. Each is checked for
its shape when read: a record of another shape is refused in one line naming the file.
"""

import hashlib
import json
import os

import jax

from mstkd_jax import files, paths
from mstkd_jax.errors import UserError


# ------------------------------------------------------------------------ stage outputs

# Not outputs a later stage or the report reads: training checkpoints (kept for resume),
# TensorBoard events, hidden files, and the pipeline's own record.
UNRECORDED = ("checkpoints", "stage.json")
UNRECORDED_PREFIXES = ("events.out.tfevents", ".")
FULL_HASH_BYTES = 16 << 20     # files up to this size are hashed whole
SAMPLE_CHUNKS, CHUNK_BYTES = 16, 64 << 10


def _file_digest(path: str, size: int) -> str:
  """sha256 of the file, or for a file over FULL_HASH_BYTES of its first and last chunk and
  SAMPLE_CHUNKS chunks at fixed, evenly spaced offsets (a cache's header and a sample of
  its rows: cheap at any size, and it catches truncation, a rewrite or garbage)."""
  digest = hashlib.sha256()
  with files.open_read(path) as f:
    if size <= FULL_HASH_BYTES:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    else:
      offsets = [0, size - CHUNK_BYTES] + [size * (k + 1) // (SAMPLE_CHUNKS + 1)
                                           for k in range(SAMPLE_CHUNKS)]
      for offset in sorted(offsets):
        f.seek(offset)
        digest.update(f.read(CHUNK_BYTES))
  return digest.hexdigest()


def output_record(stage_dir: str) -> dict:
  """{relative path: `file_record`} of every output file of a finished stage (not
  UNRECORDED ones). `stage_dir` may be a URL."""
  url = paths.is_url(stage_dir)
  record = {}
  walk = (((str(r), d, n) for r, d, n in files.epath_of(stage_dir).walk()) if url
          else os.walk(stage_dir))
  try:
    for root, dirs, names in walk:
      rel_root = os.path.relpath(root, stage_dir)
      # Pruned in place. On GCS, tf.io.gfile lists sub-folders with a trailing "/"
      # (tensorflow issue 39167).
      dirs[:] = sorted(d.rstrip("/") for d in dirs
                       if not (rel_root == "." and d.rstrip("/") in UNRECORDED)
                       and not d.startswith("."))
      for name in sorted(names):
        if (rel_root == "." and name in UNRECORDED) or name.startswith(UNRECORDED_PREFIXES):
          continue
        record[os.path.normpath(os.path.join(rel_root, name))] = file_record(
            os.path.join(root, name))
  except Exception as e:  # pylint: disable=broad-except; a URL's storage library errors
    if not url or isinstance(e, UserError):
      raise
    raise files.url_error(stage_dir, e, "list") from e
  return record


def file_record(path: str) -> dict:
  """{"size": bytes, "sha256": digest} of one file."""
  size = files.size(path)
  return {"size": size, "sha256": _file_digest(path, size)}


def damaged_output(stage_dir: str, record: dict, contents: bool = True) -> str | None:
  """Why the outputs in `stage_dir` differ from `record` (`output_record` when the stage
  finished): the first file missing, of another size or (`contents`) another content; None
  if intact."""
  for rel, expected in sorted(record.items()):
    path = os.path.join(stage_dir, rel)
    try:
      size = files.size(path)
    except OSError:
      return f"{rel} is missing"
    if size != expected["size"]:
      return f"{rel} has {size} bytes, {expected['size']} when the stage finished"
    if not contents:
      continue
    try:
      if _file_digest(path, size) != expected["sha256"]:
        return f"{rel} changed since the stage finished"
    except OSError as e:
      return f"{rel} is unreadable ({e.strerror or e})"
  return None


def _check_shapes(path: str, record: dict, shapes: dict, expected: str, required=()) -> None:
  """UserError naming `path` and the entry where one of `shapes` ({key: kind}; True is not
  an int) is of another kind, or one of `required` (those of a finished stage) is absent."""
  for key, kind in shapes.items():
    if key not in record:
      if key in required:
        raise UserError(f'{path}: a finished stage without "{key}"; expected {expected}')
    elif not isinstance(record[key], kind) or (type(record[key]) is bool and kind is not bool):
      raise UserError(f'{path}: "{key}" holds {json.dumps(record[key])[:60]}; expected {expected}')


# ----------------------------------------------------------------------------- results

def write_results(workdir: str, name: str, step: int, results: dict,
                  record: dict | None = None) -> None:
  """<workdir>/results.json (process 0): the model, its step, the per-group verification
  summary and the entries of `record`."""
  if jax.process_index() != 0:
    return
  summary = {g: {k: r[k] for k in ("accuracy", "accuracy_std", "accuracy_noflip")}
             for g, r in results.items()}
  files.write_json(os.path.join(workdir, "results.json"),
                   {"model": name, "step": int(step), "verification": summary,
                    **(record or {})})


def read_results(workdir: str) -> dict:
  """The results.json a stage wrote ({} where it wrote none).

  Raises:
    UserError: it is unreadable or of another shape than a stage writes, naming it.
  """
  path = os.path.join(workdir, "results.json")
  expected = "the results.json of a stage; rerun its stage"
  results = files.read_json(path, expected, missing={})
  _check_shapes(path, results, {"step": int, "model": str, "verification": dict,
                                "training": dict, "diagnostics": (dict, type(None)),
                                "selected": (dict, type(None)), "stage": str}, expected)
  return results


# ------------------------------------------------------------------------ stage records

STAGE_RECORD = "stage.json"
_STAGE_RECORD_EXPECTED = "a stage record the pipeline writes; delete it to rerun that stage"


def read_stage_record(stage_dir: str) -> dict | None:
  """The pipeline's record of a stage, <stage_dir>/stage.json (None where there is none):
  {"finished": true, "fingerprint", "fields", "inputs", "outputs" (and "caches")} once the
  stage finished; {"invalidated": why} or {"cleared": true} while it is to rerun.

  Raises:
    UserError: the record is unreadable or of another shape, naming the file and the entry.
  """
  path = os.path.join(stage_dir, STAGE_RECORD)
  record = files.read_json(path, _STAGE_RECORD_EXPECTED, missing=None)
  if record is None:
    return None
  required = ("fingerprint", "fields", "inputs", "outputs") if record.get("finished") else ()
  _check_shapes(path, record, {"finished": bool, "invalidated": str, "cleared": bool,
                               "fingerprint": str, "fields": dict, "inputs": dict,
                               "outputs": dict, "caches": dict}, _STAGE_RECORD_EXPECTED, required)
  for key in ("outputs", "caches"):
    for rel, entry in record.get(key, {}).items():
      if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
              and isinstance(entry.get("sha256"), str)):
        raise UserError(f'{path}: "{key}" entry {rel!r} holds {json.dumps(entry)[:60]}; '
                        'expected {"size": bytes, "sha256": digest} '
                        f"({_STAGE_RECORD_EXPECTED})")
  if not all(isinstance(v, str) for v in record.get("inputs", {}).values()):
    raise UserError(f'{path}: "inputs" holds other than fingerprints; expected '
                    f"{_STAGE_RECORD_EXPECTED}")
  return record

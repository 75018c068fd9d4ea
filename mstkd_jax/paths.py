"""Paths that users give (flags, config fields, environment): local ones made absolute,
URLs (gs://bucket/dir) either kept as they are or refused, and the local cache folder.

Where the code reads and writes through `mstkd_jax.files` and `etils.epath` (the workdir's
records: config.json, config_history.jsonl, stage.json, results.json, reports; see
`resolve`), a URL is kept and written through epath, whose gs:// backend is tf.io.gfile
(TensorFlow is installed) or fsspec/gcsfs. Where the code still uses plain file-system
calls, or memory-maps files (the embedding caches), `local` refuses a URL with one line:
otherwise gs://bucket/dir would turn into a local folder named "gs:" without a word.
Buckets are then used through a mount (gcsfuse: launch/tpu_vm.sh --gcsfuse mounts
gs://BUCKET at /mnt/gcs/BUCKET on every TPU VM worker).
"""

import hashlib
import os
import re
import tempfile

from mstkd_jax.errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path) -> bool:
  """Whether `path` (str or os.PathLike, an epath.Path of a bucket included) is a URL
  (scheme://...)."""
  return bool(_URL.match(os.fspath(path)))


def local(path, what: str) -> str:
  """`path` (str or os.PathLike) with ~ expanded, made absolute.

  Raises:
    UserError: `path` is a URL (scheme://...); `what` names the flag or field it came from.
  """
  text = os.fspath(path)
  if _URL.match(text):
    raise UserError(
        f"{what}={text!r} is a URL; mstkd_jax reads and writes plain paths. Mount the "
        "bucket (e.g. gcsfuse; launch/tpu_vm.sh mounts gs://BUCKET at /mnt/gcs/BUCKET on "
        "every worker) or use a shared file system, and give the path")
  return os.path.abspath(os.path.expanduser(text))


def resolve(path, what: str) -> str:
  """A path for code that reads and writes through `mstkd_jax.files` / `etils.epath`: a
  local `path` (str or os.PathLike) as `local` makes it (absolute, ~ expanded); a URL
  (gs://bucket/run) kept as given, less trailing slashes. Returns str either way.

  Raises:
    UserError: `path` is empty or a URL with nothing after the scheme (gs://); `what`
      names the flag or field it came from.
  """
  text = os.fspath(path)
  if not text.strip():
    raise UserError(f"{what} is empty; give a folder or a gs:// URL")
  if _URL.match(text):
    if not _URL.sub("", text).strip("/"):
      raise UserError(f"{what}={text!r} names no bucket or folder")
    return text.rstrip("/")
  return local(text, what)


def cache_dir(cache: str, workdir: str) -> str:
  """The local folder of the memory-mapped caches (teacher_embeddings.npy, targets.npy),
  which need a local disk: `cache` (the config field `cache_dir`) made absolute when given;
  else `workdir` when it is local; else <tempfile.gettempdir()>/mstkd_cache/<the first 16
  hex digits of sha256(workdir)>, one folder per URL workdir on this machine. A cache there
  is not in the bucket: a run on another machine computes it again.

  Raises:
    UserError: `cache` is a URL (a memory map needs a local file).
  """
  if cache:
    return local(cache, "cache_dir")
  if not is_url(workdir):
    return local(workdir, "workdir")
  digest = hashlib.sha256(os.fspath(workdir).rstrip("/").encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), "mstkd_cache", digest)

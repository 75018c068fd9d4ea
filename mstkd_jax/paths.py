"""Paths that users give (flags, config fields, environment): local ones made absolute,
URLs (gs://bucket/dir) either kept as they are (`resolve`: workdirs, checkpoints) or refused
in one line (`local`), and the local cache folder. What must be a local file refuses a URL:
memory-mapped caches, TFDS data folders, the user's own input files and the commands'
--out; otherwise gs://bucket/dir would turn into a local folder named "gs:" without a word.
"""

import os
import re
import tempfile

from mstkd_jax.errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path) -> bool:
  """Whether `path` (str or os.PathLike) is a URL (scheme://...)."""
  return bool(_URL.match(os.fspath(path)))


def local(path, what: str) -> str:
  """`path` with ~ expanded, made absolute.

  Raises:
    UserError: `path` is a URL; `what` names the flag or field it came from.
  """
  text = os.fspath(path)
  if _URL.match(text):
    raise UserError(
        f"{what}={text!r} is a URL; it must be a local path (only the workdir and "
        "checkpoints may be URLs). Copy the files to a local disk, or mount the bucket "
        "(gcsfuse), and give the path")
  return os.path.abspath(os.path.expanduser(text))


def resolve(path, what: str) -> str:
  """A local `path` as `local` makes it, or a URL as given less trailing slashes.

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


CACHE_ROOT = "mstkd_cache"   # under tempfile.gettempdir(), for URL folders without cache_dir


def cache_dir(cache: str, folder: str) -> str:
  """The local folder of the memory-mapped caches of the stage folder `folder`:
  - `cache` (the config field `cache_dir`) empty and `folder` local: `folder` itself;
  - `cache` empty and `folder` a URL: <tempfile.gettempdir()>/mstkd_cache/<mirror>;
  - `cache` given: <cache, made absolute>/<mirror>;
  where <mirror> is `folder` without "://" and leading "/" (gs://bucket/run/x ->
  gs/bucket/run/x). A run resumed on another machine computes such caches again.

  Raises:
    UserError: `cache` is a URL (a memory map needs a local file).
  """
  text = os.fspath(folder).rstrip("/")
  if not cache and not is_url(text):
    return local(text, "workdir")
  root = local(cache, "cache_dir") if cache else os.path.join(tempfile.gettempdir(),
                                                              CACHE_ROOT)
  mirror = text.replace("://", "/", 1) if is_url(text) else local(text, "workdir")
  return os.path.join(root, mirror.lstrip("/"))

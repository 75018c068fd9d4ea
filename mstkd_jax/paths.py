"""Paths that users give (flags, config fields, environment): made absolute, URLs refused.

Every file this project reads or writes goes through plain file-system calls (memory-mapped
embedding caches among them), so a URL such as gs://bucket/dir would otherwise turn into a
local folder named "gs:" without a word. Buckets are used through a mount (gcsfuse:
launch/tpu_vm.sh mounts gs://BUCKET at /mnt/gcs/BUCKET on every TPU VM worker).
"""

import os
import re

from mstkd_jax.errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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

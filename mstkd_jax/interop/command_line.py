"""The command line that evaluate, export and embed share: the flags naming a checkpoint and
its backbone, absl's parsing, --out and --checkpoint checked, and the run of a command's body
with user errors as one line (FlagError: exit code 2, other UserErrors 1).
"""

import dataclasses
import os
from typing import Any, Sequence

from mstkd_jax import errors, files, paths
from mstkd_jax.errors import UserError
from mstkd_jax.interop.resolve import DEFAULTS, FIELDS, ArchSettings


class FlagError(UserError):
  """A bad command-line setting (exit code 2); other UserErrors are data/checkpoint (1)."""
  exit_code = 2


CHECKPOINT_EXPECTED = ("expected a stage workdir, its model/ or checkpoints/ folder or a step "
                       "folder (Orbax), a PyTorch .pth state_dict, or an ONNX recognition "
                       "model (.onnx)")


@dataclasses.dataclass(frozen=True)
class ModelFlags:
  """The absl flags that name a checkpoint and the backbone it holds (`define_model_flags`)."""
  checkpoint: Any
  arch: Any
  width: Any
  embedding_size: Any
  use_se: Any
  image_size: Any

  def settings(self) -> ArchSettings:
    """The explicit ArchSettings the flags give (None where a flag is unset)."""
    return ArchSettings(**{field: getattr(self, field).value for field in FIELDS})


def define_model_flags(repeatable: bool = False) -> ModelFlags:
  """Defines --checkpoint (given several times where `repeatable`), --arch, --width,
  --embedding_size, --use_se and --image_size in absl's global flags (once per command-line
  module); returns their holders.

  The flags belong to the calling module (this module disclaims them), so that they are
  among its key flags and `--help` of the command lists them, not only `--helpfull`.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.disclaim_key_flags()
  default = "default: from config.json or the checkpoint, else"
  help_text = ("Orbax stage workdir (its model/, else latest checkpoints/), a model/ or "
               "checkpoints/ folder or a step folder; a PyTorch IResNet .pth state_dict; or "
               "an ONNX recognition model (.onnx, insightface's convention, run by "
               "onnxruntime).")
  return ModelFlags(
      checkpoint=(flags.DEFINE_multi_string("checkpoint", [], help_text + " Repeatable: "
                                            "one report row per checkpoint.")
                  if repeatable else flags.DEFINE_string("checkpoint", None, help_text)),
      arch=flags.DEFINE_string("arch", None, f"IResNet name ({default} {DEFAULTS.arch})."),
      width=flags.DEFINE_integer("width", None, f"Stem channels ({default} {DEFAULTS.width})."),
      embedding_size=flags.DEFINE_integer(
          "embedding_size", None, f"Embedding size ({default} {DEFAULTS.embedding_size})."),
      use_se=flags.DEFINE_boolean("use_se", None,
                                  f"Squeeze-and-excitation blocks ({default} false)."),
      image_size=flags.DEFINE_integer(
          "image_size", None, f"Model input side, a multiple of 16 ({default} "
          f"{DEFAULTS.image_size})."))


def checkpoint_path(checkpoint: Any) -> str:
  """The local path of a --checkpoint value.

  Raises:
    FlagError: none given.
    UserError: the path does not exist.
  """
  if checkpoint is None or not os.fspath(checkpoint):
    raise FlagError("--checkpoint: expected an Orbax stage workdir, model/ or checkpoints/ "
                    "folder or step folder, a PyTorch .pth file or an ONNX .onnx file")
  path = paths.resolve(checkpoint, "--checkpoint")
  if not files.exists(path):
    raise UserError(f"--checkpoint={os.fspath(checkpoint)}: {path} does not exist; "
                    + CHECKPOINT_EXPECTED)
  return path


def parse_flags(argv):
  """absl's flag parsing, with flag mistakes reported as one line (exit code 2)."""
  import sys  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def output_file(out: Any, example: str) -> str:
  """The absolute local path of a command's --out file (e.g. example "embeddings.npz").

  Raises:
    FlagError: --out is missing or empty, a URL, or an existing folder.
  """
  if out is None or not os.fspath(out):
    raise FlagError(f"--out: expected the file to write, e.g. --out={example}")
  try:
    path = paths.local(out, "--out")
  except UserError as e:
    raise FlagError(str(e)) from None
  if os.path.isdir(path):
    raise FlagError(f"--out={os.fspath(out)}: is a folder; expected the file to write "
                    f"(e.g. {example})")
  return path


def run_command(argv: Sequence[str], body) -> None:
  """Runs a command's `body()` as absl's main: unexpected positional arguments and FlagError
  print one `error: ...` line and exit 2, any other UserError one line and exit 1, Ctrl-C
  (KeyboardInterrupt) one line and exit 130 at once (`errors.run_reported`)."""
  import sys  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; give every setting as a --flag",
          file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)
  errors.run_reported(body)

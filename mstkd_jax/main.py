r"""Command-line entry point: runs the stage (or the whole recipe) a config names.

  python -m mstkd_jax.main --config=configs/teacher.py:smoke --workdir=/tmp/w
  python -m mstkd_jax.main --config=configs/teacher.py --config.teacher.group=group_b

Multi-host (TPU VM pods, SLURM) is set up here and only here.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mstkd_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:preset]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Where the run writes; default ./workdir/<config>_<preset>.")
_MULTIHOST = flags.DEFINE_enum(
    "multihost", "auto", ["auto", "true", "false"],
    "Call jax.distributed.initialize(): auto = on a TPU VM pod or under SLURM.")


def _stages():
  # Imported here so `--help` and flag errors do not pay for importing JAX and TF.
  # pylint: disable=g-import-not-at-top
  from mstkd_jax import pipeline
  from mstkd_jax.stages import teacher
  return {"teacher": teacher.run, "pipeline": pipeline.run}


def _wants_multihost(mode: str) -> bool:
  if mode != "auto":
    return mode == "true"
  on_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  on_tpu_pod = int(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",")) > 0
  return on_slurm or on_tpu_pod


def default_workdir(config_arg: str) -> str:
  path, _, preset = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdir", f"{name}_{preset or 'default'}")


def run(config, workdir: str, multihost: str = "false"):
  """Runs `config.stage` in `workdir` (importable: notebooks and tests call this)."""
  import jax  # pylint: disable=g-import-not-at-top
  if _wants_multihost(multihost):
    jax.distributed.initialize()
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # Reruns and resumptions (and stages of the same shapes) skip XLA compilation.
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.abspath(workdir), "compilation_cache"))
  stages = _stages()
  if config.stage not in stages:
    raise UserError(f"config field stage={config.stage!r}: expected one of {sorted(stages)}")
  return stages[config.stage](config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config_arg = flags.FLAGS["config"].config_filename
  workdir = _WORKDIR.value or default_workdir(config_arg)
  try:
    config = _CONFIG.value
    config.stage  # pylint: disable=pointless-statement
  except OSError as e:  # ml_collections reports an unloadable config file only on use.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    run(config, workdir, _MULTIHOST.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
  """absl's flag parsing, with config mistakes (unknown preset or field, bad value) reported
  as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (UserError, KeyError, ValueError, TypeError, AttributeError, flags.Error) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)

r"""Command-line entry point: runs the stage (or the whole recipe) a config names.

  python -m mstkd_jax.main --config=configs/teacher.py:smoke --workdir=/tmp/w
  python -m mstkd_jax.main --config=configs/teacher.py --config.teacher.group=group_b

Multi-host (TPU VM pods, SLURM, or a manual launch):

  python -m mstkd_jax.main --config=... --workdir=<shared folder> \
      --coordinator_address=10.0.0.1:8476 --num_processes=2 --process_id=<0 or 1>

(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment). Every
process runs the same command on the same workdir; only process 0 prints and writes files.

SIGTERM (a preemption, a scheduler's time limit) or Ctrl-C: a training stage saves the step
it reached (every process the same step), and the run ends with one `error:` line and exit
status 143 (SIGTERM) or 130 (SIGINT); the same command resumes.
"""

import contextlib
import os
import re
import sys
import threading

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from mstkd_jax import multihost, paths
from mstkd_jax.errors import UserError
from mstkd_jax.multihost import Multihost


class _KeepsConfig(flags.ArgumentParser):
  """The config flag's parser, keeping the config it loaded for `_unknown_field`."""

  def __init__(self, parser: flags.ArgumentParser):
    self.parser, self.path, self.config = parser, None, None

  def parse(self, argument):
    self.path, self.config = argument, None
    self.config = self.parser.parse(argument)
    return self.config

  def flag_type(self):
    return self.parser.flag_type()


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:preset]).",
                                          lock_config=True)
flags.FLAGS["config"].parser = _KeepsConfig(flags.FLAGS["config"].parser)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Where the run writes: a folder or a gs:// URL; default "
                               "./workdir/<config>_<preset>.")
_MULTIHOST = flags.DEFINE_enum(
    "multihost", "auto", ["auto", "true", "false"],
    "Call jax.distributed.initialize(): auto = on a TPU VM pod, under SLURM with several "
    "tasks, or when a coordinator address or process count > 1 is given.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for a manual multi-host launch (env JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes of a manual multi-host launch (env JAX_NUM_PROCESSES).",
    lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id, 0..num_processes-1 (env JAX_PROCESS_ID).",
    lower_bound=0)
_MULTIHOST_TIMEOUT = flags.DEFINE_integer(
    "multihost_timeout", 300,
    "Seconds to wait for the coordinator and every process before stopping with an error.",
    lower_bound=1)


def _stages():
  # Imported here so `--help` and flag errors do not pay for importing JAX and TF.
  # pylint: disable=g-import-not-at-top
  from mstkd_jax import pipeline
  from mstkd_jax.stages import teacher
  return {"teacher": teacher.run, "pipeline": pipeline.run}


def default_workdir(config_arg: str) -> str:
  path, _, preset = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdir", f"{name}_{preset or 'default'}")


def run(config, workdir: str, hosts: str | Multihost = "false"):
  """Runs `config.stage` in `workdir`; `hosts` is a --multihost mode or a Multihost."""
  from mstkd_jax import config_ranges  # pylint: disable=g-import-not-at-top
  config_ranges.check(config)  # every field in its range, before anything starts
  import jax  # pylint: disable=g-import-not-at-top
  from mstkd_jax.train import build  # pylint: disable=g-import-not-at-top
  config = build.resolve_dtypes(config)  # "auto" -> this platform's dtype, recorded
  workdir = paths.resolve(workdir, "--workdir")
  multihost.initialize(hosts if isinstance(hosts, Multihost) else Multihost(mode=hosts))
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # Reruns and resumptions skip XLA compilation; on a local disk (paths.cache_dir).
    cache = paths.cache_dir(config.get("cache_dir", ""), workdir)
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache, "compilation_cache"))
  stages = _stages()
  if config.stage not in stages:
    raise UserError(f"config field stage={config.stage!r}: expected one of {sorted(stages)}")
  if paths.is_url(workdir) and "data" in config:
    # The synthetic set's cache goes to the local cache folder.
    from mstkd_jax.data import sources  # pylint: disable=g-import-not-at-top
    config = sources.with_data_dir(config, workdir)
  from mstkd_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  quiet = jax.process_index() != 0  # the others compute alike; process 0 reports for all
  with workdir_lib.locked(workdir, enabled=not quiet), open(os.devnull, "w") as devnull:
    with contextlib.redirect_stdout(devnull) if quiet else contextlib.nullcontext():
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
    print(f"error: {_unloadable(config_arg, e)}", file=sys.stderr)
    sys.exit(2)
  # pylint: disable=g-import-not-at-top; neither imports JAX (a fast --help)
  from mstkd_jax import errors
  from mstkd_jax.train import interrupts
  try:
    with interrupts.handled():  # SIGTERM and SIGINT: save the step reached, then stop
      run(config, workdir, Multihost(
          mode=_MULTIHOST.value, coordinator_address=_COORDINATOR.value,
          num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
          timeout_s=_MULTIHOST_TIMEOUT.value))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    exit_promptly(1)
  except KeyboardInterrupt as e:
    # Without interpreter shutdown: XLA may still be compiling on its own threads.
    if isinstance(e, interrupts.Interrupted):
      print(f"error: {e}", file=sys.stderr)
      interrupts.exit_now(e.code)
    print("error: interrupted; rerun the same command to resume", file=sys.stderr)
    interrupts.exit_now(130)
  except Exception as e:  # pylint: disable=broad-except
    memory = errors.out_of_memory(e)
    if memory is not None:  # outside a training step (the loop words its own)
      print(f"error: out of memory while embedding or evaluating images ({memory}); lower "
            "the stage's train.eval_batch_size (in the recipe: teacher.train."
            "eval_batch_size, student.train.eval_batch_size) or the image size",
            file=sys.stderr)
    else:  # a bug
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
    exit_promptly(1)


EXIT_GRACE_S = 10.0  # how long interpreter shutdown may take once the run has failed


def exit_promptly(code: int) -> None:
  """sys.exit(code), then os._exit(code) after EXIT_GRACE_S seconds of shutdown: a thread
  that cannot finish (an Orbax save waiting for a commit that will not come) would otherwise
  hold the process for minutes. The workdir lock goes with it."""
  sys.stdout.flush()
  sys.stderr.flush()
  timer = threading.Timer(EXIT_GRACE_S, os._exit, args=(code,))  # pylint: disable=protected-access
  timer.daemon = True
  timer.start()
  sys.exit(code)


def parse_flags(argv):
  """absl's flag parsing, config mistakes (unknown preset or field, bad value) in one line."""
  try:
    return flags.FLAGS(argv)
  except (UserError, KeyError, ValueError, TypeError, AttributeError, OSError,
          flags.Error) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    config_arg = flags.FLAGS["config"].parser.path
    if isinstance(e, OSError) and config_arg:  # an override of a config that did not load
      message = _unloadable(config_arg, e)
    if isinstance(e, (KeyError, AttributeError)):
      known = _unknown_field(argv)
      if known:
        hint = re.search(r"Did you mean [^\n']*\?", str(message))
        message = known + (f" ({hint.group(0)})" if hint else "")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _unloadable(config_arg: str, error: OSError) -> str:
  path = config_arg.partition(":")[0]
  reason = (f"no such file (from {os.getcwd()})" if not os.path.exists(path)
            else str(error).strip().splitlines()[-1].strip())
  return f"--config={config_arg}: cannot load the config file: {reason}"


def _unknown_field(argv) -> str | None:
  """"unknown config field X (in <config>); <section> has: ..." for the first --config.X
  override in `argv` that the loaded config lacks; else None."""
  parser = flags.FLAGS["config"].parser
  if not isinstance(parser.config, ml_collections.ConfigDict):
    return None
  for field in [a[len("--config."):].split("=", 1)[0] for a in argv
                if a.startswith("--config.")]:
    section = parser.config
    for i, key in enumerate(field.split(".")):
      children = section.keys() if isinstance(section, ml_collections.ConfigDict) else ()
      if key not in children:
        where = ".".join(field.split(".")[:i]) or "the config"
        return (f"unknown config field {field!r} (in {parser.path}); {where} has: "
                f"{', '.join(sorted(children))}")
      section = section[key]
  return None


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)

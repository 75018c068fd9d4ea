r"""Command-line entry point: runs the stage (or the whole recipe) a config names.

  python -m mstkd_jax.main --config=configs/teacher.py:smoke --workdir=/tmp/w
  python -m mstkd_jax.main --config=configs/teacher.py --config.teacher.group=group_b

Multi-host (TPU VM pods, SLURM, or a manual launch) is set up here and only here:

  python -m mstkd_jax.main --config=... --workdir=<shared folder> \
      --coordinator_address=10.0.0.1:8476 --num_processes=2 --process_id=<0 or 1>

(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment). Every
process runs the same command on the same workdir; only process 0 prints and writes files.

SIGTERM (a preemption, a scheduler's time limit) or Ctrl-C: a training stage saves the step
it reached (every process the same step), and the run ends with one `error:` line and exit
status 143 (SIGTERM) or 130 (SIGINT); the same command resumes (train/interrupts.py).
"""

import contextlib
import dataclasses
import os
import re
import socket
import sys
import threading
import time

from absl import app, flags, logging
from ml_collections import config_flags

from mstkd_jax import paths
from mstkd_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:preset]).",
                                          lock_config=True)
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
    "num_processes", None, "Processes of a manual multi-host launch (env JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id, 0..num_processes-1 (env JAX_PROCESS_ID).")
_MULTIHOST_TIMEOUT = flags.DEFINE_integer(
    "multihost_timeout", 300,
    "Seconds to wait for the coordinator and every process before stopping with an error.")


def _stages():
  # Imported here so `--help` and flag errors do not pay for importing JAX and TF.
  # pylint: disable=g-import-not-at-top
  from mstkd_jax import pipeline
  from mstkd_jax.stages import teacher
  return {"teacher": teacher.run, "pipeline": pipeline.run}


@dataclasses.dataclass(frozen=True)
class Multihost:
  """How to set up several JAX processes; None fields come from the environment."""
  mode: str = "auto"                   # auto | true | false
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = 300

  def manual(self) -> dict:
    """{coordinator_address, num_processes, process_id} from the flags, else JAX_* env."""
    return {"coordinator_address": self.coordinator_address
                                   or os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
            "num_processes": _pick_int(self.num_processes, "JAX_NUM_PROCESSES"),
            "process_id": _pick_int(self.process_id, "JAX_PROCESS_ID")}


def _pick_int(value, env: str):
  if value is not None:
    return value
  text = os.environ.get(env, "").strip()
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise UserError(f"environment variable {env}={text!r}: expected an integer") from None


def _on_cluster() -> bool:
  """Under SLURM or Open MPI with several tasks, or on a TPU VM pod (JAX finds the cluster
  itself)."""
  several = lambda env: os.environ.get(env, "1").strip() not in ("", "0", "1")
  on_tpu_pod = os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
  return several("SLURM_NTASKS") or several("OMPI_COMM_WORLD_SIZE") or on_tpu_pod


def _wants_multihost(mode: str, manual: dict | None = None) -> bool:
  if mode not in ("auto", "true", "false"):
    raise UserError(f"--multihost={mode!r}: expected auto, true or false")
  if mode != "auto":
    return mode == "true"
  manual = manual or {}
  return (_on_cluster() or manual.get("coordinator_address") is not None
          or (manual.get("num_processes") or 1) > 1)


def _check_manual(manual: dict, timeout_s: int) -> None:
  """Refuses impossible settings before JAX sees them (JAX fills in those left None)."""
  if timeout_s < 1:
    raise UserError(f"--multihost_timeout={timeout_s}: expected at least 1 second")
  address, num, pid = (manual[k] for k in ("coordinator_address", "num_processes",
                                           "process_id"))
  if num is not None and num < 1:
    raise UserError(f"--num_processes={num}: expected at least 1")
  if pid is not None and not 0 <= pid < (num or pid + 1):
    raise UserError(f"--process_id={pid}: expected 0..{num - 1} for --num_processes={num}")
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise UserError(f"--coordinator_address={address!r}: expected host:port of process 0")


def _wait_for_coordinator(address: str, deadline: float, timeout_s: int) -> None:
  """Returns once process 0's coordinator accepts connections, or raises UserError."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=1.0):
        return
    except OSError as e:
      reason = e.strerror or str(e)
    if time.monotonic() >= deadline:
      raise UserError(
          f"cannot reach the multi-host coordinator at {address} within {timeout_s} s "
          f"({reason}): start process 0 (--process_id=0) with the same "
          "--coordinator_address, and check the host, the port and the firewall")
    time.sleep(0.25)


def initialize_multihost(setup: Multihost) -> bool:
  """Calls jax.distributed.initialize() if `setup` asks for several processes.

  Waits at most `setup.timeout_s` for the coordinator and every process; then stops with
  one clear message (a UserError, or, when JAX's connection wait itself runs out of time
  and cannot be interrupted, the same message on stderr and exit status 1). Returns
  whether JAX runs distributed.
  """
  import jax  # pylint: disable=g-import-not-at-top
  manual = setup.manual()
  if not _wants_multihost(setup.mode, manual):
    return False
  if jax.distributed.is_initialized():
    return True
  _check_manual(manual, setup.timeout_s)
  deadline = time.monotonic() + setup.timeout_s
  address, num = manual["coordinator_address"], manual["num_processes"]
  if address and manual["process_id"] not in (None, 0):
    _wait_for_coordinator(address, deadline, setup.timeout_s)
  who = f"the {num} processes" if num else "the processes of this cluster job"
  fix = ("start every process with the same --coordinator_address and --num_processes and "
         "a distinct --process_id (0 .. num_processes - 1)" if address else
         "check that every task of the job started and reaches the others")
  message = (f"error: {who} did not all connect to the multi-host coordinator"
             f"{' at ' + address if address else ''} within {setup.timeout_s} s: {fix}")

  def give_up():
    # JAX's connect blocks in C++ and aborts with a cryptic log when its own (later)
    # timeout passes; say what went wrong and leave first.
    print(message, file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access

  watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**manual,
                               initialization_timeout=int(setup.timeout_s) + 60)
  except (RuntimeError, ValueError, TypeError) as e:
    missing = [f"--{k} (or JAX_{k.upper()})" for k, v in manual.items() if v is None]
    if missing and isinstance(e, ValueError):
      raise UserError(
          "cannot set up the multi-host run: JAX found no cluster (TPU VM pod, SLURM, Open "
          f"MPI) to take the settings from ({e}); give {', '.join(missing)}") from e
    raise UserError(f"cannot set up the multi-host run: {e}") from e
  finally:
    watchdog.cancel()
  return True


def default_workdir(config_arg: str) -> str:
  path, _, preset = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdir", f"{name}_{preset or 'default'}")


def run(config, workdir: str, multihost: str | Multihost = "false"):
  """Runs `config.stage` in `workdir` (importable: notebooks and tests call this).

  `multihost` is a mode ("auto", "true", "false") or a full Multihost setting.
  """
  from mstkd_jax import config_ranges  # pylint: disable=g-import-not-at-top
  config_ranges.check(config)  # every field in its range, before anything starts
  import jax  # pylint: disable=g-import-not-at-top
  workdir = paths.resolve(workdir, "--workdir")
  setup = multihost if isinstance(multihost, Multihost) else Multihost(mode=multihost)
  initialize_multihost(setup)
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # Reruns and resumptions (and stages of the same shapes) skip XLA compilation. Kept on
    # a local disk: the workdir's own folder, or its local cache folder for a URL workdir.
    cache = paths.cache_dir(config.get("cache_dir", ""), workdir)
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache, "compilation_cache"))
  stages = _stages()
  if config.stage not in stages:
    raise UserError(f"config field stage={config.stage!r}: expected one of {sorted(stages)}")
  if paths.is_url(workdir) and "data" in config:
    # The synthetic set's cache goes to the local cache folder (the pipeline does this for
    # its stages itself).
    from mstkd_jax.data import sources  # pylint: disable=g-import-not-at-top
    config = sources.with_data_dir(config, workdir)
  from mstkd_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  with workdir_lib.locked(workdir, enabled=jax.process_index() == 0):
    if jax.process_index() == 0:
      return stages[config.stage](config, workdir)
    # The other processes compute alike but stay quiet: process 0 reports for all.
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
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
    path = config_arg.partition(":")[0]
    reason = (f"no such file (from {os.getcwd()})" if not os.path.exists(path)
              else str(e).strip().splitlines()[-1].strip())
    print(f"error: --config={config_arg}: cannot load the config file: {reason}",
          file=sys.stderr)
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
      exit_promptly(1)
    # A bug: its traceback, then the same prompt exit.
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
    exit_promptly(1)


EXIT_GRACE_S = 10.0  # how long interpreter shutdown may take once the run has failed


def exit_promptly(code: int, grace_s: float | None = None) -> None:
  """sys.exit(code), bounded in time.

  A background thread that cannot finish (an Orbax save waiting for a commit that will not
  come) would otherwise hold the process at shutdown for minutes. After `grace_s` seconds
  (default EXIT_GRACE_S) of shutdown the process ends with `code` anyway (os._exit);
  everything already written stays, and the workdir lock goes with the process.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  grace_s = EXIT_GRACE_S if grace_s is None else grace_s
  timer = threading.Timer(grace_s, os._exit, args=(code,))  # pylint: disable=protected-access
  timer.daemon = True
  timer.start()
  sys.exit(code)


def parse_flags(argv):
  """absl's flag parsing, with config mistakes (unknown preset or field, bad value) reported
  as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (UserError, KeyError, ValueError, TypeError, AttributeError, flags.Error) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, (KeyError, AttributeError)):
      known = unknown_field_message(argv)
      if known:
        hint = re.search(r"Did you mean [^\n']*\?", str(message))
        message = known + (f" ({hint.group(0)})" if hint else "")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def unknown_field_message(argv) -> str | None:
  """"unknown config field X; <section> has: ..." for the first --config.X override of
  `argv` that the config (file and preset as given) does not have; None if all exist or
  the config cannot be loaded."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if not config_arg:
    return None
  path, _, preset = config_arg.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_config_for_message", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset or None)
  except Exception:  # pylint: disable=broad-except
    return None
  for arg in argv:
    if not arg.startswith("--config.") or arg.startswith("--config_"):
      continue
    field = arg[len("--config."):].split("=", 1)[0]
    section = config
    for i, key in enumerate(field.split(".")):
      children = section.keys() if hasattr(section, "keys") else ()
      if key not in children:
        where = ".".join(field.split(".")[:i]) or "the config"
        return (f"unknown config field {field!r} (in {config_arg}); {where} has: "
                f"{', '.join(sorted(children))}")
      section = section[key]
  return None


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)

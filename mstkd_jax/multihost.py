"""Several JAX processes (a TPU VM pod, SLURM, Open MPI, or a manual launch): when to call
jax.distributed.initialize(), and a bounded wait that ends in one line when the processes do
not all meet."""

import dataclasses
import os
import re
import socket
import sys
import threading

from mstkd_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Multihost:
  """How to set up several JAX processes; None fields come from the environment."""
  mode: str = "auto"                   # auto | true | false
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = 300

  def manual(self) -> dict:
    """{coordinator_address, num_processes, process_id} from the fields, else JAX_* env."""
    return {"coordinator_address": self.coordinator_address
                                   or os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
            "num_processes": _int_or_env(self.num_processes, "JAX_NUM_PROCESSES"),
            "process_id": _int_or_env(self.process_id, "JAX_PROCESS_ID")}

  def wanted(self, manual: dict) -> bool:
    """Mode "true", or "auto" on a cluster (SLURM or Open MPI with several tasks, a TPU VM
    pod) or with a coordinator or several processes given."""
    if self.mode not in ("auto", "true", "false"):
      raise UserError(f"--multihost={self.mode!r}: expected auto, true or false")
    if self.mode != "auto":
      return self.mode == "true"
    several = lambda env: os.environ.get(env, "1").strip() not in ("", "0", "1")
    return (several("SLURM_NTASKS") or several("OMPI_COMM_WORLD_SIZE")
            or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
            or manual["coordinator_address"] is not None or (manual["num_processes"] or 1) > 1)


def _int_or_env(value, env: str) -> int | None:
  text = os.environ.get(env, "").strip()
  if value is not None or not text:
    return value
  try:
    return int(text)
  except ValueError:
    raise UserError(f"environment variable {env}={text!r}: expected an integer") from None


def initialize(setup: Multihost) -> bool:
  """Calls jax.distributed.initialize() if `setup` asks for several processes; returns
  whether JAX runs distributed. JAX's own time-out aborts with a C++ stack trace: a timer
  ends the process first, after `setup.timeout_s`, with one `error:` line and status 1.

  Raises:
    UserError: a coordinator address that is not host:port, or settings JAX refuses (a
      process id out of range, missing settings and no cluster to take them from).
  """
  import jax  # pylint: disable=g-import-not-at-top
  manual = setup.manual()
  if not setup.wanted(manual):
    return False
  if jax.distributed.is_initialized():
    return True
  address = manual["coordinator_address"]
  if address is not None and not re.fullmatch(r".+:\d+", address):
    raise UserError(f"--coordinator_address={address!r}: expected host:port of process 0")
  timer = threading.Timer(setup.timeout_s, _give_up, (manual, setup.timeout_s))
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(**manual, initialization_timeout=int(setup.timeout_s) + 60)
  except (RuntimeError, ValueError, TypeError) as e:
    missing = [f"--{k} (or JAX_{k.upper()})" for k, v in manual.items() if v is None]
    if missing and isinstance(e, ValueError):
      raise UserError(
          "cannot set up the multi-host run: JAX found no cluster (TPU VM pod, SLURM, Open "
          f"MPI) to take the settings from ({e}); give {', '.join(missing)}") from e
    raise UserError(f"cannot set up the multi-host run: {e}") from e
  finally:
    timer.cancel()
  return True


def _give_up(manual: dict, timeout_s: int) -> None:
  """Ends the process with one line: the coordinator is unreachable, or not every process
  connected to it."""
  address, num, pid = manual.values()  # in Multihost.manual's order
  unreachable = _unreachable(address) if address and pid not in (None, 0) else None
  if unreachable:
    message = (f"cannot reach the multi-host coordinator at {address} within {timeout_s} s "
               f"({unreachable}): start process 0 (--process_id=0) with the same "
               "--coordinator_address, and check the host, the port and the firewall")
  else:
    who = f"the {num} processes" if num else "the processes of this cluster job"
    fix = ("start every process with the same --coordinator_address and --num_processes "
           "and a distinct --process_id (0 .. num_processes - 1)" if address else
           "check that every task of the job started and reaches the others")
    message = (f"{who} did not all connect to the multi-host coordinator"
               f"{' at ' + address if address else ''} within {timeout_s} s: {fix}")
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


def _unreachable(address: str) -> str | None:
  """Why no connection to host:port `address` opens; None where one does."""
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
      return None
  except OSError as e:
    return e.strerror or str(e)

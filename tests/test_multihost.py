"""Several JAX processes: 2 processes x 2 CPU devices train like 1 process x 4 devices.

Each run is a subprocess of this file (`python tests/test_multihost.py worker ...`): the
pytest process already holds 8 devices, and jax.distributed must start before any JAX
computation. Both runs train the teacher stage (pmap) and a student stage (a-KD on cached
targets, shard_map) and must end with the same parameters and verification embeddings. The processes
are bounded in time and killed if a test fails.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import conftest
import numerics
from configs import teacher as teacher_config
from mstkd_jax import main
from mstkd_jax.errors import UserError
from mstkd_jax.stages import shared, student
from mstkd_jax.train import checkpoints, loop, parallel, state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT_S = 480              # generous: the CPU may be shared with other work
NUM_IMAGES = 2 * 8 * 6            # groups x identities x images of configs/teacher.py:tiny
EMBEDDING = 16                    # its embedding size
# 2 processes x 2 devices against 1 x 4: gradients and BatchNorm statistics reduced in
# another order (gloo between the processes) over the teacher's 12 steps, the widest sum a
# BatchNorm's over 16 images x 16 x 16: 576 EPS32 = 6.9e-5 (the student trains 6 of them).
# Measured: 12 EPS32 (the teacher's momentum) on the AVX-512 and AVX2 code paths, 17 on
# SSE4.2.
MULTIHOST_BOUND = numerics.reorder_bound(terms=16 * 16 * 16, steps=12)


def tiny_teacher_config():
  c = teacher_config.get_config("tiny")
  c.model.stage_depths = (1, 1, 1, 1)  # IResNet's structure, one block per stage: quick
  c.train.eval_batch_size = 64
  c.num_devices = 0                   # every device of every process
  return c


def tiny_student_config():
  c = tiny_teacher_config()
  del c["teacher"]
  c.stage = "student"
  c.train.update(epochs=1.0, checkpoint_every=100)
  c.parallelism = "shard_map"         # the teacher runs pmap: both kinds span processes
  c.student = ml_collections.ConfigDict(dict(
      kd=dict(distance="mse", weight=100.0, margin_loss=False), targets="cached"))
  return c


def worker(args):
  """One process of a run: `worker <workdir> <num_processes> <process_id> <port>`."""
  workdir, num_processes, process_id, port = args[0], int(args[1]), int(args[2]), args[3]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  multihost = main.Multihost(mode="false")
  if num_processes > 1:
    multihost = main.Multihost(mode="true", coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id,
                               timeout_s=60)
  started = time.perf_counter()
  main.run(tiny_teacher_config(), os.path.join(workdir, "teacher"), multihost)
  # main runs the stages its configs name; the student stage is called as the pipeline does.
  quiet = open(os.devnull, "w") if jax.process_index() else None
  with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
    student.run(tiny_student_config(), os.path.join(workdir, "student"),
                inputs=shared.Inputs(adaptor_dir=os.path.join(workdir, "adaptor")))
  print(f"worker: {time.perf_counter() - started:.1f} s in the stages, "
        f"{time.process_time():.1f} s of CPU in all", flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Processes:
  """Started subprocesses, each logging to a file; all killed at the end of a test."""

  def __init__(self, log_dir):
    self.log_dir = log_dir
    self.started = []
    self.wall_s = {}              # name -> seconds from start to exit

  def start(self, name: str, argv: list, devices: int):
    # LLVM optimisation off: the runs compile in half the time (compiling is most of a
    # worker's time; it trains 18 tiny steps), and every run compiles alike, so both sides
    # of the comparison still run the same code.
    env = dict(os.environ, XLA_FLAGS=conftest.child_xla_flags(
                   f"--xla_force_host_platform_device_count={devices}",
                   "--xla_backend_optimization_level=0"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=ROOT)
    env.pop("JAX_PLATFORMS", None)
    log = open(os.path.join(self.log_dir, f"{name}.log"), "w")
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    self.started.append((name, proc, log))
    self.wall_s[name] = time.perf_counter()
    return proc

  def wait_all(self, timeout_s: float) -> None:
    """Waits for every started process; fails (showing its log) at the first error, or
    when one still runs after `timeout_s`."""
    deadline = time.perf_counter() + timeout_s
    running = list(self.started)
    while running:
      for name, proc, _ in list(running):
        if proc.poll() is None:
          continue
        running.remove((name, proc, _))
        self.wall_s[name] = time.perf_counter() - self.wall_s[name]
        if proc.returncode:
          pytest.fail(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
      if running and time.perf_counter() > deadline:
        name = running[0][0]
        pytest.fail(f"{name} still running after {timeout_s} s:\n{self.tail(name)}")
      time.sleep(0.2)

  def output(self, name: str) -> str:
    with open(os.path.join(self.log_dir, f"{name}.log")) as f:
      return f.read()

  def tail(self, name: str, lines: int = 40) -> str:
    return "\n".join(self.output(name).splitlines()[-lines:])

  def kill_all(self):
    for _, proc, log in self.started:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
    self.started = []


@pytest.fixture
def processes(tmp_path):
  procs = _Processes(str(tmp_path))
  yield procs
  procs.kill_all()


def _start(processes, name: str, workdir: str, num_processes: int, devices: int) -> None:
  port = _free_port()
  for pid in range(num_processes):
    processes.start(f"{name}{pid}", [__file__, "worker", workdir, str(num_processes),
                                     str(pid), str(port)], devices)


def _seed(workdir: str) -> None:
  """The cached student targets of a run: fixed unit vectors [N, 2, D]."""
  os.makedirs(os.path.join(workdir, "adaptor"))
  targets = np.random.default_rng(0).normal(size=(NUM_IMAGES, 2, EMBEDDING))
  targets /= np.linalg.norm(targets, axis=-1, keepdims=True)
  np.save(os.path.join(workdir, "adaptor", "targets.npy"), targets.astype(np.float32))


def _final_state(stage_dir: str):
  manager = checkpoints.Checkpoints(os.path.join(stage_dir, "checkpoints"))
  step = manager.latest_step()
  state = manager.manager.restore(step, args=ocp.args.Composite(
      **{checkpoints.STATE: ocp.args.StandardRestore()}))[checkpoints.STATE]
  manager.close()
  return step, state


@pytest.mark.slow
def test_two_processes_train_like_one(processes, tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _seed(one)
  _seed(two)
  # Side by side: the second process compiles everything itself (JAX's persistent cache is
  # written by process 0 only), which leaves a core idle for the 1-process run.
  _start(processes, "one", one, num_processes=1, devices=4)
  _start(processes, "two", two, num_processes=2, devices=2)
  processes.wait_all(RUN_TIMEOUT_S)
  wall = processes.wall_s
  print(f"\nwall time, run side by side: 1 process x 4 devices {wall['one0']:.1f} s; "
        f"2 processes x 2 devices {max(wall['two0'], wall['two1']):.1f} s")
  for name in ("one0", "two0", "two1"):
    print(name, *[line for line in processes.output(name).splitlines() if "worker:" in line])
  main_log, other_log = processes.output("two0"), processes.output("two1")
  processes.kill_all()
  assert "[student] step 6/6" in main_log
  assert "[teacher" not in other_log and "[student" not in other_log  # process 0 reports
  for stage in ("teacher", "student"):
    step_one, state_one = _final_state(os.path.join(one, stage))
    step_two, state_two = _final_state(os.path.join(two, stage))
    assert step_one == step_two == {"teacher": 12, "student": 6}[stage]
    for part in ("params", "batch_stats", "opt_state"):
      numerics.check_tree(f"{stage} {part}", state_one[part], state_two[part],
                          MULTIHOST_BOUND)
    with np.load(os.path.join(one, stage, "verification_embeddings.npz")) as a, \
        np.load(os.path.join(two, stage, "verification_embeddings.npz")) as b:
      assert sorted(a.files) == sorted(b.files)
      numerics.check_tree(f"{stage} embeddings",
                          {k: a[k] for k in a.files if "issame" not in k},
                          {k: b[k] for k in b.files if "issame" not in k}, MULTIHOST_BOUND)
    with open(os.path.join(two, stage, "results.json")) as f:
      assert set(json.load(f)["verification"]) == {"group_a", "group_b"}
    assert not [f for f in os.listdir(os.path.join(two, stage)) if "probe" in f]


def test_resuming_on_another_device_count_says_so(tmp_path, capsys):
  """The training state is replicated, so a checkpoint of 1 device resumes on 2."""

  def step(state, batch, rng):
    del rng
    return (state.replace(step=state.step + 1,
                          params={"w": state.params["w"] + jnp.mean(batch["x"])}),
            {"loss": 1.0 / (1.0 + state.step)})

  def batches(devices, stop):
    return lambda start: ({"x": np.full((devices, 1), float(t), np.float32)}
                          for t in range(start, stop))

  init = state_lib.TrainState(step=np.zeros((), np.int32),
                              params={"w": np.zeros(3, np.float32)}, batch_stats={},
                              opt_state=optax.EmptyState())
  settings = loop.LoopSettings(name="toy", total_steps=6, steps_per_epoch=6,
                               images_per_step=2, log_every=2, checkpoint_every=2)
  with pytest.raises(UserError, match="the input pipeline ended at step 3"):
    loop.train(workdir=str(tmp_path), settings=settings, init_state=init, step_fn=step,
               batches=batches(1, 3), parallel=parallel.get("pmap", 1),
               rng=np.zeros(2, np.uint32))
  final = loop.train(workdir=str(tmp_path), settings=settings, init_state=init, step_fn=step,
                     batches=batches(2, 6), parallel=parallel.get("pmap", 2),
                     rng=np.zeros(2, np.uint32))
  out = capsys.readouterr().out
  assert "[toy] resuming from step 2 of 6" in out
  assert ("[toy] the checkpoint was written on 1 device in 1 process; resuming on 2 devices "
          "in 1 process") in out
  np.testing.assert_array_equal(final.params["w"], np.full(3, 0 + 1 + 2 + 3 + 4 + 5))


def _cli(processes, name: str, *flags) -> None:
  processes.start(name, ["-m", "mstkd_jax.main", "--config=configs/teacher.py:smoke",
                         "--multihost_timeout=3", *flags], devices=1)


def test_unreachable_coordinator_or_missing_processes_stop_with_a_clear_message(
    processes, tmp_path):
  port = _free_port()                         # nobody listens there
  _cli(processes, "unreachable", f"--workdir={tmp_path / 'a'}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1")
  # Process 0 of 2, started alone: its coordinator waits for a process that never comes.
  _cli(processes, "alone", f"--workdir={tmp_path / 'b'}",
       f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2",
       "--process_id=0")
  start = time.perf_counter()
  for name, proc, _ in processes.started:
    proc.wait(timeout=60)
    assert proc.returncode == 1, processes.tail(name)
  assert time.perf_counter() - start < 60
  unreachable, alone = processes.output("unreachable"), processes.output("alone")
  assert (f"error: cannot reach the multi-host coordinator at 127.0.0.1:{port} within 3 s"
          in unreachable)
  assert "error: the 2 processes did not all connect to the multi-host coordinator" in alone
  for out in (unreachable, alone):
    assert "Traceback" not in out


if __name__ == "__main__":
  if sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2:])

"""SIGTERM (a preemption) and SIGINT (Ctrl-C): a training loop saves the step it reached and
stops in one line with 128 + the signal's number; the rerun resumes bit for bit; elsewhere
(compiling, extracting, reporting) the run stops at once, and no segfault."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import distill
from mstkd_jax import pipeline
from mstkd_jax.train import checkpoints as checkpoints_lib, interrupts, loop, parallel
from mstkd_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "signal_at.py")


# --------------------------------------------------------------------- a toy training loop

def _step(state, batch, rng):
  """A step that reads the batch, its RNG and its state: any skipped or repeated step,
  batch or key shows in w."""
  noise = jax.random.normal(jax.random.fold_in(rng, state.step), (3,))
  w = 0.9 * state.params["w"] + jnp.mean(batch["x"]) + 0.1 * noise
  return state.replace(step=state.step + 1, params={"w": w}), {"loss": jnp.sum(w * w)}


def _init():
  return state_lib.TrainState(step=np.zeros((), np.int32),
                              params={"w": np.zeros(3, np.float32)}, batch_stats={},
                              opt_state=optax.EmptyState())


def _train(workdir: str, batches, total: int = 20):
  settings = loop.LoopSettings(name="toy", total_steps=total, steps_per_epoch=5,
                               images_per_step=2, log_every=100, checkpoint_every=100)
  return loop.train(workdir=workdir, settings=settings, init_state=_init(), step_fn=_step,
                    batches=batches, parallel=parallel.get("pmap", 1),
                    rng=jax.random.PRNGKey(3))


def _batches(start, signal_at=None):
  for step in range(start, 100):
    if step == signal_at:
      os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled in this thread
    yield {"x": np.full((1, 2), float(step % 7), np.float32)}


def test_a_signal_outside_a_training_step_stops_at_once_with_128_plus_its_number():
  with interrupts.handled():
    with pytest.raises(interrupts.Interrupted) as info:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)  # the handler raises in here
  assert info.value.code == 143 and "stopped by SIGTERM" in str(info.value)
  with interrupts.handled():
    interrupts.unsaved(True)  # a training step holds unsaved work: the signal waits
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert interrupts.received() == signal.SIGINT and interrupts.stop_requested() == signal.SIGINT
    with pytest.raises(interrupts.Interrupted) as info:
      os.kill(os.getpid(), signal.SIGINT)  # a second one does not wait
      time.sleep(5)
    assert info.value.code == 130
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_sigterm_in_training_saves_the_step_it_reached_and_the_rerun_resumes_bit_for_bit(
    tmp_path):
  uninterrupted = _train(str(tmp_path / "reference"), _batches)
  workdir = str(tmp_path / "stopped")
  with interrupts.handled():
    with pytest.raises(interrupts.Interrupted) as info:
      _train(workdir, lambda start: _batches(start, signal_at=9))
  # The loop takes its batches 2 ahead (prefetch): the signal comes with batch 9, while
  # step 8 (batch 7) runs, between checkpoints (every 100 steps).
  stopped_at = 8
  assert info.value.code == 143
  assert str(info.value) == (
      f"[toy] stopped by SIGTERM at step {stopped_at} of 20; its checkpoint is saved in "
      f"{workdir}/checkpoints: rerun the same command to resume")
  checkpoints = checkpoints_lib.Checkpoints(os.path.join(workdir, "checkpoints"))
  assert checkpoints.latest_step() == stopped_at
  checkpoints.close()
  resumed = _train(workdir, _batches)
  np.testing.assert_array_equal(resumed.params["w"], uninterrupted.params["w"])
  assert loop.load_history(workdir) == loop.load_history(str(tmp_path / "reference"))


# ------------------------------------------------------------- the command line, for real

def _child_env(**extra) -> dict:
  """This process's environment (its XLA flags too: the 8 simulated devices of the tests
  change how XLA:CPU compiles, hence float rounding, so a child computes as the tiny_recipe
  fixture did)."""
  return dict(os.environ, PYTHONPATH=ROOT, **extra)


def _run_to_pause(workdir: str, config: str, point: tuple, send, env=None) -> dict:
  """Runs tests/signal_at.py at `point` (target, when, n, substring); once it pauses there,
  sends it `send` (None: it signals itself). Returns its exit code, output and the seconds
  from the signal to its exit."""
  target, when, n, substring = point
  proc = subprocess.Popen([sys.executable, SCRIPT, workdir, config, target, when, str(n),
                           substring], cwd=ROOT, env=env or _child_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    out = []
    sent = None
    for line in proc.stdout:
      out.append(line)
      if send is not None and line.startswith("paused at "):
        sent = time.perf_counter()
        proc.send_signal(send)
        break
    stdout, stderr = proc.communicate(timeout=300)
    exited = time.perf_counter()
  finally:
    if proc.poll() is None:
      proc.kill()
  return {"code": proc.returncode, "stdout": "".join(out) + stdout, "stderr": stderr,
          "signal_to_exit_s": None if sent is None else exited - sent}


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_ctrl_c_while_xla_compiles_exits_130_in_one_line(tmp_path):
  """SIGINT 0.5 s into the compilation of the teacher's initialisation (a fresh compilation
  cache, so XLA compiles for seconds): exit status 130 and one line. Before, the interpreter
  shut down under XLA's compiling threads: SIGSEGV (exit -11) in most runs. ~15 s: a
  subprocess that imports JAX and TensorFlow and makes the tiny synthetic set."""
  env = _child_env(JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(dir=tmp_path))
  result = _run_to_pause(str(tmp_path / "w"), "configs/teacher.py:tiny",
                         ("jax._src.compiler:backend_compile_and_load", "during", 1,
                          "jit_init"), None, env)
  assert result["code"] == 130, result["stderr"][-3000:]
  assert _error_lines(result["stderr"]) == [
      "error: stopped by SIGINT; rerun the same command to resume (a training stage goes on "
      "from its newest checkpoint, any other stage starts again)"]
  assert "Traceback" not in result["stderr"] and "Fatal Python error" not in result["stderr"]


# Points inside the recipe where a SIGTERM comes: inside a teacher's training (after the
# step-5 metrics of teacher/group_a, of 6 steps: it has no checkpoint before its last
# step), inside the extraction, and inside the report.
SIGTERM_POINTS = [
    ("mstkd_jax.train.loop:_Progress.add", "after", 5, "teacher/group_a"),
    ("mstkd_jax.stages.extract:_embed_training_set", "before", 2, ""),
    ("mstkd_jax.files:write_bytes", "before", 1, "report.md"),
]


@pytest.mark.slow
def test_sigterm_inside_the_recipe_stops_in_one_line_and_resumes_to_the_same_numbers(
    tiny_recipe, tmp_path, capsys):
  """SIGTERM at each point in turn (each rerun resumes what the last left), then a plain
  rerun: the teacher's parameters equal the uninterrupted run's bit for bit, and the report
  digit for digit. Prints the seconds from each signal to the exit."""
  finished, report = tiny_recipe
  workdir = str(tmp_path / "stopped")
  timings = {}
  for point in SIGTERM_POINTS:
    result = _run_to_pause(workdir, "configs/distill.py:tiny", point, signal.SIGTERM)
    assert result["code"] == 143, (point, result["stderr"][-3000:])
    lines = _error_lines(result["stderr"])
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"]
    timings[point[0]] = result["signal_to_exit_s"]
    if point[0].endswith("_Progress.add"):
      teacher = os.path.join(workdir, "teacher", "group_a", "checkpoints")
      assert lines[0] == (f"error: [teacher/group_a] stopped by SIGTERM at step 5 of 6; its "
                          f"checkpoint is saved in {teacher}: rerun the same command to "
                          "resume")
      checkpoints = checkpoints_lib.Checkpoints(teacher)
      assert checkpoints.latest_step() == 5
      checkpoints.close()
  with capsys.disabled():
    print("\nseconds from SIGTERM to exit: "
          + ", ".join(f"{k.split(':')[1]} {v:.2f}" for k, v in timings.items()))
  rerun = pipeline.run(distill.get_config("tiny"), workdir)
  assert rerun["models"] == report["models"]
  for name in ("teacher/group_a", "teacher/group_b"):
    mine = _model_arrays(os.path.join(workdir, name))
    theirs = _model_arrays(os.path.join(finished, name))
    assert mine.keys() == theirs.keys()
    for key in mine:
      np.testing.assert_array_equal(mine[key], theirs[key], err_msg=f"{name} {key}")
  with open(os.path.join(workdir, "report", "report.md")) as f, \
       open(os.path.join(finished, "report", "report.md")) as g:
    assert f.read() == g.read().replace(finished, workdir)


def _model_arrays(stage_dir: str) -> dict:
  """{"params/...": array} of the model a stage saved (Orbax, read without a template)."""
  checkpoints = checkpoints_lib.Checkpoints(os.path.join(stage_dir, "model"), keep=1)
  try:
    step = checkpoints.latest_step()
    tree = checkpoints.manager.restore(step).default
  finally:
    checkpoints.close()
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


# ------------------------------------------------------------ several processes (one job)

def worker(args):
  """One process of a 2-process toy run: `worker <workdir> <process_id> <port>`. Prints
  "step N" per step and ends as the command line does on a signal."""
  workdir, process_id, port = args[0], int(args[1]), args[2]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from mstkd_jax import multihost  # pylint: disable=g-import-not-at-top
  with interrupts.handled():  # before JAX's own SIGTERM notifier, as main.main does
    multihost.initialize(multihost.Multihost(
        mode="true", coordinator_address=f"127.0.0.1:{port}", num_processes=2,
        process_id=process_id, timeout_s=60))

    def batches(start):
      for step in range(start, 1000):
        time.sleep(0.05)
        print(f"step {step}", flush=True)
        yield {"x": np.full((jax.local_device_count(), 1), float(step % 7), np.float32)}

    settings = loop.LoopSettings(name="toy", total_steps=400, steps_per_epoch=5,
                                 images_per_step=2, log_every=1000, checkpoint_every=1000)
    try:
      loop.train(workdir=workdir, settings=settings, init_state=_init(), step_fn=_step,
                 batches=batches, parallel=parallel.get("pmap", 0),
                 rng=jax.random.PRNGKey(3))
    except interrupts.Interrupted as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      interrupts.exit_now(e.code)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_sigterm_to_one_process_of_a_multi_host_run_stops_every_process_at_one_step(
    tmp_path):
  """SIGTERM to process 1 of 2 (JAX's preemption notifier takes it): both save the same
  step and exit with 143. ~20 s: two processes start JAX and connect."""
  from conftest import child_xla_flags  # pylint: disable=g-import-not-at-top
  port = _free_port()
  env = _child_env(XLA_FLAGS=child_xla_flags("--xla_force_host_platform_device_count=1"))
  procs = [subprocess.Popen([sys.executable, __file__, "worker", str(tmp_path), str(p),
                             str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for p in (0, 1)]
  try:
    for line in procs[1].stdout:
      if line.strip() == "step 20":
        procs[1].send_signal(signal.SIGTERM)
        break
    outputs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  lines = [_error_lines(err) for _, err in outputs]
  assert [p.returncode for p in procs] == [143, 143], [err[-2000:] for _, err in outputs]
  assert len(lines[0]) == 1 and lines[0] == lines[1], lines
  step = int(lines[0][0].split(" at step ")[1].split()[0])
  checkpoints = checkpoints_lib.Checkpoints(str(tmp_path / "checkpoints"))
  assert checkpoints.latest_step() == step
  checkpoints.close()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  worker(sys.argv[2:])

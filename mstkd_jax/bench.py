r"""Throughput of the MST-KD steps: img/s, cost relative to the plain student step, and MFU.

  python -m mstkd_jax.bench --config=configs/distill.py:smoke --steps=10
  python -m mstkd_jax.bench --config=configs/distill.py:bupt_iresnet34 --batch=128 \
      --config.student.model.dtype=bfloat16 --torch --out=/tmp/bench.json

Builds the config's student IResNet, G frozen teachers of the same architecture and the
adaptor (mstkd_jax/recipe_steps.py), compiles each step once (XLA's cost analysis of the
executable, cross-checked against the lowered module's, gives its FLOPs), and times it
after warm-up with block_until_ready:
  plain        classification_step of the student + margin head (EAF, the student alone)
  cached_kd    student_step (EAF-KD) with the targets in the batch
  online_kd    student_step (EAF-KD) with the G teachers and the adaptor in the step
  online_kd_vmap  the same, the teachers vmapped over their stacked parameters
  extraction   one teacher embedding images and their mirrors (inference)
  adaptor      classification_step of the adaptor over concatenated teacher embeddings
  pipeline     input_pipeline.train_batches on in-memory arrays (skipped without TensorFlow)
  torch        (--torch) an equivalent PyTorch training step (mstkd_jax/bench_torch.py),
               on one device with the global batch: compare it on one-device runs
"cost x plain" is (plain img/s) / (its img/s): a step taking 1.1x the plain step's time
reads 1.10. Runs without TensorFlow, TFDS and clu.

`--head_scale=10000,100000,1000000,2000000` instead measures the margin head alone against
the number of identities, replicated, class-sharded and sharded with Partial-FC sampling
(mstkd_jax/bench_heads.py): memory per device from XLA's compiled memory analysis, step
time, and their ratios to the replicated head, e.g. on 8 simulated CPU devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m mstkd_jax.bench \
      --config=configs/teacher.py --head_scale=10000,100000,1000000,2000000
"""

import dataclasses
import functools
import json
import os
import sys
import time

import jax
import numpy as np

from mstkd_jax import config_ranges, errors, files, recipe_steps
from mstkd_jax.chips import peak_tflops  # the peak table lives in chips.py
from mstkd_jax.data import input_pipeline
from mstkd_jax.errors import UserError
from mstkd_jax.recipe_steps import Setup, setup_from_config
from mstkd_jax.train import build
from mstkd_jax.train import parallel as parallel_lib, state as state_lib

# Performance targets on each step's cost ratio (its time per image over the plain student
# step's), checked by _add_ratios and shown in the table's goal column.
GOALS = {
    "cached_kd": ("<=", 1.10),
    "online_kd": ("<=", 2.5),
    "pipeline": ("<=", 0.5),    # the input pipeline at least 2x the step's img/s
    "torch": (">=", 1.5),       # the JAX step at least 1.5x PyTorch's img/s
}
STEP_NAMES = ("plain", "cached_kd", "online_kd", "online_kd_vmap", "extraction", "adaptor")


class _Bench:
  """Fills the steps that recipe_steps.Builder makes with device arrays; times each one."""

  def __init__(self, config, setup: Setup, *, warmup: int):
    self.setup, self.warmup = setup, warmup
    self.parallel = parallel_lib.get(config.parallelism, config.num_devices)
    input_pipeline.check_batch_split(setup.batch, self.parallel.device_count,
                                     jax.process_count())
    self.per_device = setup.batch // self.parallel.device_count
    self.builder = recipe_steps.Builder(config, setup,
                                        local_devices=self.parallel.local_device_count,
                                        per_device=self.per_device)
    self.rng = self.parallel.replicate(jax.random.PRNGKey(config.seed + 1))
    self.batch = self.parallel.shard(self._host_batch())

  def _host_batch(self) -> dict:
    """Random values for builder.batch_shapes(): uint8 pixels (and, for the steps fed
    normalized images, "normalized": the same in [-1, 1]), labels, unit targets and G unit
    teacher embeddings per image."""
    rng, shapes = np.random.default_rng(0), self.builder.batch_shapes()
    lead, dim = shapes["label"].shape, self.setup.embedding_size

    def unit(*s):
      x = rng.normal(size=s).astype(np.float32)
      return x / np.linalg.norm(x, axis=-1, keepdims=True)
    teacher = unit(*lead, self.setup.num_teachers, dim)  # G unit vectors per image
    pixels = rng.integers(0, 256, shapes["image"].shape, dtype=np.uint8)
    return {"image": pixels, "normalized": input_pipeline.normalize_images(pixels),
            "label": rng.integers(0, self.setup.num_classes, lead).astype(np.int32),
            "target": unit(*lead, dim),
            "teacher_embeddings": teacher.reshape(shapes["teacher_embeddings"].shape)}

  def timer(self, step: recipe_steps.Step) -> "_Timer":
    """Compiles the wrapped step once (its cost analysis, cross-checked against the lowered
    module's, gives the FLOPs), runs warm-up."""
    batch = {k: self.batch[k] for k in step.batch}
    if "image" in batch and step.batch["image"].dtype != np.uint8:
      batch["image"] = self.batch["normalized"]
    carry = {"state": self.parallel.replicate(step.state), "metrics": None}
    extra = tuple(self.parallel.replicate(e) for e in step.extra)
    args = (batch, self.rng) + extra if step.train else (batch,)
    wrapped = (self.parallel.wrap if step.train else self.parallel.wrap_apply)(step.fn)
    start = time.perf_counter()
    lowered = wrapped.lower(carry["state"], *args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = self.builder.step_flops(step, compiled, lowered)
    if not step.train:
      return _Timer(lambda: compiled(carry["state"], batch), self.warmup, flops, compile_s)

    def call():
      carry["state"], carry["metrics"] = compiled(carry["state"], *args)
      return carry["metrics"]

    def check():
      return bool(np.isfinite(float(self.parallel.unreplicate(carry["metrics"])["loss"])))
    return _Timer(call, self.warmup, flops, compile_s, check)

  def pipeline(self) -> "_Timer | dict":
    """input_pipeline.train_batches on in-memory uint8 images; skipped without TensorFlow."""
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      return {"skipped": "TensorFlow is not installed"}
    size, batch, steps_per_epoch = self.setup.image_size, self.setup.batch, 4
    rng, count = np.random.default_rng(0), steps_per_epoch * self.setup.batch
    arrays = {"image": rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
              "label": rng.integers(0, self.setup.num_classes, count).astype(np.int32)}
    batches = input_pipeline.train_batches(
        arrays, global_batch=batch, steps_per_epoch=steps_per_epoch, seed=0, start_step=0,
        total_steps=2 ** 40, local_device_count=self.parallel.local_device_count,
        process_index=0, process_count=1)
    return _Timer(lambda: next(batches), self.warmup + 1)


class _Timer:
  """A prepared measurement: `time(count)` gives seconds per call over `count` calls.

  `call` is run `warmup` times first; `timed`, if given, replaces the timing of `call`
  (the PyTorch step times itself, synchronizing its own device).
  """

  def __init__(self, call, warmup: int, flops=None, compile_s=None, check=None,
               timed=None):
    self.call, self.flops, self.compile_s, self.check, self._timed = (call, flops, compile_s,
                                                                      check, timed)
    for _ in range(warmup):
      out = call()
    if warmup:
      jax.block_until_ready(out)

  def time(self, count: int) -> float:
    if self._timed is not None:
      return self._timed(count)
    start = time.perf_counter()
    for _ in range(count):
      out = self.call()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / count


def _torch_timer(setup: Setup, config, *, warmup: int):
  """(timer, info) of the PyTorch reference step, or (None, skip reason)."""
  try:
    from mstkd_jax import bench_torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None, "PyTorch is not installed"
  model = recipe_steps.student(config, "model")
  optim = recipe_steps.optim_config(config)
  margin = build.margin_spec(recipe_steps.student(config, "head"))
  timed, info = bench_torch.prepare(
      stage_depths=setup.stage_depths, width=model.width, embedding_size=model.embedding_size,
      dropout=build.backbone(model).dropout, image_size=setup.image_size, batch_size=setup.batch,
      num_classes=setup.num_classes, dtype=setup.dtype, warmup=warmup,
      margin=(margin.s, margin.m, margin.std),
      lr=state_lib.scaled_lr(optim.base_lr, setup.batch), momentum=optim.momentum,
      weight_decay=optim.weight_decay, clip_norm=optim.clip_norm)
  return _Timer(None, 0, timed=timed), info


def run(config, *, steps: int = 10, warmup: int = 2, rounds: int = 3, batch: int = 0,
        image_size: int = 0, num_classes: int = 0, num_teachers: int = 0,
        stage_depths: tuple[int, ...] = (), peak: float = 0.0, torch_step: bool = False,
        only: tuple[str, ...] = ()) -> dict:
  """Measures every step (or those in `only`, plus plain); returns a JSON-ready report.

  Every measurement is compiled and warmed up first, then timed in `rounds` interleaved
  rounds of `steps` calls; the fastest round counts, so load that comes and goes on a
  shared machine does not skew one step against another.
  """
  if steps < 1 or warmup < 0 or rounds < 1:
    raise UserError(f"--steps={steps}, --warmup={warmup}, --rounds={rounds}: expected "
                    "steps >= 1, warmup >= 0, rounds >= 1")
  names = STEP_NAMES + ("pipeline",)
  unknown = set(only) - set(names)
  if unknown:
    raise UserError(f"--only={','.join(only)}: unknown {sorted(unknown)}; expected some of "
                    f"{list(names)}")
  setup = setup_from_config(config, batch=batch, image_size=image_size,
                            num_classes=num_classes, num_teachers=num_teachers,
                            stage_depths=stage_depths)
  device = jax.devices()[0]
  chip, table_peak = peak_tflops(device.device_kind, setup.dtype)
  peak = peak or table_peak
  model = recipe_steps.student(config, "model")
  _log(f"{model.name} width {model.width} {setup.image_size}x"
       f"{setup.image_size} {setup.dtype}, global batch {setup.batch} on "
       f"{jax.device_count()} x {device.device_kind}")
  bench = _Bench(config, setup, warmup=warmup)
  make = bench.builder
  builders = {"plain": make.plain, "cached_kd": make.cached_kd, "online_kd": make.online_kd,
              "online_kd_vmap": functools.partial(make.online_kd, teacher_map="vmap"),
              "extraction": make.extraction, "adaptor": make.adaptor_step}
  timers, results = {}, {}
  for name in names:
    if only and name not in only and name != "plain":
      continue
    _log(f"compiling and warming up {name}")
    timer = bench.pipeline() if name == "pipeline" else bench.timer(builders[name]())
    if isinstance(timer, dict):
      results[name] = timer
    else:
      timers[name] = timer
  if torch_step:
    _log("building the PyTorch step")
    timer, info = _torch_timer(setup, config, warmup=warmup)
    results["torch"] = {"skipped": info} if timer is None else info
    if timer is not None:
      timers["torch"] = timer
  seconds = {name: [] for name in timers}
  for r in range(rounds):
    for name, timer in timers.items():
      # The input pipeline is cheap per batch; give it more batches for a steady reading.
      seconds[name].append(timer.time(max(steps, 10) if name == "pipeline" else steps))
    _log(f"round {r + 1}/{rounds}: " + ", ".join(
        f"{n} {setup.batch / s[-1]:.1f} img/s" for n, s in seconds.items()))
  for name, timer in timers.items():
    best = min(seconds[name])
    results[name] = {
        **results.get(name, {}),
        "img_per_s": setup.batch / best, "seconds_per_step": best,
        "round_seconds": seconds[name], "flops_per_device": timer.flops,
        "compile_s": timer.compile_s}
    if timer.check is not None:
      results[name]["finite_loss"] = timer.check()
  results = {n: results[n] for n in names + ("torch",) if n in results}
  _add_ratios(results, peak, devices=setup.batch // bench.per_device)
  return {
      "setup": dataclasses.asdict(setup) | {
          "model": model.name, "width": model.width, "per_device_batch": bench.per_device,
          "steps": steps, "warmup": warmup, "rounds": rounds},
      "device": {"kind": device.device_kind, "platform": device.platform,
                 "count": jax.device_count(), "chip": chip, "peak_tflops": peak,
                 "jax_version": jax.__version__},
      "results": results,
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  }


def _log(message: str) -> None:
  print(f"[bench] {message}", file=sys.stderr, flush=True)


def _add_ratios(results: dict, peak: float | None, devices: int = 1) -> None:
  """Adds cost x plain, goal checks and MFU (per device: FLOPs / time / peak) in place.

  The PyTorch step runs the whole global batch on one device: its FLOPs are the plain
  JAX step's per-device FLOPs times the `devices` that share that batch.
  """
  plain = results["plain"]["img_per_s"]
  plain_flops = results["plain"]["flops_per_device"]
  for name, entry in results.items():
    if "img_per_s" not in entry:
      continue
    entry["cost_vs_plain"] = plain / entry["img_per_s"]
    flops = entry.get("flops_per_device")
    if name == "torch" and plain_flops:
      # The same network, batch and loss: the JAX step's FLOPs per image stand for it.
      flops = plain_flops * devices
      entry["flops_per_device"] = flops
    entry["tflops_per_s"] = flops / entry["seconds_per_step"] / 1e12 if flops else None
    entry["mfu"] = entry["tflops_per_s"] / peak if flops and peak else None
    if name in GOALS:
      op, bound = GOALS[name]
      value = entry["cost_vs_plain"]
      entry["goal"] = f"{op} {bound:g}"
      entry["goal_met"] = bool(value <= bound if op == "<=" else value >= bound)


def format_table(report: dict) -> str:
  """The results as a fixed-width text table."""
  lines = [f"{'step':<14} {'img/s':>10} {'ms/step':>9} {'cost x plain':>12} "
           f"{'goal':>10} {'TFLOP/s':>8} {'MFU':>7}"]
  for name, entry in report["results"].items():
    if "skipped" in entry:
      lines.append(f"{name:<14} skipped: {entry['skipped']}")
      continue
    goal = entry.get("goal", "")
    if goal:
      goal += " ok" if entry["goal_met"] else " NO"
    tflops = f"{entry['tflops_per_s']:.2f}" if entry.get("tflops_per_s") else "n/a"
    mfu = f"{100 * entry['mfu']:.1f}%" if entry.get("mfu") else "n/a"
    lines.append(f"{name:<14} {entry['img_per_s']:>10.1f} "
                 f"{1e3 * entry['seconds_per_step']:>9.2f} {entry['cost_vs_plain']:>12.2f} "
                 f"{goal:>10} {tflops:>8} {mfu:>7}")
  device = report["device"]
  peak = f"{device['peak_tflops']:g} TFLOP/s" if device["peak_tflops"] else "unknown"
  setup = report["setup"]
  lines.append(f"device: {device['count']} x {device['kind']} (peak {peak}, "
               f"{setup['dtype']}); global batch {setup['batch']}, {setup['image_size']}x"
               f"{setup['image_size']}, {setup['model']} width {setup['width']}")
  return "\n".join(lines)


def _ints(text: str, flag: str) -> tuple[int, ...]:
  try:
    values = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError as e:
    raise UserError(f"--{flag}={text!r}: expected comma-separated integers") from e
  if any(v < 1 for v in values):
    raise UserError(f"--{flag}={text!r}: expected positive integers")
  return values


def main(argv):
  # pylint: disable=g-import-not-at-top
  from absl import flags
  del argv
  f = flags.FLAGS
  config_ranges.check(f.config, stage_vocabulary=False)
  if f.head_scale:
    # pylint: disable-next=g-import-not-at-top
    from mstkd_jax import bench_heads
    report = bench_heads.run(
        _ints(f.head_scale, "head_scale"),
        margin=build.margin_spec(recipe_steps.student(f.config, "head"), shards_classes=True),
        embedding_size=f.head_dim, batch=f.head_batch, sample_rate=f.head_sample_rate,
        steps=f.steps, run_limit_gib=f.head_run_limit_gib)
    table = bench_heads.format_table(report)
  else:
    report = run(build.resolve_dtypes(f.config), steps=f.steps, warmup=f.warmup,
                 rounds=f.rounds, batch=f.batch, image_size=f.image_size,
                 num_classes=f.num_classes, num_teachers=f.num_teachers,
                 stage_depths=_ints(f.stage_depths, "stage_depths"), peak=f.peak_tflops,
                 torch_step=f.torch, only=tuple(x for x in f.only.split(",") if x))
    table = format_table(report)
  print(table, flush=True)
  if f.out:
    files.write_bytes(f.out, (json.dumps(report, indent=2) + "\n").encode())
    _log(f"wrote {f.out}")


def _define_flags():
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file (path[:preset]).",
                                  lock_config=True)
  flags.DEFINE_integer("steps", 10, "Timed steps per measurement.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds; the fastest counts.")
  flags.DEFINE_integer("batch", 0, "Global batch; 0 = the student recipe's.")
  flags.DEFINE_integer("image_size", 0, "Image side; 0 = the data config's (112 if real).")
  flags.DEFINE_integer("num_classes", 0, "Identities of the margin head; 0 = the data's.")
  flags.DEFINE_integer("num_teachers", 0, "Teachers G; 0 = the data's groups.")
  flags.DEFINE_string("stage_depths", "", "Blocks per stage, e.g. 1,1,1,1 for quick checks; "
                      "'' = the model's (iresnet34: 3,4,6,3).")
  flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU; 0 = the table's.")
  flags.DEFINE_bool("torch", False, "Also time an equivalent PyTorch step, if installed.")
  flags.DEFINE_string("out", "", "Write the results as JSON to this file.")
  flags.DEFINE_string("only", "", "Comma-separated subset of " + ",".join(
      STEP_NAMES + ("pipeline",)) + " (plain is always run).")
  flags.DEFINE_string("head_scale", "", "Comma-separated numbers of identities: measure "
                      "the margin head alone (replicated, sharded, sampled) instead.")
  flags.DEFINE_integer("head_dim", 512, "--head_scale: embedding size D.")
  flags.DEFINE_integer("head_batch", 64, "--head_scale: global batch of features.")
  flags.DEFINE_float("head_sample_rate", 0.1, "--head_scale: Partial-FC rate of 'sampled'.")
  flags.DEFINE_float("head_run_limit_gib", 8.0, "--head_scale: run (and time) a layout "
                     "only if its memory over all devices is below this; the memory is "
                     "measured either way.")
  flags.mark_flag_as_required("config")


def cli():
  """`python -m mstkd_jax.bench`: UserErrors print their message alone."""
  # pylint: disable=g-import-not-at-top
  from absl import app
  _define_flags()
  # The PyTorch step shares the accelerator: do not let XLA reserve most of its memory.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  app.run(errors.guarded(main))


if __name__ == "__main__":
  cli()

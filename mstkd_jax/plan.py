r"""Before renting a TPU: compile the recipe's steps for a TPU topology on this machine (no
TPU needed) and print, per chip, what each step costs, whether it fits in the chip's
memory, and the compiler's estimate of its time and of the whole recipe's.

  pip install -r requirements.txt -r requirements-tpu.txt     # libtpu: the TPU compiler
  python -m mstkd_jax.plan --config=configs/distill.py:bupt_iresnet34 --topology=v5e:2x4 \
      [--json=plan.json] [--config.student.model.dtype=float32 ...]

The steps, built as `bench` builds them (recipe_steps.Builder), each with its role's
network, global batch (split over the chips) and dtype from the config ("auto": what a run
on a TPU resolves it to, bfloat16):
  teacher         a teacher's training step (the teacher section's network, head, optimiser)
  extraction      one frozen teacher embedding a batch and its mirror (teacher eval batch)
  adaptor         the adaptor's training step over concatenated teacher embeddings
  student_cached  the EAF-KD student with its targets in the batch (a-KD has no head: a
                  little cheaper)
  student_online  the same with the G frozen teachers and the adaptor inside the step
  student_alone   the plain student step, compiled only where its network, head or batch
                  differ from the teacher's (otherwise the teacher's numbers stand for it)
The online step's teachers and the adaptor's inputs are of the student's network (as in
bench), and each step is wrapped by DataParallel(shard_map) over a Mesh of every chip.

One process: libtpu admits one process at a time (its lock file, /tmp/libtpu_lockfile).
This command holds it from the topology's creation to its exit and compiles every step
in that one process, one after another; a second one stops with one line saying so.

Estimates, not measurements: FLOPs, bytes and memory come from XLA's analyses of the
compiled step; the time is the sum of the compiler's per-instruction cycle estimates at
the chip's clock (hlo_cycles.py; `optimal_seconds` of its cost analysis is unusable on
libtpu). What they leave out is printed with the projection (recipe_size.LEFT_OUT).
"""

import dataclasses
import importlib.metadata
import json
import os
import sys
import time

from mstkd_jax import (chips, config_ranges, errors, files, hlo_cycles, recipe_size,
                       recipe_steps)
from mstkd_jax.data import input_pipeline
from mstkd_jax.errors import UserError

STEPS = ("teacher", "extraction", "adaptor", "student_cached", "student_online",
         "student_alone")


@dataclasses.dataclass
class _Planned:
  """A step to compile: its builder (a role's sizes) and which step of it."""
  name: str
  builder: recipe_steps.Builder
  make: str                     # the Builder method
  batch_field: str              # the config field of its global batch


def _as_student(config, role: str):
  """The config with `role`'s section (teacher, adaptor) in the student's place, so that
  the Builder builds that role's network, batch, head and optimiser."""
  view = config.copy_and_resolve_references()
  with view.unlocked():
    section = view[role]
    for key in ("model", "head", "train", "optim"):
      if key in section:
        view.student[key] = section[key]
  return view


def _planned(config, devices: int) -> list[_Planned]:
  def builder(view, batch, field):
    input_pipeline.check_batch_split(batch, devices, 1, field=field)
    setup = recipe_steps.setup_from_config(view, batch=batch)
    return recipe_steps.Builder(view, setup, local_devices=devices,
                                per_device=batch // devices, abstract=True)
  if "teacher" not in config:
    raise UserError("plan reads the recipe's config (configs/distill.py): it has no "
                    "teacher section")
  teacher_view = _as_student(config, "teacher")
  fields = {"teacher": "teacher.train.batch_size", "adaptor": "adaptor.train.batch_size",
            "extraction": "teacher.train.eval_batch_size",
            "student": "student.train.batch_size"}
  batches = {k: config[k.split(".")[0]].train[k.split(".")[-1]] for k in fields.values()}
  teacher = builder(teacher_view, batches[fields["teacher"]], fields["teacher"])
  students = builder(config, batches[fields["student"]], fields["student"])
  steps = [_Planned("teacher", teacher, "plain", fields["teacher"]),
           _Planned("extraction", builder(teacher_view, batches[fields["extraction"]],
                                          fields["extraction"]), "extraction",
                    fields["extraction"]),
           _Planned("adaptor", builder(config, batches[fields["adaptor"]], fields["adaptor"]),
                    "adaptor_step", fields["adaptor"]),
           _Planned("student_cached", students, "cached_kd", fields["student"]),
           _Planned("student_online", students, "online_kd", fields["student"])]
  same = all(config.teacher[k].to_dict() == config.student[k].to_dict()
             for k in ("model", "head")) and (config.teacher.train.batch_size
                                              == config.student.train.batch_size)
  if not same:
    steps.append(_Planned("student_alone", students, "plain", fields["student"]))
  return steps


def _abstract(tree, sharding):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      tree)


def compile_step(planned: _Planned, parallel, chip: chips.TpuChip) -> dict:
  """Compiles one step over `parallel`'s compile-only mesh; its per-chip figures (bytes,
  seconds, img/s, MFU as a fraction; None where not known)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  step = getattr(planned.builder, planned.make)()
  replicated = NamedSharding(parallel.mesh, P())
  batch = _abstract(step.batch, NamedSharding(parallel.mesh, P(parallel_axis())))
  state = _abstract(step.state, replicated)
  setup = planned.builder.setup
  entry = {"step": planned.name, "batch_field": planned.batch_field, "dtype": setup.dtype,
           "global_batch": setup.batch,
           "per_chip_batch": planned.builder.per_device, "hbm_bytes": chip.hbm_bytes,
           "flops": None, "bytes_accessed": None, "argument_bytes": None,
           "output_bytes": None, "alias_bytes": None, "temp_bytes": None, "peak_bytes": None,
           "fits": None, "est_step_s": None, "est_img_per_s": None, "est_mfu": None}
  start = time.perf_counter()
  try:
    if step.train:
      rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=replicated)
      extra = tuple(_abstract(e, replicated) for e in step.extra)
      lowered = parallel.wrap(step.fn).lower(state, batch, rng, *extra)
    else:
      lowered = parallel.wrap_apply(step.fn).lower(state, batch)
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    needed = errors.out_of_memory(e)
    if needed is None:
      raise
    entry.update(fits=False, peak_bytes=errors.needed_bytes(e), not_fitting=needed,
                 compile_s=time.perf_counter() - start)
    return entry
  entry["compile_s"] = time.perf_counter() - start
  entry["flops"] = flops = planned.builder.step_flops(step, compiled, lowered)
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  entry["bytes_accessed"] = (analysis or {}).get("bytes accessed")
  memory = compiled.memory_analysis()
  if memory is not None:
    sizes = {k: int(getattr(memory, f"{k}_size_in_bytes", 0) or 0)
             for k in ("argument", "output", "alias", "temp", "generated_code")}
    entry.update({f"{k}_bytes": sizes[k] for k in ("argument", "output", "alias", "temp")})
    # libtpu's reported peak can be below its own temporaries: take the larger.
    entry["peak_bytes"] = max(int(getattr(memory, "peak_memory_in_bytes", 0) or 0),
                              sizes["argument"] + sizes["output"] - sizes["alias"]
                              + sizes["temp"] + sizes["generated_code"])
    entry["fits"] = entry["peak_bytes"] <= chip.hbm_bytes
  text = compiled.as_text()
  moved = hlo_cycles.collectives(text)
  entry.update(collectives=moved["count"], collective_bytes=moved["bytes"])
  cycles = hlo_cycles.estimated_cycles(text)
  if cycles and chip.clock_hz:
    seconds = cycles / chip.clock_hz
    entry.update(est_cycles=cycles, est_step_s=seconds,
                 est_img_per_s=step.examples_per_device / seconds)
    if flops:
      entry["est_mfu"] = flops / seconds / (chip.peak_tflops * 1e12)
  return entry


def parallel_axis() -> str:
  from mstkd_jax.train import parallel as parallel_lib  # pylint: disable=g-import-not-at-top
  return parallel_lib.AXIS


def run(config, topology_name: str, *, num_images: int = 0, only: tuple[str, ...] = (),
        log=None) -> dict:
  """Compiles every planned step (or those named in `only`) for the topology; returns the
  JSON-ready plan (per chip: bytes, seconds, MFU as a fraction; None where not known).

  Raises:
    UserError: no libtpu, an unknown topology or step name, a batch that does not split
      over the chips, a config field out of its range.
  """
  if not all(k in config and "train" in config[k] for k in ("teacher", "adaptor", "student")):
    raise UserError("plan reads a recipe config (configs/distill.py[:preset]), with teacher, "
                    "adaptor and student sections")
  config_ranges.check(config)
  from mstkd_jax.train import build  # pylint: disable=g-import-not-at-top
  config = build.resolve_dtypes(config, "tpu")  # the dtype a run on the chip would use
  unknown = sorted(set(only) - set(STEPS))
  if unknown:
    raise UserError(f"--only={','.join(only)}: unknown {unknown}; expected some of "
                    f"{list(STEPS)}")
  devices, chip = chips.topology(topology_name)
  import jax  # pylint: disable=g-import-not-at-top
  from mstkd_jax.train import parallel as parallel_lib  # pylint: disable=g-import-not-at-top
  parallel = parallel_lib.DataParallel("shard_map", devices=devices)
  results = []
  planned = _planned(config, len(devices))
  for step in planned:
    if only and step.name not in only:
      continue
    if log:
      log(f"compiling {step.name} for {topology_name}")
    results.append(compile_step(step, parallel, chip))
    if log:
      log(_summary(results[-1]))
  seconds = {r["step"]: r["est_step_s"] for r in results}
  if "student_alone" not in [p.name for p in planned]:
    seconds["student_alone"] = seconds.get("teacher")  # the same step (see _planned)
  return {
      "topology": topology_name, "chip": chip.name, "chips": len(devices),
      "device_kind": devices[0].device_kind, "peak_tflops": chip.peak_tflops,
      "hbm_bytes": chip.hbm_bytes, "clock_hz": chip.clock_hz, "jax": jax.__version__,
      "libtpu": _version("libtpu"), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "steps": results,
      "recipe": recipe_size.projection(config, seconds, num_images),
  }


def _summary(entry: dict) -> str:
  """One step's figures in a line, logged as soon as it is compiled (a full-size step can
  take 10-15 minutes on 2 cores)."""
  figures = {"GFLOP": entry["flops"] and entry["flops"] / 1e9,
             "peak GiB": entry["peak_bytes"] and entry["peak_bytes"] / (1 << 30),
             "est. ms": entry["est_step_s"] and entry["est_step_s"] * 1e3,
             "est. MFU %": entry["est_mfu"] and entry["est_mfu"] * 100}
  return (f"{entry['step']}: compiled in {entry['compile_s']:.0f} s; fits "
          f"{entry['fits']}; " + ", ".join(f"{k} {v:.2f}" if v else f"{k} n/a"
                                          for k, v in figures.items()))


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _gib(value) -> str:
  return f"{value / (1 << 30):.2f}" if value is not None else "n/a"


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return "no estimate"
  if seconds >= 86400:
    return f"{int(seconds // 86400)} d {seconds % 86400 / 3600:.1f} h"
  for unit, size in (("h", 3600), ("min", 60)):
    if seconds >= size:
      return f"{seconds / size:.1f} {unit}"
  return f"{seconds:.1f} s"


def format_plan(plan: dict) -> str:
  """The plan as fixed-width text: the steps per chip, then the recipe's projection."""
  clock = f"{plan['clock_hz'] / 1e9:.2f} GHz" if plan["clock_hz"] else "clock unknown"
  lines = [f"{plan['topology']}: {plan['chips']} x {plan['device_kind']} ({plan['chip']}: "
           f"{plan['peak_tflops']:g} TFLOP/s bf16, {_gib(plan['hbm_bytes'])} GiB HBM, "
           f"{clock}); jax {plan['jax']}, libtpu {plan['libtpu']}",
           "per chip; est. = the compiler's estimate, not a measurement",
           f"{'step':<15} {'batch':>5} {'dtype':>8} {'GFLOP':>8} {'GB moved':>8} "
           f"{'args GiB':>8} {'out GiB':>7} {'temp GiB':>8} {'peak GiB':>8} {'fits':>4} "
           f"{'est. ms':>8} {'est. img/s':>10} {'est. MFU':>8} {'collectives':>16}"]
  for s in plan["steps"]:
    flops = f"{s['flops'] / 1e9:.1f}" if s["flops"] else "n/a"
    moved = f"{s['bytes_accessed'] / 1e9:.2f}" if s["bytes_accessed"] else "n/a"
    fits = {True: "yes", False: "NO", None: "?"}[s["fits"]]
    ms = f"{1e3 * s['est_step_s']:.2f}" if s["est_step_s"] else "n/a"
    rate = f"{s['est_img_per_s']:.0f}" if s["est_img_per_s"] else "n/a"
    mfu = f"{100 * s['est_mfu']:.1f}%" if s["est_mfu"] else "n/a"
    coll = (f"{s['collectives']} x, {s['collective_bytes'] / (1 << 20):.1f} MiB"
            if s.get("collective_bytes") is not None else "n/a")
    lines.append(f"{s['step']:<15} {s['per_chip_batch']:>5} {s['dtype'][:8]:>8} {flops:>8} "
                 f"{moved:>8} {_gib(s['argument_bytes']):>8} {_gib(s['output_bytes']):>7} "
                 f"{_gib(s['temp_bytes']):>8} {_gib(s['peak_bytes']):>8} {fits:>4} {ms:>8} "
                 f"{rate:>10} {mfu:>8} {coll:>16}")
  recipe = plan["recipe"]
  lines += ["", f"the recipe on {plan['topology']} (steps x est. step time):",
            f"{'step':<15} {'stages':>6} {'image-steps':>14} {'est. time':>14}"]
  total = recipe["image_steps"] or 1
  for name, entry in recipe["by_step"].items():
    lines.append(f"{name:<15} {entry['stages']:>6} {entry['image_steps']:>14,} "
                 f"{_duration(entry['est_s']):>14}")
  students = sum(e["image_steps"] for n, e in recipe["by_step"].items()
                 if n.startswith("student"))
  lines.append(f"{recipe['image_steps']:,} image-steps through teachers and students "
               f"(students {100 * students / total:.0f}%), plus {recipe['adaptor_steps']:,} "
               f"adaptor embedding-steps and {recipe['extraction_images']:,} images "
               "embedded (each with its mirror)")
  lines.append(f"projected wall time: {_duration(recipe['est_wall_s'])} (est.)")
  lines.append("left out: " + "; ".join(recipe["left_out"]))
  return "\n".join(lines)


def main(argv):
  # pylint: disable=g-import-not-at-top
  from absl import flags
  del argv
  f = flags.FLAGS
  if not f.topology:
    raise UserError("--topology: expected a TPU topology, e.g. v5e:2x4")
  plan = run(f.config, f.topology, num_images=f.num_images,
             only=tuple(x for x in f.only.split(",") if x),
             log=lambda m: print(f"[plan] {m}", file=sys.stderr, flush=True))
  print(format_plan(plan), flush=True)
  for step in plan["steps"]:
    if step["fits"] is False:
      needed = step.get("not_fitting") or (f"it needs {_gib(step['peak_bytes'])} GiB of "
                                           f"{_gib(step['hbm_bytes'])} GiB HBM")
      errors.warn(f"{step['step']} does not fit on one {plan['chip']}: {needed}; lower "
                  f"{step['batch_field']}={step['global_batch']} or use more chips")
  if f.json:
    files.write_bytes(f.json, (json.dumps(plan, indent=2) + "\n").encode())
    print(f"[plan] wrote {f.json}", file=sys.stderr, flush=True)


def _define_flags():
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Recipe config (configs/distill.py"
                                  "[:preset]).", lock_config=True)
  flags.DEFINE_string("topology", "", "libtpu topology: v4:2x2x1, v5e:1x1, v5e:2x4, "
                      "v5p:2x2x1, v6e:2x2, ...")
  flags.DEFINE_string("json", "", "Also write the plan as JSON to this file.")
  flags.DEFINE_string("only", "", "Comma-separated steps to compile (" + ",".join(STEPS)
                      + "); '' = all. The projection needs them all.")
  flags.DEFINE_integer("num_images", 0, "Training images when the data is not synthetic; "
                       f"0 = BUPT-Balancedface's {recipe_size.DEFAULT_IMAGES:,}.")
  flags.mark_flag_as_required("config")


def cli():
  """`python -m mstkd_jax.plan`: a UserError prints one `error:` line, no traceback."""
  # pylint: disable=g-import-not-at-top
  from absl import app
  import jax
  # Shapes are traced on this host's CPU; the TPU is only a compilation target (jax has
  # read JAX_PLATFORMS at import: set its flag, unless the user chose).
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  _define_flags()
  app.run(errors.guarded(main))


if __name__ == "__main__":
  cli()

"""Scale benchmark of the margin head (`python -m mstkd_jax.bench --head_scale=...`).

For each number of identities and each head layout:
  replicated  every device holds the whole [D, C] centres (head.shard_classes=false)
  sharded     the centres split over the devices (head.shard_classes=true)
  sampled     sharded with Partial-FC sampling (head.sample_rate, 0.1 by default)
it builds the real training step of the head alone on given features (steps.
classification_step with an identity backbone: the margin head, its cross-entropy, SGD
with momentum and weight decay), compiles it for every device of a `shard_map` mesh, and
reads the head's memory per device from XLA's compiled memory analysis (`arguments`: the
state and the batch a device holds; `temporaries`: the step's working memory; `total`:
arguments + outputs not aliased to them + temporaries). The memory figures come from
compilation alone, so a layout that would not fit is still measured; it is only run (and
timed, after one warm-up step) where its total over all devices is below `run_limit_gib`.
"""

import dataclasses
import functools
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mstkd_jax import losses, models
from mstkd_jax.errors import UserError
from mstkd_jax.train import parallel as parallel_lib, state as state_lib, steps as steps_lib

LAYOUTS = ("replicated", "sharded", "sampled")


class _Features(nn.Module):
  """The identity 'backbone': the batch already holds the features [B, D]."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return x


@dataclasses.dataclass(frozen=True)
class HeadCase:
  num_classes: int
  layout: str
  embedding_size: int = 512
  batch: int = 64                 # global batch of features
  sample_rate: float = 0.1        # for "sampled"


def _measure(case: HeadCase, margin: losses.MarginSpec, *, steps: int, run_limit_gib: float,
             log) -> dict:
  par = parallel_lib.DataParallel("shard_map")
  devices = par.device_count
  if case.batch % devices:
    raise UserError(f"--head_batch={case.batch}: expected a multiple of the {devices} "
                    "devices")
  classes = None
  if case.layout != "replicated":
    rate = case.sample_rate if case.layout == "sampled" else 1.0
    par = par.with_class_shards(case.num_classes, rate)
    classes = par.class_shards
  schedule = state_lib.step_decay_schedule(0.1, 1000, ())
  tx = state_lib.sgd({"backbone": state_lib.ParamGroup(schedule),
                      "head": state_lib.ParamGroup(schedule)})
  head = models.create("margin_head", num_classes=case.num_classes)
  step = functools.partial(steps_lib.classification_step, backbone=_Features(), head=head,
                           margin=margin, tx=tx, schedule=schedule, input_key="features",
                           classes=classes)
  width = classes.padded_classes if classes else case.num_classes
  kernel_shape = jax.ShapeDtypeStruct((case.embedding_size, width), jnp.float32)
  params = {"backbone": {}, "head": {"kernel": kernel_shape}}
  state = jax.eval_shape(lambda p: state_lib.create_state(p, {}, tx), params)
  shardings = par.state_sharding(state)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  per_device = case.batch // devices
  batch_sharding = NamedSharding(par.mesh, P(parallel_lib.AXIS))
  abstract_batch = {
      "features": jax.ShapeDtypeStruct((devices, per_device, case.embedding_size),
                                       jnp.float32, sharding=batch_sharding),
      "label": jax.ShapeDtypeStruct((devices, per_device), jnp.int32,
                                    sharding=batch_sharding)}
  abstract_rng = jax.ShapeDtypeStruct((2,), jnp.uint32,
                                      sharding=NamedSharding(par.mesh, P()))
  wrapped = par.wrap(step)
  started = time.perf_counter()
  compiled = wrapped.lower(abstract_state, abstract_batch, abstract_rng).compile()
  compile_s = time.perf_counter() - started
  memory = compiled.memory_analysis()
  arguments = int(memory.argument_size_in_bytes)
  temporaries = int(memory.temp_size_in_bytes)
  outputs = int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes)
  total = arguments + max(outputs, 0) + temporaries
  result = {"num_classes": case.num_classes, "layout": case.layout,
            "embedding_size": case.embedding_size, "batch": case.batch,
            "sample_rate": case.sample_rate if case.layout == "sampled" else 1.0,
            "devices": devices, "classes_per_device": classes.shard_size if classes
            else case.num_classes,
            "arguments_bytes": arguments, "temporaries_bytes": temporaries,
            "total_bytes": total, "compile_s": compile_s}
  if total * devices > run_limit_gib * 2**30:
    result["skipped"] = (f"not run: {total * devices / 2**30:.1f} GiB over the "
                         f"{devices} devices, above --head_run_limit_gib={run_limit_gib:g}")
    log(f"{case.layout} {case.num_classes}: {total / 2**20:.1f} MiB per device; "
        f"{result['skipped']}")
    return result
  device_state = _initial_state(case, tx, width, shardings)
  rng = np.random.default_rng(0)
  batch = par.shard({
      "features": rng.normal(size=(devices, per_device, case.embedding_size)).astype(
          np.float32),
      "label": rng.integers(0, case.num_classes, (devices, per_device)).astype(np.int32)})
  key = par.replicate(jax.random.PRNGKey(0))
  device_state, metrics = compiled(device_state, batch, key)          # warm-up
  jax.block_until_ready(metrics)
  seconds = []
  for _ in range(steps):
    started = time.perf_counter()
    device_state, metrics = compiled(device_state, batch, key)
    jax.block_until_ready((device_state, metrics))
    seconds.append(time.perf_counter() - started)
  result["seconds_per_step"] = min(seconds)
  result["finite_loss"] = bool(np.isfinite(np.asarray(metrics["loss"])))
  log(f"{case.layout} {case.num_classes}: {total / 2**20:.1f} MiB per device, "
      f"{1e3 * min(seconds):.1f} ms/step")
  return result


def _initial_state(case: HeadCase, tx, width: int, shardings):
  """The head's TrainState made on the devices where it lives (no host copy of the
  centres): centres N(0, 0.01), momentum zero."""
  def init():
    kernel = 0.01 * jax.random.normal(jax.random.PRNGKey(1), (case.embedding_size, width),
                                      jnp.float32)
    return state_lib.create_state({"backbone": {}, "head": {"kernel": kernel}}, {}, tx)
  with jax.threefry_partitionable(True):   # each device draws only its own columns
    return jax.jit(init, out_shardings=shardings)()


def run(identities, *, margin: losses.MarginSpec, embedding_size: int = 512,
        batch: int = 64, sample_rate: float = 0.1, steps: int = 3,
        run_limit_gib: float = 8.0, layouts=LAYOUTS) -> dict:
  """Measures every (identities, layout); returns {"cases": [...], "ratios": {...}}.

  Ratios, per number of identities: each layout's memory per device and step time over
  the replicated head's (memory always; time where both ran).
  """
  log = lambda m: print(f"[bench] head {m}", file=sys.stderr, flush=True)
  cases = []
  for classes in identities:
    for layout in layouts:
      cases.append(_measure(HeadCase(classes, layout, embedding_size, batch, sample_rate),
                            margin, steps=steps, run_limit_gib=run_limit_gib, log=log))
  ratios = {}
  for classes in identities:
    by_layout = {c["layout"]: c for c in cases if c["num_classes"] == classes}
    base = by_layout.get("replicated")
    if base is None:
      continue
    for layout, case in by_layout.items():
      entry = {"memory": case["total_bytes"] / base["total_bytes"]}
      if "seconds_per_step" in case and "seconds_per_step" in base:
        entry["time"] = case["seconds_per_step"] / base["seconds_per_step"]
      ratios[f"{classes}/{layout}"] = entry
  device = jax.devices()[0]
  return {"cases": cases, "ratios": ratios,
          "device": {"kind": device.device_kind, "platform": device.platform,
                     "count": jax.device_count(), "jax_version": jax.__version__},
          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def format_table(report: dict) -> str:
  """The head benchmark as a fixed-width text table."""
  lines = [f"{'identities':>10} {'layout':<10} {'per dev':>8} {'args MiB':>9} "
           f"{'temp MiB':>9} {'total MiB':>10} {'x repl':>7} {'ms/step':>9} {'x repl':>7}"]
  for case in report["cases"]:
    ratio = report["ratios"].get(f"{case['num_classes']}/{case['layout']}", {})
    memory = f"{ratio['memory']:.3f}" if "memory" in ratio else "n/a"
    if "seconds_per_step" in case:
      ms = f"{1e3 * case['seconds_per_step']:.1f}"
    else:
      ms = "not run"
    speed = f"{ratio['time']:.2f}" if "time" in ratio else "n/a"
    lines.append(f"{case['num_classes']:>10} {case['layout']:<10} "
                 f"{case['classes_per_device']:>8} {case['arguments_bytes'] / 2**20:>9.1f} "
                 f"{case['temporaries_bytes'] / 2**20:>9.1f} "
                 f"{case['total_bytes'] / 2**20:>10.1f} {memory:>7} {ms:>9} {speed:>7}")
  first = report["cases"][0] if report["cases"] else {}
  lines.append(f"device: {report['device']['count']} x {report['device']['kind']}; the head "
               f"alone on given features, D={first.get('embedding_size')}, global batch "
               f"{first.get('batch')}; memory per device from XLA's compiled memory analysis")
  return "\n".join(lines)

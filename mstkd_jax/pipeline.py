"""The MST-KD recipe as a small graph of named stages, each writing into <workdir>/<stage>/.

A stage is finished when its stage.json says so (written last, after its outputs), and a
finished stage is skipped, so rerunning after an interruption continues where it stopped.
stage.json also records the config fields that shaped the stage (and its inputs'
fingerprints): a finished stage whose fields changed is not reused silently — the run stops
naming the fields, and `--config.force=<stage>` reruns it and everything downstream.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from mstkd_jax import paths
from mstkd_jax.data import input_pipeline, sources
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import report as report_lib, seeds as seeds_lib, target_space
from mstkd_jax.models import adaptor as adaptor_model
from mstkd_jax.stages import adaptor, extract, runtime, student, teacher
from mstkd_jax.train import parallel as parallel_lib

SET_PREFIX = {"specialized": ("teacher", "mstkd", ""), "balanced": ("balanced_teacher",
                                                                    "balanced_kd", "balanced_")}


@dataclasses.dataclass
class Stage:
  """One node of the recipe: `run(config, workdir)` on its own derived config."""
  name: str                          # also its folder under the workdir, e.g. teacher/group_a
  config: ml_collections.ConfigDict  # what the stage runs with
  run: Callable
  deps: tuple[str, ...] = ()
  model: str = ""                    # report row of the model it trains ("" = none)
  section: str = ""                  # its recipe section in configs/distill.py ("" = none)

  def run_in(self, stage_dir: str):
    kwargs = {"epochs_field": f"{self.section}.train.epochs"} if self.section else {}
    return self.run(self.config, stage_dir, name=self.name, **kwargs)


def _base(config) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  for key in ("seed", "parallelism", "num_devices", "data", "model", "head"):
    c[key] = config[key]
  return ml_collections.ConfigDict(c.to_dict())


def _with_recipe(config, recipe) -> ml_collections.ConfigDict:
  c = _base(config)
  c.train = ml_collections.ConfigDict(recipe.train.to_dict())
  c.optim = ml_collections.ConfigDict(recipe.optim.to_dict())
  return c


def balanced_split(num_identities: int, parts: int, seed: int) -> list[np.ndarray]:
  """All identities split at random (seeded) into `parts` disjoint parts of equal size; where
  `parts` does not divide the count, the first parts take one identity more (BUPT's 27,997:
  7,000 + 3 x 6,999, as the authors' baseline teachers)."""
  if parts < 1 or num_identities < parts:
    raise UserError(f"the balanced baseline cannot split {num_identities} training "
                    f"identities into {parts} parts")
  order = np.random.default_rng(seed).permutation(num_identities)
  return [np.sort(p) for p in np.array_split(order, parts)]


def build(config, workdir: str, train_set: sources.TrainingSet) -> list[Stage]:
  """The recipe's stages in an order that respects their dependencies."""
  kd_losses = tuple(k for k in student.KD_LOSSES if k != "none")
  for field, allowed in (("teacher_sets", SET_PREFIX), ("kd_losses", kd_losses),
                         ("adaptors", adaptor_model.KINDS)):
    for value in config[field]:
      if value not in allowed:
        raise UserError(f"config field {field} holds {value!r}; expected some of "
                        f"{list(allowed)}")
  input_pipeline.check_orientation(config.target_orientation, "target_orientation")
  for section in ("teacher", "student"):   # checked now, not when the stage starts
    runtime.evaluation_fields(config[section].train, f"{section}.train")
  if config.targets not in student.TARGETS:
    raise UserError(f"config field targets={config.targets!r}: expected one of "
                    f"{student.TARGETS}")
  groups = train_set.group_names
  if not groups:
    raise UserError("the training set has no groups; MST-KD needs one teacher per group")
  stages = []
  path = lambda name: os.path.join(workdir, name)
  for teacher_set in config.teacher_sets:
    teacher_prefix, student_prefix, adaptor_prefix = SET_PREFIX[teacher_set]
    if teacher_set == "specialized":
      subsets = [(g, dict(group=g, identities="")) for g in groups]
    else:
      parts = balanced_split(train_set.num_identities, len(groups), config.balanced_seed)
      subsets = [(str(k), dict(group="", identities=",".join(map(str, p))))
                 for k, p in enumerate(parts)]
    teacher_names = []
    for label, section in subsets:
      c = _with_recipe(config, config.teacher)
      c.teacher = section
      name = f"{teacher_prefix}/{label}"
      stages.append(Stage(name, c, teacher.run, model=name, section="teacher"))
      teacher_names.append(name)
    c = _base(config)
    c.train = ml_collections.ConfigDict(config.teacher.train.to_dict())
    c.extract = dict(teacher_dirs=tuple(path(n) for n in teacher_names))
    extract_name = f"extract/{teacher_set}"
    stages.append(Stage(extract_name, c, extract.run, deps=tuple(teacher_names)))
    for kind in config.adaptors:
      c = _with_recipe(config, config.adaptor)
      c.head = ml_collections.ConfigDict(config.adaptor.head.to_dict())
      c.adaptor = dict(kind=kind, embedding_size=config.adaptor.embedding_size,
                       dropout=config.adaptor.dropout, extract_dir=path(extract_name),
                       orientation=config.target_orientation)
      adaptor_name = f"adaptor/{teacher_set}/{kind}"
      stages.append(Stage(adaptor_name, c, adaptor.run, deps=(extract_name,),
                          model=f"{adaptor_prefix}adaptor/{kind}", section="adaptor"))
      for kd in config.kd_losses:
        c = _with_recipe(config, config.student)
        c.student = dict(
            kd=kd, targets=config.targets, orientation=config.target_orientation,
            kd_weight=config.student.kd_weight,
            adaptor_dir=path(adaptor_name), teacher_dirs=tuple(path(n) for n in teacher_names),
            adaptor_model=dict(kind=kind, embedding_size=config.adaptor.embedding_size,
                               dropout=config.adaptor.dropout))
        name = f"{student_prefix}/{kind}/{kd}"
        deps = (adaptor_name,) + (tuple(teacher_names) if config.targets == "online" else ())
        stages.append(Stage(f"student/{name}", c, student.run, deps=deps, model=name,
                            section="student"))
  if config.student_alone:
    c = _with_recipe(config, config.student)
    c.student = dict(kd="none", targets="cached", orientation="as_fed", kd_weight=0.0,
                     adaptor_dir="",
                     teacher_dirs=(), adaptor_model=dict(kind="SL", embedding_size=0,
                                                         dropout=0.0))
    stages.append(Stage("student/student_alone", c, student.run, model="student_alone",
                        section="student"))
  models = tuple(s.name for s in stages if s.model)
  c = ml_collections.ConfigDict(dict(models=models))
  stages.append(Stage("report", c, None, deps=models))
  return stages


def _fingerprint(stage: Stage, fingerprints: dict) -> dict:
  fields = runtime.config_dict(stage.config)
  flat = {k: v for k, v in runtime.flatten(fields).items()
          if not any(k == f or k.startswith(f + ".") for f in runtime.RUN_CONTROL_FIELDS)}
  inputs = {d: fingerprints[d] for d in stage.deps}
  digest = hashlib.sha256(json.dumps([flat, inputs], sort_keys=True).encode()).hexdigest()
  return {"fingerprint": digest, "fields": flat, "inputs": inputs}


def _read_record(stage_dir: str) -> dict | None:
  try:
    with open(os.path.join(stage_dir, "stage.json")) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UserError(f"{stage_dir}/stage.json is unreadable ({e}); delete it to rerun "
                    "that stage") from e


def _stale_message(name: str, old: dict, new: dict) -> str:
  changed = [f"{k}: {old['fields'].get(k, '<absent>')!r} -> {v!r}"
             for k, v in new["fields"].items() if old["fields"].get(k) != v]
  changed += [f"{k}: removed" for k in old["fields"] if k not in new["fields"]]
  changed += [f"input {d} changed" for d, fp in new["inputs"].items()
              if old.get("inputs", {}).get(d) != fp]
  return (f"the finished stage {name!r} was made with another config ("
          + "; ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
          + f"). Rerun it and everything after it with --config.force={name}, or use "
          "another --workdir.")


def _downstream(stages: list[Stage], roots: set) -> set:
  out = set(roots)
  for stage in stages:          # stages are in dependency order
    if out & set(stage.deps):
      out.add(stage.name)
  return out


def _with_data_dir(config, workdir: str) -> ml_collections.ConfigDict:
  """The config with data.data_dir filled in: one data folder for every stage and seed
  (for the synthetic set, its cache)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.data.data_dir:
    config.data.data_dir = sources.data_dir(config.data, workdir)
  return config


def _check_seeds(config) -> int:
  seeds = config.get("seeds", 1)
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise UserError(f"config field seeds={seeds!r}: expected an integer >= 1 (the number "
                    "of training seeds to run the recipe with)")
  return seeds


def run(config, workdir: str) -> dict:
  """Runs every stage that is not finished; returns the report.

  With config.seeds = N > 1 the recipe runs once per training seed (config.seed + k for k
  < N) into <workdir>/seed_<seed>/, sharing the data (and so the synthetic cache) and the
  balanced identity split; finished seeds are skipped. It ends with the combined report
  over seeds in <workdir>/report/ (evaluation/seeds.py) and returns it.
  """
  workdir = paths.local(workdir, "workdir")
  seeds = _check_seeds(config)
  config = _with_data_dir(config, workdir)
  if seeds == 1:
    return run_recipe(config, workdir)
  runtime.prepare_workdir(config, workdir, refuse_changes=False)
  reports = {}
  for k in range(seeds):
    seed = config.seed + k
    seed_config = ml_collections.ConfigDict(config.to_dict())
    seed_config.update(seed=seed, seeds=1)
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    _check_seed_folder(seed_dir, seed_config)
    print(f"[pipeline] seed {seed} ({k + 1} of {seeds}) in {seed_dir}", flush=True)
    reports[seed] = run_recipe(seed_config, seed_dir, show_table=False)
  if config.only:
    return {}
  combined = seeds_lib.combine_reports(reports)
  combined["warnings"] = [f"seed {seed}: {w}" for seed, r in reports.items()
                          for w in r.get("warnings", ())]
  if jax.process_index() == 0:
    seeds_lib.write_combined(combined, os.path.join(workdir, "report"))
  print(_warnings_text(combined["warnings"]) + seeds_lib.format_combined_table(combined),
        flush=True)
  print(f"[pipeline] {seeds} seeds done; combined report: "
        f"{os.path.join(workdir, 'report')}", flush=True)
  return combined


def _check_seed_folder(seed_dir: str, seed_config) -> None:
  """Refuses a seed folder whose recorded config differs from this run's for that seed."""
  path = os.path.join(seed_dir, "config.json")
  try:
    with open(path) as f:
      old = json.load(f)
  except FileNotFoundError:
    return
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}); move the folder {seed_dir} away") from e
  changes = runtime.changed_fields(old, runtime.config_dict(seed_config),
                                   ignore=runtime.RUN_CONTROL_FIELDS + ("seeds",))
  if changes:
    raise UserError(f"the seed folder {seed_dir} holds a run of another config ("
                    + "; ".join(changes[:8]) + (" ..." if len(changes) > 8 else "")
                    + "); use another --workdir, or the same settings to continue it")


def _warnings_text(warnings) -> str:
  if not warnings:
    return ""
  return ("WARNINGS (read before the numbers):\n"
          + "\n".join(f"  - {w}" for w in warnings) + "\n\n")


def run_recipe(config, workdir: str, show_table: bool = True) -> dict:
  """One run of the recipe (one training seed) in `workdir`; returns its report ({} with
  --config.only)."""
  train_set = sources.training_set(config.data, workdir)
  stages = build(config, workdir, train_set)
  names = [s.name for s in stages]
  for field in ("only", "force"):
    if config[field] and config[field] not in names:
      raise UserError(f"config field {field}={config[field]!r}: no such stage; the stages "
                      f"are {names}")
  forced = _downstream(stages, {config.force}) if config.force else set()
  # Every finished stage is checked against this config before anything runs or is
  # written (config.json included): a refused run leaves the workdir as it was.
  fingerprints, records = {}, {}
  for stage in stages:
    records[stage.name] = _fingerprint(stage, fingerprints)
    fingerprints[stage.name] = records[stage.name]["fingerprint"]
    old = _read_record(os.path.join(workdir, stage.name))
    if (stage.name not in forced and old and old.get("finished")
        and old["fingerprint"] != fingerprints[stage.name]):
      raise UserError(_stale_message(stage.name, old, records[stage.name]))
  runtime.prepare_workdir(config, workdir, refuse_changes=False)
  finished = {}
  started = time.perf_counter()
  for stage in stages:
    stage_dir = os.path.join(workdir, stage.name)
    record = records[stage.name]
    old = _read_record(stage_dir)
    if stage.name in forced and os.path.isdir(stage_dir):
      print(f"[pipeline] --config.force: rerunning {stage.name}", flush=True)
      if jax.process_index() == 0:
        shutil.rmtree(stage_dir)
      parallel_lib.sync_hosts(f"force {stage.name}")
      old = None
    if old and old.get("finished"):
      finished[stage.name] = True
      continue
    if config.only and stage.name != config.only:
      continue
    missing = [d for d in stage.deps if not finished.get(d)]
    if missing:
      raise UserError(f"the stage {stage.name!r} needs the outputs of {missing}, which are "
                      f"not finished; run the pipeline without --config.only, or run "
                      f"--config.only={missing[0]} first")
    print(f"[pipeline] stage {stage.name} ({time.perf_counter() - started:.0f} s so far)",
          flush=True)
    if stage.name == "report":
      write_report(config, workdir, stages, stage_dir)
    else:
      stage.run_in(stage_dir)
    if jax.process_index() == 0:
      os.makedirs(stage_dir, exist_ok=True)
      with open(os.path.join(stage_dir, "stage.json.tmp"), "w") as f:
        json.dump({**record, "finished": True}, f, indent=2, sort_keys=True)
      os.replace(os.path.join(stage_dir, "stage.json.tmp"),
                 os.path.join(stage_dir, "stage.json"))
    # The other processes read what process 0 just wrote only after this barrier.
    parallel_lib.sync_hosts(f"finished {stage.name}")
    finished[stage.name] = True
  report_path = os.path.join(workdir, "report", "report.json")
  if finished.get("report") and not config.only:
    with open(report_path) as f:
      report = json.load(f)
    if show_table:
      print(_warnings_text(report.get("warnings")) + report_lib.format_table(report),
            flush=True)
    print(f"[pipeline] done in {time.perf_counter() - started:.0f} s; report: "
          f"{os.path.dirname(report_path)}", flush=True)
    return report
  return {}


def write_report(config, workdir: str, stages: list[Stage], out_dir: str) -> dict:
  """Evaluates every model's saved verification embeddings and writes the report, with
  every stage's convergence record, the target-space diagnostics and their warnings."""
  models = {}
  for stage in stages:
    if stage.model:
      embeddings = runtime.load_embeddings(os.path.join(workdir, stage.name))
      models[stage.model] = runtime.evaluate_embeddings(embeddings)
  report = report_lib.build_report(models, config=runtime.config_dict(config))
  report.update(stage_health(workdir, stages))
  if jax.process_index() == 0:
    report_lib.write_report(report, out_dir)
  return report


def stage_health(workdir: str, stages: list[Stage]) -> dict:
  """{"warnings": [...], "training": {stage: convergence record}, "diagnostics":
  {"target_space": {space: target_space statistics}, "students": {model: target fit}}}
  from the results.json of every stage (not-converged and collapse warnings first)."""
  warnings, training = [], {}
  spaces, students = {}, {}
  for stage in stages:
    results = runtime.read_results(os.path.join(workdir, stage.name))
    record = results.get("training")
    if record:
      training[stage.name] = {k: v for k, v in record.items() if k != "warnings"}
      warnings += record.get("warnings", [])
    diagnostics = results.get("diagnostics") or {}
    for key, label in (("concatenation", "concatenated teacher embeddings"),
                       ("targets", "targets")):
      statistics = diagnostics.get(key)
      if statistics:
        space = f"{stage.name} ({label})"
        spaces[space] = statistics
        warning = target_space.collapse_warning(space, statistics)
        if warning:
          warnings.append(warning)
    if stage.model and "train_target_cosine" in diagnostics:
      students[stage.model] = diagnostics
  return {"warnings": warnings, "training": training,
          "diagnostics": {"target_space": spaces, "students": students}}

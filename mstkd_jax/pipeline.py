"""Runs the MST-KD recipe (stages/recipe.py), each stage writing into <workdir>/<stage>/.

A stage is finished when its stage.json says so (written last, with the size and content
hash of each output); a finished stage with intact outputs is skipped, so a rerun continues
where it stopped, and one with missing or damaged outputs reruns with everything after it.
stage.json also records the config fields that shaped the stage and its inputs'
fingerprints: a finished stage whose fields changed stops the run naming them, and
`--config.force=<stage>` reruns it and everything downstream.
"""

import hashlib
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from mstkd_jax import config_ranges, errors, files, paths, workdir as workdir_lib
from mstkd_jax.data import sources
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import report as report_lib, seeds as seeds_lib
from mstkd_jax.stages import report_stage, shared
from mstkd_jax.stages.recipe import Stage, make_stages
from mstkd_jax.train import build, parallel as parallel_lib


def _fingerprint(stage: Stage, fingerprints: dict) -> dict:
  fields = workdir_lib.config_dict(stage.config)
  flat = {k: v for k, v in workdir_lib.flatten(fields).items()
          if not any(k == f or k.startswith(f + ".") for f in workdir_lib.RUN_CONTROL_FIELDS)}
  inputs = {d: fingerprints[d] for d in stage.deps}
  # A network made elsewhere counts by its content (only a stage that imports one).
  made = [flat, inputs] + ([stage.imported] if stage.imported else [])
  digest = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()
  return {"fingerprint": digest, "fields": flat, "inputs": inputs,
          **({"imported": stage.imported} if stage.imported else {})}


def _stale_message(name: str, old: dict, new: dict) -> str:
  changed = workdir_lib.changed_fields(old["fields"], new["fields"])
  changed += [f"input {d} changed" for d, fp in new["inputs"].items()
              if old.get("inputs", {}).get(d) != fp]
  if old.get("imported") != new.get("imported"):
    changed.append("the network it imports changed")
  dtype = any(c.split(":")[0].endswith("model.dtype") for c in changed)
  return (f"the finished stage {name!r} was made with another config ("
          + "; ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
          + f"). Rerun it and everything after it with --config.force={name}, or use "
          "another --workdir" + ('; model.dtype "auto" is bfloat16 on TPUs and GPUs and '
                                 "float32 on CPUs: to go on here as it ran, set that field "
                                 "to the recorded dtype" if dtype else "") + ".")


def _downstream(stages: list[Stage], roots: set) -> set:
  out = set(roots)
  for stage in stages:          # stages are in dependency order
    if out & set(stage.deps):
      out.add(stage.name)
  return out


def run(config, workdir: str) -> dict:
  """Runs every stage that is not finished; returns the report.

  With config.seeds = N > 1 the recipe runs once per seed config.seed + k (k < N) into
  <workdir>/seed_<seed>/, sharing the data and the balanced identity split, and returns the
  combined report it writes to <workdir>/report/ (evaluation/seeds.py).
  """
  config_ranges.check(config)  # every field in its range before the data is read
  config = build.resolve_dtypes(config)  # "auto" -> this platform's, in every fingerprint
  workdir = paths.resolve(workdir, "workdir")
  seeds = config.get("seeds", 1)
  # One data folder for every stage and seed (for the synthetic set, its cache).
  config = sources.with_data_dir(config, workdir)
  if seeds == 1:
    return run_recipe(config, workdir)
  workdir_lib.prepare(config, workdir, refuse_changes=False)
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


def _cache_record(config, stage_dir: str) -> dict:
  """{"caches": output record} of the stage's caches kept outside its folder, else {}."""
  cache = shared.cache_folder(config, stage_dir)
  if cache is None or not files.isdir(cache):
    return {}
  return {"caches": workdir_lib.output_record(cache)}


def _damaged_caches(config, stage_dir: str, record: dict) -> str | None:
  """Why the caches of a finished stage are not as it left them (None where intact). Each
  process checks its machine's copy (only process 0 by content: the others' were computed
  apart from the recorded one), and all agree: any process lacking them remakes them."""
  if not record.get("caches"):
    return None
  cache = paths.cache_dir(config.cache_dir, stage_dir)
  why = workdir_lib.damaged_output(cache, record["caches"],
                                   contents=jax.process_index() == 0)
  why = f"its caches in {cache} are not as it left them ({why})" if why else None
  if jax.process_count() > 1:
    lacking = np.flatnonzero(parallel_lib.gather_hosts(np.array([why is not None])))
    if len(lacking) and why is None:
      why = (f"its caches in {cache} are not as it left them on processes "
             f"{lacking.tolist()}")
  return why


def _remake(config, stage: Stage, stage_dir: str, record: dict, why: str) -> None:
  """Writes the caches of a finished stage again (`Stage.remake`, no training). Where they
  differ from the recorded ones (another machine's rounding), a warning says so and the
  record takes the new ones; finished stages after it keep what they made."""
  print(f"[pipeline] {stage.name}: remaking its caches, which a stage to run reads ({why})",
        flush=True)
  stage.remake(stage.config, stage_dir, name=stage.name, inputs=stage.inputs)
  parallel_lib.sync_hosts(f"remade {stage.name}")
  if jax.process_index() == 0:
    cache = paths.cache_dir(config.cache_dir, stage_dir)
    # The recorded files only: with cache_dir unset since, the cache folder is the stage's.
    fresh = {rel: entry for rel, entry in workdir_lib.output_record(cache).items()
             if rel in record["caches"]}
    if fresh != record["caches"]:
      errors.warn(f"{stage.name}: its remade caches in {cache} differ from the ones the "
                  "finished stages after it read (other hardware rounds differently); those "
                  "keep their results, the stages still to run read the new caches",
                  file=sys.stderr)
      files.write_json(os.path.join(stage_dir, "stage.json"), {**record, "caches": fresh},
                       sort_keys=True)
  parallel_lib.sync_hosts(f"recorded {stage.name}")


def _check_seed_folder(seed_dir: str, seed_config) -> None:
  """Refuses a seed folder whose recorded config differs from this run's for that seed."""
  old = files.read_json(os.path.join(seed_dir, "config.json"),
                        f"a run's config.json; move the folder {seed_dir} away", missing=None)
  if old is None:
    return
  changes = workdir_lib.changed_fields(old, workdir_lib.config_dict(seed_config),
                                       ignore=workdir_lib.RUN_CONTROL_FIELDS + ("seeds",))
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
  """One run of the recipe (one seed) in `workdir`; returns its report ({} with only)."""
  train_set = sources.training_set(config.data, workdir)
  stages = make_stages(config, workdir, train_set)
  names = [s.name for s in stages]
  for field in ("only", "force"):
    if config[field] and config[field] not in names:
      raise UserError(f"config field {field}={config[field]!r}: no such stage; the stages "
                      f"are {names}")
  forced = _downstream(stages, {config.force}) if config.force else set()
  # Every finished stage is checked before anything is written (config.json included): a
  # refused run leaves the workdir as it was. A stale report is rebuilt, not refused.
  fingerprints, records, rerun, unfinished, caches = {}, {}, {}, [], {}
  for stage in stages:
    stage_dir = os.path.join(workdir, stage.name)
    records[stage.name] = _fingerprint(stage, fingerprints)
    fingerprints[stage.name] = records[stage.name]["fingerprint"]
    old = workdir_lib.read_stage_record(stage_dir)
    if not (old and old.get("finished")):
      unfinished.append(stage.name)
    if stage.name in forced or stage.name in unfinished:
      continue
    if old["fingerprint"] != fingerprints[stage.name]:
      if stage.name != "report":
        raise UserError(_stale_message(stage.name, old, records[stage.name]))
      rerun[stage.name] = "the models it reports changed"
    elif why := workdir_lib.damaged_output(stage_dir, old.get("outputs", {})):
      rerun[stage.name] = f"its outputs are damaged ({why})"
    elif why := _damaged_caches(config, stage_dir, old):
      caches[stage.name] = why
  for name in _downstream(stages, set(rerun)) - set(rerun):
    rerun[name] = "an earlier stage it reads reruns"
  rerun.update({name: "--config.force" for name in forced})
  # A finished stage's missing cache is remade only where a stage that reads it will run;
  # a remade adaptor reads the extraction's cache in turn: repeated until none is added.
  will_run = set(rerun) | set(unfinished)
  if config.only:
    will_run &= {config.only}
  readers = {s.name: {t.name for t in stages if s.name in t.deps and t.name != "report"}
             for s in stages}
  remake = {}
  while added := [name for name in caches if name not in rerun and name not in remake
                  and readers[name] & (will_run | set(remake))]:
    remake.update({name: caches[name] for name in added})
  if rerun or unfinished:  # a finished run writes nothing: it prints from a read-only workdir
    workdir_lib.prepare(config, workdir, refuse_changes=False)
  # Recorded first: a forced or repaired run, interrupted and resumed, still reruns these.
  for name, why in rerun.items():
    stage_dir = os.path.join(workdir, name)
    if not files.isdir(stage_dir):
      continue
    print(f"[pipeline] {name} will rerun: {why}", flush=True)
    if jax.process_index() == 0:
      files.write_json(os.path.join(stage_dir, "stage.json"), {"invalidated": why})
  parallel_lib.sync_hosts("invalidated")
  finished = {}
  started = time.perf_counter()
  for stage in stages:
    stage_dir = os.path.join(workdir, stage.name)
    old = workdir_lib.read_stage_record(stage_dir)
    if old and old.get("finished"):
      finished[stage.name] = True
      if stage.name in remake:
        _remake(config, stage, stage_dir, old, remake[stage.name])
      continue
    if config.only and stage.name != config.only:
      continue
    missing = [d for d in stage.deps if not finished.get(d)]
    if missing:
      raise UserError(f"the stage {stage.name!r} needs the outputs of {missing}, which are "
                      f"not finished; run the pipeline without --config.only, or run "
                      f"--config.only={missing[0]} first")
    if old and old.get("invalidated"):
      # Its inputs are there: only now are its previous outputs removed.
      if jax.process_index() == 0:
        files.rmtree(stage_dir)
        files.makedirs(stage_dir)  # a resumption of this rerun keeps its progress
        files.write_json(os.path.join(stage_dir, "stage.json"), {"cleared": True})
      cache = shared.cache_folder(config, stage_dir)
      if cache and shared.writes_caches(config, stage_dir):
        files.rmtree(cache)  # each machine's own copy
      parallel_lib.sync_hosts(f"cleared {stage.name}")
    print(f"[pipeline] stage {stage.name} ({time.perf_counter() - started:.0f} s so far)",
          flush=True)
    if stage.name == "report":
      report_stage.run(config, workdir, [(s.name, s.model) for s in stages], stage_dir)
    else:
      stage.run_in(stage_dir)
    if jax.process_index() == 0:
      files.makedirs(stage_dir)
      files.write_json(os.path.join(stage_dir, "stage.json"),
                       {**records[stage.name], "finished": True,
                        "outputs": workdir_lib.output_record(stage_dir),
                        **_cache_record(config, stage_dir)}, sort_keys=True)
    # The other processes read what process 0 just wrote only after this barrier.
    parallel_lib.sync_hosts(f"finished {stage.name}")
    finished[stage.name] = True
  report_path = os.path.join(workdir, "report", "report.json")
  if finished.get("report") and not config.only:
    report = files.read_json(report_path, "the report the report stage wrote")
    if show_table:
      print(_warnings_text(report.get("warnings")) + report_lib.format_table(report),
            flush=True)
    print(f"[pipeline] done in {time.perf_counter() - started:.0f} s; report: "
          f"{os.path.dirname(report_path)}", flush=True)
    return report
  return {}

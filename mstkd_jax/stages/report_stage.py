"""Report stage: every model's per-group verification from its saved embeddings, with
every stage's convergence record, the target-space diagnostics and their warnings."""

import os

import jax

from mstkd_jax import workdir as workdir_lib
from mstkd_jax.evaluation import embedding, report as report_lib, space_report


def run(config, workdir: str, stages: list[tuple[str, str]], out_dir: str) -> dict:
  """Writes <out_dir>/report.json, report.md and the plots (evaluation/report.py) of the
  `stages` (stage name, report row or "") in `workdir`; returns the report."""
  models = {}
  for name, model in stages:
    if model:
      embeddings = embedding.load_embeddings(os.path.join(workdir, name))
      models[model] = embedding.evaluate_embeddings(embeddings)
  report = report_lib.build_report(models, config=workdir_lib.config_dict(config))
  health = stage_health(workdir, stages)
  # A model verifying at chance first: its numbers are not measurements at all.
  health["warnings"] = report["warnings"] + health["warnings"]
  report.update(health)
  if jax.process_index() == 0:
    report_lib.write_report(report, out_dir)
  return report


def stage_health(workdir: str, stages: list[tuple[str, str]]) -> dict:
  """{"warnings": [...], "training": {stage: convergence record}, "diagnostics":
  {"target_space": {space: target_space statistics}, "students": {model: target fit}}}
  from the results.json of every stage (not-converged and collapse warnings first)."""
  warnings, training, spaces, students = [], {}, {}, {}
  for name, model in stages:
    results = workdir_lib.read_results(os.path.join(workdir, name))
    record = results.get("training")
    if record:
      training[name] = {k: v for k, v in record.items() if k != "warnings"}
      warnings += record.get("warnings", [])
    diagnostics = results.get("diagnostics") or {}
    for key, label in (("concatenation", "concatenated teacher embeddings"),
                       ("targets", "targets")):
      statistics = diagnostics.get(key)
      if statistics:
        space = f"{name} ({label})"
        spaces[space] = statistics
        warning = space_report.collapse_warning(space, statistics)
        if warning:
          warnings.append(warning)
    if model and "train_target_cosine" in diagnostics:
      students[model] = diagnostics
  return {"warnings": warnings, "training": training,
          "diagnostics": {"target_space": spaces, "students": students}}

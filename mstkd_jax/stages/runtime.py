"""What every stage does around the loop: check the workdir, build models and optimiser from
the config, embed images, evaluate verification pairs.

Configs are read here and in the stage files only; models, losses and steps take plain values.
"""

import contextlib
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mstkd_jax import losses, models, paths
from mstkd_jax.data import input_pipeline, sources
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import target_space, verification
from mstkd_jax.models import iresnet
from mstkd_jax.train import convergence, loop, parallel as parallel_lib, state as state_lib, steps
from mstkd_jax.train.checkpoints import Checkpoints
from mstkd_jax.workdir import (RUN_CONTROL_FIELDS, flatten, config_dict, changed_fields, write_json,
  write_results, read_results, save_model, load_model, npy_writer, save_npz as atomic_save_npz,
  prepare as prepare_workdir)
from mstkd_jax.train.build import (DTYPES, backbone, margin_spec, init_variables, optimizer as optimiser,
  backbone_and_head_groups, loop_settings)
from mstkd_jax.evaluation.embed import (embed_images, verification_embeddings, evaluate_embeddings,
  save_embeddings, load_embeddings, accuracy_line)



def training_record(workdir: str, settings: loop.LoopSettings) -> dict:
  """How far the stage trained (convergence.summarize over the loop's saved history) and
  its "warnings" ([] or the one not-converged line, also printed here)."""
  summary = convergence.summarize(loop.load_history(workdir), settings.steps_per_epoch)
  warning = convergence.warning(settings.name, summary, settings.epochs_field)
  if warning:
    print(f"WARNING: {warning}", flush=True)
  return {**summary, "warnings": [warning] if warning else []}


EVAL_SELECTION = ("last", "validation")


def evaluation_fields(train_config, section: str = "train") -> tuple[int, str]:
  """(eval_every, select) of a `train` config section, checked; UserError naming the field."""
  every = train_config.get("eval_every", 0)
  select = train_config.get("select", "last")
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise UserError(f"config field {section}.eval_every={every!r}: expected an integer >= 0 "
                    "(steps between evaluations; 0 = off)")
  if select not in EVAL_SELECTION:
    raise UserError(f"config field {section}.select={select!r}: expected one of "
                    f"{EVAL_SELECTION}")
  return every, select


def training_evaluation(config, workdir: str, module, parallel) -> loop.Evaluation | None:
  """The loop's verification during training from train.eval_every (steps, 0 = off) and
  train.select ("last": the final state is the model; "validation": the state of the best
  mean validation accuracy, which needs a held-out validation split). Evaluates on the
  validation pairs where the data has them, else on the test pairs, for watching only."""
  every, select = evaluation_fields(config.train)
  has_validation = sources.has_validation(config.data)
  if select == "validation":
    if not has_validation:
      raise UserError("config field train.select='validation' needs a held-out validation "
                      "split (data.synthetic.validation_identities_per_group > 0, or "
                      "data.tfds.validation); selecting on the test pairs would report a "
                      "test score chosen on the test set")
    if not every:
      raise UserError("config field train.select='validation' needs train.eval_every > 0 "
                      "(how often to evaluate)")
  if not every:
    return None
  pairs = (sources.validation_sets(config.data, workdir) if has_validation
           else sources.verification_sets(config.data, workdir))
  batch = config.train.eval_batch_size

  def accuracy(state):
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
    results = evaluate_embeddings(
        verification_embeddings(variables, module, pairs, parallel, batch))
    return {g: r["accuracy"] for g, r in results.items()}

  label = "validation" if has_validation else "verification"
  return loop.Evaluation(fn=accuracy, every=every, label=label,
                         select=select == "validation")


def finish_model(config, workdir: str, name: str, step: int, variables: dict, module,
                 parallel) -> dict:
  """What every trained backbone stage ends with: save the network under <workdir>/model,
  embed every group's verification pairs (kept for the report) and print the per-group
  accuracy. The stage then writes results.json (`write_results`). Returns {group:
  evaluate_verification result}."""
  results = _evaluated(workdir, step)
  if results is not None:  # a rerun of a finished run: its model and embeddings are saved
    print(f"[{name}] verification accuracy (saved at step {step}): {accuracy_line(results)}",
          flush=True)
  else:
    save_model(workdir, step, variables)  # Orbax: every process takes part, process 0 writes.
    embeddings = verification_embeddings(
        variables, module, sources.verification_sets(config.data, workdir), parallel,
        config.train.eval_batch_size)
    results = evaluate_embeddings(embeddings)
    print(f"[{name}] verification accuracy: {accuracy_line(results)}", flush=True)
    if jax.process_index() == 0:
      save_embeddings(workdir, embeddings)
  return results


def backbone_result(final, workdir: str, evaluation: loop.Evaluation | None):
  """(backbone variables, their step, selection record or None) of a trained teacher or
  student: the final state, or with train.select='validation' the best one the loop kept."""
  if evaluation is None or not evaluation.select:
    variables = {"params": final.params["backbone"], "batch_stats": final.batch_stats}
    return variables, int(final.step), None
  best, info = loop.load_best(workdir, loop.best_variables(final))
  print(f"[{os.path.basename(workdir)}] selected step {info['step']} (mean validation "
        f"accuracy {100 * info['mean_accuracy']:.2f}%)", flush=True)
  variables = {"params": best["params"]["backbone"], "batch_stats": best["batch_stats"]}
  return variables, int(info["step"]), info


def warn_collapse(name: str, statistics: dict) -> str | None:
  """Prints the collapse warning of a target space's statistics (target_space); returns it."""
  warning = target_space.collapse_warning(name, statistics)
  if warning:
    print(f"WARNING: {warning}", flush=True)
  return warning


def _evaluated(workdir: str, step: int) -> dict | None:
  """The verification results that `finish_model` saved for `step` in this workdir (model,
  embeddings and results.json all of that step), recomputed from the saved embeddings; None
  where anything is missing or of another step."""
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      if json.load(f).get("step") != int(step):
        return None
  except (OSError, ValueError):
    return None
  checkpoints = Checkpoints(os.path.join(workdir, "model"), keep=1)
  try:
    if checkpoints.latest_step() != int(step):
      return None
  finally:
    checkpoints.close()
  try:
    return evaluate_embeddings(load_embeddings(workdir))
  except UserError:
    return None


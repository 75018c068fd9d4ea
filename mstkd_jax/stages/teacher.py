"""Teacher stage: IResNet + margin head trained on one group's identities (a specialized
teacher) or on a given identity subset (a balanced-baseline teacher).

Writes <workdir>/checkpoints (Orbax training state), model/ (the trained backbone),
TensorBoard events, config.json, verification_embeddings.npz and results.json (the
teacher's verification accuracy on every group's pairs).

Config (configs/teacher.py; the pipeline derives it from configs/distill.py's `teacher`
section): seed, parallelism, num_devices, data, model, head, optim, train, and
teacher.group or teacher.identities. Inputs: none.
"""

import dataclasses
import functools

import numpy as np

from mstkd_jax import models, workdir as workdir_lib
from mstkd_jax.data import sources
from mstkd_jax.errors import UserError
from mstkd_jax.stages import common
from mstkd_jax.train import build, steps


def _identities(config) -> tuple:
  text = str(config.teacher.identities).strip()
  if not text:
    return ()
  try:
    return tuple(int(x) for x in text.split(","))
  except ValueError as e:
    raise UserError(f"config field teacher.identities={text!r}: expected comma-separated "
                    "integer identity labels") from e


def run(config, workdir: str, name: str = "", epochs_field: str = "train.epochs",
        inputs: common.Inputs = common.Inputs()) -> dict:
  """Trains the teacher and evaluates it on every group; returns {"state", "verification",
  "training"}. A teacher reads no earlier stage (`inputs` is unused)."""
  del inputs
  identities = _identities(config)
  run = common.StageRun.create(config, workdir, name, epochs_field)
  rows, labels = sources.select(run.train_set,
                                group="" if identities else config.teacher.group,
                                identities=identities)
  num_classes = int(labels.max()) + 1
  name = name or (f"teacher/{num_classes} identities" if identities
                  else f"teacher/{config.teacher.group}")
  run = dataclasses.replace(run, name=name)
  print(f"[{name}] {len(rows)} images of {num_classes} identities", flush=True)
  settings = run.settings(len(rows))

  backbone = build.backbone(config.model)
  head = models.create("margin_head", num_classes=num_classes)
  init_rng, head_rng = run.init_rngs()
  variables = build.init_variables(backbone, init_rng, run.image_example(), train=False)
  head_vars = build.init_variables(
      head, head_rng, np.zeros((1, config.model.embedding_size), np.float32))
  init_state, tx, schedule = run.state(
      settings, {"backbone": variables["params"], "head": head_vars["params"]},
      variables.get("batch_stats", {}), build.backbone_and_head_groups(config.optim))
  parallel, classes = build.class_shards(config.head, run.parallel, num_classes)
  run = dataclasses.replace(run, parallel=parallel)
  step_fn = functools.partial(steps.classification_step, backbone=backbone, head=head,
                              margin=build.margin_spec(config.head, shards_classes=True),
                              tx=tx, schedule=schedule, classes=classes)
  batches = functools.partial(run.train_set.train_batches, rows, labels,
                              **run.batch_plan(settings))
  evaluation = common.training_evaluation(run, backbone)
  final = run.train(settings, init_state, step_fn,
                    lambda start: batches(start_step=start), evaluation=evaluation)

  variables, step, selected = common.backbone_result(final, run.workdir, evaluation)
  training = common.training_record(run.workdir, settings)
  results = common.finish_model(run, step, variables, backbone)
  workdir_lib.write_results(run.workdir, name, step, results,
                            {"training": training, "selected": selected})
  return {"state": final, "verification": results, "training": training}

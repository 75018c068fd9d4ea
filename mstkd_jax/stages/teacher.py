"""Teacher stage: IResNet + margin head trained on one group's identities (a specialized
teacher) or on a given identity subset (a balanced-baseline teacher).

Writes <workdir>/checkpoints (Orbax training state), model/ (the trained backbone),
TensorBoard events, config.json, verification_embeddings.npz and results.json (the
teacher's verification accuracy on every group's pairs).

Config (configs/teacher.py; the pipeline derives it from configs/distill.py's `teacher`
section): seed, parallelism, num_devices, data, model, head, optim, train, and
teacher.group or teacher.identities. Inputs: none.

`run_import` makes the same outputs from a teacher trained elsewhere (config field
teacher.checkpoints: an Orbax stage folder or an IResNet .pth/.pt), with no training.
Config: parallelism, num_devices, data, model, train.eval_batch_size. Inputs: checkpoint.
"""

import dataclasses
import functools

import numpy as np

from mstkd_jax import models, workdir as workdir_lib
from mstkd_jax.data import sources
from mstkd_jax.errors import UserError
from mstkd_jax.stages import imported, shared
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


def run(config, workdir: str, name: str = "", inputs: shared.Inputs = shared.Inputs()
        ) -> dict:
  """Trains the teacher and evaluates it on every group; returns {"state", "verification",
  "training"}. A teacher reads no earlier stage (`inputs` is unused)."""
  del inputs
  identities = _identities(config)
  stage = shared.StageRun.create(config, workdir, name, "teacher")
  rows, labels = sources.select(stage.train_set,
                                group="" if identities else config.teacher.group,
                                identities=identities)
  num_classes = int(labels.max()) + 1
  name = name or (f"teacher/{num_classes} identities" if identities
                  else f"teacher/{config.teacher.group}")
  stage = dataclasses.replace(stage, name=name)
  print(f"[{name}] {len(rows)} images of {num_classes} identities", flush=True)
  settings = stage.settings(len(rows))

  backbone = build.backbone(config.model)
  head = models.create("margin_head", num_classes=num_classes)
  init_rng, head_rng = stage.init_rngs()
  variables = build.init_variables(backbone, init_rng, stage.image_example(), train=False)
  head_vars = build.init_variables(
      head, head_rng, np.zeros((1, config.model.embedding_size), np.float32))
  init_state, tx, schedule = stage.state(
      settings, {"backbone": variables["params"], "head": head_vars["params"]},
      variables.get("batch_stats", {}), build.backbone_and_head_groups(config.optim))
  parallel, classes = build.class_shards(config.head, stage.parallel, num_classes)
  stage = dataclasses.replace(stage, parallel=parallel)
  step_fn = functools.partial(steps.classification_step, backbone=backbone, head=head,
                              margin=build.margin_spec(config.head, shards_classes=True),
                              tx=tx, schedule=schedule, classes=classes)
  batches = functools.partial(stage.train_set.train_batches, rows, labels,
                              **stage.batch_plan(settings))
  evaluation = shared.training_evaluation(stage, backbone)
  final = stage.train(settings, init_state, step_fn,
                    lambda start: batches(start_step=start), evaluation=evaluation)

  variables, step, selected = shared.backbone_result(final, stage.workdir, evaluation)
  training = shared.training_record(stage.workdir, settings)
  results = shared.finish_model(stage, step, variables, backbone)
  workdir_lib.write_results(stage.workdir, name, step, results,
                            {"training": training, "selected": selected})
  return {"state": final, "verification": results, "training": training}


def run_import(config, workdir: str, name: str = "teacher",
               inputs: shared.Inputs = shared.Inputs(), field: str = "teacher.checkpoints"
               ) -> dict:
  """Imports the teacher in `inputs.checkpoint` into the network of config.model instead of
  training one: saves it under model/, embeds and evaluates every group's verification
  pairs and writes results.json (with "imported": where it came from, see
  imported.load_backbone), as `run` does for a trained teacher. Returns {"verification",
  "imported"}.

  Raises:
    UserError: the checkpoint cannot be read or does not fit config.model (`field` names
      the config field it came from).
  """
  stage = shared.StageRun.create(config, workdir, name, "teacher")
  module = build.backbone(config.model)
  template = build.template_variables(module, stage.image_example(), train=False)
  variables, record = imported.load_backbone(inputs.checkpoint, template,
                                             config.model.to_dict(),
                                             stage.train_set.image_shape, field)
  print(f"[{name}] imported {inputs.checkpoint} ({record['format']}); no training",
        flush=True)
  step = record["step"] or 0
  results = shared.finish_model(stage, step, variables, module)
  workdir_lib.write_results(stage.workdir, name, step, results, {"imported": record})
  return {"verification": results, "imported": record}

"""Teacher stage: IResNet + margin head trained on one group's identities (a specialized
teacher) or on a given identity subset (a balanced-baseline teacher).

Writes <workdir>/checkpoints, model/ (the backbone), TensorBoard events, config.json,
verification_embeddings.npz and results.json (verification accuracy on every group).
`run_import` makes the same outputs from a teacher trained elsewhere, with no training.
"""

import dataclasses
import functools

from mstkd_jax import workdir as workdir_lib
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
  """Trains the teacher (of teacher.group or teacher.identities) and evaluates it on every
  group; returns {"state", "verification", "training"}. It reads no earlier stage."""
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
  init_rng, head_rng = stage.init_rngs()
  variables = build.init_variables(backbone, init_rng, stage.image_example(), train=False)
  head, head_params = shared.margin_head(num_classes, head_rng, config.model.embedding_size)
  init_state, tx, schedule = stage.state(
      settings, {"backbone": variables["params"], "head": head_params},
      variables.get("batch_stats", {}), build.backbone_and_head_groups(config.optim))
  stage, classes, margin = stage.with_class_shards(num_classes)
  step_fn = functools.partial(steps.classification_step, backbone=backbone, head=head,
                              margin=margin, tx=tx, schedule=schedule, classes=classes)
  batches = functools.partial(stage.train_set.train_batches, rows, labels,
                              **stage.batch_plan(settings))
  final, _, step, results, record = stage.train_backbone(
      settings, init_state, step_fn, lambda start: batches(start_step=start), backbone)
  workdir_lib.write_results(stage.workdir, name, step, results, record)
  return {"state": final, "verification": results, "training": record["training"]}


def run_import(config, workdir: str, name: str = "teacher",
               inputs: shared.Inputs = shared.Inputs(), field: str = "teacher.checkpoints"
               ) -> dict:
  """Imports the teacher in `inputs.checkpoint` into config.model's network and writes what
  `run` writes (results.json with "imported": see imported.load_backbone). Returns
  {"verification", "imported"}.

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

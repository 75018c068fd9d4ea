"""Teacher stage: IResNet + margin head trained on one group's identities (a specialized
teacher) or on a given identity subset (a balanced-baseline teacher).

Writes <workdir>/checkpoints (Orbax training state), model/ (the trained backbone),
TensorBoard events, config.json, verification_embeddings.npz and results.json (the
teacher's verification accuracy on every group's pairs).
"""

import functools

import jax
import numpy as np

from mstkd_jax import models
from mstkd_jax.data import input_pipeline, sources
from mstkd_jax.errors import UserError
from mstkd_jax.train import loop, parallel as parallel_lib, state as state_lib, steps
from mstkd_jax.stages import runtime


def _identities(config) -> tuple:
  text = str(config.teacher.identities).strip()
  if not text:
    return ()
  try:
    return tuple(int(x) for x in text.split(","))
  except ValueError as e:
    raise UserError(f"config field teacher.identities={text!r}: expected comma-separated "
                    "integer identity labels") from e


def build(config, train_set: sources.TrainingSet, num_classes: int):
  """(backbone, head, backbone variables, head variables): fresh host weights of a teacher."""
  backbone = runtime.backbone(config.model)
  head = models.create("margin_head", num_classes=num_classes)
  init_rng, head_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  example = np.zeros((1,) + train_set.image_shape, np.float32)
  variables = runtime.init_variables(backbone, init_rng, example, train=False)
  head_vars = runtime.init_variables(
      head, head_rng, np.zeros((1, config.model.embedding_size), np.float32))
  return backbone, head, variables, head_vars


def run(config, workdir: str, name: str = "", epochs_field: str = "train.epochs") -> dict:
  """Trains the teacher and evaluates it on every group; returns the results dict."""
  workdir = runtime.prepare_workdir(config, workdir)
  train_set = sources.training_set(config.data, workdir)
  identities = _identities(config)
  rows, labels = sources.select(train_set, group="" if identities else config.teacher.group,
                                identities=identities)
  num_classes = int(labels.max()) + 1
  name = name or (f"teacher/{num_classes} identities" if identities
                  else f"teacher/{config.teacher.group}")
  print(f"[{name}] {len(rows)} images of {num_classes} identities", flush=True)

  parallel = parallel_lib.get(config.parallelism, config.num_devices)
  input_pipeline.check_batch_split(config.train.batch_size, parallel.device_count,
                                   jax.process_count())
  settings = runtime.loop_settings(config, name, len(rows), epochs_field)
  backbone, head, variables, head_vars = build(config, train_set, num_classes)
  tx, schedule = runtime.optimiser(
      config.optim, global_batch=config.train.batch_size,
      steps_per_epoch=settings.steps_per_epoch,
      groups=runtime.backbone_and_head_groups(config.optim))
  init_state = state_lib.create_state(
      {"backbone": variables["params"], "head": head_vars["params"]},
      variables.get("batch_stats", {}), tx)
  init_state = jax.tree.map(np.asarray, init_state)
  step_fn = functools.partial(steps.classification_step, backbone=backbone, head=head,
                              margin=runtime.margin_spec(config.head), tx=tx,
                              schedule=schedule)
  batches = functools.partial(
      train_set.train_batches, rows, labels, global_batch=config.train.batch_size,
      steps_per_epoch=settings.steps_per_epoch, seed=config.seed,
      total_steps=settings.total_steps, local_device_count=parallel.local_device_count)
  evaluation = runtime.training_evaluation(config, workdir, backbone, parallel)
  final = loop.train(workdir=workdir, settings=settings, init_state=init_state,
                     step_fn=step_fn, batches=lambda start: batches(start_step=start),
                     parallel=parallel, rng=jax.random.PRNGKey(config.seed + 1),
                     evaluation=evaluation)
  variables, step, selected = runtime.backbone_result(final, workdir, evaluation)
  training = runtime.training_record(workdir, settings)
  results = runtime.finish_model(config, workdir, name, step, variables, backbone, parallel)
  runtime.write_results(workdir, name, step, results,
                        {"training": training, "selected": selected})
  return {"state": final, "verification": results, "training": training}

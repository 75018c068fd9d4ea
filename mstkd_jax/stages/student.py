"""Student stage: an IResNet trained from scratch on every training identity.

`student.kd` picks the loss: "none" (the student alone: ElasticArcFace only, the paper's
baseline), "a-KD" (kd_weight x MSE to the MST-KD target, no labels) or "EAF-KD"
(ElasticArcFace + the same term). Targets come `cached` (the adaptor stage's
<adaptor>/targets.npy, for the image and its mirror, looked up for the orientation fed) or
`online` (the frozen teachers and adaptor run inside the step).
"""

import functools
import os

import jax
import numpy as np

from mstkd_jax import models
from mstkd_jax.data import input_pipeline, sources
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import target_space
from mstkd_jax.stages import runtime
from mstkd_jax.train import loop, parallel as parallel_lib, state as state_lib, steps

KD_LOSSES = ("none", "a-KD", "EAF-KD")
TARGETS = ("cached", "online")


def frozen_teachers(config, train_set):
  """(teacher module, stacked teacher variables) of the teacher dirs, in teacher order."""
  teacher = runtime.backbone(config.model)
  template = runtime.init_variables(
      teacher, jax.random.PRNGKey(0), np.zeros((1,) + train_set.image_shape, np.float32),
      train=False)
  variables = [runtime.load_model(d, template, d) for d in config.student.teacher_dirs]
  return teacher, jax.tree.map(lambda *xs: np.stack(xs), *variables)


def frozen_adaptor(config, num_teachers: int):
  """(adaptor module, adaptor variables) of the adaptor stage (its best epoch)."""
  adaptor = models.create("adaptor", **config.student.adaptor_model.to_dict())
  template = runtime.init_variables(
      adaptor, jax.random.PRNGKey(0),
      np.zeros((1, num_teachers * config.model.embedding_size), np.float32))
  return adaptor, runtime.load_model(config.student.adaptor_dir, template,
                                     config.student.adaptor_dir)


def run(config, workdir: str, name: str = "student", epochs_field: str = "train.epochs") -> dict:
  kd, mode = config.student.kd, config.student.targets
  if kd not in KD_LOSSES:
    raise UserError(f"config field student.kd={kd!r}: expected one of {KD_LOSSES}")
  if mode not in TARGETS:
    raise UserError(f"config field student.targets={mode!r}: expected one of {TARGETS}")
  orientation = input_pipeline.check_orientation(
      config.student.get("orientation", "as_fed"), "student.orientation")
  workdir = runtime.prepare_workdir(config, workdir)
  train_set = sources.training_set(config.data, workdir)
  labels = train_set.identity
  print(f"[{name}] {len(labels)} images of {train_set.num_identities} identities, "
        f"loss {'ElasticArcFace' if kd == 'none' else kd}"
        f"{'' if kd == 'none' else f', {mode} targets'}", flush=True)

  parallel = parallel_lib.get(config.parallelism, config.num_devices)
  input_pipeline.check_batch_split(config.train.batch_size, parallel.device_count,
                                   jax.process_count())
  settings = runtime.loop_settings(config, name, len(labels), epochs_field)
  backbone = runtime.backbone(config.model)
  init_rng, head_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = runtime.init_variables(
      backbone, init_rng, np.zeros((1,) + train_set.image_shape, np.float32), train=False)
  params = {"backbone": variables["params"]}
  groups = runtime.backbone_and_head_groups(config.optim)
  head = None
  if kd != "a-KD":
    head = models.create("margin_head", num_classes=train_set.num_identities)
    params["head"] = runtime.init_variables(
        head, head_rng, np.zeros((1, config.model.embedding_size), np.float32))["params"]
  if head is None:
    del groups["head"]
  tx, schedule = runtime.optimiser(config.optim, global_batch=config.train.batch_size,
                                   steps_per_epoch=settings.steps_per_epoch, groups=groups)
  init_state = jax.tree.map(np.asarray, state_lib.create_state(
      params, variables.get("batch_stats", {}), tx))

  extra, extra_args = {}, ()
  margin = runtime.margin_spec(config.head)
  if kd == "none":
    step_fn = functools.partial(steps.classification_step, backbone=backbone, head=head,
                                margin=margin, tx=tx, schedule=schedule)
  else:
    target_fn = None
    if mode == "cached":
      extra["target"] = load_targets(config.student.adaptor_dir, len(labels))
    else:
      teacher, teacher_vars = frozen_teachers(config, train_set)
      adaptor, adaptor_vars = frozen_adaptor(config, len(config.student.teacher_dirs))
      target_fn = functools.partial(steps.online_targets, teacher=teacher, adaptor=adaptor)
      extra_args = (teacher_vars, adaptor_vars)
    step_fn = functools.partial(steps.student_step, backbone=backbone, head=head,
                                margin=margin if head is not None else None,
                                kd_weight=config.student.kd_weight, tx=tx, schedule=schedule,
                                target_fn=target_fn, orientation=orientation)
  batches = functools.partial(
      train_set.train_batches, np.arange(len(labels)), labels, extra=extra,
      orientation=orientation,
      global_batch=config.train.batch_size, steps_per_epoch=settings.steps_per_epoch,
      seed=config.seed, total_steps=settings.total_steps,
      local_device_count=parallel.local_device_count)
  evaluation = runtime.training_evaluation(config, workdir, backbone, parallel)
  final = loop.train(workdir=workdir, settings=settings, init_state=init_state,
                     step_fn=step_fn, batches=lambda start: batches(start_step=start),
                     parallel=parallel, rng=jax.random.PRNGKey(config.seed + 1),
                     extra_args=extra_args, evaluation=evaluation)
  variables, step, selected = runtime.backbone_result(final, workdir, evaluation)
  training = runtime.training_record(workdir, settings)
  results = runtime.finish_model(config, workdir, name, step, variables, backbone, parallel)
  diagnostics = None
  if kd != "none":
    diagnostics = target_fit(config, workdir, train_set, variables, backbone, parallel)
  runtime.write_results(workdir, name, step, results,
                        {"training": training, "selected": selected,
                         "diagnostics": diagnostics})
  return {"state": final, "verification": results, "training": training,
          "diagnostics": diagnostics}


# Training images whose embeddings are compared with their targets after training.
TARGET_FIT_SAMPLE = 2048


def target_fit(config, workdir: str, train_set, variables: dict, backbone, parallel) -> dict:
  """How close a distilled student came to its targets: the mean cosine between its
  embedding and the adaptor's target of the same image, over a fixed sample of training
  images (at most TARGET_FIT_SAMPLE, the same rows for every student of a data set; images
  as stored, targets.npy[:, 0]) and per group over the verification pair images (the
  adaptor's space there, which the adaptor stage saved; {} for targets made elsewhere).
  Call after `finish_model`.

  Returns {"train_target_cosine": float, "num_train_images": int,
  "verification_target_cosine": {group: float}} on process 0, None on the others.
  """
  adaptor_dir = config.student.adaptor_dir
  rows = target_space.fixed_sample(train_set.num_examples, TARGET_FIT_SAMPLE)
  # Every process embeds (one program over all devices); process 0, which wrote the
  # verification embeddings, compares.
  embeddings, _ = runtime.embed_images(variables, backbone, train_set.images_at(rows),
                                       parallel, config.train.eval_batch_size)
  if jax.process_index() != 0:
    return None
  targets = load_targets(adaptor_dir, train_set.num_examples)
  own = runtime.load_embeddings(workdir)
  # An adaptor stage saves its space on the verification pairs; hand-made targets need not.
  has_space = os.path.exists(os.path.join(adaptor_dir, "verification_embeddings.npz"))
  space = runtime.load_embeddings(adaptor_dir) if has_space else {}
  return {
      "train_target_cosine": target_space.mean_cosine(embeddings, targets[rows, 0]),
      "num_train_images": len(rows),
      "verification_target_cosine": {
          g: target_space.mean_cosine(own[g][0], space[g][0]) for g in own if g in space},
  }


def load_targets(adaptor_dir: str, num_examples: int) -> np.ndarray:
  """The adaptor stage's cached targets [N, 2, D] (image, mirror)."""
  path = f"{adaptor_dir}/targets.npy"
  try:
    targets = np.load(path, mmap_mode="r")  # each batch reads its own rows
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read the cached targets {path} ({e}); run the adaptor stage "
                    "that makes them first") from e
  if targets.ndim != 3 or targets.shape[:2] != (num_examples, 2):
    raise UserError(f"{path} holds targets of shape {targets.shape}; expected "
                    f"({num_examples}, 2, D) for this training set")
  return targets

"""Student stage: an IResNet trained from scratch on every training identity.

`student.kd` picks the loss: "none" (the student alone: ElasticArcFace only, the paper's
baseline), "a-KD" (kd_weight x MSE to the MST-KD target, no labels) or "EAF-KD"
(ElasticArcFace + the same term). Targets come `cached` (the adaptor stage's
<adaptor>/targets.npy, for the image and its mirror, looked up for the orientation fed) or
`online` (the frozen teachers and adaptor run inside the step).

Config: seed, parallelism, num_devices, data, model, head (with head.shard_classes and
head.sample_rate as the teacher's, for the students with a head), optim, train, student.kd,
student.orientation and, for the KD students, student.{targets, kd_weight, adaptor_model}
(the student alone has adaptor_model None). Inputs: adaptor_dir (KD students) and
teacher_dirs (online targets).
"""

import dataclasses
import functools
import os

import jax
import numpy as np

from mstkd_jax import files, models, workdir as workdir_lib
from mstkd_jax.data import input_pipeline
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import embed, target_space
from mstkd_jax.stages import common
from mstkd_jax.train import build, steps

KD_LOSSES = ("none", "a-KD", "EAF-KD")
TARGETS = ("cached", "online")


def frozen_teachers(config, teacher_dirs, image_example):
  """(teacher module, teacher variables stacked along a leading axis) of `teacher_dirs`, in
  teacher order; every model's shapes are checked against the config's backbone."""
  teacher = build.backbone(config.model)
  template = build.init_variables(teacher, jax.random.PRNGKey(0), image_example,
                                  train=False)
  variables = [workdir_lib.load_model(d, template, d) for d in teacher_dirs]
  return teacher, jax.tree.map(lambda *xs: np.stack(xs), *variables)


def frozen_adaptor(config, adaptor_dir: str, num_teachers: int):
  """(adaptor module, adaptor variables) saved by the adaptor stage (its selected epoch)."""
  adaptor = models.create("adaptor", **config.student.adaptor_model.to_dict())
  template = build.init_variables(
      adaptor, jax.random.PRNGKey(0),
      np.zeros((1, num_teachers * config.model.embedding_size), np.float32))
  return adaptor, workdir_lib.load_model(adaptor_dir, template, adaptor_dir)


def run(config, workdir: str, name: str = "student", epochs_field: str = "train.epochs",
        inputs: common.Inputs = common.Inputs()) -> dict:
  """Trains the student with config.student.kd; the KD students read their targets from
  `inputs.adaptor_dir` (cached) or from the frozen `inputs.teacher_dirs` and adaptor
  (online). Returns {"state", "verification", "training", "diagnostics"}.

  Raises:
    UserError: an unknown student.kd / student.targets / student.orientation, a KD student
      without an adaptor, or inputs that are missing or of another shape.
  """
  kd = config.student.kd
  mode = config.student.targets if kd != "none" else None
  if kd not in KD_LOSSES:
    raise UserError(f"config field student.kd={kd!r}: expected one of {KD_LOSSES}")
  if kd != "none" and mode not in TARGETS:
    raise UserError(f"config field student.targets={mode!r}: expected one of {TARGETS}")
  orientation = input_pipeline.check_orientation(
      config.student.get("orientation", "as_fed"), "student.orientation")
  if kd != "none" and not inputs.adaptor_dir:
    raise UserError(f"the student with student.kd={kd!r} needs the folder of an adaptor "
                    "stage (its targets); run it through the pipeline (configs/distill.py)")
  run = common.StageRun.create(config, workdir, name, epochs_field)
  labels = run.train_set.identity
  print(f"[{name}] {len(labels)} images of {run.train_set.num_identities} identities, "
        f"loss {'ElasticArcFace' if kd == 'none' else kd}"
        f"{'' if kd == 'none' else f', {mode} targets'}", flush=True)
  settings = run.settings(len(labels))

  backbone = build.backbone(config.model)
  init_rng, head_rng = run.init_rngs()
  variables = build.init_variables(backbone, init_rng, run.image_example(), train=False)
  params = {"backbone": variables["params"]}
  groups = build.backbone_and_head_groups(config.optim)
  head = None
  if kd != "a-KD":
    head = models.create("margin_head", num_classes=run.train_set.num_identities)
    params["head"] = build.init_variables(
        head, head_rng, np.zeros((1, config.model.embedding_size), np.float32))["params"]
  else:
    del groups["head"]
  init_state, tx, schedule = run.state(settings, params, variables.get("batch_stats", {}),
                                       groups)

  extra, frozen = {}, None
  margin = build.margin_spec(config.head, shards_classes=True)
  classes = None
  if head is not None:
    # head.shard_classes / head.sample_rate split the centres of every training identity
    # (train/sharded_head.py). a-KD has no head: its head section is checked, not used.
    parallel, classes = build.class_shards(config.head, run.parallel,
                                           run.train_set.num_identities)
    run = dataclasses.replace(run, parallel=parallel)
  if kd == "none":
    step_fn = functools.partial(steps.classification_step, backbone=backbone, head=head,
                                margin=margin, tx=tx, schedule=schedule, classes=classes)
  else:
    target_fn = None
    if mode == "cached":
      extra["target"] = load_targets(config, inputs.adaptor_dir, len(labels))
    else:
      teacher, teacher_vars = frozen_teachers(config, inputs.teacher_dirs,
                                              run.image_example())
      adaptor, adaptor_vars = frozen_adaptor(config, inputs.adaptor_dir,
                                             len(inputs.teacher_dirs))
      target_fn = functools.partial(steps.online_targets, teacher=teacher, adaptor=adaptor)
      frozen = {"teachers": teacher_vars, "adaptor": adaptor_vars}
    step_fn = functools.partial(steps.student_step, backbone=backbone, head=head,
                                margin=margin if head is not None else None,
                                kd_weight=config.student.kd_weight, tx=tx, schedule=schedule,
                                target_fn=target_fn, orientation=orientation,
                                classes=classes)
  batches = functools.partial(run.train_set.train_batches, np.arange(len(labels)), labels,
                              extra=extra, orientation=orientation, **run.batch_plan(settings))
  evaluation = common.training_evaluation(run, backbone)
  final = run.train(settings, init_state, step_fn, lambda start: batches(start_step=start),
                    frozen=frozen, evaluation=evaluation)

  variables, step, selected = common.backbone_result(final, run.workdir, evaluation)
  training = common.training_record(run.workdir, settings)
  results = common.finish_model(run, step, variables, backbone)
  diagnostics = None
  if kd != "none":
    diagnostics = target_fit(run, inputs.adaptor_dir, variables, backbone)
  workdir_lib.write_results(run.workdir, name, step, results,
                            {"training": training, "selected": selected,
                             "diagnostics": diagnostics})
  return {"state": final, "verification": results, "training": training,
          "diagnostics": diagnostics}


# Training images whose embeddings are compared with their targets after training.
TARGET_FIT_SAMPLE = 2048


def target_fit(run: common.StageRun, adaptor_dir: str, variables: dict, backbone) -> dict:
  """How close a distilled student came to its targets: the mean cosine between its
  embedding and the adaptor's target of the same image, over a fixed sample of training
  images (at most TARGET_FIT_SAMPLE, the same rows for every student of a data set; images
  as stored, targets.npy[:, 0]) and per group over the verification pair images (the
  adaptor's space there, which the adaptor stage saved; {} for targets made elsewhere).
  Call after `finish_model`.

  Returns {"train_target_cosine": float, "num_train_images": int,
  "verification_target_cosine": {group: float}} on process 0, None on the others.
  """
  train_set = run.train_set
  rows = target_space.fixed_sample(train_set.num_examples, TARGET_FIT_SAMPLE)
  # Every process embeds (one program over all devices); process 0, which wrote the
  # verification embeddings, compares.
  embeddings, _ = embed.embed_images(variables, backbone, train_set.images_at(rows),
                                     run.parallel, run.config.train.eval_batch_size)
  if jax.process_index() != 0:
    return None
  targets = load_targets(run.config, adaptor_dir, train_set.num_examples)
  own = embed.load_embeddings(run.workdir)
  # An adaptor stage saves its space on the verification pairs; hand-made targets need not.
  has_space = files.exists(os.path.join(adaptor_dir, embed.EMBEDDINGS_FILE))
  space = embed.load_embeddings(adaptor_dir) if has_space else {}
  return {
      "train_target_cosine": target_space.mean_cosine(embeddings, targets[rows, 0]),
      "num_train_images": len(rows),
      "verification_target_cosine": {
          g: target_space.mean_cosine(own[g][0], space[g][0]) for g in own if g in space},
  }


def load_targets(config, adaptor_dir: str, num_examples: int) -> np.ndarray:
  """The adaptor stage's cached targets [N, 2, D] (image, mirror), memory-mapped from its
  cache folder (common.cache_file; config field cache_dir)."""
  path = common.cache_file(config, adaptor_dir, common.TARGETS)
  try:
    targets = np.load(path, mmap_mode="r")  # each batch reads its own rows
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read the cached targets {path} ({e}); run the adaptor stage "
                    "that makes them first") from e
  if targets.ndim != 3 or targets.shape[:2] != (num_examples, 2):
    raise UserError(f"{path} holds targets of shape {targets.shape}; expected "
                    f"({num_examples}, 2, D) for this training set")
  return targets

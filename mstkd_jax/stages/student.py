"""Student stage: a backbone trained from scratch on every training identity.

`student.kd` picks the loss: None (the student alone: its margin head's loss, the paper's
baseline) or {distance, weight, margin_loss}: weight x the KD distance (losses.KD_DISTANCES)
between the student's normalized embedding and its MST-KD target, plus the margin head's
loss where margin_loss (the paper's a-KD: mse without, EAF-KD: mse with). Targets come
`cached` (the adaptor stage's targets.npy, looked up for the orientation fed) or `online`
(the frozen teachers and adaptor run inside the step, with the networks their stages ran
with).
"""

import functools
import json
import os

import jax
import numpy as np

from mstkd_jax import files, losses, models, workdir as workdir_lib
from mstkd_jax.data import input_pipeline
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import embedding, target_space
from mstkd_jax.stages import shared
from mstkd_jax.train import build, steps

TARGETS = ("cached", "online")
# The paper's KD students by name (report rows and presets), as student.kd.margin_loss.
KD_LOSSES = {"a-KD": False, "EAF-KD": True}
PAPER_DISTANCE = "mse"
KD_FIELDS = ("distance", "weight", "margin_loss")


def kd_name(margin_loss: bool, distance: str) -> str:
  """A KD student's report name: the paper's (a-KD, EAF-KD), with "-<distance>" unless mse."""
  name = next(n for n, margin in KD_LOSSES.items() if margin == margin_loss)
  return name if distance == PAPER_DISTANCE else f"{name}-{distance}"


def kd_settings(config) -> dict | None:
  """config.student.kd checked: None (the student alone) or {"distance", "weight",
  "margin_loss"}; UserError naming a bad field, or a margin head to train without `head`."""
  kd = config.student.get("kd")
  if kd is None:
    if "head" not in config:
      raise UserError("the student alone (student.kd None) trains with its margin head: "
                      "config section head is missing")
    return None
  kd = kd.to_dict() if hasattr(kd, "to_dict") else dict(kd)
  unknown = sorted(set(kd) - set(KD_FIELDS))
  if unknown:
    raise UserError(f"config section student.kd has unknown field(s) {unknown}; expected "
                    f"{list(KD_FIELDS)}")
  distance = kd.get("distance", PAPER_DISTANCE)
  if distance not in losses.KD_DISTANCES:
    raise UserError(f"config field student.kd.distance={distance!r}: expected one of "
                    f"{sorted(losses.KD_DISTANCES)}")
  weight = kd.get("weight")
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
    raise UserError(f"config field student.kd.weight={weight!r}: expected a number >= 0")
  margin_loss = kd.get("margin_loss", False)
  if not isinstance(margin_loss, bool):
    raise UserError(f"config field student.kd.margin_loss={margin_loss!r}: expected True "
                    "or False")
  if margin_loss and "head" not in config:
    raise UserError("config field student.kd.margin_loss=True trains the student's margin "
                    "head too, but its config has no head section (student.head)")
  return {"distance": distance, "weight": float(weight), "margin_loss": margin_loss}


def frozen_teachers(teacher_dirs, image_example):
  """(modules, variables, positions) of the frozen teachers, as steps.online_targets takes
  them: teachers of one network stacked along a leading axis (one stack per network, in
  order of first appearance), `positions[k]` the places of stack k's teachers in
  `teacher_dirs`. Kernels are cast here to each network's compute dtype."""
  built, stacks = {}, {}
  for place, teacher_dir in enumerate(teacher_dirs):
    key = json.dumps(shared.stage_network(teacher_dir), sort_keys=True)
    module, variables = shared.frozen_backbone(teacher_dir, image_example, built)
    stacks.setdefault(key, (module, [], []))
    stacks[key][1].append(variables)
    stacks[key][2].append(place)
  modules, variables, positions = [], [], []
  for key, (module, members, places) in stacks.items():
    dtype = build.compute_dtype(json.loads(key))
    modules.append(module)
    variables.append(build.cast_kernels(jax.tree.map(lambda *xs: np.stack(xs), *members),
                                        dtype))
    positions.append(tuple(places))
  return tuple(modules), tuple(variables), tuple(positions)


def frozen_adaptor(adaptor_dir: str, input_size: int):
  """(module, variables) of the adaptor saved in `adaptor_dir`, over `input_size` inputs."""
  adaptor = models.create("adaptor", **shared.stage_network(adaptor_dir))
  return adaptor, workdir_lib.load_model(
      adaptor_dir, shared.adaptor_template(adaptor, input_size), adaptor_dir)


def _online_targets(inputs: shared.Inputs, image_example):
  """(target_fn, frozen) of online targets: the frozen teachers, then the frozen adaptor."""
  modules, teacher_vars, positions = frozen_teachers(inputs.teacher_dirs, image_example)
  input_size = sum(shared.embedding_size(m, jax.tree.map(lambda x: x[0], v), image_example)
                   * len(p) for m, v, p in zip(modules, teacher_vars, positions))
  adaptor, adaptor_vars = frozen_adaptor(inputs.adaptor_dir, input_size)
  target_fn = functools.partial(steps.online_targets, teacher=modules, adaptor=adaptor,
                                positions=positions)
  return target_fn, {"teachers": teacher_vars, "adaptor": adaptor_vars}


def run(config, workdir: str, name: str = "student", inputs: shared.Inputs = shared.Inputs()
        ) -> dict:
  """Trains the student with config.student.kd, a KD student on the targets of
  `inputs.adaptor_dir` (and, online, `inputs.teacher_dirs`). Returns {"state",
  "verification", "training", "diagnostics"}.

  Raises:
    UserError: a bad student.kd (kd_settings), student.targets or student.orientation, a
      KD student without an adaptor, or inputs that are missing or of another shape.
  """
  kd = kd_settings(config)
  mode = config.student.get("targets", "cached") if kd else None
  if kd and mode not in TARGETS:
    raise UserError(f"config field student.targets={mode!r}: expected one of {TARGETS}")
  orientation = input_pipeline.check_orientation(
      config.student.get("orientation", "as_fed"), "student.orientation")
  if kd and not inputs.adaptor_dir:
    raise UserError("a KD student (student.kd set) needs the folder of an adaptor stage "
                    "(its targets); run it through the pipeline (configs/distill.py)")
  stage = shared.StageRun.create(config, workdir, name, "student")
  labels = stage.train_set.identity
  num_identities = stage.train_set.num_identities
  loss = ("ElasticArcFace" if kd is None else
          f"KD ({kd['distance']}, weight {kd['weight']:g})"
          f"{' + margin head' if kd['margin_loss'] else ''}, {mode} targets")
  print(f"[{name}] {len(labels)} images of {num_identities} identities, loss {loss}",
        flush=True)
  settings = stage.settings(len(labels))

  backbone = build.backbone(config.model)
  init_rng, head_rng = stage.init_rngs()
  variables = build.init_variables(backbone, init_rng, stage.image_example(), train=False)
  params = {"backbone": variables["params"]}
  groups = build.backbone_and_head_groups(config.optim)
  head = None
  if kd is None or kd["margin_loss"]:
    head, params["head"] = shared.margin_head(num_identities, head_rng,
                                              config.model.embedding_size)
  else:
    del groups["head"]
  init_state, tx, schedule = stage.state(settings, params, variables.get("batch_stats", {}),
                                         groups)

  extra, frozen, margin, classes, target_fn = {}, None, None, None, None
  if head is not None:
    stage, classes, margin = stage.with_class_shards(num_identities)
  if kd is None:
    step_fn = functools.partial(steps.classification_step, backbone=backbone, head=head,
                                margin=margin, tx=tx, schedule=schedule, classes=classes)
  else:
    if mode == "cached":
      extra["target"] = load_targets(config, inputs.adaptor_dir, len(labels))
      size = config.model.get("embedding_size", extra["target"].shape[-1])
      if extra["target"].shape[-1] != size:
        raise UserError(f"the targets in {inputs.adaptor_dir} are "
                        f"{extra['target'].shape[-1]}-D, the student's model.embedding_size "
                        f"is {size}: the adaptor's embedding_size must be the student's")
    else:
      target_fn, frozen = _online_targets(inputs, stage.image_example())
    step_fn = functools.partial(steps.student_step, backbone=backbone, head=head,
                                margin=margin, kd_weight=kd["weight"],
                                kd_distance=kd["distance"], tx=tx, schedule=schedule,
                                target_fn=target_fn, orientation=orientation,
                                classes=classes)
  batches = functools.partial(stage.train_set.train_batches, np.arange(len(labels)), labels,
                              extra=extra, orientation=orientation, **stage.batch_plan(settings))
  final, variables, step, results, record = stage.train_backbone(
      settings, init_state, step_fn, lambda start: batches(start_step=start), backbone,
      frozen=frozen)
  record["diagnostics"] = None
  if kd is not None:
    record["diagnostics"] = target_fit(stage, inputs.adaptor_dir, variables, backbone)
  workdir_lib.write_results(stage.workdir, name, step, results, record)
  return {"state": final, "verification": results, "training": record["training"],
          "diagnostics": record["diagnostics"]}


# Training images whose embeddings are compared with their targets after training.
TARGET_FIT_SAMPLE = 2048


def target_fit(stage: shared.StageRun, adaptor_dir: str, variables: dict, backbone) -> dict:
  """How close a distilled student came to its targets (call after `finish_model`): on
  process 0 (None elsewhere) {"train_target_cosine": mean cosine to targets.npy[:, 0] over
  a fixed sample of training images, "num_train_images", "verification_target_cosine":
  {group: the same against the adaptor's space on the pair images ({} if not saved)}}."""
  train_set = stage.train_set
  rows = target_space.fixed_sample(train_set.num_examples, TARGET_FIT_SAMPLE)
  # Every process embeds (one program over all devices); process 0 compares.
  embeddings, _ = embedding.embed_images(variables, backbone, train_set.images_at(rows),
                                         stage.parallel, stage.config.train.eval_batch_size)
  if jax.process_index() != 0:
    return None
  targets = load_targets(stage.config, adaptor_dir, train_set.num_examples)
  own = embedding.load_embeddings(stage.workdir)
  has_space = files.exists(os.path.join(adaptor_dir, embedding.EMBEDDINGS_FILE))
  space = embedding.load_embeddings(adaptor_dir) if has_space else {}
  return {
      "train_target_cosine": target_space.mean_cosine(embeddings, targets[rows, 0]),
      "num_train_images": len(rows),
      "verification_target_cosine": {
          g: target_space.mean_cosine(own[g][0], space[g][0]) for g in own if g in space},
  }


def load_targets(config, adaptor_dir: str, num_examples: int) -> np.ndarray:
  """The adaptor stage's cached targets [N, 2, D] (image, mirror), memory-mapped."""
  path = shared.cache_file(config, adaptor_dir, shared.TARGETS)
  try:
    targets = np.load(path, mmap_mode="r")  # each batch reads its own rows
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read the cached targets {path} ({e}); run the adaptor stage "
                    "that makes them first") from e
  if targets.ndim != 3 or targets.shape[:2] != (num_examples, 2):
    raise UserError(f"{path} holds targets of shape {targets.shape}; expected "
                    f"({num_examples}, 2, D) for this training set")
  return targets

"""The MST-KD recipe as stages: which stages configs/distill.py makes, each with its own
config, inputs and report row; `pipeline` runs them.

A stage's config is the recipe's shared fields and its role's section (teacher, adaptor,
student) whole, with what makes it one of a grid (a teacher's group, an adaptor's kind, a
student's KD variant). It never holds another role's fields: it reads an earlier stage's
network from that stage's folder (shared.frozen_backbone).
"""

import dataclasses
import functools
import os
from typing import Callable

import ml_collections
import numpy as np

from mstkd_jax import config_ranges
from mstkd_jax.data import sources
from mstkd_jax.errors import UserError
from mstkd_jax.models import adaptor as adaptor_model
from mstkd_jax.stages import adaptor, extract, imported, shared, student, teacher

SET_PREFIX = {"specialized": ("teacher", "mstkd", ""), "balanced": ("balanced_teacher",
                                                                    "balanced_kd", "balanced_")}


@dataclasses.dataclass
class Stage:
  """One node of the recipe: `run(config, workdir, name=, inputs=)` on its own config.

  `config` and `imported` (the digest of a network it imports) are fingerprinted; `inputs`
  are not (the deps' own fingerprints stand for them).
  """
  name: str                          # also its folder under the workdir, e.g. teacher/group_a
  config: ml_collections.ConfigDict
  run: Callable
  deps: tuple[str, ...] = ()
  model: str = ""                    # report row of the model it makes ("" = none)
  inputs: shared.Inputs = shared.Inputs()
  # Writes its local caches again for a finished stage, from its saved outputs and inputs.
  remake: Callable | None = None
  imported: dict = dataclasses.field(default_factory=dict)

  def run_in(self, stage_dir: str):
    return self.run(self.config, stage_dir, name=self.name, inputs=self.inputs)


def balanced_split(num_identities: int, parts: int, seed: int) -> list[np.ndarray]:
  """All identities split at random (seeded) into `parts` disjoint parts of equal size, the
  first taking one more where needed (BUPT's 27,997: 7,000 + 3 x 6,999, as the authors')."""
  if parts < 1 or num_identities < parts:
    raise UserError(f"the balanced baseline cannot split {num_identities} training "
                    f"identities into {parts} parts")
  order = np.random.default_rng(seed).permutation(num_identities)
  return [np.sort(p) for p in np.array_split(order, parts)]


# The recipe's fields that every training stage reads.
SHARED_FIELDS = ("seed", "parallelism", "num_devices", "cache_dir", "data")
# The fields of a role's section its stages hold at the top of their config, as a
# single-stage config does; its other fields go under the role's name.
TRAINING_FIELDS = ("model", "head", "train", "optim")
# Fields of a section that the recipe reads itself (imports, each teacher's network).
RECIPE_FIELDS = ("checkpoints", "balanced_checkpoints", "models")
CHECKPOINTS_FIELD = {"specialized": "checkpoints", "balanced": "balanced_checkpoints"}


def _plain(value):
  return value.to_dict() if hasattr(value, "to_dict") else value


def stage_config(config, role: str, **own) -> ml_collections.ConfigDict:
  """A training stage's config: SHARED_FIELDS, the `role` section's TRAINING_FIELDS, and its
  other fields (less RECIPE_FIELDS) updated by `own` under the role's name."""
  section = config[role].to_dict()
  c = {k: _plain(config[k]) for k in SHARED_FIELDS}
  c.update({k: section.pop(k) for k in TRAINING_FIELDS if k in section})
  rest = {k: v for k, v in section.items() if k not in RECIPE_FIELDS} | own
  if rest:
    c[role] = rest
  return ml_collections.ConfigDict(c)


# What a stage that runs networks without training them reads: no seed (nothing is drawn).
INFERENCE_SHARED = ("parallelism", "num_devices", "cache_dir", "data")


def inference_config(config, role: str, *fields: str) -> ml_collections.ConfigDict:
  """An inference stage's config: INFERENCE_SHARED, the `role` section's `fields` and its
  train.eval_batch_size."""
  c = {k: _plain(config[k]) for k in INFERENCE_SHARED}
  c.update({k: _plain(config[role][k]) for k in fields})
  c["train"] = {"eval_batch_size": config[role].train.eval_batch_size}
  return ml_collections.ConfigDict(c)


def _teacher_network(config, name: str) -> dict:
  """teacher.model updated by teacher.models[name], which replaces it whole where it names
  another network."""
  model = config.teacher.model.to_dict()
  entry = _plain(config.teacher.get("models", {}).get(name)) or {}
  return dict(entry) if entry.get("name", model["name"]) != model["name"] else model | entry


def _imports(config, role: str, teacher_set: str, needed, what: str, allowed=None) -> tuple:
  """(the role's checkpoints field for this teacher set, {label: entry path} of it)."""
  folder = config[role].get(CHECKPOINTS_FIELD[teacher_set], "")
  field = f"{role}.{CHECKPOINTS_FIELD[teacher_set]}"
  return field, imported.entries(folder, field, needed, what, allowed) if folder else {}


def _import_stage(name: str, config, run_import, field: str, inputs: shared.Inputs,
                  **kwargs) -> Stage:
  """A stage that imports the network in `inputs.checkpoint` (from config `field`)."""
  return Stage(name, config, functools.partial(run_import, field=field), inputs=inputs,
               imported={"sha256": imported.digest(inputs.checkpoint)}, **kwargs)


def _check(config) -> None:
  """The recipe's fields in their ranges, and the adaptor's output the students' size."""
  config_ranges.check(config)
  size, student_size = (config[s].model.get("embedding_size") for s in ("adaptor", "student"))
  if config.kd_losses and size != student_size:
    raise UserError(f"config field adaptor.model.embedding_size={size} differs from "
                    f"student.model.embedding_size={student_size}; the students distil the "
                    "adaptor's targets, so they must match")


def _teacher_stages(config, teacher_set: str, train_set) -> list[Stage]:
  """The teacher stages of a teacher set, trained or imported."""
  prefix = SET_PREFIX[teacher_set][0]
  if teacher_set == "specialized":
    subsets = [(g, dict(group=g, identities="")) for g in train_set.group_names]
  else:
    parts = balanced_split(train_set.num_identities, len(train_set.group_names),
                           config.balanced_seed)
    subsets = [(str(k), dict(group="", identities=",".join(map(str, p))))
               for k, p in enumerate(parts)]
  what = "group" if teacher_set == "specialized" else "balanced part"
  field, imports = _imports(config, "teacher", teacher_set, [label for label, _ in subsets],
                           what)
  stages = []
  for label, subset in subsets:
    name = f"{prefix}/{label}"
    if label in imports:
      stage = _import_stage(name, inference_config(config, "teacher"), teacher.run_import,
                            field, shared.Inputs(checkpoint=imports[label]), model=name)
    else:
      stage = Stage(name, stage_config(config, "teacher", **subset), teacher.run, model=name)
    stage.config.model = _teacher_network(config, name)
    stages.append(stage)
  return stages


def _check_teacher_networks(config, stages: list[Stage]) -> None:
  names = {s.name for s in stages if s.name.split("/")[0] in ("teacher", "balanced_teacher")}
  unknown = sorted(set(config.teacher.get("models", {})) - names)
  if unknown:
    raise UserError(f"config field teacher.models names {unknown}, which are no teachers of "
                    f"this recipe; expected some of {sorted(names)}")


def make_stages(config, workdir: str, train_set: sources.TrainingSet) -> list[Stage]:
  """The recipe's stages in an order that respects their dependencies."""
  _check(config)
  if not train_set.group_names:
    raise UserError("the training set has no groups; MST-KD needs one teacher per group")
  stages = []
  path = lambda name: os.path.join(workdir, name)
  for teacher_set in config.teacher_sets:
    _, student_prefix, adaptor_prefix = SET_PREFIX[teacher_set]
    teachers = _teacher_stages(config, teacher_set, train_set)
    stages += teachers
    teacher_names = tuple(s.name for s in teachers)
    teacher_dirs = tuple(path(n) for n in teacher_names)
    extract_name = f"extract/{teacher_set}"
    stages.append(Stage(extract_name, inference_config(config, "teacher"), extract.run,
                        deps=teacher_names,
                        inputs=shared.Inputs(teacher_dirs=teacher_dirs),
                        remake=extract.remake_caches))
    field, adaptor_imports = _imports(config, "adaptor", teacher_set, config.adaptors,
                                      "adaptor kind", adaptor_model.KINDS)
    for kind in config.adaptors:
      adaptor_name = f"adaptor/{teacher_set}/{kind}"
      inputs = shared.Inputs(extract_dir=path(extract_name),
                             checkpoint=adaptor_imports.get(kind, ""))
      row = f"{adaptor_prefix}adaptor/{kind}"
      if kind in adaptor_imports:
        stage = _import_stage(adaptor_name, inference_config(config, "adaptor", "model"),
                              adaptor.run_import, field, inputs, deps=(extract_name,),
                              model=row, remake=adaptor.remake_caches)
      else:
        c = stage_config(config, "adaptor", orientation=config.target_orientation)
        stage = Stage(adaptor_name, c, adaptor.run, deps=(extract_name,), model=row,
                      inputs=inputs, remake=adaptor.remake_caches)
      stage.config.model = {"kind": kind, **stage.config.model.to_dict()}
      stages.append(stage)
      online = config.targets == "online"
      for kd_loss in config.kd_losses:
        for distance in config.kd_distances:
          margin_loss = student.KD_LOSSES[kd_loss]
          c = stage_config(config, "student", targets=config.targets,
                           orientation=config.target_orientation)
          c.student.kd.update(distance=distance, margin_loss=margin_loss)
          if not margin_loss:
            del c["head"]             # a-KD trains no margin head
          name = f"{student_prefix}/{kind}/{student.kd_name(margin_loss, distance)}"
          stages.append(Stage(
              f"student/{name}", c, student.run, model=name,
              deps=(adaptor_name,) + (teacher_names if online else ()),
              inputs=shared.Inputs(adaptor_dir=path(adaptor_name),
                                   teacher_dirs=teacher_dirs if online else ())))
  if config.student_alone:
    stages.append(Stage("student/student_alone", stage_config(config, "student", kd=None),
                        student.run, model="student_alone"))
  _check_teacher_networks(config, stages)
  models = tuple(s.name for s in stages if s.model)
  stages.append(Stage("report", ml_collections.ConfigDict(dict(models=models)), None,
                      deps=models))
  return stages

"""How much work a recipe is: the training steps of every stage configs/distill.py makes,
and their projected wall time from a time per step of each kind (`plan`).

The stages are the recipe's own (stages/recipe.make_stages); the training set is known by
its size only: the synthetic set's from the config, otherwise `num_images` (default
BUPT-Balancedface's 1.3 million images of 28,000 identities in 4 groups, the data set's
paper: Wang & Deng, CVPR 2020), split evenly over the groups, as BUPT nearly is.
"""

import dataclasses
import math

from mstkd_jax.recipe_steps import DEFAULT_CLASSES, DEFAULT_GROUPS
from mstkd_jax.stages import adaptor, extract, recipe, student, teacher
from mstkd_jax.train import loop

DEFAULT_IMAGES = 1_300_000
# What a projection from per-step estimates does not hold.
LEFT_OUT = ("communication between chips: the collectives each step counts (synchronized "
            "BatchNorm's and the gradients' all-reduces) carry no cycle estimate",
            "the input pipeline (decoding, augmentation, "
            "host-to-device copies)", "host work: checkpoints, logs, verification during "
            "training, evaluation and the report", "compilation")


@dataclasses.dataclass(frozen=True)
class _Sizes:
  """The stand-in training set make_stages reads: its group names and identity count."""
  group_names: tuple[str, ...]
  num_identities: int


def training_size(config, num_images: int = 0) -> tuple[int, int, int]:
  """(images, identities, groups) of the config's training set: the synthetic set's, or
  `num_images` (0: DEFAULT_IMAGES) of BUPT-Balancedface's identities and groups."""
  if config.data.source == "synthetic":
    data = config.data.synthetic
    identities = data.num_groups * data.identities_per_group
    return identities * data.images_per_identity, identities, data.num_groups
  return num_images or DEFAULT_IMAGES, DEFAULT_CLASSES, DEFAULT_GROUPS


def _kind(stage) -> str | None:
  """The step a stage repeats (a plan step name), or None for a stage that trains nothing
  (imports, the report)."""
  if stage.run is teacher.run:
    return "teacher"
  if stage.run is extract.run:
    return "extraction"
  if stage.run is adaptor.run:
    return "adaptor"
  if stage.run is student.run:
    kd = stage.config.get("student", {}).get("kd")
    if kd is None:
      return "student_alone"
    return "student_online" if stage.config.student.targets == "online" else "student_cached"
  return None


def stages(config, num_images: int = 0) -> list[dict]:
  """Every stage that runs a step: {"stage", "step" (its kind), "examples" (per epoch, or
  images embedded), "batch", "steps" (calls of the step), "image_steps" (steps x batch)}.

  A teacher trains on its group's (or balanced part's) share, images / groups; the
  adaptor and the students on every image; the extraction is one call per eval batch of
  every image, per teacher.
  """
  images, identities, groups = training_size(config, num_images)
  names = tuple(f"group_{g}" for g in range(groups))
  out = []
  for stage in recipe.make_stages(config, "plan", _Sizes(names, identities)):
    kind = _kind(stage)
    if kind is None:
      continue
    train = stage.config.train
    if kind == "extraction":
      teachers = len(stage.inputs.teacher_dirs)
      calls = teachers * math.ceil(images / train.eval_batch_size)
      out.append({"stage": stage.name, "step": kind, "examples": teachers * images,
                  "batch": train.eval_batch_size, "steps": calls,
                  "image_steps": teachers * images})
      continue
    examples = images // groups if kind == "teacher" else images
    _, total = loop.steps_for(examples, train.batch_size, train.epochs)
    out.append({"stage": stage.name, "step": kind, "examples": examples,
                "batch": train.batch_size, "steps": total,
                "image_steps": total * train.batch_size})
  return out


def projection(config, step_seconds: dict, num_images: int = 0) -> dict:
  """The recipe's work and projected wall time from `step_seconds` ({step kind: estimated
  seconds per call, or None}).

  Returns {"image_steps" (images through a training backbone step: teachers and
  students), "adaptor_steps", "extraction_images", "est_wall_s" (None unless every stage's
  step has an estimate), "stages": stages() each with "est_s", "by_step": per kind its
  stages, image_steps and est_s, "left_out"}.
  """
  rows = stages(config, num_images)
  by_step = {}
  for row in rows:
    seconds = step_seconds.get(row["step"])
    row["est_s"] = row["steps"] * seconds if seconds is not None else None
    entry = by_step.setdefault(row["step"], {"stages": 0, "image_steps": 0, "est_s": 0.0})
    entry["stages"] += 1
    entry["image_steps"] += row["image_steps"]
    entry["est_s"] = (entry["est_s"] + row["est_s"] if entry["est_s"] is not None
                      and row["est_s"] is not None else None)
  backbone = [r for r in rows if r["step"] not in ("adaptor", "extraction")]
  times = [r["est_s"] for r in rows]
  return {
      "image_steps": sum(r["image_steps"] for r in backbone),
      "adaptor_steps": sum(r["image_steps"] for r in rows if r["step"] == "adaptor"),
      "extraction_images": sum(r["image_steps"] for r in rows if r["step"] == "extraction"),
      "est_wall_s": sum(times) if rows and None not in times else None,
      "by_step": by_step,
      "stages": rows,
      "left_out": list(LEFT_OUT),
  }

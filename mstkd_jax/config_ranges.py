"""The allowed range of every numeric and enumerated config field, in one table (RANGES), and
the one check that reads it, run where a config is read (main.run, pipeline.run, the recipe's
build, bench) before any stage: a value out of range stops the run in one line that names
the field as it is typed on the command line,

  error: config field teacher.train.epochs=0.0: expected a finite number > 0

Fields with a free value (paths, names of data sets, stage names) have no range here; they
are listed, with why, in UNRANGED.
"""

from collections.abc import Mapping

from mstkd_jax import losses, models
from mstkd_jax.data import input_pipeline, sources, synthetic
from mstkd_jax.errors import UserError
from mstkd_jax.field_ranges import Choice, Choices, Flag, Number, Numbers, Range
from mstkd_jax.models import adaptor
from mstkd_jax.train import build, parallel


# The names registered in stages/, read only when checked (see check's stage_vocabulary).
def _kd_losses():
  from mstkd_jax.stages import student  # pylint: disable=g-import-not-at-top
  return list(student.KD_LOSSES)


def _targets():
  from mstkd_jax.stages import student  # pylint: disable=g-import-not-at-top
  return student.TARGETS


def _teacher_sets():
  from mstkd_jax.stages import recipe  # pylint: disable=g-import-not-at-top
  return list(recipe.SET_PREFIX)


def _selections():
  from mstkd_jax.stages import shared  # pylint: disable=g-import-not-at-top
  return shared.EVAL_SELECTION


_POSITIVE = Number(1, integer=True)
# JAX's random keys take 32-bit seeds; the runs also use seed + 1 (and seed + k for seeds).
_SEED = Number(0, 2**31 - 1, integer=True)
_BATCH = Number(1, integer=True,
                text="a positive integer (the global batch, over all hosts and devices)")
_IMAGE = "IResNets and MobileFaceNets halve the image 4 times"

# "<role>." stands for each training section: the top of a single-stage config
# (configs/teacher.py) and the recipe's teacher., adaptor. and student. (configs/distill.py).
# A field a config does not have is skipped.
RANGES: dict[str, Range] = {
    "seed": _SEED,
    "parallelism": Choice(lambda: parallel.KINDS),
    "num_devices": Number(1, integer=True, special=((0, "every device"),)),
    "data.source": Choice(lambda: sources.SOURCES),
    "data.synthetic.num_groups": Number(1, 702, integer=True),
    "data.synthetic.identities_per_group": Number(2, integer=True),
    "data.synthetic.images_per_identity": _POSITIVE,
    "data.synthetic.eval_identities_per_group": Number(2, integer=True),
    "data.synthetic.eval_images_per_identity": Number(2, integer=True),
    "data.synthetic.pairs_per_group": Number(2, integer=True, multiple=2,
                                             meaning="half of them same-identity"),
    "data.synthetic.image_size": Number(16, 112, integer=True, multiple=16, meaning=_IMAGE),
    "data.synthetic.difficulty": Numbers(Number(0, 4), scalar=True,
                                         meaning="one per group; () = the generator's ramp"),
    "data.synthetic.seed": Number(0, 2**63 - 1, integer=True),
    "data.synthetic.validation_identities_per_group": Number(
        2, integer=True, special=((0, "no validation split"),)),
    "data.synthetic.validation_pairs_per_group": Number(
        2, integer=True, multiple=2, special=((0, "no validation split"),)),
    "data.tfds.image_size": Number(16, integer=True, multiple=16, meaning=_IMAGE),
    # Each role's network, margin head, training and optimiser.
    "<role>.model.name": Choice(models.backbone_names),
    "<role>.model.width": _POSITIVE,
    "<role>.model.embedding_size": _POSITIVE,
    "<role>.model.use_se": Flag(),
    "<role>.model.dtype": Choice(lambda: list(build.DTYPES) + [build.AUTO]),
    "<role>.model.dropout": Number(0, 1, high_open=True,
                                   special=((None, "the architecture's standard"),)),
    "<role>.model.stage_depths": Numbers(_POSITIVE, length=4, meaning="IResNet blocks per "
                                         "stage"),
    "<role>.model.blocks": Numbers(_POSITIVE, length=4, meaning="MobileFaceNet blocks per "
                                   "stage"),
    "<role>.model.scale": _POSITIVE,
    "<role>.head.name": Choice(lambda: losses.HEADS),
    "<role>.head.s": Number(0, low_open=True),
    "<role>.head.m": Number(0, special=((None, "the head's standard"),)),
    "<role>.head.std": Number(0, special=((None, "the head's standard"),)),
    "<role>.head.shard_classes": Flag(),
    "<role>.head.sample_rate": Number(0, 1, low_open=True,
                                      meaning="the fraction of classes kept per step"),
    "<role>.train.batch_size": _BATCH,
    "<role>.train.epochs": Number(0, low_open=True),
    "<role>.train.log_every": _POSITIVE,
    "<role>.train.checkpoint_every": _POSITIVE,
    "<role>.train.keep_checkpoints": _POSITIVE,
    "<role>.train.eval_batch_size": _POSITIVE,
    "<role>.train.eval_every": Number(0, integer=True,
                                      meaning="steps between evaluations; 0 = off"),
    "<role>.train.select": Choice(_selections, in_stages=True),
    # 0 freezes the backbone (optim.head_base_lr > 0 then trains the class centres alone).
    "<role>.optim.base_lr": Number(0),
    "<role>.optim.head_base_lr": Number(meaning="< 0: the same as base_lr"),
    "<role>.optim.momentum": Number(0, 1, high_open=True),
    "<role>.optim.weight_decay": Number(0),
    "<role>.optim.clip_norm": Number(0, meaning="0 = off"),
    "<role>.optim.lr_decay_epochs": Numbers(_POSITIVE, ordered=True,
                                            meaning="1-based epochs; () = a constant LR"),
    "<role>.optim.lr_decay_factor": Number(0, 1, low_open=True),
    # 0 is refused: an a-KD student would train on nothing, an EAF-KD one be the student
    # alone again.
    "student.kd.weight": Number(0, low_open=True),
    # The recipe's own fields.
    "teacher_sets": Choices(_teacher_sets, in_stages=True),
    "adaptors": Choices(lambda: adaptor.KINDS),
    "kd_losses": Choices(_kd_losses, in_stages=True),
    "kd_distances": Choices(lambda: list(losses.KD_DISTANCES)),
    "student_alone": Flag(),
    "seeds": Number(1, integer=True, meaning="the number of training seeds to run the recipe "
                    "with"),
    "targets": Choice(_targets, in_stages=True),
    "target_orientation": Choice(lambda: input_pipeline.ORIENTATIONS),
    "balanced_seed": Number(0, integer=True),
}

ROLES = ("", "teacher.", "adaptor.", "student.")

# Fields without a range, and why: free text, or checked where its possible values are known.
UNRANGED = {
    "stage": "main checks it against its stages",
    "preset": "set by the config file itself",
    "cache_dir": "a path",
    "data.data_dir": "a path",
    "data.tfds.train": "a prepared data set's name, looked up when the data is read",
    "data.tfds.verification": "a prepared data set's name, looked up when the data is read",
    "data.tfds.validation": "a prepared data set's name, looked up when the data is read",
    "teacher.group": "a group of the data, checked when the data is read",
    "teacher.identities": "identity labels of the data, checked when the data is read",
    "teacher.checkpoints": "a folder, read before any stage runs",
    "teacher.balanced_checkpoints": "a folder, read before any stage runs",
    "teacher.models": "its entries' fields have the ranges of teacher.model's",
    "adaptor.checkpoints": "a folder, read before any stage runs",
    "adaptor.balanced_checkpoints": "a folder, read before any stage runs",
    "only": "a stage name, checked once the recipe's stages are known",
    "force": "a stage name, checked once the recipe's stages are known",
}


def _lookup(config, path: str):
  """(True, value) of the dotted `path` in `config` (ConfigDicts or dicts), (False, None)
  where it has no such field."""
  node = config
  for key in path.split("."):
    if not isinstance(node, Mapping) and not hasattr(node, "keys"):
      return False, None
    if key not in node:
      return False, None
    node = node[key]
  return True, node


def _fields(config):
  """(name as typed on the command line, value, rule) of every field of `config` in RANGES,
  each entry of teacher.models with teacher.model's ranges."""
  for pattern, rule in RANGES.items():
    for role in ROLES if pattern.startswith("<role>.") else ("",):
      name = pattern.replace("<role>.", role)
      found, value = _lookup(config, name)
      if found:
        yield name, value, rule
  found, entries = _lookup(config, "teacher.models")
  for teacher in (entries.keys() if found and hasattr(entries, "keys") else ()):
    entry = entries[teacher]
    for key in (entry.keys() if hasattr(entry, "keys") else ()):
      rule = RANGES.get(f"<role>.model.{key}")
      if rule is not None:
        yield f'teacher.models["{teacher}"].{key}', entry[key], rule


def check(config, *, stage_vocabulary: bool = True) -> None:
  """Refuses a config with a field out of its RANGES, or whose fields together make no
  sense (below); returns None where every field is in range.

  `stage_vocabulary`: also check the fields whose names are registered in stages/
  (teacher_sets, kd_losses, targets, train.select); bench, which does not import stages/
  and reads none of them, passes False.

  Raises:
    UserError: one line, `config field <field>=<value>: expected <range>` for the first
      field out of range; or naming the fields that together are refused: a last seed
      (seed + seeds - 1) out of range, the synthetic set's sizes that cannot give their
      pairs, a training section whose learning rates are both 0, a recipe that trains no
      KD student.
  """
  for name, value, rule in _fields(config):
    if isinstance(rule, Choice) and rule.in_stages and not stage_vocabulary:
      continue
    if not rule.accepts(value):
      raise UserError(rule.refusal(name, value))
  _check_seeds(config)
  _check_synthetic(config)
  for role in ROLES:
    _check_learning_rates(config, role)
  if stage_vocabulary:
    _check_kd_students(config)


def _check_seeds(config) -> None:
  """With seeds = N the recipe runs seeds seed .. seed + N - 1: the last one too in range."""
  found, seeds = _lookup(config, "seeds")
  seed = config.get("seed", 0)
  if found and seed + seeds - 1 > _SEED.high:
    raise UserError(f"config fields seed={seed} and seeds={seeds}: the last run's seed, "
                    f"{seed + seeds - 1}, is above {_SEED.high}; expected seed + seeds - 1 <= "
                    f"{_SEED.high}")


def _check_synthetic(config) -> None:
  """The synthetic set's sizes together (the pairs they can give, a validation split
  both-or-none), where that set is the source: SyntheticSpec's own check, nothing made."""
  found, source = _lookup(config, "data.source")
  found_spec, fields = _lookup(config, "data.synthetic")
  if not (found and found_spec and source == "synthetic"):
    return
  fields = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
  try:
    synthetic.SyntheticSpec(**fields)
  except UserError as e:
    raise UserError("config field " + str(e).replace("SyntheticSpec.", "data.synthetic.")) from e
  except TypeError as e:
    raise UserError(f"config field data.synthetic: {e}") from e


def _check_learning_rates(config, role: str) -> None:
  """A training section whose backbone and head LRs are both 0 would train nothing."""
  found, base = _lookup(config, f"{role}optim.base_lr")
  _, head = _lookup(config, f"{role}optim.head_base_lr")
  if found and base == 0 and head is not None and head <= 0:
    same = " (< 0: the same as base_lr)" if head < 0 else ""
    raise UserError(f"config field {role}optim.base_lr={base!r} with {role}optim.head_base_lr="
                    f"{head!r}{same}: nothing would train; expected a learning rate > 0 for "
                    "the backbone or the head")


def _check_kd_students(config) -> None:
  """A recipe with no KD student (an empty teacher_sets, adaptors, kd_losses or
  kd_distances) is refused while it trains the student alone: its point is gone. With
  student_alone=False it is a run of teachers (and adaptors) only, as asked; with
  --config.only one stage is asked for."""
  if "kd_losses" not in config or config.get("only"):
    return
  empty = [f for f in ("teacher_sets", "adaptors", "kd_losses", "kd_distances")
           if not config.get(f)]
  if not empty:
    return
  if config.get("student_alone"):
    raise UserError(f"config field {empty[0]}=(): the recipe would train no KD student, only "
                    f"the student alone; expected some of {list(RANGES[empty[0]].values())} "
                    "(or student_alone=False for teachers and adaptors only, or "
                    "--config.only=<stage>)")
  if "teacher_sets" in empty:
    raise UserError("config fields teacher_sets=() and student_alone=False: the recipe would "
                    "train nothing; expected some teacher sets")

"""Every numeric and enumerated config field has a range (mstkd_jax/config_ranges.py): a
value outside it stops the run in one line naming the field, before any stage runs; every
preset, and every field set to its default explicitly, passes."""

import math
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import distill, teacher
from mstkd_jax import config_ranges, losses, main
from mstkd_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = [(distill, p) for p in ("default", "smoke", "tiny", "full", "wide_teachers",
                                  "bupt_iresnet34")] + [
    (teacher, p) for p in ("default", "smoke", "tiny", "bupt_iresnet34")]


def _leaves(tree, prefix=""):
  """{"a.b": leaf} of a config; an empty section (teacher.models) is a leaf."""
  tree = tree.to_dict() if hasattr(tree, "to_dict") else tree
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _set(config, field: str, value):
  """config.<field> = value, whatever its type (a field it lacks is added)."""
  *parents, leaf = field.split(".")
  node = config
  for key in parents:
    node = node[key]
  with node.ignore_type():
    node[leaf] = value
  return config


def _pattern(field: str) -> str:
  for role in config_ranges.ROLES[1:]:
    if field.startswith(role) and f"<role>.{field[len(role):]}" in config_ranges.RANGES:
      return f"<role>.{field[len(role):]}"
  return field if field in config_ranges.RANGES else f"<role>.{field}"


@pytest.mark.parametrize("module,preset", PRESETS, ids=lambda x: getattr(x, "__name__", x))
def test_every_preset_is_in_range(module, preset):
  config_ranges.check(module.get_config(preset))


@pytest.mark.parametrize("module,preset", PRESETS, ids=lambda x: getattr(x, "__name__", x))
def test_every_field_of_every_preset_has_a_range_or_says_why_not(module, preset):
  """A field added to a config later gets a range here (or a reason in UNRANGED)."""
  for field in _leaves(module.get_config(preset)):
    assert (_pattern(field) in config_ranges.RANGES or field in config_ranges.UNRANGED), field


# The issue's values, on today's fields: each stops main.run in one line before anything is
# made (the workdir is not even created).
ISSUE = [
    ("student.kd.weight", -1.0, "config field student.kd.weight=-1.0: expected a finite "
     "number > 0"),
    ("kd_losses", (), "config field kd_losses=(): the recipe would train no KD student, only "
     "the student alone; expected some of ['a-KD', 'EAF-KD'] (or student_alone=False for "
     "teachers and adaptors only, or --config.only=<stage>)"),
    ("teacher.train.epochs", 0.0, "config field teacher.train.epochs=0.0: expected a finite "
     "number > 0"),
    ("student.optim.base_lr", -0.1, "config field student.optim.base_lr=-0.1: expected a "
     "finite number >= 0"),
    ("teacher.head.s", 0.0, "config field teacher.head.s=0.0: expected a finite number > 0"),
    ("adaptor.train.log_every", 0, "config field adaptor.train.log_every=0: expected an "
     "integer >= 1"),
    ("student.train.checkpoint_every", 0, "config field student.train.checkpoint_every=0: "
     "expected an integer >= 1"),
    ("adaptor.model.embedding_size", 0, "config field adaptor.model.embedding_size=0: "
     "expected an integer >= 1"),
    ("teacher.model.width", 0, "config field teacher.model.width=0: expected an integer >= 1"),
    ("teacher.train.epochs", math.nan, "config field teacher.train.epochs=nan: expected a "
     "finite number > 0"),
    ("student.train.epochs", math.inf, "config field student.train.epochs=inf: expected a "
     "finite number > 0"),
    ("data.synthetic.image_size", 31, "config field data.synthetic.image_size=31: expected a "
     "multiple of 16 in [16, 112] (IResNets and MobileFaceNets halve the image 4 times)"),
    ("teacher.optim.lr_decay_factor", -1.0, "config field teacher.optim.lr_decay_factor=-1.0: "
     "expected a number in (0, 1]"),
    ("student.train.batch_size", True, "config field student.train.batch_size=True: expected "
     "a positive integer (the global batch, over all hosts and devices)"),
]


@pytest.mark.parametrize("field,value,line", ISSUE, ids=[f"{f}={v}" for f, v, _ in ISSUE])
def test_each_bad_value_of_the_issue_stops_main_in_one_line(tmp_path, field, value, line):
  workdir = str(tmp_path / "run")
  with pytest.raises(UserError) as error:
    main.run(_set(distill.get_config("tiny"), field, value), workdir)
  assert str(error.value) == line
  assert not os.path.exists(workdir)


def test_a_single_stage_config_is_checked_with_its_own_field_names(tmp_path):
  config = teacher.get_config("tiny")
  config.train.epochs = 0.0
  with pytest.raises(UserError, match=r"^config field train\.epochs=0\.0: expected a finite "
                                      r"number > 0$"):
    main.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_the_command_line_prints_the_one_line_and_makes_nothing(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "mstkd_jax.main", "--config=configs/distill.py:tiny",
       "--config.adaptor.model.embedding_size=0", f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert [l for l in result.stderr.splitlines() if l.startswith("error:")] == [
      "error: config field adaptor.model.embedding_size=0: expected an integer >= 1"]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "run")


def _explicit_defaults(config_arg: str) -> list[str]:
  """--config.<field>=<its default> for every field of the config; an unset margin or
  dropout (None) given as the value it stands for (the head's, the architecture's)."""
  module = {"distill": distill, "teacher": teacher}[os.path.basename(config_arg)[:-3]]
  config = module.get_config()
  overrides = []
  for field, value in _leaves(config).items():
    if field == "preset" or value == {}:
      continue
    if value is None:
      section = field.rsplit(".", 1)[0]
      if field.endswith("dropout"):
        value = 0.0
      else:
        name = config[section.split(".")[0]].head.name if "." in section else config.head.name
        value = losses.STANDARD_MARGINS[name][field.endswith(".std")]
    overrides.append(f"--config.{field}={value}")
  return overrides


@pytest.mark.parametrize("config_arg,example", [
    ("configs/distill.py", "--config.teacher.head.m=0.5"),
    ("configs/teacher.py", "--config.head.m=0.5")])
def test_every_field_set_to_its_default_on_the_command_line_passes(config_arg, example):
  """The flag parser's values (floats for float fields, tuples ...) of every default, e.g.
  the margin m given as the head's standard 0.5, are in range."""
  script = ("import sys; from mstkd_jax import config_ranges, main; "
            "main.parse_flags(sys.argv); config_ranges.check(main._CONFIG.value); "
            "print('in range')")
  argv = [f"--config={config_arg}", *_explicit_defaults(config_arg)]
  assert example in argv
  result = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.stdout.strip() == "in range", result.stderr[-2000:]


# Each field of the table: a value just outside its range. Fields the presets lack (another
# backbone's) are added to the tiny recipe's sections with their model's default.
OUTSIDE = {
    "seed": [-1, 2**31], "parallelism": ["jit"], "num_devices": [-1, 1.0],
    "data.source": ["tfrecord"], "data.synthetic.num_groups": [0, 703],
    "data.synthetic.identities_per_group": [1], "data.synthetic.images_per_identity": [0],
    "data.synthetic.eval_identities_per_group": [1],
    "data.synthetic.eval_images_per_identity": [1], "data.synthetic.pairs_per_group": [0, 41],
    "data.synthetic.image_size": [0, 24, 128], "data.synthetic.difficulty": [-0.1, (0.5, 4.1)],
    "data.synthetic.seed": [-1], "data.synthetic.validation_identities_per_group": [1, -1],
    "data.synthetic.validation_pairs_per_group": [-2, 3],
    "data.tfds.image_size": [0, 120],
    "<role>.model.name": ["resnet50"], "<role>.model.width": [0, 4.0],
    "<role>.model.embedding_size": [0], "<role>.model.use_se": [1],
    "<role>.model.dtype": ["float16"], "<role>.model.dropout": [1.0, -0.1],
    "<role>.model.stage_depths": [(1, 1, 1), (1, 1, 0, 1)],
    "<role>.model.blocks": [(1, 4, 6), (1, 4, 0, 2)], "<role>.model.scale": [0],
    "<role>.head.name": ["sphereface"], "<role>.head.s": [0.0, math.inf],
    "<role>.head.m": [-0.01, math.nan], "<role>.head.std": [-0.01],
    "<role>.head.shard_classes": [0], "<role>.head.sample_rate": [0.0, 1.01],
    "<role>.train.batch_size": [0, 16.0], "<role>.train.epochs": [0.0, -1.0, math.nan],
    "<role>.train.log_every": [0], "<role>.train.checkpoint_every": [0],
    "<role>.train.keep_checkpoints": [0], "<role>.train.eval_batch_size": [0],
    "<role>.train.eval_every": [-1], "<role>.train.select": ["best"],
    "<role>.optim.base_lr": [-1e-9, math.inf], "<role>.optim.head_base_lr": [math.nan],
    "<role>.optim.momentum": [1.0, -0.1], "<role>.optim.weight_decay": [-1e-9],
    "<role>.optim.clip_norm": [-1e-9], "<role>.optim.lr_decay_epochs": [(0,), (2, 1), (1.5,)],
    "<role>.optim.lr_decay_factor": [0.0, 1.01], "student.kd.weight": [0.0, math.inf],
    "teacher_sets": [("specialized", "specialized"), ("all",), "specialized"],
    "adaptors": [("MLP",)], "kd_losses": [("KD",)], "kd_distances": [("l1",)],
    "student_alone": [1], "seeds": [0], "targets": ["offline"],
    "target_orientation": ["mirrored"], "balanced_seed": [-1],
}
ADDED = {"model.stage_depths": (2, 2, 2, 2), "model.blocks": (1, 4, 6, 2), "model.scale": 2}


# The adaptor's model section holds these alone (its kind is the recipe's `adaptors`).
ADAPTOR_MODEL = ("model.embedding_size", "model.dropout")


def _fields_of(pattern: str) -> list[str]:
  """The recipe's fields of a RANGES pattern: "<role>." as each role that has the field."""
  if not pattern.startswith("<role>."):
    return [pattern]
  rest = pattern[len("<role>."):]
  adaptor = not rest.startswith("model.") or rest in ADAPTOR_MODEL
  return [role + rest for role in ("teacher.", "adaptor.", "student.")
          if role != "adaptor." or adaptor]


def _tiny_with(field: str) -> ml_collections.ConfigDict:
  config = distill.get_config("tiny")
  rest = field.partition(".")[2]
  if rest in ADDED:
    _set(config, field, ADDED[rest])
  return config


def test_every_field_of_the_table_is_swept():
  assert sorted(OUTSIDE) == sorted(config_ranges.RANGES)


SWEEP = [(field, value) for pattern, values in OUTSIDE.items() for field in _fields_of(pattern)
         for value in values]


@pytest.mark.parametrize("field,value", SWEEP, ids=[f"{f}={v!r}" for f, v in SWEEP])
def test_a_value_just_outside_the_range_is_refused_naming_the_field(field, value):
  config = _set(_tiny_with(field), field, value)
  with pytest.raises(UserError, match=rf"^config field {field}(=| holds )"):
    config_ranges.check(config)


ACCEPTED = sorted({field for field, _ in SWEEP})


@pytest.mark.parametrize("field", ACCEPTED)
def test_each_field_set_to_its_default_is_accepted(field):
  config = _tiny_with(field)
  *parents, leaf = field.split(".")
  node = config
  for key in parents:
    node = node[key]
  default = node[leaf]
  config_ranges.check(_set(config, field, default))


@pytest.mark.parametrize("field,value", [
    ("data.synthetic.image_size", 112), ("data.synthetic.difficulty", 0.0),
    ("teacher.model.dropout", 0.0), ("teacher.optim.momentum", 0.0),
    ("teacher.optim.lr_decay_epochs", ()), ("teacher.optim.lr_decay_epochs", (3, 3)),
    ("teacher.optim.lr_decay_factor", 1.0), ("teacher.optim.clip_norm", 0.0),
    ("teacher.head.m", 0.0), ("teacher.head.sample_rate", 1.0),
    ("num_devices", 0), ("seed", 2**31 - 1), ("seeds", 5),
    ("data.synthetic.num_groups", 1), ("teacher.model.name", "mbf")])
def test_values_at_the_edges_of_a_range_are_accepted(field, value):
  config_ranges.check(_set(distill.get_config("tiny"), field, value))


def test_a_teacher_of_its_own_network_is_checked_by_the_model_ranges():
  config = distill.get_config("tiny")
  config.teacher.models = {"teacher/group_a": {"width": 8}, "teacher/group_b": {"width": 0}}
  with pytest.raises(UserError, match=r'^config field teacher\.models\["teacher/group_b"\]\.'
                                      r"width=0: expected an integer >= 1$"):
    config_ranges.check(config)


def test_a_recipe_without_kd_students_is_refused_unless_asked_for():
  """No KD student while the student alone trains: the recipe's point is gone. Without any
  student (teachers and adaptors only, as the import tests run it) or one stage asked for
  (--config.only), it is what the user asked."""
  for field in ("teacher_sets", "adaptors", "kd_losses", "kd_distances"):
    with pytest.raises(UserError, match=rf"^config field {field}=\(\): the recipe would train "
                                        "no KD student"):
      config_ranges.check(_set(distill.get_config("tiny"), field, ()))
  config_ranges.check(_set(_set(distill.get_config("tiny"), "kd_losses", ()),
                           "student_alone", False))
  config_ranges.check(_set(_set(distill.get_config("tiny"), "kd_losses", ()),
                           "only", "teacher/group_a"))
  nothing = _set(_set(distill.get_config("tiny"), "teacher_sets", ()), "student_alone", False)
  with pytest.raises(UserError, match="the recipe would train nothing"):
    config_ranges.check(nothing)


def test_a_section_with_no_learning_rate_at_all_is_refused():
  config = distill.get_config("tiny")
  config.teacher.optim.base_lr = 0.0          # head_base_lr -1: the same, 0
  with pytest.raises(UserError, match=r"^config field teacher\.optim\.base_lr=0\.0 with "
                                      r"teacher\.optim\.head_base_lr=-1\.0 .*nothing would "
                                      "train"):
    config_ranges.check(config)
  config.teacher.optim.head_base_lr = 0.1     # a frozen backbone, trained class centres
  config_ranges.check(config)


def test_the_last_seed_of_a_multi_seed_run_is_in_range_too():
  config = distill.get_config("tiny")
  config.update(seed=2**31 - 2, seeds=3)
  with pytest.raises(UserError, match=r"^config fields seed=2147483646 and seeds=3: the last "
                                      r"run's seed, 2147483648, is above 2147483647"):
    config_ranges.check(config)


def test_the_synthetic_sizes_are_checked_together_with_the_field_names():
  config = distill.get_config("tiny")
  config.data.synthetic.validation_identities_per_group = 4   # pairs left 0
  with pytest.raises(UserError, match=r"^config field data\.synthetic\.validation_identities"
                                      r"_per_group=4 and data\.synthetic\.validation_pairs"
                                      r"_per_group=0: expected both 0"):
    config_ranges.check(config)


def test_bench_skips_the_names_registered_in_stages_only():
  config = _set(distill.get_config("tiny"), "kd_losses", ("KD",))
  config_ranges.check(config, stage_vocabulary=False)
  with pytest.raises(UserError, match="kd_losses holds 'KD'"):
    config_ranges.check(config)
  with pytest.raises(UserError, match="teacher.model.width=0"):
    config_ranges.check(_set(config, "teacher.model.width", 0), stage_vocabulary=False)

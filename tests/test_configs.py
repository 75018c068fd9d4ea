"""Presets carry the paper's numbers; unset margins and dropout follow the architecture/loss."""

import pytest

from configs import distill, teacher
from mstkd_jax import losses
from mstkd_jax.train import state as state_lib
from mstkd_jax.train import build


@pytest.mark.parametrize("module,preset", [
    (teacher, "default"), (teacher, "smoke"), (teacher, "tiny"), (teacher, "bupt_iresnet34"),
    (distill, "default"), (distill, "smoke"), (distill, "tiny"), (distill, "full"),
    (distill, "wide_teachers"), (distill, "bupt_iresnet34")])
def test_every_preset_builds_its_model_and_margin(module, preset):
  config = module.get_config(preset)
  # A single stage's config has one model and head; the recipe's, one per role.
  sections = [config[role] for role in ("teacher", "student")] if "student" in config else [
      config]
  for section in sections:
    assert build.backbone(section.model).dropout == 0.0   # iresnet18 / 34: no dropout
    spec = build.margin_spec(section.head)
    assert (spec.name, spec.s, spec.m, spec.std) == ("elastic_arcface", 64.0, 0.5, 0.05)


def test_paper_preset_numbers():
  c = distill.get_config("bupt_iresnet34")
  for section in (c.teacher, c.student):
    assert (section.model.name, section.model.width, section.model.embedding_size) == (
        "iresnet34", 64, 512)
    assert section.train.batch_size == 128 and section.train.epochs == 52.0
    assert tuple(section.optim.lr_decay_epochs) == (16, 28, 40, 50)
    assert state_lib.scaled_lr(section.optim.base_lr, section.train.batch_size) == 0.025
    assert section.optim.clip_norm == 5.0 and section.optim.weight_decay == 5e-4
  assert c.student.kd.weight == 10000.0 and c.kd_distances == ("mse",)
  a = c.adaptor
  assert a.train.epochs == 26.0 and tuple(a.optim.lr_decay_epochs) == (8, 14, 20, 25)
  assert state_lib.scaled_lr(a.optim.base_lr, a.train.batch_size) == 0.25
  assert a.optim.clip_norm == 5.0 and a.model.dropout == 0.2 and a.model.embedding_size == 512
  spec = build.margin_spec(a.head)
  assert (spec.name, spec.m, spec.std) == ("elastic_arcface", 0.5, 0.0125)
  assert c.target_orientation == "stored"   # the released scripts' targets
  assert distill.get_config("default").target_orientation == "as_fed"
  t = teacher.get_config("bupt_iresnet34")
  assert (t.train.batch_size, t.train.epochs) == (128, 52.0)


@pytest.mark.parametrize("name,m,std", [
    ("arcface", 0.5, 0.0), ("cosface", 0.35, 0.0), ("elastic_arcface", 0.5, 0.05),
    ("elastic_arcface_plus", 0.5, 0.0175), ("elastic_cosface", 0.35, 0.05),
    ("elastic_cosface_plus", 0.35, 0.02)])
def test_naming_a_head_takes_its_margins_unless_given(name, m, std):
  config = teacher.get_config("smoke")
  config.head.name = name
  spec = build.margin_spec(config.head)
  assert (spec.m, spec.std) == (m, std)
  config.head.m, config.head.std = 0.3, 0.01
  spec = build.margin_spec(config.head)
  assert (spec.m, spec.std) == (0.3, 0.01)
  assert losses.MarginSpec(name, m=0.2).std == std


def test_iresnet50_takes_the_paper_s_dropout_unless_given():
  config = teacher.get_config("bupt_iresnet34")
  config.model.name = "iresnet50"
  assert build.backbone(config.model).dropout == 0.4
  config.model.dropout = 0.1
  assert build.backbone(config.model).dropout == 0.1
  config.model.update(name="iresnet100", dropout=None)
  assert build.backbone(config.model).dropout == 0.0


# Fields of configs/distill.py that the pipeline itself reads (the others reach a stage).
PIPELINE_FIELDS = {"stage", "preset", "teacher_sets", "adaptors", "kd_losses", "kd_distances",
                   "student_alone", "seeds", "targets", "target_orientation", "balanced_seed",
                   "only", "force"}


def _changed(value):
  """A different value of the same kind (what a user's override would give)."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + 1
  if isinstance(value, str):
    return value + "_changed"
  if isinstance(value, (tuple, list)):
    return tuple(value) + (tuple(value)[-1] if value else 1,)
  return 1.5 if value is None else None


@pytest.mark.parametrize("preset", ["tiny", "smoke"])
def test_every_field_of_the_recipe_is_read(tmp_path, preset):
  """Changing any field of the recipe changes some stage's config (or is refused): no
  field is silently ignored. The pipeline's own fields are read by recipe.make_stages/run."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mstkd_jax import pipeline, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from mstkd_jax.data import sources  # pylint: disable=g-import-not-at-top
  from mstkd_jax.errors import UserError as Refused  # pylint: disable=g-import-not-at-top
  config = distill.get_config(preset)
  config.data.data_dir = str(tmp_path / "data")
  train_set = sources.training_set(config.data, str(tmp_path))

  def stage_configs(c):
    return [workdir_lib.config_dict(s.config) for s in pipeline.make_stages(c, str(tmp_path),
                                                                     train_set)]

  reference = stage_configs(config)
  unread = []
  for field, value in workdir_lib.flatten(workdir_lib.config_dict(config)).items():
    if field.split(".")[0] in PIPELINE_FIELDS:
      continue
    changed = ml_collections.ConfigDict(config.to_dict())
    *parents, leaf = field.split(".")
    node = changed
    for key in parents:
      node = node[key]
    with node.ignore_type():
      node[leaf] = _changed(value)
    try:
      if stage_configs(changed) == reference:
        unread.append(field)
    except (Refused, TypeError, ValueError):
      pass  # checked, so read
  assert not unread, f"fields no stage reads: {unread}"

"""Presets carry the paper's numbers; unset margins and dropout follow the architecture/loss."""

import pytest

from configs import distill, teacher
from mstkd_jax import losses
from mstkd_jax.train import state as state_lib
from mstkd_jax.train import build


@pytest.mark.parametrize("module,preset", [
    (teacher, "default"), (teacher, "smoke"), (teacher, "tiny"), (teacher, "bupt_iresnet34"),
    (distill, "default"), (distill, "smoke"), (distill, "tiny"), (distill, "full"),
    (distill, "bupt_iresnet34")])
def test_every_preset_builds_its_model_and_margin(module, preset):
  config = module.get_config(preset)
  assert build.backbone(config.model).dropout == 0.0   # iresnet18 / 34: no dropout
  spec = build.margin_spec(config.head)
  assert (spec.name, spec.s, spec.m, spec.std) == ("elastic_arcface", 64.0, 0.5, 0.05)


def test_paper_preset_numbers():
  c = distill.get_config("bupt_iresnet34")
  assert (c.model.name, c.model.width, c.model.embedding_size) == ("iresnet34", 64, 512)
  for section in (c.teacher, c.student):
    assert section.train.batch_size == 128 and section.train.epochs == 52.0
    assert tuple(section.optim.lr_decay_epochs) == (16, 28, 40, 50)
    assert state_lib.scaled_lr(section.optim.base_lr, section.train.batch_size) == 0.025
    assert section.optim.clip_norm == 5.0 and section.optim.weight_decay == 5e-4
  assert c.student.kd_weight == 10000.0
  a = c.adaptor
  assert a.train.epochs == 26.0 and tuple(a.optim.lr_decay_epochs) == (8, 14, 20, 25)
  assert state_lib.scaled_lr(a.optim.base_lr, a.train.batch_size) == 0.25
  assert a.optim.clip_norm == 5.0 and a.dropout == 0.2
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

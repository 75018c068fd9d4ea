"""Each role its own network: the recipe's sections reach their stages whole, teachers of
different networks, the KD distance registry, and the refusals of a bad KD section."""
# pylint: disable=protected-access

import functools
import json
import os
import shutil

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import distill
from mstkd_jax import losses, models, pipeline, workdir as workdir_lib
from mstkd_jax.data import input_pipeline, sources
from mstkd_jax.errors import UserError
from mstkd_jax.stages import adaptor as adaptor_stage, extract, recipe, shared, student
from mstkd_jax.train import build, steps
from test_torch_checkpoint import _random_variables  # random weights and BN statistics


@pytest.fixture
def tiny(tmp_path):
  """(configs/distill.py:tiny with its data folder in tmp_path, the training set)."""
  config = distill.get_config("tiny")
  config.data.data_dir = str(tmp_path / "data")
  return config, sources.training_set(config.data, str(tmp_path))


def _stages(config, train_set, workdir="/nonexistent") -> dict:
  return {s.name: s for s in recipe.make_stages(config, workdir, train_set)}


# ------------------------------------------------------------------------ the sections

def test_each_role_trains_its_own_network(tiny):
  config, train_set = tiny
  config.teacher.model.update(width=8, use_se=True)
  config.teacher.models = {"teacher/group_b": {"width": 12},
                           "balanced_teacher/1": {"name": "iresnet34", "width": 4,
                                                  "embedding_size": 24}}
  stages = _stages(config, train_set)
  model = lambda name: stages[name].config.model.to_dict()
  assert (model("teacher/group_a")["width"], model("teacher/group_a")["use_se"]) == (8, True)
  assert (model("teacher/group_b")["width"], model("teacher/group_b")["use_se"]) == (12, True)
  # Another model name: that entry is the whole network.
  assert model("balanced_teacher/1") == {"name": "iresnet34", "width": 4, "embedding_size": 24}
  assert model("student/mstkd/SL/a-KD")["width"] == 4                # the student's own
  assert model("adaptor/specialized/SL") == {"kind": "SL", "embedding_size": 16,
                                             "dropout": 0.2}
  # Extraction and the students hold no teacher network: they read it from the teachers'
  # folders, whose fingerprints chain into theirs.
  assert "model" not in stages["extract/specialized"].config
  config.teacher.models = {"teacher/group_q": {"width": 12}}
  with pytest.raises(UserError, match=r"teacher.models names \['teacher/group_q'\], which "
                                      r"are no teachers of this recipe"):
    _stages(config, train_set)


@pytest.mark.parametrize("role,stage", [("teacher", "teacher/group_a"),
                                        ("adaptor", "adaptor/balanced/SL"),
                                        ("student", "student/mstkd/SL/a-KD"),
                                        ("student", "student/student_alone")])
def test_a_new_field_of_a_section_reaches_its_stages_and_their_fingerprint(tiny, role, stage):
  """A field nothing knows about, added to a section, is in its stages' configs (under
  the role's name) and so in their fingerprints, with no edit to the pipeline."""
  config, train_set = tiny
  before = recipe.make_stages(config, "/w", train_set)
  config[role].made_up_field = 3
  after = {s.name: s for s in recipe.make_stages(config, "/w", train_set)}
  assert after[stage].config[role].made_up_field == 3
  old, new = _fingerprints(before), _fingerprints(list(after.values()))
  assert old[stage] != new[stage]
  other = {"teacher": "student/student_alone", "adaptor": "teacher/group_b",
           "student": "adaptor/specialized/SL"}[role]
  assert old[other] == new[other]     # another role's stage that does not read it


def _fingerprints(stages) -> dict:
  """{stage: the fingerprint the pipeline records for it}."""
  fingerprints = {}
  for s in stages:
    fingerprints[s.name] = pipeline._fingerprint(s, fingerprints)["fingerprint"]
  return fingerprints


def test_a_stage_is_fingerprinted_by_the_fields_it_reads(tiny):
  """The a-KD student trains no margin head: its config has no head, so a head change
  leaves it (and the teachers) as they were and reaches the student alone."""
  config, train_set = tiny
  stages = _stages(config, train_set)
  assert "head" not in stages["student/mstkd/SL/a-KD"].config
  config.student.head.m = 0.3
  changed = _stages(config, train_set)
  for name in ("student/mstkd/SL/a-KD", "teacher/group_a", "adaptor/specialized/SL"):
    assert workdir_lib.config_dict(changed[name].config) == workdir_lib.config_dict(
        stages[name].config)
  assert changed["student/student_alone"].config.head.m == 0.3


def test_kd_variants_are_a_grid_of_the_paper_names_and_distances(tiny):
  config, train_set = tiny
  config.kd_losses = ("a-KD", "EAF-KD")
  config.kd_distances = ("mse", "cosine")
  stages = _stages(config, train_set)
  kd = {n: s.config.student.kd.to_dict() for n, s in stages.items()
        if n.startswith("student/mstkd/")}
  assert kd == {
      "student/mstkd/SL/a-KD": dict(distance="mse", weight=10000.0, margin_loss=False),
      "student/mstkd/SL/a-KD-cosine": dict(distance="cosine", weight=10000.0,
                                           margin_loss=False),
      "student/mstkd/SL/EAF-KD": dict(distance="mse", weight=10000.0, margin_loss=True),
      "student/mstkd/SL/EAF-KD-cosine": dict(distance="cosine", weight=10000.0,
                                             margin_loss=True)}
  assert "head" in stages["student/mstkd/SL/EAF-KD-cosine"].config
  assert "student/balanced_kd/SL/a-KD-cosine" in stages
  config.kd_distances = ("mse", "hamming")
  with pytest.raises(UserError, match=r"config field kd_distances holds 'hamming'; expected "
                                      r"some of \['mse', 'cosine'\]"):
    _stages(config, train_set)


def test_an_adaptor_of_another_size_than_the_student_is_refused(tiny):
  config, train_set = tiny
  config.adaptor.model.embedding_size = 32
  with pytest.raises(UserError, match=r"adaptor.model.embedding_size=32 differs from "
                                      r"student.model.embedding_size=16"):
    _stages(config, train_set)


# ----------------------------------------------------------------------- KD distances

def _unit(rng, shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_kd_distances_match_numpy():
  rng = np.random.default_rng(0)
  target = _unit(rng, (5, 12)).astype(np.float32)
  student_raw = (rng.normal(size=(5, 12)) * 3).astype(np.float32)
  s = student_raw / np.linalg.norm(student_raw, axis=-1, keepdims=True)
  # float32 sums of 60 terms of size <= 4: relative error a few float32 eps.
  np.testing.assert_allclose(losses.kd_loss(target, student_raw, 7.0, "mse"),
                             7.0 * np.mean((target - s) ** 2), rtol=1e-5)
  np.testing.assert_allclose(losses.kd_loss(target, student_raw, 7.0, "cosine"),
                             7.0 * np.mean(1 - np.sum(target * s, axis=-1)), rtol=1e-5)
  # For unit vectors the two differ by D / 2: ||t - s||^2 = 2 - 2 cos.
  np.testing.assert_allclose(losses.kd_loss(target, student_raw, 1.0, "cosine"),
                             6.0 * losses.kd_loss(target, student_raw, 1.0, "mse"), rtol=1e-5)
  with pytest.raises(ValueError, match="KD distance must be one of"):
    losses.kd_loss(target, student_raw, 1.0, "hamming")


def test_mse_is_the_paper_term_bit_for_bit():
  """The registry's "mse" is the expression the step computed before it existed."""
  rng = np.random.default_rng(1)
  target = _unit(rng, (64, 128)).astype(np.float32)
  student_raw = rng.normal(size=(64, 128)).astype(np.float32)
  paper = jax.jit(lambda t, s: 10000.0 * jax.numpy.mean(
      (t.astype(np.float32) - losses.l2_normalize(s)) ** 2))
  assert float(jax.jit(losses.kd_loss, static_argnums=(2, 3))(
      target, student_raw, 10000.0, "mse")) == float(paper(target, student_raw))


def _student_config(**kd):
  c = ml_collections.ConfigDict(dict(head=dict(name="elastic_arcface"), student=dict(
      kd=dict(distance="mse", weight=1.0, margin_loss=False) | kd)))
  return c


@pytest.mark.parametrize("kd,head,message", [
    (dict(distance="hamming"), True,
     r"config field student.kd.distance='hamming': expected one of \['cosine', 'mse'\]"),
    (dict(margin_loss=True), False,
     r"config field student.kd.margin_loss=True trains the student's margin head too, but "
     r"its config has no head section"),
    (dict(weight=-1.0), True, r"config field student.kd.weight=-1.0: expected a number"),
    (dict(margin_loss="yes"), True, r"student.kd.margin_loss='yes': expected True or False"),
    (dict(temperature=2.0), True, r"student.kd has unknown field\(s\) \['temperature'\]")])
def test_a_bad_kd_section_is_refused_in_one_line(kd, head, message):
  config = _student_config(**kd)
  if not head:
    del config["head"]
  with pytest.raises(UserError, match=message) as error:
    student.kd_settings(config)
  assert "\n" not in str(error.value)


# ------------------------------------------------------- teachers of different networks

SIZE = 16


class ToyBackbone(nn.Module):
  """A backbone the project does not have, registered here: one dense layer over the
  image. A new backbone is its module and a `register` line; every stage then takes it."""
  embedding_size: int = 8
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, images, train: bool = False):
    return nn.Dense(self.embedding_size, dtype=self.dtype)(images.reshape(len(images), -1))


if "toy_backbone" not in models.names():
  models.register("toy_backbone", ToyBackbone)

IRESNET = dict(name="iresnet18", stage_depths=(1, 1, 1, 1), use_se=False, dtype="float32",
               dropout=0.0)
NETWORKS = [  # teacher order: three networks, interleaved, so stacking must reorder
    IRESNET | dict(width=4, embedding_size=16),
    IRESNET | dict(width=8, embedding_size=8, use_se=True),
    dict(name="toy_backbone", embedding_size=12, dtype="float32"),
    IRESNET | dict(width=4, embedding_size=16),
]
TOTAL = 16 + 8 + 12 + 16


def _teacher_folder(folder, network: dict, seed: int):
  """A finished-looking teacher stage folder: config.json with its model, model/ with
  random variables."""
  workdir_lib.prepare(ml_collections.ConfigDict(dict(model=network)), folder)
  module = build.backbone(ml_collections.ConfigDict(network))
  template = build.template_variables(module, np.zeros((1, SIZE, SIZE, 3), np.float32),
                                      train=False)
  workdir_lib.save_model(folder, 0, _random_variables(template, seed))
  return folder


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
  """Teacher folders of NETWORKS, in teacher order (float32)."""
  root = tmp_path_factory.mktemp("teachers")
  return [_teacher_folder(str(root / f"t{i}"), n, seed=i) for i, n in enumerate(NETWORKS)]


def _adaptor_folder(folder, input_size: int):
  network = dict(kind="DuL", embedding_size=16, dropout=0.2)
  workdir_lib.prepare(ml_collections.ConfigDict(dict(model=network)), folder)
  adaptor = models.create("adaptor", **network)
  variables = {"params": _random_variables(build.template_variables(
      adaptor, np.zeros((1, input_size), np.float32))["params"], 7)}
  workdir_lib.save_model(folder, 0, variables)
  return folder, adaptor, variables


def test_mixed_teachers_give_the_same_targets_cached_and_online(tiny, tmp_path, teacher_dirs):
  """Teachers of three networks (IResNets of other widths, embedding sizes and SE, and a
  backbone registered by this test): the extraction stage's cache through the adaptor
  equals the online targets, which stack the teachers of one network and run the others
  apart, in the teacher order."""
  config, train_set = tiny
  c = ml_collections.ConfigDict(dict(parallelism="pmap", num_devices=1, cache_dir="",
                                     data=config.data.to_dict(),
                                     train=dict(eval_batch_size=64)))
  extract_dir = str(tmp_path / "extract")
  # The extraction stage's training-set cache (remake_caches writes only that).
  extract.remake_caches(c, extract_dir, inputs=shared.Inputs(teacher_dirs=tuple(teacher_dirs)))
  cached_embeddings = np.load(shared.cache_file(c, extract_dir, shared.TEACHER_EMBEDDINGS))
  assert cached_embeddings.shape == (train_set.num_examples, 2, TOTAL)
  adaptor_dir, adaptor, adaptor_vars = _adaptor_folder(str(tmp_path / "adaptor"), TOTAL)
  rows = np.arange(0, train_set.num_examples, 7)
  cached = adaptor_stage._map(adaptor_stage._apply_fn(adaptor), adaptor_vars,
                              cached_embeddings[rows, 0], np.empty((len(rows), 16), np.float32))

  example = np.zeros((1, SIZE, SIZE, 3), np.float32)
  target_fn, frozen = student._online_targets(
      shared.Inputs(teacher_dirs=tuple(teacher_dirs), adaptor_dir=adaptor_dir), example)
  assert target_fn.keywords["positions"] == ((0, 3), (1,), (2,))
  images = input_pipeline.normalize_images(train_set.images_at(rows))
  online = jax.jit(target_fn)(images, frozen)
  # Both sides run the same float32 convolutions, the cached side in batches of another
  # size: a few float32 eps of the unit targets.
  np.testing.assert_allclose(online, cached, rtol=0, atol=2e-6)


def test_frozen_bfloat16_teachers_are_cast_once_and_give_the_same_targets(tmp_path,
                                                                         teacher_dirs):
  """Kernels come out of frozen_teachers in bfloat16 (cast once, at load); the targets
  equal those of float32 kernels cast by Flax in every step, bit for bit."""
  dirs = []
  for folder in teacher_dirs:     # the same teachers, run in bfloat16
    copy = str(tmp_path / os.path.basename(folder))
    shutil.copytree(folder, copy)
    with open(os.path.join(copy, "config.json")) as f:
      config = json.load(f)
    config["model"]["dtype"] = "bfloat16"
    with open(os.path.join(copy, "config.json"), "w") as f:
      json.dump(config, f)
    dirs.append(copy)
  example = np.zeros((1, SIZE, SIZE, 3), np.float32)
  modules, cast, positions = student.frozen_teachers(dirs, example)
  leaves = jax.tree_util.tree_leaves_with_path(cast)
  assert {x.dtype for p, x in leaves if p[-1].key == "kernel"} == {np.dtype("bfloat16")}
  assert {x.dtype for p, x in leaves if p[-1].key != "kernel"} == {np.dtype("float32")}
  uncast = tuple(jax.tree.map(lambda *xs: np.stack(xs),
                              *[shared.frozen_backbone(dirs[i], example)[1] for i in places])
                 for places in positions)
  adaptor = models.create("adaptor", kind="SL", embedding_size=16)
  adaptor_vars = _random_variables(
      build.template_variables(adaptor, np.zeros((1, TOTAL), np.float32)), 3)
  images = np.random.default_rng(0).uniform(-1, 1, (4, SIZE, SIZE, 3)).astype(np.float32)
  fn = jax.jit(functools.partial(steps.online_targets, teacher=modules, adaptor=adaptor,
                                 positions=positions))
  once = fn(images, {"teachers": cast, "adaptor": adaptor_vars})
  every_step = fn(images, {"teachers": uncast, "adaptor": adaptor_vars})
  np.testing.assert_array_equal(once, every_step)


def test_a_student_reads_its_teachers_networks_from_their_folders(tmp_path, teacher_dirs):
  folder = str(tmp_path / "t")
  shutil.copytree(teacher_dirs[1], folder)
  assert shared.stage_network(folder)["width"] == 8
  os.remove(os.path.join(folder, "config.json"))
  with pytest.raises(UserError, match=r"config.json is missing: the stage in .* has not run"):
    shared.stage_network(folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"seed": 0}, f)
  with pytest.raises(UserError, match=r"config.json holds no model section"):
    shared.stage_network(folder)

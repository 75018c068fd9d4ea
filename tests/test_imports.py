"""Teachers and adaptors made elsewhere, imported by the recipe instead of trained
(teacher.checkpoints, adaptor.checkpoints): PyTorch teachers against a PyTorch twin, an
earlier run's teachers giving its students back bit for bit, and one-line refusals."""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from configs import distill
from mstkd_jax import pipeline
from mstkd_jax.data import input_pipeline, sources
from mstkd_jax.errors import UserError
from mstkd_jax.evaluation import embedding
from mstkd_jax.stages import adaptor, shared, student, teacher
from test_mobilefacenet import _torch_mobilefacenet
from test_torch_adaptor import _twins as _torch_adaptor_twins
from test_torch_checkpoint import _randomize

SIZE, WIDTH, EMBEDDING = 16, 4, 16      # configs/distill.py:tiny's teachers and images


def _torch_teachers(torch, folder, groups=("group_a", "group_b"), **shape):
  """{group: a random insightface IResNet-18 (eval mode)}, each saved as <group>.pth."""
  from mstkd_jax import bench_torch  # pylint: disable=g-import-not-at-top  (needs torch)
  os.makedirs(folder, exist_ok=True)
  nets = {}
  for seed, group in enumerate(groups):
    settings = dict(stage_depths=(2, 2, 2, 2), width=WIDTH, embedding_size=EMBEDDING,
                    image_size=SIZE) | shape
    torch.manual_seed(seed)
    nets[group] = _randomize(torch, bench_torch.IResNet(**settings), seed=seed)
    torch.save(nets[group].state_dict(), os.path.join(folder, f"{group}.pth"))
  return nets


def _torch_embed(torch, net, images):
  """PyTorch embeddings of uint8 NHWC images, as our input pipeline feeds them."""
  x = torch.from_numpy(input_pipeline.normalize_images(images).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    return net(x).numpy()


def _close(ours, reference):
  """Within 1e-5 relative (the largest error over the largest value: float32 through 8
  blocks of small convolutions errs by ~1e-6), and far closer than the rows are to each
  other (random teachers map these similar faces to similar embeddings: the comparison
  must still tell images apart)."""
  error = np.max(np.abs(ours - reference))
  assert error < 1e-5 * np.max(np.abs(reference))
  assert error < 1e-3 * np.max(np.abs(reference - reference.mean(axis=0)))


def _half_recipe(workdir: str, **fields):
  """The tiny recipe's specialized half, its data shared with `workdir` (the finished run)."""
  config = distill.get_config("tiny")
  config.update(teacher_sets=("specialized",), student_alone=False)
  config.data.data_dir = os.path.join(workdir, "data")
  for field, value in fields.items():
    section, key = field.split(".")
    config[section][key] = value
  return config


def test_pytorch_teachers_give_their_pytorch_embeddings_and_targets(tiny_recipe, tmp_path):
  """Two .pth teachers and the finished run's (Orbax) adaptor, imported: no training; the
  teachers' verification embeddings and the targets equal their PyTorch twin's (teachers,
  then normalize, concatenate, the adaptor's layer, normalize) within 1e-5 relative."""
  torch = pytest.importorskip("torch")
  finished, _ = tiny_recipe
  nets = _torch_teachers(torch, str(tmp_path / "teachers"))
  config = _half_recipe(finished, **{
      "teacher.checkpoints": str(tmp_path / "teachers"),
      "adaptor.checkpoints": os.path.join(finished, "adaptor", "specialized")})
  config.kd_losses = ()
  workdir = str(tmp_path / "run")
  report = pipeline.run(config, workdir)
  assert sorted(report["models"]) == ["adaptor/SL", "teacher/group_a", "teacher/group_b"]
  assert not [stage for stage in report["training"] if stage.startswith("teacher/")]
  with open(os.path.join(workdir, "teacher", "group_a", "results.json")) as f:
    record = json.load(f)["imported"]
  assert (record["from"], record["format"]) == (str(tmp_path / "teachers" / "group_a.pth"),
                                                "pytorch")

  data = sources.training_set(config.data, workdir)
  pairs = sources.verification_sets(config.data, workdir)["group_b"].pair_images()
  ours = embedding.load_embeddings(os.path.join(workdir, "teacher", "group_a"))["group_b"][0]
  _close(ours, _torch_embed(torch, nets["group_a"], pairs))

  images = data.images_at(np.arange(data.num_examples))
  normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  fc1 = student.frozen_adaptor(os.path.join(workdir, "adaptor", "specialized", "SL"),
                               2 * EMBEDDING)[1]["params"]["fc1"]
  for k, mirrored in enumerate((images, images[:, :, ::-1])):
    concatenated = np.concatenate([normalize(_torch_embed(torch, nets[g], mirrored))
                                   for g in ("group_a", "group_b")], axis=-1)
    reference = normalize(concatenated @ fc1["kernel"] + fc1["bias"])
    targets = np.load(os.path.join(workdir, "adaptor", "specialized", "SL", "targets.npy"))
    _close(targets[:, k], reference)


def _calibrated(torch, net, images):
  """`net` (eval mode) with every BatchNorm's running statistics those of its input over
  `images` (one pass in training mode, cumulative averages), and random PReLU slopes: a
  randomly initialised MobileFaceNet then maps different faces to clearly different
  embeddings (with random statistics its output hardly depends on the image)."""
  batch_norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, batch_norms):
        module.reset_running_stats()
        module.momentum = None
      elif isinstance(module, torch.nn.PReLU):
        module.weight.uniform_(0.0, 0.5)
    net.train()
    net(torch.from_numpy(input_pipeline.normalize_images(images).transpose(0, 3, 1, 2).copy()))
  return net.eval()


def test_mobilefacenet_teachers_and_the_authors_sl_adaptor_give_their_pytorch_targets(
    tiny_recipe, tmp_path):
  """Teachers of another family (arcface_torch MobileFaceNets, .pth) and the authors' SL
  adaptor (FC_mapping's state_dict, SL.pth), all imported: the teachers' verification
  embeddings and the targets equal the PyTorch twins' chain (teachers, normalize,
  concatenate, FC_mapping, normalize) within 1e-5 relative; the adaptor's record names the
  file."""
  torch = pytest.importorskip("torch")
  finished, _ = tiny_recipe
  mbf = dict(width=8, scale=2, blocks=(2, 1, 1, 1), embedding_size=EMBEDDING)
  teachers, adaptors = tmp_path / "teachers", tmp_path / "adaptors"
  os.makedirs(teachers)
  os.makedirs(adaptors)
  data = sources.training_set(_half_recipe(finished).data, str(tmp_path))
  images = data.images_at(np.arange(data.num_examples))
  nets = {}
  for seed, group in enumerate(("group_a", "group_b")):
    torch.manual_seed(seed)
    nets[group] = _calibrated(torch, _torch_mobilefacenet(torch, **mbf, image_size=SIZE),
                              images)
    torch.save(nets[group].state_dict(), teachers / f"{group}.pth")
  fc_mapping, _ = _torch_adaptor_twins(torch)
  torch.manual_seed(7)
  twin = fc_mapping(2 * EMBEDDING, EMBEDDING).eval()
  torch.save(twin.state_dict(), adaptors / "SL.pth")
  config = _half_recipe(finished, **{"teacher.checkpoints": str(teachers),
                                     "adaptor.checkpoints": str(adaptors)})
  config.teacher.model = ml_collections.ConfigDict(dict(
      config.teacher.model.to_dict(), name="mbf", **mbf))
  config.kd_losses = ()
  workdir = str(tmp_path / "run")
  report = pipeline.run(config, workdir)
  assert sorted(report["models"]) == ["adaptor/SL", "teacher/group_a", "teacher/group_b"]
  with open(os.path.join(workdir, "adaptor", "specialized", "SL", "results.json")) as f:
    record = json.load(f)["imported"]
  assert (record["from"], record["format"]) == (str(adaptors / "SL.pth"), "pytorch")

  pairs = sources.verification_sets(config.data, workdir)["group_a"].pair_images()
  ours = embedding.load_embeddings(os.path.join(workdir, "teacher", "group_b"))["group_a"][0]
  _close(ours, _torch_embed(torch, nets["group_b"], pairs))
  targets = np.load(os.path.join(workdir, "adaptor", "specialized", "SL", "targets.npy"))
  normalize = torch.nn.functional.normalize
  for k, mirrored in enumerate((images, images[:, :, ::-1])):
    concatenated = torch.cat([normalize(torch.from_numpy(_torch_embed(torch, nets[g],
                                                                       mirrored)))
                              for g in ("group_a", "group_b")], dim=-1)
    with torch.no_grad():
      reference = normalize(twin(concatenated)).numpy()
    _close(targets[:, k], reference)


def test_an_earlier_runs_teachers_give_its_students_bit_for_bit(tiny_recipe, tmp_path,
                                                                capsys):
  """--config.teacher.checkpoints=OLD/teacher: the teachers are imported (their rows as
  before), and the adaptor and student trained on them are the earlier run's, digit for
  digit. Another checkpoint at the same place is not taken for the one imported."""
  finished, finished_report = tiny_recipe
  config = _half_recipe(finished, **{"teacher.checkpoints": os.path.join(finished, "teacher")})
  workdir = str(tmp_path / "run")
  report = pipeline.run(config, workdir)
  assert "[teacher/group_a] imported" in capsys.readouterr().out
  assert report["models"] == {m: finished_report["models"][m] for m in report["models"]}
  assert sorted(report["models"]) == ["adaptor/SL", "mstkd/SL/a-KD", "teacher/group_a",
                                      "teacher/group_b"]

  swapped = str(tmp_path / "swapped")
  shutil.copytree(os.path.join(finished, "teacher", "group_a"), f"{swapped}/group_b")
  shutil.copytree(os.path.join(finished, "teacher", "group_b"), f"{swapped}/group_a")
  config.teacher.checkpoints = swapped
  with pytest.raises(UserError, match=r"'teacher/group_a' was made with another config "
                                      r"\(the network it imports changed\)"):
    pipeline.run(config, workdir)


# ------------------------------------------------------------------------- refusals

def test_a_checkpoints_folder_must_hold_one_entry_per_group(tiny_recipe, tmp_path):
  finished, _ = tiny_recipe
  folder = tmp_path / "teachers"
  shutil.copytree(os.path.join(finished, "teacher", "group_a"), folder / "group_a")
  config = _half_recipe(finished, **{"teacher.checkpoints": str(folder)})
  with pytest.raises(UserError, match=r"config field teacher.checkpoints: .*teachers has no "
                                      r"entry for group \['group_b'\]"):
    pipeline.run(config, str(tmp_path / "run"))
  shutil.copytree(folder / "group_a", folder / "group_b")
  shutil.copytree(folder / "group_a", folder / "group_c")
  with pytest.raises(UserError, match=r"holds group \['group_c'\], which the recipe does not "
                                      r"have; expected entries for \['group_a', 'group_b'\]"):
    pipeline.run(config, str(tmp_path / "run"))
  shutil.rmtree(folder / "group_c")
  (folder / "group_b.pth").write_bytes(b"")
  with pytest.raises(UserError, match=r"group_b and .*group_b.pth are both for group"):
    pipeline.run(config, str(tmp_path / "run"))
  config.teacher.checkpoints = str(tmp_path / "nowhere")
  with pytest.raises(UserError, match=r"teacher.checkpoints=.*nowhere is not a folder"):
    pipeline.run(config, str(tmp_path / "run"))


def _import_config(finished: str, **model) -> ml_collections.ConfigDict:
  """The config of an importing teacher stage of the tiny recipe, with `model` changes."""
  data = distill.get_config("tiny").data
  data.data_dir = os.path.join(finished, "data")
  network = distill.get_config("tiny").teacher.model.to_dict() | model
  return ml_collections.ConfigDict(dict(parallelism="pmap", num_devices=1, cache_dir="",
                                        data=data.to_dict(), model=network,
                                        train=dict(eval_batch_size=64)))


@pytest.mark.parametrize("shape,message", [
    (dict(width=8), r"group_a.pth: the checkpoint does not fit iresnet18 width=4 "
                    r"embedding_size=16 use_se=False \(the network of teacher.checkpoints's "
                    r"section\); it looks like: iresnet18 width=8 embedding_size=16 "
                    r"use_se=False image_size=16"),
    (dict(image_size=32), r"group_a.pth: this teacher takes 32x32 images \(what its last "
                          r"layers' shapes imply\), the training images are 16x16")])
def test_a_pytorch_teacher_that_does_not_fit_is_refused_saying_what_it_is(
    tiny_recipe, tmp_path, shape, message):
  torch = pytest.importorskip("torch")
  finished, _ = tiny_recipe
  _torch_teachers(torch, str(tmp_path / "teachers"), groups=("group_a",), **shape)
  with pytest.raises(UserError, match=message) as error:
    teacher.run_import(_import_config(finished), str(tmp_path / "stage"),
                       inputs=shared.Inputs(checkpoint=str(tmp_path / "teachers/group_a.pth")))
  assert "\n" not in str(error.value)


def test_an_orbax_teacher_that_does_not_fit_is_refused_saying_what_it_is(tiny_recipe,
                                                                        tmp_path):
  finished, _ = tiny_recipe
  entry = os.path.join(finished, "teacher", "group_a")
  with pytest.raises(UserError, match=r"group_a: the checkpoint does not fit iresnet34 width=4 "
                                      r".*it looks like: iresnet18 width=4 embedding_size=16 "
                                      r"use_se=False image_size=16") as error:
    teacher.run_import(_import_config(finished, name="iresnet34"), str(tmp_path / "stage"),
                       inputs=shared.Inputs(checkpoint=entry))
  assert "\n" not in str(error.value)


def test_an_adaptor_over_another_number_of_teacher_inputs_is_refused(tiny_recipe, tmp_path):
  """The finished run's SL adaptor (16 + 16 teacher inputs) offered to a stage whose
  teachers give 32 + 32."""
  finished, _ = tiny_recipe
  config = _import_config(finished)
  config.model = dict(kind="SL", embedding_size=EMBEDDING, dropout=0.2)
  extract_dir = tmp_path / "extract"
  extract_dir.mkdir()
  np.save(extract_dir / "teacher_embeddings.npy", np.zeros((96, 2, 64), np.float32))
  shutil.copy(os.path.join(finished, "extract", "specialized",
                           "verification_teacher_embeddings.npz"), extract_dir)
  with pytest.raises(UserError, match=r"SL: the adaptor does not fit a SL adaptor from 64 "
                                      r"teacher inputs to 16 .*: fc1/kernel: "
                                      r"checkpoint \(32, 16\) vs model \(64, 16\)") as error:
    adaptor.run_import(config, str(tmp_path / "stage"), inputs=shared.Inputs(
        extract_dir=str(extract_dir),
        checkpoint=os.path.join(finished, "adaptor", "specialized", "SL")))
  assert "\n" not in str(error.value)

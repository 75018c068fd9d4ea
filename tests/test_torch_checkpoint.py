"""Tests for PyTorch backbone checkpoint import/export (interop/torch_checkpoint.py and the
mapping it rests on: torch_names, torch_iresnet, torch_mbf, backbones); the file format's
own tests are test_pth_format.py's, the MobileFaceNet twin's test_mobilefacenet.py's.

The PyTorch reference is bench_torch's IResNet, written after insightface's as its
architecture is described; tests that need it skip when torch is not installed.
"""

import collections
import functools
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import pytest

from mstkd_jax import models
from mstkd_jax.errors import UserError
from mstkd_jax.interop import backbones, torch_checkpoint as tc

WIDTH = 16


EMBEDDING = 64


IMAGE = 32  # Last feature map 2x2.


DEPTHS = (2, 2, 2, 2)  # iresnet18


def _torch_iresnet(use_se=False):
  """bench_torch's PyTorch IResNet (insightface's layout and state_dict names) of the sizes
  here; import it only after torch is found to be installed."""
  from mstkd_jax import bench_torch  # pylint: disable=g-import-not-at-top  (needs torch)
  return bench_torch.IResNet(DEPTHS, WIDTH, EMBEDDING, image_size=IMAGE, use_se=use_se)


def _randomize(torch, net, seed=0):
  """Random weights and BatchNorm statistics (an IResNet's features.weight stays 1), eval
  mode."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, module in net.named_modules():
      if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
        if name != "features":
          module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
      elif isinstance(module, torch.nn.PReLU):
        module.weight.uniform_(0.0, 0.5)
      elif isinstance(module, torch.nn.Linear) and module.bias is not None:
        module.bias.normal_(0.0, 0.1)
  return net.eval()


def _images(n=3, seed=0):
  """NCHW float32 images in [-1, 1]."""
  return np.random.default_rng(seed).uniform(-1, 1, (n, 3, IMAGE, IMAGE)).astype(np.float32)


class _Flax(NamedTuple):
  """Our model, its variable shapes and its jitted inference."""
  model: Any
  template: Any
  embed: Callable


def _flax(name="iresnet18", embedding_size=EMBEDDING, use_se=False) -> _Flax:
  return _build_flax(name, embedding_size, use_se)  # One cache entry per model.


@functools.cache
def _build_flax(name, embedding_size, use_se) -> _Flax:
  model = models.create(name, width=WIDTH, embedding_size=embedding_size, use_se=use_se)
  template = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, IMAGE, IMAGE, 3)))
  apply = jax.jit(functools.partial(model.apply, train=False))
  # NCHW in, as PyTorch takes it.
  embed = lambda variables, images: np.asarray(apply(variables, images.transpose(0, 2, 3, 1)))
  return _Flax(model, template, embed)


def _random_variables(template, seed=0):
  """Variables shaped like `template` with random weights and BatchNorm statistics."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = math.prod(leaf.shape[:-1])
      value = rng.normal(0.0, math.sqrt(2.0 / fan_in), leaf.shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == "alpha":
      value = rng.uniform(0.0, 0.5, leaf.shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.1, leaf.shape)
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, template)


def _max_relative_error(ours, reference):
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def _exported_in_twin(torch, net, state_dict, path):
  """Saves `state_dict` (our export) to `path` and loads it into the PyTorch twin `net`,
  every key, strictly; returns (NCHW images, the net's embeddings of them in eval mode)."""
  tc.save_state_dict(path, state_dict)
  net.load_state_dict(torch.load(path, weights_only=True), strict=True)
  images = _images(seed=1)
  with torch.no_grad():
    return images, net.eval()(torch.from_numpy(images)).numpy()


def _saved_twin(torch, net, folder):
  """Randomizes `net`, saves its state_dict to folder/twin.pth; returns (path, NCHW images,
  the net's embeddings of them in eval mode)."""
  _randomize(torch, net)
  path = folder / "twin.pth"
  torch.save(net.state_dict(), path)
  images = _images()
  with torch.no_grad():
    return path, images, net(torch.from_numpy(images)).numpy()


# --- Import: same embeddings as PyTorch ------------------------------------------------


@pytest.mark.parametrize("use_se", [False, True])
def test_imported_checkpoint_gives_pytorch_embeddings(tmp_path, use_se):
  torch = pytest.importorskip("torch")
  path, images, reference = _saved_twin(torch, _torch_iresnet(use_se=use_se), tmp_path)
  flax = _flax(use_se=use_se)
  ours = flax.embed(tc.load_iresnet(path, flax.template), images)
  assert _max_relative_error(ours, reference) < 1e-4


def test_exported_checkpoint_gives_same_embeddings_in_pytorch(tmp_path):
  torch = pytest.importorskip("torch")
  flax = _flax()
  variables = _random_variables(flax.template)
  path = tmp_path / "exported.pth"
  images, reference = _exported_in_twin(torch, _torch_iresnet(), tc.export_iresnet(variables),
                                        path)
  assert _max_relative_error(flax.embed(variables, images), reference) < 1e-4
  assert not os.path.exists(f"{path}.tmp") and os.listdir(tmp_path) == ["exported.pth"]


def test_export_save_load_import_round_trip_is_exact(tmp_path):
  template = _flax(use_se=True).template
  variables = _random_variables(template)
  exported = tc.export_iresnet(variables)
  assert list(exported)[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
  assert exported["features.weight"].tolist() == [1.0] * EMBEDDING
  assert exported["bn1.num_batches_tracked"].dtype == np.int64
  path = tmp_path / "round_trip.pth"
  tc.save_state_dict(path, exported)
  loaded = tc.load_state_dict(path)
  assert list(loaded) == list(exported)
  for key, value in exported.items():
    assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  assert "layer1.0.se_block.fc1.weight" in loaded
  imported = tc.import_iresnet(loaded, template)
  jax.tree.map(np.testing.assert_array_equal, imported, variables)


# --- Refusals --------------------------------------------------------------------------


def test_wrong_architecture_lists_missing_unexpected_and_misshaped_keys():
  state_dict = tc.export_iresnet(_random_variables(_flax("iresnet34", 32).template))
  with pytest.raises(UserError) as info:
    tc.import_iresnet(state_dict, _flax(use_se=True).template, source="r34.pth")
  message = str(info.value)
  assert message.startswith("r34.pth")
  assert "missing keys (16)" in message  # fc1/fc2 weights of 8 SE gates.
  assert "layer1.0.se_block.fc1.weight" in message
  assert "unexpected keys" in message and "layer1.2.bn1.weight" in message
  assert "... and" in message  # Long lists are truncated.
  assert "mis-shaped keys (6)" in message  # fc and features.
  assert "fc.weight: expected (64, 512), found (32, 512)" in message
  assert "iresnet34" in message and "use_se=False" in message


def test_features_weight_other_than_ones_is_refused():
  template = _flax().template
  state_dict = tc.export_iresnet(_random_variables(template))
  state_dict["features.weight"] = np.full(EMBEDDING, 2.0, np.float32)
  with pytest.raises(UserError, match="scaled.pth: features.weight must be all ones"):
    tc.import_iresnet(state_dict, template, source="scaled.pth")


# --- Checkpoints that hold more than the backbone --------------------------------------


def _arcface_torch_resume_checkpoint(torch, net, data_parallel: bool, optimizer: str):
  """What arcface_torch's train.py saves as checkpoint_gpu_<rank>.pt to resume a run."""
  partial_fc = torch.nn.Linear(EMBEDDING, 11, bias=False)  # The class centres.
  params = [{"params": net.parameters()}, {"params": partial_fc.parameters()}]
  if optimizer == "sgd":
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
  else:
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
  scheduler = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=100, power=2)
  net.train()
  loss = partial_fc(net(torch.from_numpy(_images(n=4, seed=2)))).square().mean()
  loss.backward()
  opt.step()  # Momentum buffers / Adam moments and step counts in the optimizer state.
  scheduler.step()
  net.eval()
  backbone = net.state_dict()
  if data_parallel:  # torch.nn.parallel.DistributedDataParallel(backbone).state_dict().
    backbone = collections.OrderedDict((f"module.{k}", v) for k, v in backbone.items())
  return {"epoch": 3, "global_step": 1234, "state_dict_backbone": backbone,
          "state_dict_softmax_fc": partial_fc.state_dict(),
          "state_optimizer": opt.state_dict(), "state_lr_scheduler": scheduler.state_dict()}


@pytest.mark.parametrize("data_parallel", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_arcface_torch_resume_checkpoint_gives_pytorch_embeddings(tmp_path, data_parallel,
                                                                  optimizer):
  torch = pytest.importorskip("torch")
  net = _randomize(torch, _torch_iresnet())
  path = tmp_path / "checkpoint_gpu_0.pt"
  torch.save(_arcface_torch_resume_checkpoint(torch, net, data_parallel, optimizer), path)
  images = _images()
  with torch.no_grad():
    reference = net(torch.from_numpy(images)).numpy()

  state_dict, note = tc.read_state_dict(path)
  expected_note = "state_dict under ['state_dict_backbone']" + (
      ", 'module.' prefix removed" if data_parallel else "")
  assert note == expected_note
  assert list(state_dict) == list(net.state_dict())
  flax = _flax()
  notes = []
  ours = flax.embed(tc.load_iresnet(path, flax.template, log=notes.append), images)
  assert notes == [f"note: {path}: using the {expected_note}"]
  assert _max_relative_error(ours, reference) < 1e-4


# --- NaN / Inf, and what a state_dict is -----------------------------------------------


def _template(name, **settings):
  """Variable shapes of a registered backbone at IMAGE x IMAGE."""
  model = models.create(name, **settings)
  return jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, IMAGE, IMAGE, 3)))


@pytest.mark.parametrize("name, key", [("iresnet18", "layer2.1.bn1.running_var"),
                                       ("mbf", "layers.4.layers.1.layers.2.weight")])
def test_a_nan_weight_is_refused_at_load_naming_the_file_and_tensor(tmp_path, name, key):
  template = _template(name, width=4, embedding_size=8)
  state_dict = tc.export_backbone(_random_variables(template))
  later = list(state_dict)[-2]  # A bad tensor further on is not the one named.
  state_dict[key] = state_dict[key].copy()
  state_dict[key][1] = np.nan
  state_dict[later] = np.full_like(state_dict[later], np.inf)
  path = tmp_path / "diverged.pth"
  tc.save_state_dict(path, state_dict)
  with pytest.raises(UserError) as info:
    tc.load_backbone(path, template)
  assert str(info.value) == (f"{path}: the checkpoint holds NaN in {key} (1 of "
                             f"{state_dict[key].size} values; a diverged run?); expected "
                             "finite weights: use an earlier checkpoint")


@pytest.mark.parametrize("name, settings, inferred", [
    ("iresnet50", dict(width=8, embedding_size=24, use_se=True),
     dict(arch="iresnet50", width=8, embedding_size=24, use_se=True, image_size=32)),
    ("mbf", dict(width=8, embedding_size=16),
     dict(arch="mbf", width=8, embedding_size=16, use_se=False, image_size=32)),
    ("mbf_large", dict(width=4, embedding_size=16),
     dict(arch="mbf_large", width=4, embedding_size=16, use_se=False, image_size=32)),
    ("mbf", dict(width=8, embedding_size=16, scale=3), {}),          # No registered name.
    ("iresnet18", dict(width=8, stage_depths=(1, 1, 1, 1)), {}),
])
def test_the_architecture_is_inferred_from_the_shapes(tmp_path, name, settings, inferred):
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _template(name, **settings))
  path = tmp_path / "model.pth"
  tc.save_state_dict(path, tc.export_backbone(variables))
  notes = []
  assert tc.infer_settings(path, log=notes.append) == inferred
  assert notes == ([f"note: {path}: no --arch given; its shapes say "
                    + " ".join(f"{k}={v}" for k, v in inferred.items())] if inferred else [])
  if inferred:  # What is inferred builds a model the file fits.
    tc.load_backbone(path, _template(inferred["arch"], width=inferred["width"],
                                     embedding_size=inferred["embedding_size"],
                                     use_se=inferred["use_se"]), log=None)
  # Our variables and their PyTorch state_dict are described alike.
  assert backbones.describe_variables(variables) == backbones.describe_state_dict(
      tc.load_state_dict(path))


def test_a_state_dict_of_no_known_backbone_infers_nothing(tmp_path):
  path = tmp_path / "other.pth"
  tc.save_state_dict(path, {"encoder.weight": np.ones((4, 3), np.float32)})
  assert tc.infer_settings(path, log=None) == {}
  with pytest.raises(UserError, match="no known backbone"):
    backbones.describe_state_dict(tc.load_state_dict(path))

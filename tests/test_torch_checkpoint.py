"""Tests for PyTorch backbone checkpoint import/export (interop/torch_checkpoint.py and the
files it rests on: pth_format, torch_names, torch_iresnet, torch_mbf, backbones).

The PyTorch references below follow insightface's IResNet and arcface_torch's
MobileFaceNet as their architectures are described; tests that need them skip when torch
is not installed.
"""

import collections
import functools
import math
import os
import pickle
import shlex
import zipfile
from typing import Any, Callable, NamedTuple

import jax
import ml_dtypes
import numpy as np
import pytest

from mstkd_jax import models
from mstkd_jax.errors import UserError
from mstkd_jax.interop import backbones, pth_format, torch_checkpoint as tc

WIDTH = 16
EMBEDDING = 64
IMAGE = 32  # Last feature map 2x2.
DEPTHS = (2, 2, 2, 2)  # iresnet18


def _torch_iresnet(torch, depths=DEPTHS, width=WIDTH, embedding_size=EMBEDDING,
                   image_size=IMAGE, use_se=False):
  """A PyTorch IResNet with insightface's layout and state_dict names."""
  nn = torch.nn

  def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

  class SEModule(nn.Module):
    """The authors' SE gate: bias-free 1x1 convs, reduction 16."""

    def __init__(self, channels):
      super().__init__()
      self.fc1 = nn.Conv2d(channels, channels // 16, 1, bias=False)
      self.fc2 = nn.Conv2d(channels // 16, channels, 1, bias=False)

    def forward(self, x):
      s = torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))
      return x * torch.sigmoid(self.fc2(s))

  class IBasicBlock(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
      self.conv1 = conv3x3(cin, cout)
      self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
      self.prelu = nn.PReLU(cout)
      self.conv2 = conv3x3(cout, cout, stride)
      self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                        nn.BatchNorm2d(cout, eps=1e-5))
      if use_se:
        self.se_block = SEModule(cout)

    def forward(self, x):
      out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
      if use_se:
        out = self.se_block(out)
      return out + (x if self.downsample is None else self.downsample(x))

  class IResNet(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = conv3x3(3, width)
      self.bn1 = nn.BatchNorm2d(width, eps=1e-5)
      self.prelu = nn.PReLU(width)
      cin = width
      for stage, depth in enumerate(depths):
        cout = width * 2**stage
        blocks = [IBasicBlock(cin if i == 0 else cout, cout, 2 if i == 0 else 1)
                  for i in range(depth)]
        setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        cin = cout
      self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
      self.dropout = nn.Dropout(0.0)
      self.fc = nn.Linear(cin * (image_size // 16)**2, embedding_size)
      self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
      nn.init.constant_(self.features.weight, 1.0)
      self.features.weight.requires_grad = False

    def forward(self, x):
      x = self.prelu(self.bn1(self.conv1(x)))
      for stage in range(len(depths)):
        x = getattr(self, f"layer{stage + 1}")(x)
      x = self.dropout(torch.flatten(self.bn2(x), 1))
      return self.features(self.fc(x))

  return IResNet()


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


def _saved_twin(torch, net, folder):
  """Randomizes `net`, saves its state_dict to folder/twin.pth; returns (path, NCHW images,
  the net's embeddings of them in eval mode)."""
  _randomize(torch, net)
  path = folder / "twin.pth"
  torch.save(net.state_dict(), path)
  images = _images()
  with torch.no_grad():
    return path, images, net(torch.from_numpy(images)).numpy()


# --- Reading what torch.save writes ----------------------------------------------------


def test_loader_rebuilds_dtypes_views_and_unwraps_module_prefix(tmp_path):
  torch = pytest.importorskip("torch")
  base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  tensors = {"transposed": base.t(), "offset_view": base[1:, 2:],
             "half": torch.randn(5).half(), "bfloat16": torch.randn(5).bfloat16(),
             "scalar_long": torch.tensor(7), "empty": torch.zeros(0, 3),
             "parameter": torch.nn.Parameter(torch.ones(2))}
  path = tmp_path / "wrapped.pth"
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tensors.items()}},
             path)
  loaded = tc.load_state_dict(path)
  assert list(loaded) == list(tensors)
  for key, tensor in tensors.items():
    expected = tensor.detach().float().numpy()
    assert loaded[key].shape == expected.shape, key
    np.testing.assert_array_equal(np.asarray(loaded[key], np.float32), expected, err_msg=key)
  assert loaded["bfloat16"].dtype.name == "bfloat16"
  assert loaded["scalar_long"].dtype == np.int64


def test_legacy_format_is_refused_with_resave_hint(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "legacy.pth"
  torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
  with pytest.raises(UserError, match="legacy") as info:
    tc.load_state_dict(path)
  assert str(path) in str(info.value) and "torch.save" in str(info.value)


# --- Import: same embeddings as PyTorch ------------------------------------------------


@pytest.mark.parametrize("use_se", [False, True])
def test_imported_checkpoint_gives_pytorch_embeddings(tmp_path, use_se):
  torch = pytest.importorskip("torch")
  path, images, reference = _saved_twin(torch, _torch_iresnet(torch, use_se=use_se), tmp_path)
  flax = _flax(use_se=use_se)
  ours = flax.embed(tc.load_iresnet(path, flax.template), images)
  assert _max_relative_error(ours, reference) < 1e-4


def test_exported_checkpoint_gives_same_embeddings_in_pytorch(tmp_path):
  torch = pytest.importorskip("torch")
  flax = _flax()
  variables = _random_variables(flax.template)
  path = tmp_path / "exported.pth"
  tc.save_state_dict(path, tc.export_iresnet(variables))

  net = _torch_iresnet(torch)
  net.load_state_dict(torch.load(path, weights_only=True), strict=True)
  images = _images(seed=1)
  with torch.no_grad():
    reference = net.eval()(torch.from_numpy(images)).numpy()
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


class _Payload:
  """Pickles as a call of `function(*args)`: what a malicious checkpoint would run."""

  def __init__(self, function, *args):
    self.function, self.args = function, args

  def __reduce__(self):
    return self.function, self.args


def _zip_with_pickle(path, data_pkl: bytes):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", data_pkl)
    archive.writestr("archive/version", "3\n")


@pytest.mark.parametrize("attack", ["open", "system", "eval", "nested"])
def test_malicious_pickle_is_refused_before_it_runs(tmp_path, attack):
  marker = tmp_path / "marker"
  payloads = {
      "open": _Payload(open, str(marker), "w"),
      "system": _Payload(os.system, f"touch {shlex.quote(str(marker))}"),
      "eval": _Payload(eval, f"open({str(marker)!r}, 'w')"),
      "nested": collections.OrderedDict(
          [("conv1.weight", 1.0), ("bn1.weight", _Payload(open, str(marker), "w"))]),
  }
  function = {"system": os.system, "eval": eval}.get(attack, open)
  path = tmp_path / "evil.pth"
  _zip_with_pickle(path, pickle.dumps(payloads[attack], protocol=2))
  with pytest.raises(UserError) as info:
    tc.load_state_dict(path)
  message = str(info.value)
  assert str(path) in message
  assert f"refused to load the global" in message
  assert f".{function.__name__}" in message  # Protocol 2 spells builtins __builtin__.
  assert not marker.exists()


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


@pytest.fixture(name="saved")
def _saved(tmp_path):
  path = tmp_path / "good.pth"
  tc.save_state_dict(path, {"w": np.arange(4096, dtype=np.float32)})
  return path.read_bytes()


@pytest.mark.parametrize("damage, expected", [
    (lambda data: data[:len(data) // 2], "truncated"),
    (lambda data: data[:-10], "zip"),
    (lambda data: data.replace(np.float32(7).tobytes(), b"\0\0\0\0", 1), "CRC"),
    (lambda data: b"not a checkpoint at all", "not a PyTorch checkpoint"),
    (lambda data: pth_format._LEGACY_MAGIC + b"rest", "legacy"),
    (lambda data: b"", "not a PyTorch checkpoint"),
])
def test_damaged_file_error_names_the_file(tmp_path, saved, damage, expected):
  path = tmp_path / "damaged.pth"
  path.write_bytes(damage(saved))
  with pytest.raises(UserError, match=expected) as info:
    tc.load_state_dict(path)
  assert str(path) in str(info.value)


def test_missing_file_error_names_the_file(tmp_path):
  with pytest.raises(UserError, match="missing.pth"):
    tc.load_state_dict(tmp_path / "missing.pth")


def test_pickle_cannot_modify_the_loader(tmp_path):
  # GLOBAL torch._utils._rebuild_tensor_v2, then BUILD with slot state {"_function": "x"}.
  data = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\t\x00\x00\x00_function"
          b"X\x01\x00\x00\x00xs\x86b.")
  path = tmp_path / "tamper.pth"
  _zip_with_pickle(path, data)
  with pytest.raises(UserError, match="tamper.pth"):
    tc.load_state_dict(path)
  rebuild = pth_format._SAFE_GLOBALS[("torch._utils", "_rebuild_tensor_v2")]
  assert getattr(rebuild, "_function", None) != "x"
  good = tmp_path / "good.pth"
  tc.save_state_dict(good, {"w": np.ones(3, np.float32)})
  np.testing.assert_array_equal(tc.load_state_dict(good)["w"], np.ones(3, np.float32))


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
  net = _randomize(torch, _torch_iresnet(torch))
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


@pytest.mark.parametrize("key", tc.STATE_DICT_KEYS)
def test_state_dict_found_under_common_keys(tmp_path, key):
  torch = pytest.importorskip("torch")
  tensors = {"w": torch.arange(3.0), "b": torch.ones(2, dtype=torch.int64)}
  path = tmp_path / f"{key}.pth"
  torch.save({"epoch": 1, "best_acc": 0.5, "args": {"lr": 0.1, "steps": [1, 2]},
              key: {f"module.{k}": v for k, v in tensors.items()}}, path)
  state_dict, note = tc.read_state_dict(path)
  assert note == f"state_dict under [{key!r}], 'module.' prefix removed"
  assert list(state_dict) == ["w", "b"]
  np.testing.assert_array_equal(state_dict["w"], [0.0, 1.0, 2.0])
  assert state_dict["b"].dtype == np.int64
  # The most specific key wins; nesting is followed.
  path = tmp_path / "nested.pth"
  torch.save({"model": {"state_dict": tensors}, "state_dict_backbone_ema": {}}, path)
  assert tc.read_state_dict(path)[1] == "state_dict under ['model']['state_dict']"
  path = tmp_path / "plain.pth"
  torch.save(tensors, path)
  assert tc.read_state_dict(path)[1] == ""


def test_checkpoint_without_a_known_key_lists_what_it_holds(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "ema.pth"
  torch.save({"epoch": 1, "ema_weights": {"w": torch.ones(2)}, "head": {"x": torch.ones(1)}},
             path)
  with pytest.raises(UserError) as info:
    tc.load_state_dict(path)
  message = str(info.value)
  assert message.startswith(f"{path}: expected a state_dict")
  assert "'state_dict_backbone'" in message and "'model'" in message
  assert "found dicts of tensors under 'ema_weights', 'head'" in message
  path = tmp_path / "model_list.pth"
  torch.save({"model": [torch.ones(1)]}, path)
  with pytest.raises(UserError, match="found non-tensor entries 'model'"):
    tc.load_state_dict(path)


def test_checkpoint_extras_still_run_nothing(tmp_path):
  # The optimizer part of a checkpoint is read by the same restricted unpickler.
  marker = tmp_path / "marker"
  payload = {"state_dict_backbone": collections.OrderedDict(), "state_optimizer":
             {"state": {0: _Payload(os.system, f"touch {shlex.quote(str(marker))}")}}}
  path = tmp_path / "evil.pt"
  _zip_with_pickle(path, pickle.dumps(payload, protocol=2))
  with pytest.raises(UserError, match="refused to load the global .*system"):
    tc.load_state_dict(path)
  assert not marker.exists()


# --- MobileFaceNet (arcface_torch's mbf) -----------------------------------------------

MBF = dict(width=8, scale=2, blocks=(2, 1, 1, 1), embedding_size=16)  # 32x32: a 2x2 GDC


def _torch_mobilefacenet(torch, width=8, scale=2, blocks=(2, 1, 1, 1), embedding_size=16,
                         image_size=IMAGE):
  """A PyTorch MobileFaceNet with arcface_torch's layout and state_dict names: every
  block an nn.Sequential named `layers`; ConvBlock = conv (no bias), BatchNorm2d, PReLU;
  LinearBlock = conv, BatchNorm2d; DepthWise = ConvBlock 1x1 to its groups, ConvBlock 3x3
  depthwise (stride), LinearBlock 1x1 (+ input where residual); GDC = LinearBlock over the
  whole last map (7x7 at 112x112) in 8 x width groups, flatten, Linear without bias,
  BatchNorm1d. Channel counts as arcface_torch's for width 64."""
  nn = torch.nn

  def conv_block(cin, cout, kernel=1, stride=1, padding=0, groups=1, prelu=True):
    block = nn.Module()
    parts = [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
             nn.BatchNorm2d(cout)]
    block.layers = nn.Sequential(*parts, *([nn.PReLU(cout)] if prelu else []))
    block.forward = block.layers.forward
    return block

  class DepthWise(nn.Module):

    def __init__(self, cin, cout, groups, stride=1, residual=False):
      super().__init__()
      self.residual = residual
      self.layers = nn.Sequential(conv_block(cin, groups),
                                  conv_block(groups, groups, 3, stride, 1, groups),
                                  conv_block(groups, cout, prelu=False))

    def forward(self, x):
      return x + self.layers(x) if self.residual else self.layers(x)

  def residual(channels, depth, groups):
    block = nn.Module()
    block.layers = nn.Sequential(*[DepthWise(channels, channels, groups, residual=True)
                                   for _ in range(depth)])
    block.forward = block.layers.forward
    return block

  class MobileFaceNet(nn.Module):

    def __init__(self):
      super().__init__()
      w, s, side = width, scale, image_size // 16
      self.layers = nn.ModuleList([
          conv_block(3, w * s, 3, 2, 1),
          conv_block(w * s, w * s, 3, 1, 1, groups=w) if blocks[0] == 1
          else residual(w * s, blocks[0], 2 * w),
          DepthWise(w * s, w * s, 2 * w, stride=2), residual(w * s, blocks[1], 2 * w),
          DepthWise(w * s, 2 * w * s, 4 * w, stride=2), residual(2 * w * s, blocks[2], 4 * w),
          DepthWise(2 * w * s, 2 * w * s, 8 * w, stride=2),
          residual(2 * w * s, blocks[3], 4 * w)])
      self.conv_sep = conv_block(2 * w * s, 8 * w)
      self.features = nn.Module()
      self.features.layers = nn.Sequential(
          conv_block(8 * w, 8 * w, side, groups=8 * w, prelu=False), nn.Flatten(),
          nn.Linear(8 * w, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))

    def forward(self, x):
      for layer in self.layers:
        x = layer(x)
      return self.features.layers(self.conv_sep(x))

  return MobileFaceNet()


@functools.cache
def _mbf_flax(blocks=MBF["blocks"]) -> _Flax:
  model = models.create("mbf", **dict(MBF, blocks=blocks))
  template = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, IMAGE, IMAGE, 3)))
  apply = jax.jit(functools.partial(model.apply, train=False))
  embed = lambda variables, images: np.asarray(apply(variables, images.transpose(0, 2, 3, 1)))
  return _Flax(model, template, embed)


# The stem: a grouped ConvBlock (blocks[0] == 1) or residual DepthWise blocks.
@pytest.mark.parametrize("blocks", [(1, 2, 1, 1), (2, 1, 1, 1)])
def test_imported_mbf_gives_pytorch_embeddings(tmp_path, blocks):
  torch = pytest.importorskip("torch")
  net = _torch_mobilefacenet(torch, blocks=blocks)
  path, images, reference = _saved_twin(torch, net, tmp_path)
  flax = _mbf_flax(blocks)
  ours = flax.embed(tc.load_mbf(path, flax.template), images)
  # float32 both sides, ~20 layers: summation-order differences of ~1e-7 relative per
  # layer (BatchNorm folds, grouped-conv accumulation) stay well under 1e-4.
  assert _max_relative_error(ours, reference) < 1e-4
  assert list(tc.export_mbf(tc.load_mbf(path, flax.template))) == list(net.state_dict())


def test_exported_mbf_gives_same_embeddings_in_pytorch(tmp_path):
  torch = pytest.importorskip("torch")
  flax = _mbf_flax()
  variables = _random_variables(flax.template, seed=3)
  path = tmp_path / "mbf_exported.pth"
  tc.save_state_dict(path, tc.export_backbone(variables))
  net = _torch_mobilefacenet(torch)
  net.load_state_dict(torch.load(path, weights_only=True), strict=True)
  images = _images(seed=1)
  with torch.no_grad():
    reference = net.eval()(torch.from_numpy(images)).numpy()
  assert _max_relative_error(flax.embed(variables, images), reference) < 1e-4
  imported = tc.import_backbone(tc.load_state_dict(path), flax.template)
  jax.tree.map(np.testing.assert_array_equal, imported, variables)


def test_a_pth_of_the_other_family_says_what_it_looks_like():
  state_dict = tc.export_mbf(_random_variables(_mbf_flax().template))
  with pytest.raises(UserError) as info:
    tc.import_backbone(state_dict, _flax().template, source="mbf.pth")
  message = str(info.value)
  assert message.startswith("mbf.pth does not fit this IResNet")
  assert ("the checkpoint looks like: MobileFaceNet blocks (2, 1, 1, 1), scale 2, width 8, "
          "embedding_size 16, input size 32") in message
  with pytest.raises(UserError, match="r18.pth does not fit this MobileFaceNet"):
    tc.import_backbone(tc.export_iresnet(_random_variables(_flax().template)),
                       _mbf_flax().template, source="r18.pth")


# --- NaN / Inf, and what a state_dict is -----------------------------------------------


@pytest.mark.parametrize("family, key", [("iresnet", "layer2.1.bn1.running_var"),
                                         ("mbf", "layers.4.layers.1.layers.2.weight")])
def test_a_nan_weight_is_refused_at_load_naming_the_file_and_tensor(tmp_path, family, key):
  template = (_flax() if family == "iresnet" else _mbf_flax()).template
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


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_every_float_dtype_is_checked_and_integers_are_not(tmp_path, dtype):
  path = tmp_path / "half.pth"
  tc.save_state_dict(path, {"bn.num_batches_tracked": np.array(-1, np.int64),
                            "w": np.array([1.0, np.inf], dtype)})
  with pytest.raises(UserError, match="half.pth: the checkpoint holds Inf in w "):
    tc.check_finite(tc.load_state_dict(path), str(path))


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
  model = models.create(name, **settings)
  template = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, IMAGE, IMAGE, 3)))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  path = tmp_path / "model.pth"
  tc.save_state_dict(path, tc.export_backbone(variables))
  notes = []
  assert tc.infer_settings(path, log=notes.append) == inferred
  assert notes == ([f"note: {path}: no --arch given; its shapes say "
                    + " ".join(f"{k}={v}" for k, v in inferred.items())] if inferred else [])
  if inferred:  # What is inferred builds a model the file fits.
    built = models.create(inferred["arch"], width=inferred["width"],
                          embedding_size=inferred["embedding_size"], use_se=inferred["use_se"])
    tc.load_backbone(path, jax.eval_shape(built.init, jax.random.key(0),
                                          np.zeros((1, IMAGE, IMAGE, 3))), log=None)
  # Our variables and their PyTorch state_dict are described alike.
  assert backbones.describe_variables(variables) == backbones.describe_state_dict(
      tc.load_state_dict(path))


def test_a_state_dict_of_no_known_backbone_infers_nothing(tmp_path):
  path = tmp_path / "other.pth"
  tc.save_state_dict(path, {"encoder.weight": np.ones((4, 3), np.float32)})
  assert tc.infer_settings(path, log=None) == {}
  with pytest.raises(UserError, match="no known backbone"):
    backbones.describe_state_dict(tc.load_state_dict(path))

"""MobileFaceNet ("mbf"): shapes and parameter counts counted independently from the
architecture; the network in our training step where an IResNet goes (built from a model
config section, BatchNorm over every device); and a PyTorch twin with arcface_torch's
layout and names, written here from the architecture's description, giving the embeddings
of our import and taking our export. Its ONNX export is test_export's.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mstkd_jax import losses, models
from mstkd_jax.errors import UserError
from mstkd_jax.interop import torch_checkpoint as tc
from mstkd_jax.train import build, parallel as parallel_lib, state as state_lib, steps

from test_torch_checkpoint import (IMAGE, _Flax, _exported_in_twin, _flax,
                                   _max_relative_error, _random_variables, _saved_twin)

TINY = dict(width=4, scale=1, blocks=(1, 1, 1, 1), embedding_size=8)


def _shapes(name, size=112, **kwargs):
  model = models.create(name, **kwargs)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def mobilefacenet_trainable_parameters(blocks, scale, width=64, embedding=512,
                                       input_size=112):
  """Trainable parameters of arcface_torch's MobileFaceNet, counted block by block from
  its definition: bias-free convs ([out, in / groups, k, k]), BatchNorm weight + bias,
  per-channel PReLU, a bias-free linear layer and a BatchNorm1d with weight and bias."""
  def conv_block(cin, cout, k=1, groups=1, prelu=True):
    return cout * (cin // groups) * k * k + 2 * cout + (cout if prelu else 0)

  def depthwise(cin, cout, hidden):
    return (conv_block(cin, hidden) + conv_block(hidden, hidden, 3, hidden)
            + conv_block(hidden, cout, prelu=False))

  w, s = width, scale
  total = conv_block(3, w * s, 3)
  total += (conv_block(w * s, w * s, 3, groups=w) if blocks[0] == 1
            else blocks[0] * depthwise(w * s, w * s, 2 * w))
  total += depthwise(w * s, w * s, 2 * w) + blocks[1] * depthwise(w * s, w * s, 2 * w)
  total += depthwise(w * s, 2 * w * s, 4 * w) + blocks[2] * depthwise(2 * w * s, 2 * w * s,
                                                                       4 * w)
  total += depthwise(2 * w * s, 2 * w * s, 8 * w) + blocks[3] * depthwise(2 * w * s,
                                                                          2 * w * s, 4 * w)
  total += conv_block(2 * w * s, 8 * w)                                    # conv_sep
  side = input_size // 16
  total += conv_block(8 * w, 8 * w, side, groups=8 * w, prelu=False)       # GDC depthwise
  return total + 8 * w * embedding + 2 * embedding                         # linear, BN1d


@pytest.mark.parametrize("name, blocks, scale", [("mbf", (1, 4, 6, 2), 2),
                                                 ("mbf_large", (2, 8, 12, 4), 4)])
def test_parameter_count_equals_arcface_torch(name, blocks, scale):
  assert _count(_shapes(name)["params"]) == mobilefacenet_trainable_parameters(blocks, scale)


def test_known_size():
  # arcface_torch's get_mbf(fp16=False, num_features=512): 2.06M parameters.
  assert _count(_shapes("mbf")["params"]) == 2_059_520


@pytest.mark.parametrize("size", [16, 32, 64, 112])
def test_global_depthwise_kernel_spans_the_last_map(size):
  shapes = _shapes("mbf", size=size, **TINY)
  kernel = shapes["params"]["features"]["layers_0"]["layers_0"]["kernel"]
  assert kernel.shape == (size // 16, size // 16, 1, 32)
  assert _count(shapes["params"]) == mobilefacenet_trainable_parameters(
      TINY["blocks"], 1, width=4, embedding=8, input_size=size)
  model = models.create("mbf", **TINY)
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  out = jax.eval_shape(lambda: model.apply(variables, jnp.zeros((2, size, size, 3))))
  assert out.shape == (2, 8) and out.dtype == jnp.float32


def test_width_and_scale_set_every_channel_count():
  params = _shapes("mbf", size=32, width=8, embedding_size=16)["params"]  # scale 2
  assert params["layers_0"]["layers_0"]["kernel"].shape == (3, 3, 3, 16)
  assert params["layers_1"]["layers_0"]["kernel"].shape == (3, 3, 2, 16)  # 8 groups
  assert params["layers_4"]["layers_1"]["layers_0"]["kernel"].shape == (3, 3, 1, 32)
  assert params["layers_6"]["layers_2"]["layers_0"]["kernel"].shape == (1, 1, 64, 32)
  assert params["conv_sep"]["layers_0"]["kernel"].shape == (1, 1, 32, 64)
  assert params["features"]["layers_2"]["kernel"].shape == (64, 16)
  assert "bias" not in params["features"]["layers_2"]
  assert set(params["features"]["layers_3"]) == {"scale", "bias"}
  large = _shapes("mbf", size=32, width=8, embedding_size=16, blocks=(2, 1, 1, 1))["params"]
  assert len(large["layers_1"]) == 2 and "layers_2" in large["layers_1"]["layers_0"]


def test_settings_an_mbf_cannot_take_are_refused_by_name():
  with pytest.raises(UserError, match="use_se=True: MobileFaceNet has no squeeze"):
    models.create("mbf", use_se=True)
  with pytest.raises(UserError, match="blocks=.*expected 4 stages"):
    models.create("mbf", blocks=(1, 2, 3))
  model = models.create("mbf", **TINY)
  with pytest.raises(ValueError, match="multiples of 16"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 40, 40, 3)))
  assert {"mbf", "mbf_large"} <= set(models.backbone_names())
  assert "adaptor" not in models.backbone_names()


def test_bfloat16_trunk_keeps_float32_parameters_embedding_and_statistics():
  model = models.create("mbf", dtype=jnp.bfloat16, **TINY)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)))
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  jaxpr = jax.make_jaxpr(apply)(variables, jnp.ones((2, 16, 16, 3)))
  convs = [tuple(str(v.aval.dtype) for v in e.invars) for e in jaxpr.jaxpr.eqns
           if e.primitive.name == "conv_general_dilated"]
  # The trunk: 2 ConvBlocks, then 3 strided and 3 residual DepthWise blocks of 3 convs
  # each, in bfloat16; conv_sep and the global depthwise conv in float32.
  assert convs == [("bfloat16",) * 2] * 20 + [("float32",) * 2] * 2
  out, stats = jax.eval_shape(apply, variables, jnp.ones((2, 16, 16, 3)))
  assert out.dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(stats)} == {jnp.dtype(jnp.float32)}


def _teacher_step(devices: int, batch: int = 8):
  """One teacher classification step on an mbf built from a model config section, pmapped
  over `devices`; returns (initial variables, final state, loss)."""
  config = ml_collections.ConfigDict(dict(name="mbf", width=4, embedding_size=8,
                                          use_se=False, dtype="float32", dropout=None))
  backbone = build.backbone(config, scale=1, blocks=(1, 1, 1, 1))
  head = models.create("margin_head", num_classes=5)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  variables = build.init_variables(backbone, k1, np.zeros((1, 16, 16, 3), np.float32))
  head_vars = build.init_variables(head, k2, np.zeros((1, 8), np.float32))
  schedule = state_lib.step_decay_schedule(0.1, 10, ())
  tx = state_lib.sgd({"backbone": state_lib.ParamGroup(schedule, 5.0),
                      "head": state_lib.ParamGroup(schedule)})
  state = state_lib.create_state({"backbone": variables["params"], "head": head_vars["params"]},
                                 variables["batch_stats"], tx)
  step = functools.partial(steps.classification_step, backbone=backbone, head=head,
                           margin=losses.MarginSpec("arcface"), tx=tx, schedule=schedule)
  par = parallel_lib.DataParallel("pmap", devices)
  data = np.random.default_rng(0)
  images = data.uniform(-1, 1, (devices, batch // devices, 16, 16, 3)).astype(np.float32)
  labels = data.integers(0, 5, (devices, batch // devices)).astype(np.int32)
  new_state, metrics = par.wrap(step)(par.replicate(jax.tree.map(np.asarray, state)),
                                      par.shard({"image": images, "label": labels}),
                                      par.replicate(jax.random.PRNGKey(1)))
  return variables, par.unreplicate(new_state), float(par.unreplicate(metrics)["loss"])


def _changed(before, after) -> list[float]:
  return jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before, after))


def test_an_mbf_from_a_model_config_trains_in_the_teacher_step():
  # (The one compiled training step of this file, backward pass included: ~20 s on the 2
  # CPU cores shared with other work here; what "works in our training step" costs.)
  initial, state, loss = _teacher_step(2)
  assert np.isfinite(loss) and loss > 0
  assert min(_changed(initial["params"], state.params["backbone"])) > 0
  assert min(_changed(initial["batch_stats"], state.batch_stats)) > 0  # every BatchNorm


def _train_forward(devices: int):
  """Training-mode forward of the same 8 images over `devices` pmapped devices, BatchNorm
  averaged over them: (embeddings [8, D], updated batch_stats)."""
  model = models.create("mbf", axis_name=parallel_lib.AXIS, **TINY)
  variables = build.init_variables(model, jax.random.PRNGKey(0),
                                   np.zeros((1, 16, 16, 3), np.float32))
  images = np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
  par = parallel_lib.DataParallel("pmap", devices)
  forward = par.wrap_apply(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  out, updated = forward(par.replicate(variables),
                         par.shard(images.reshape(devices, 8 // devices, 16, 16, 3)))
  return np.asarray(out).reshape(8, -1), jax.tree.map(lambda x: np.asarray(x)[0], updated)


def test_batchnorm_statistics_are_those_of_the_whole_batch_on_any_device_count():
  out_one, stats_one = _train_forward(1)
  out_four, stats_four = _train_forward(4)
  # Every BatchNorm averages over all devices (axis_name), so splitting the batch changes
  # only the float32 summation order: ~1e-7 relative per reduction, a few dozen layers deep.
  assert _relative_difference(out_one, out_four) < 1e-5
  assert _relative_difference(stats_one, stats_four) < 1e-5


def _relative_difference(a, b) -> float:
  """max |a - b| / max |a| over a whole pytree."""
  diff = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return diff / max(float(np.abs(x).max()) for x in jax.tree.leaves(a))


# --- The PyTorch twin: import and export -----------------------------------------------


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
  images, reference = _exported_in_twin(torch, _torch_mobilefacenet(torch),
                                        tc.export_backbone(variables), path)
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

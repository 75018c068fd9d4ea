"""IResNet shapes and parameter counts, counted independently from the architecture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mstkd_jax import models
from mstkd_jax.errors import UserError
from mstkd_jax.models import iresnet
from mstkd_jax.train import build

DEPTHS = {"iresnet18": [2, 2, 2, 2], "iresnet34": [3, 4, 6, 3], "iresnet50": [3, 4, 14, 3],
          "iresnet100": [3, 13, 30, 3]}


def _shapes(name, size=112, **kwargs):
  model = models.create(name, **kwargs)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((2, size, size, 3))))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def insightface_trainable_parameters(depths, width=64, embedding=512, input_size=112,
                                     use_se=False):
  """Trainable parameters of insightface's IResNet, counted layer by layer from its
  definition: conv weights (no biases), BN weight + bias, per-channel PReLU, fc weight +
  bias; the `features` BatchNorm1d trains only its bias (its weight is frozen at 1)."""
  bn = lambda c: 2 * c
  total = 3 * 3 * 3 * width + bn(width) + width            # conv1, bn1, prelu
  c_in = width
  for stage, depth in enumerate(depths):
    c = width * 2 ** stage
    for block in range(depth):
      total += bn(c_in) + 9 * c_in * c + bn(c) + c + 9 * c * c + bn(c)
      if use_se:
        total += c * (c // 16) * 2
      if block == 0:                                        # stride 2: downsample
        total += c_in * c + bn(c)
      c_in = c
  spatial = (input_size // 16) ** 2
  total += bn(c_in) + c_in * spatial * embedding + embedding  # bn2, fc
  total += embedding                                        # features.bias
  return total


@pytest.mark.parametrize("name", ["iresnet34", "iresnet50", "iresnet100"])
def test_parameter_count_equals_insightface(name):
  assert _count(_shapes(name)["params"]) == insightface_trainable_parameters(DEPTHS[name])


def test_known_sizes():
  # Sizes insightface reports for its IResNets (trainable, 112x112, 512-D).
  assert round(_count(_shapes("iresnet50")["params"]) / 1e6, 1) == 43.6
  assert round(_count(_shapes("iresnet100")["params"]) / 1e6, 1) == 65.2


def test_se_blocks_add_their_gates():
  shapes = _shapes("iresnet18", size=32, width=32, embedding_size=64, use_se=True)
  assert _count(shapes["params"]) == insightface_trainable_parameters(
      DEPTHS["iresnet18"], width=32, embedding=64, input_size=32, use_se=True)


@pytest.mark.parametrize("size", [16, 32, 64, 112])
def test_flatten_size_follows_input(size):
  shapes = _shapes("iresnet18", size=size, width=8, embedding_size=32)
  assert shapes["params"]["fc"]["kernel"].shape == ((size // 16) ** 2 * 64, 32)
  model = models.create("iresnet18", width=8, embedding_size=32)
  out = jax.eval_shape(lambda: model.apply(
      jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
      jnp.zeros((2, size, size, 3))))
  assert out.shape == (2, 32) and out.dtype == jnp.float32


def test_width_scales_every_stage():
  params = _shapes("iresnet18", size=32, width=16, embedding_size=32)["params"]
  assert params["conv1"]["kernel"].shape == (3, 3, 3, 16)
  assert params["layer4_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert params["prelu"]["alpha"].shape == (16,)
  assert "scale" not in params["features"] and params["features"]["bias"].shape == (32,)


def test_bfloat16_compute_keeps_float32_parameters_and_output():
  model = models.create("iresnet18", width=8, embedding_size=16, dtype=jnp.bfloat16)
  variables = build.init_variables(model, jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)))
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, jnp.ones((2, 16, 16, 3)))
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


def test_prelu_is_per_channel():
  prelu = iresnet.PReLU()
  x = jnp.asarray([[-2.0, -1.0, 3.0]])
  params = {"params": {"alpha": jnp.asarray([0.5, 0.25, 0.1])}}
  np.testing.assert_allclose(prelu.apply(params, x), [[-1.0, -0.25, 3.0]])


def test_input_not_multiple_of_16_is_refused():
  model = models.create("iresnet18", width=8)
  with pytest.raises(ValueError, match="multiples of 16"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 40, 40, 3)))


def test_unknown_model_name_lists_the_known_ones():
  with pytest.raises(UserError, match="iresnet34"):
    models.create("resnet34")

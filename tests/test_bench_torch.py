"""The benchmark's PyTorch twin (mstkd_jax/bench_torch.py) is our IResNet: it loads our
exported .pth and gives our embeddings. Skipped when PyTorch is not installed."""

import math

import jax
import numpy as np
import pytest

from mstkd_jax.interop import torch_checkpoint
from mstkd_jax.models import iresnet

DEPTHS = (2, 2, 2, 2)  # iresnet18
WIDTH = 8
EMBEDDING = 32
IMAGE = 32             # last feature map 2x2


def _random_variables(model, seed=0):
  """Random variables for `model`, drawn without compiling its init: every 1-D leaf
  (BatchNorm scales, biases and statistics, PReLU slopes, fc bias) uniform in [0.5, 1.5],
  so that a mix-up of any two tensors shows, and kernels normal with variance 0.5 / fan-in,
  which keeps the embeddings near 1 (He's 2 / fan-in makes them thousands)."""
  template = jax.eval_shape(model.init, jax.random.key(0),
                            np.zeros((1, IMAGE, IMAGE, 3), np.float32))
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if len(leaf.shape) == 1:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    fan_in = math.prod(leaf.shape[:-1])
    return rng.normal(0.0, math.sqrt(0.5 / fan_in), leaf.shape).astype(leaf.dtype)

  return jax.tree.map(draw, template)


def test_bench_torch_iresnet_loads_our_export_and_gives_our_embeddings(tmp_path):
  torch = pytest.importorskip("torch")
  from mstkd_jax import bench_torch  # pylint: disable=g-import-not-at-top  (needs torch)

  model = iresnet.IResNet(stage_depths=DEPTHS, width=WIDTH, embedding_size=EMBEDDING)
  variables = _random_variables(model)
  path = tmp_path / "ours.pth"
  torch_checkpoint.save_state_dict(path, torch_checkpoint.export_iresnet(variables))

  twin = bench_torch.IResNet(DEPTHS, WIDTH, EMBEDDING, image_size=IMAGE)
  twin.load_state_dict(torch.load(path, weights_only=True), strict=True)
  images = np.random.default_rng(1).uniform(-1, 1, (4, IMAGE, IMAGE, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = twin.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  ours = np.asarray(jax.jit(model.apply, static_argnames="train")(variables, images,
                                                                  train=False))
  assert theirs.shape == ours.shape == (4, EMBEDDING)
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())

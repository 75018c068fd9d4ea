"""IResNet (insightface's "improved ResNet") face-embedding backbones, as pure Flax modules.

Layer for layer as insightface's iresnet.py (the teachers and students of MST-KD), with
submodule names that mirror its PyTorch state_dict (conv1, bn1, prelu, layer1_0, ...), so
that `interop/` maps checkpoints one-to-one. Inputs are NHWC images in [-1, 1].
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DEPTHS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}

# Dropout before the embedding layer where a config leaves it unset: the paper's (and the
# released code's) 0.4 for IResNet-50; none for the others.
STANDARD_DROPOUT = {"iresnet50": 0.4}

# insightface: nn.BatchNorm2d(eps=1e-05, momentum=0.1); PyTorch's momentum weighs the new
# batch, Flax's weighs the running average.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
# insightface initialises every conv weight N(0, 0.1) and BN to (1, 0); its fc is PyTorch's
# default Linear init, uniform(+-1/sqrt(fan_in)) for weight and bias.
CONV_INIT = nn.initializers.normal(stddev=0.1)
FC_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _fc_bias_init(fan_in):
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / fan_in ** 0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class PReLU(nn.Module):
  """Per-channel PReLU (PyTorch's nn.PReLU(num_parameters=C), slopes initialised 0.25)."""

  @nn.compact
  def __call__(self, x):
    alpha = self.param("alpha", nn.initializers.constant(0.25), (x.shape[-1],),
                       jnp.float32)
    return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


def conv3x3(features, stride, dtype, name):
  # Explicit padding 1 as PyTorch: "SAME" would pad stride-2 convs asymmetrically.
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                 use_bias=False, kernel_init=CONV_INIT, dtype=dtype, name=name)


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation gate (global pool, 1x1 conv down, ReLU, 1x1 conv up, sigmoid)."""
  reduction: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.Conv(max(channels // self.reduction, 1), (1, 1), use_bias=False,
                kernel_init=CONV_INIT, dtype=self.dtype, name="fc1")(s)
    s = nn.relu(s)
    s = nn.Conv(channels, (1, 1), use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype,
                name="fc2")(s)
    return x * nn.sigmoid(s)


class IBasicBlock(nn.Module):
  """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN (-> SE), plus the shortcut."""
  features: int
  stride: int
  use_se: bool = False
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
        dtype=self.dtype, axis_name=self.axis_name if train else None, name=name)
    shortcut = x
    y = norm("bn1")(x)
    y = conv3x3(self.features, 1, self.dtype, "conv1")(y)
    y = norm("bn2")(y)
    y = PReLU(name="prelu")(y)
    y = conv3x3(self.features, self.stride, self.dtype, "conv2")(y)
    y = norm("bn3")(y)
    if self.use_se:
      y = SqueezeExcite(dtype=self.dtype, name="se")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), strides=(self.stride, self.stride),
                         use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype,
                         name="downsample_conv")(x)
      shortcut = norm("downsample_bn")(shortcut)
    return y + shortcut


class IResNet(nn.Module):
  """IResNet backbone returning the (unnormalized) embedding, float32 [B, embedding_size].

  Attributes:
    stage_depths: IBasicBlocks per stage, e.g. (3, 4, 6, 3) for IResNet-34.
    width: channels of the stem and first stage (64 in the paper); stages use
      width x (1, 2, 4, 8). Smaller widths make CPU-sized nets.
    embedding_size: size of the embedding (512 in the paper).
    dropout: dropout rate before the embedding layer (0.4 for IResNet-50 in the paper).
    use_se: adds squeeze-and-excitation gates to every block.
    dtype: compute dtype of the convolutions (parameters and BN statistics stay float32).
    axis_name: mapped axis over which BatchNorm averages batch statistics in training, so
      the statistics, and so the results, do not depend on the number of devices.
  """
  stage_depths: Sequence[int]
  width: int = 64
  embedding_size: int = 512
  dropout: float = 0.0
  use_se: bool = False
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"IResNet expects NHWC RGB images, got shape {images.shape}")
    if images.shape[1] % 16 or images.shape[2] % 16:
      raise ValueError(f"IResNet input height and width must be multiples of 16, got "
                       f"{images.shape[1:3]}")
    norm = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
        dtype=self.dtype, axis_name=self.axis_name if train else None, name=name)
    x = images.astype(self.dtype)
    x = conv3x3(self.width, 1, self.dtype, "conv1")(x)
    x = norm("bn1")(x)
    x = PReLU(name="prelu")(x)
    for stage, depth in enumerate(self.stage_depths):
      features = self.width * 2 ** stage
      for i in range(depth):
        x = IBasicBlock(features, stride=2 if i == 0 else 1, use_se=self.use_se,
                        dtype=self.dtype, axis_name=self.axis_name,
                        name=f"layer{stage + 1}_{i}")(x, train)
    x = norm("bn2")(x)
    # Flattened in HWC order; interop/ permutes PyTorch's CHW-ordered fc weights.
    x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(x)
    x = nn.Dense(self.embedding_size, kernel_init=FC_INIT,
                 bias_init=_fc_bias_init(x.shape[-1]), dtype=self.dtype, name="fc")(x)
    # insightface's `features` BatchNorm1d has its weight fixed to 1 (requires_grad=False).
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                     epsilon=BN_EPSILON, use_scale=False, dtype=jnp.float32,
                     axis_name=self.axis_name if train else None,
                     name="features")(x.astype(jnp.float32))
    return x

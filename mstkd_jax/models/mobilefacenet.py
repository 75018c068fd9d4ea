"""MobileFaceNet ("mbf"), the small face-embedding backbone arcface_torch ships for deployment.

Layer for layer as arcface_torch's MobileFaceNet (Chen et al., "MobileFaceNets: Efficient
CNNs for Accurate Real-Time Face Verification on Mobile Devices", 2018, in the variant with
`blocks` and `scale`), with submodule names that mirror its PyTorch state_dict (layers_0,
layers_1, ..., conv_sep, features; inside every block layers_0, layers_1, ...), so that
`interop/` maps its checkpoints by one rule ("layers_3" <-> "layers.3"). Inputs are NHWC
images in [-1, 1], height and width multiples of 16.

The network (arcface_torch's numbers for width 64; every channel count scales with width):
  layers_0  ConvBlock 3x3 stride 2 to width*scale channels
  layers_1  ConvBlock 3x3 in `width` groups (blocks[0] == 1), else blocks[0] residual
            DepthWise blocks of 2*width hidden channels
  layers_2  DepthWise stride 2, hidden 2*width      layers_3  blocks[1] residual, hidden 2*width
  layers_4  DepthWise stride 2 to 2*width*scale,    layers_5  blocks[2] residual, hidden 4*width
            hidden 4*width
  layers_6  DepthWise stride 2, hidden 8*width      layers_7  blocks[3] residual, hidden 4*width
  conv_sep  ConvBlock 1x1 to 8*width channels
  features  GDC: depthwise conv over the whole (H/16 x W/16) map, BatchNorm, flatten, linear
            to embedding_size without bias, BatchNorm1d (with scale and bias)
where ConvBlock = conv (no bias), BatchNorm, per-channel PReLU; LinearBlock = conv, BatchNorm;
DepthWise = ConvBlock 1x1 to the hidden width, ConvBlock 3x3 depthwise (groups = hidden,
stride), LinearBlock 1x1 to the output, plus the input when residual.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mstkd_jax.models.iresnet import BN_EPSILON, BN_MOMENTUM, PReLU

# Registered names: (blocks per stage, scale), as arcface_torch's get_mbf and get_mbf_large.
ARCHS = {"mbf": ((1, 4, 6, 2), 2), "mbf_large": ((2, 8, 12, 4), 4)}

# arcface_torch initialises conv and linear weights with kaiming_normal_(mode="fan_out",
# nonlinearity="relu"): N(0, 2 / fan_out), fan_out = out channels x kernel area (Flax counts
# it the same way for grouped kernels [kh, kw, in / groups, out]).
KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _norm(train: bool, axis_name: str | None, dtype, name: str, use_scale: bool = True):
  # arcface_torch: nn.BatchNorm2d / BatchNorm1d defaults (eps 1e-5, momentum 0.1).
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      use_scale=use_scale, dtype=dtype,
                      axis_name=axis_name if train else None, name=name)


class ConvBlock(nn.Module):
  """Conv (no bias) -> BatchNorm -> PReLU (arcface_torch's ConvBlock); without the PReLU
  (`activation=False`), its LinearBlock. Padding is `padding` on every side."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: int = 0
  groups: int = 1
  activation: bool = True
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    p = self.padding
    x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                padding=((p, p), (p, p)), feature_group_count=self.groups, use_bias=False,
                kernel_init=KERNEL_INIT, dtype=self.dtype, name="layers_0")(x)
    x = _norm(train, self.axis_name, self.dtype, "layers_1")(x)
    if self.activation:
      x = PReLU(name="layers_2")(x)
    return x


class DepthWise(nn.Module):
  """1x1 expansion to `hidden`, 3x3 depthwise (stride), 1x1 linear projection to `features`;
  plus the input where `residual` (arcface_torch's DepthWise, its `groups` = hidden)."""
  features: int
  hidden: int
  stride: int = 1
  residual: bool = False
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    block = lambda name, **kw: ConvBlock(dtype=self.dtype, axis_name=self.axis_name, name=name,
                                         **kw)
    y = block("layers_0", features=self.hidden)(x, train)
    y = block("layers_1", features=self.hidden, kernel=(3, 3), stride=self.stride, padding=1,
              groups=self.hidden)(y, train)
    y = block("layers_2", features=self.features, activation=False)(y, train)
    return x + y if self.residual else y


class Residual(nn.Module):
  """`depth` residual DepthWise blocks of stride 1 (arcface_torch's Residual)."""
  depth: int
  hidden: int
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.depth):
      x = DepthWise(x.shape[-1], self.hidden, residual=True, dtype=self.dtype,
                    axis_name=self.axis_name, name=f"layers_{i}")(x, train)
    return x


class GDC(nn.Module):
  """Global depthwise conv over the whole map (a LinearBlock), flatten, linear (no bias),
  BatchNorm1d: arcface_torch's GDC, whose 7x7 kernel is the map of a 112x112 input."""
  embedding_size: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    channels = x.shape[-1]
    x = ConvBlock(channels, tuple(x.shape[1:3]), groups=channels, activation=False,
                  dtype=self.dtype, axis_name=self.axis_name, name="layers_0")(x, train)
    x = x.reshape((x.shape[0], channels))  # [B, 1, 1, C] -> [B, C]
    x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(x)
    x = nn.Dense(self.embedding_size, use_bias=False, kernel_init=KERNEL_INIT,
                 dtype=self.dtype, name="layers_2")(x)
    return _norm(train, self.axis_name, self.dtype, "layers_3")(x)


class MobileFaceNet(nn.Module):
  """MobileFaceNet returning the (unnormalized) embedding, float32 [B, embedding_size].

  Attributes:
    blocks: residual blocks of the four stages ((1, 4, 6, 2) for mbf, (2, 8, 12, 4) for
      mbf_large).
    scale: width multiplier of the trunk (2 for mbf, 4 for mbf_large).
    width: channel unit, 64 in arcface_torch: the trunk has width x scale and 2 x width x
      scale channels, the expansions 2, 4 and 8 x width, the embedding conv 8 x width;
      smaller widths make CPU-sized nets.
    embedding_size: size of the embedding (512 in arcface_torch).
    dropout: dropout rate before the embedding's linear layer (arcface_torch has none: 0).
    use_se: accepted so that IResNet settings build it; must be False (no SE blocks).
    dtype: compute dtype of layers_0 ... layers_7; conv_sep and the embedding run in
      float32, as arcface_torch's fp16 mode (autocast over the trunk only). Parameters and
      BatchNorm statistics stay float32.
    axis_name: mapped axis over which BatchNorm averages batch statistics in training, so
      the statistics, and so the results, do not depend on the number of devices.

  Raises:
    ValueError: on construction, use_se or not 4 stages; when called, images not NHWC RGB
      with height and width multiples of 16.
  """
  blocks: Sequence[int] = ARCHS["mbf"][0]
  scale: int = ARCHS["mbf"][1]
  width: int = 64
  embedding_size: int = 512
  dropout: float = 0.0
  use_se: bool = False
  dtype: Any = jnp.float32
  axis_name: str | None = None

  def __post_init__(self):
    if self.use_se:
      raise ValueError("use_se=True: MobileFaceNet has no squeeze-and-excitation blocks; "
                       "expected false")
    if len(self.blocks) != 4:
      raise ValueError(f"blocks={tuple(self.blocks)}: expected 4 stages")
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"MobileFaceNet expects NHWC RGB images, got shape {images.shape}")
    if images.shape[1] % 16 or images.shape[2] % 16:
      raise ValueError(f"MobileFaceNet input height and width must be multiples of 16, got "
                       f"{images.shape[1:3]}")
    w, s = self.width, self.scale
    trunk = dict(dtype=self.dtype, axis_name=self.axis_name)
    x = images.astype(self.dtype)
    x = ConvBlock(w * s, (3, 3), stride=2, padding=1, name="layers_0", **trunk)(x, train)
    if self.blocks[0] == 1:
      x = ConvBlock(w * s, (3, 3), padding=1, groups=w, name="layers_1", **trunk)(x, train)
    else:
      x = Residual(self.blocks[0], 2 * w, name="layers_1", **trunk)(x, train)
    for i, (features, hidden, depth, hidden_res) in enumerate((
        (w * s, 2 * w, self.blocks[1], 2 * w),
        (2 * w * s, 4 * w, self.blocks[2], 4 * w),
        (2 * w * s, 8 * w, self.blocks[3], 4 * w))):
      x = DepthWise(features, hidden, stride=2, name=f"layers_{2 + 2 * i}", **trunk)(x, train)
      x = Residual(depth, hidden_res, name=f"layers_{3 + 2 * i}", **trunk)(x, train)
    x = x.astype(jnp.float32)
    head = dict(dtype=jnp.float32, axis_name=self.axis_name)
    x = ConvBlock(8 * w, name="conv_sep", **head)(x, train)
    x = GDC(self.embedding_size, self.dropout, name="features", **head)(x, train)
    return x

"""A PyTorch IResNet training step written for the benchmark: the side-by-side reference.

Not the project's code path: a plain torch.nn module with the same depth, width, embedding
and flatten size as `models.iresnet.IResNet`, an ElasticArcFace margin cross-entropy, and
SGD with momentum, weight decay and gradient-norm clipping of the backbone, as the
authors' PyTorch recipe trains. Its state_dict names are insightface's, so it loads our
IResNet as interop/torch_checkpoint.py exports it (tests/test_bench_torch.py checks that
both give the same embeddings; tests/test_torch_checkpoint.py uses it as the PyTorch
reference of the checkpoint import and export). On CUDA it runs channels_last, with bfloat16 autocast when
the benchmark's dtype is bfloat16 (float32 keeps TF32 on, as XLA does for float32
convolutions by default). Imported only when PyTorch is installed.
"""

import math
import time

import torch
from torch import nn
from torch.nn import functional as F


def _conv3x3(in_channels, out_channels, stride=1):
  return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class _SEModule(nn.Module):
  """The authors' SE gate: bias-free 1x1 convs, reduction 16."""

  def __init__(self, channels):
    super().__init__()
    self.fc1 = nn.Conv2d(channels, channels // 16, 1, bias=False)
    self.fc2 = nn.Conv2d(channels // 16, channels, 1, bias=False)

  def forward(self, x):
    s = torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))
    return x * torch.sigmoid(self.fc2(s))


class _IBasicBlock(nn.Module):
  """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN (-> SE gate), plus the shortcut."""

  def __init__(self, in_channels, channels, stride, use_se=False):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
    self.conv1 = _conv3x3(in_channels, channels)
    self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
    self.prelu = nn.PReLU(channels)
    self.conv2 = _conv3x3(channels, channels, stride)
    self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
    self.downsample = None
    if stride != 1 or in_channels != channels:
      self.downsample = nn.Sequential(
          nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
          nn.BatchNorm2d(channels, eps=1e-5))
    self.se_block = _SEModule(channels) if use_se else None

  def forward(self, x):
    y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    if self.se_block is not None:
      y = self.se_block(y)
    return y + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
  """insightface's IResNet: stem, stages of IBasicBlocks, BN-dropout-fc-BN head.

  Modules are named as insightface's (conv1, bn1, prelu, layer<stage>.<block>.conv1, ...,
  bn2, fc, features), so `load_state_dict(torch.load(path, weights_only=True))` reads a
  `.pth` written by interop/torch_checkpoint.py's `export_iresnet` + `save_state_dict` for
  a Flax IResNet of the same depths, width, embedding and SE gates.

  Args:
    stage_depths: IBasicBlocks per stage, e.g. (3, 4, 6, 3) for IResNet-34.
    width: channels of the stem and first stage; stages use width x (1, 2, 4, 8).
    embedding_size: size of the embedding.
    dropout: dropout rate before the embedding layer.
    image_size: input height and width, a multiple of 16 (fixes fc's input size).
    use_se: an SE gate (`se_block`) at the end of every block's residual branch.
  """

  def __init__(self, stage_depths, width=64, embedding_size=512, dropout=0.0,
               image_size=112, use_se=False):
    super().__init__()
    self.conv1 = _conv3x3(3, width)
    self.bn1 = nn.BatchNorm2d(width, eps=1e-5)
    self.prelu = nn.PReLU(width)
    self.stage_names = tuple(f"layer{stage + 1}" for stage in range(len(stage_depths)))
    channels = width
    for stage, depth in enumerate(stage_depths):
      out_channels = width * 2 ** stage
      blocks = [_IBasicBlock(channels if i == 0 else out_channels, out_channels,
                             2 if i == 0 else 1, use_se) for i in range(depth)]
      self.add_module(self.stage_names[stage], nn.Sequential(*blocks))
      channels = out_channels
    self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
    self.dropout = nn.Dropout(dropout)
    side = image_size // 16
    self.fc = nn.Linear(channels * side * side, embedding_size)
    self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
    nn.init.constant_(self.features.weight, 1.0)
    self.features.weight.requires_grad = False
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.1)

  def forward(self, x):
    """Images float32 [B, 3, H, W] -> embeddings float32 [B, embedding_size]."""
    x = self.prelu(self.bn1(self.conv1(x)))
    for name in self.stage_names:
      x = getattr(self, name)(x)
    x = self.dropout(torch.flatten(self.bn2(x), 1))
    return self.features(self.fc(x).float())


def elastic_arcface_loss(embeddings, labels, centres, s, m, std):
  """Mean CE of s * cos(theta + m_i) on the target class, m_i ~ N(m, std), float32."""
  cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(centres.float(), dim=0)
  cos = cos.clamp(-1.0, 1.0)
  margins = m + std * torch.randn(labels.shape[0], device=cos.device)
  target = cos.gather(1, labels[:, None])[:, 0]
  theta = torch.acos(target.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
  new_target = torch.cos(theta + margins)
  one_hot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
  logits = s * (cos + one_hot * (new_target - target)[:, None])
  return F.cross_entropy(logits, labels)


def _sync(device):
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def prepare(*, stage_depths, width, embedding_size, dropout, image_size, batch_size,
            num_classes, dtype, warmup, margin=(64.0, 0.5, 0.05), lr=0.1,
            momentum=0.9, weight_decay=5e-4, clip_norm=5.0, seed=0):
  """Builds the step and runs `warmup` steps; returns (timed, info).

  timed(count) runs `count` more steps and returns the seconds per step; info describes
  the device and settings.
  """
  torch.manual_seed(seed)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  cuda = device.type == "cuda"
  if cuda:
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  memory_format = torch.channels_last if cuda else torch.contiguous_format
  autocast = cuda and dtype == "bfloat16"
  backbone = IResNet(stage_depths, width, embedding_size, dropout, image_size)
  backbone = backbone.to(device, memory_format=memory_format).train()
  centres = nn.Parameter(0.01 * torch.randn(embedding_size, num_classes, device=device))
  optimiser = torch.optim.SGD(
      [{"params": [p for p in backbone.parameters() if p.requires_grad]},
       {"params": [centres]}], lr=lr, momentum=momentum, weight_decay=weight_decay)
  images = (2 * torch.rand(batch_size, 3, image_size, image_size, device=device) - 1)
  images = images.contiguous(memory_format=memory_format)
  labels = torch.randint(0, num_classes, (batch_size,), device=device)
  s, m, std = margin

  def step():
    optimiser.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
      embeddings = backbone(images)
    loss = elastic_arcface_loss(embeddings, labels, centres, s, m, std)
    loss.backward()
    if clip_norm:
      torch.nn.utils.clip_grad_norm_(backbone.parameters(), clip_norm)
    optimiser.step()
    return loss

  for _ in range(warmup):
    step()
  _sync(device)

  def timed(count: int) -> float:
    """Seconds per step over `count` steps."""
    start = time.perf_counter()
    for _ in range(count):
      loss = step()
    _sync(device)
    seconds = (time.perf_counter() - start) / count
    info["finite_loss"] = math.isfinite(float(loss.detach()))
    return seconds

  info = {
      "device": torch.cuda.get_device_name(device) if cuda else "cpu",
      "torch_version": torch.__version__,
      "autocast_bfloat16": autocast,
      "channels_last": cuda,
      "finite_loss": None,
  }
  return timed, info

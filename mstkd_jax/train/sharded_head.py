"""The class-sharded margin head (`head.shard_classes`) with Partial-FC sampling
(`head.sample_rate`).

The class centres, kernel [D, C], are split by columns over the N devices of the data
axis: device i holds classes [i * S, (i + 1) * S), S = ceil(C / N). Where N does not
divide C the last columns are padding classes (zero centres) that never take part in a
softmax (their probability is exactly 0) and never receive a gradient; the host state,
hence every checkpoint, holds the real [D, C] kernel and its momentum whole, so a
checkpoint does not depend on the device count or on this setting (`DataParallel`
splits and pads it when placing the state, and trims and joins it when reading it back).

A step (`margin_loss`, per device, inside pmap or shard_map): the features [b, D] and
labels of every device are all-gathered into the global batch [B, D]; each device computes
the cosines of the global batch to its own classes, the target cosines and the margins
(drawn from the step's margin key over the global batch: the draws of the unsharded head,
"+" heads ranking the global batch too), and the softmax normalizer is combined over the
devices (`losses.sharded_margin_cross_entropy`). Every device returns the same global mean
loss. Gradients: the backbone's are averaged over the devices as usual; each device's
block of centres gets the gradient of its own classes, divided by N (the N identical
copies of the loss all reach it through the psums), and is neither averaged nor gathered:
its gradient, momentum and update stay on that device.

Partial FC (`sample_rate` r < 1; arcface_torch's partial_fc_v2.py, An et al., "Killing
Two Birds with One Stone: Efficient and Robust Training of Face Recognition CNNs by
Partial FC", CVPR 2022): at each step every shard keeps each of its classes that appears
in the global batch (positives) and fills up to int(r x its class count) classes with
classes drawn at random among its others; where the positives alone are more, only they
are kept (as partial_fc_v2 does). The draw is a function of the step's key and the shard
index, so a run is deterministic and resumes identically. Only the kept classes enter the
logits (and the training accuracy), so only their centres receive a loss gradient. As in
partial_fc_v2, whose whole weight is one parameter of the SGD optimizer with zero gradient
in its unsampled rows, the rows not sampled are still updated by the optimizer: SGD's
weight decay adds wd x w to their zero gradient, their momentum buffer becomes
momentum x buffer + wd x w, and they move by lr x buffer. Static shapes: each shard
computes K = min(S, max(int(r x S), B)) columns (B the global batch, so the positives
always fit), and the columns beyond the kept ones are masked like padding.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mstkd_jax import losses
from mstkd_jax.models import heads

# The path suffix of the class-centre leaves in a TrainState: params["head"]["kernel"], and
# the optimizer's per-parameter buffers of it (SGD momentum).
_KERNEL_PATH = ("head", "kernel")


@dataclasses.dataclass(frozen=True)
class ClassShards:
  """How the class centres are split: `num_classes` real classes over `num_shards` devices,
  and the Partial-FC `sample_rate` (1.0 = every class at every step)."""
  num_classes: int
  num_shards: int
  sample_rate: float = 1.0

  def __post_init__(self):
    if self.num_classes < 1 or self.num_shards < 1:
      raise ValueError(f"need classes and shards, got {self.num_classes}, {self.num_shards}")
    if not 0.0 < self.sample_rate <= 1.0:
      raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")

  @property
  def shard_size(self) -> int:
    """S: classes per device, padding included."""
    return -(-self.num_classes // self.num_shards)

  @property
  def padded_classes(self) -> int:
    return self.shard_size * self.num_shards

  @property
  def padding(self) -> int:
    return self.padded_classes - self.num_classes

  @property
  def sampling(self) -> bool:
    return self.sample_rate < 1.0

  def real_classes(self) -> np.ndarray:
    """[N] int: the real (not padding) classes of each shard."""
    first = np.arange(self.num_shards) * self.shard_size
    return np.clip(self.num_classes - first, 0, self.shard_size)

  def num_sample(self) -> np.ndarray:
    """[N] int: Partial FC's int(sample_rate x classes of the shard), per shard."""
    return np.asarray([int(self.sample_rate * int(n)) for n in self.real_classes()])

  def sample_slots(self, global_batch: int) -> int:
    """K: the columns a shard computes per step (all S without sampling)."""
    if not self.sampling:
      return self.shard_size
    return min(self.shard_size, max(int(self.num_sample().max()), global_batch))


def is_kernel(path, leaf, leading_axes: int = 0) -> bool:
  """Whether a TrainState leaf (by its key path) is the class-centre matrix or one of its
  optimizer buffers: a [D, C] leaf (after `leading_axes`, e.g. pmap's device axis) whose
  path ends in "head", "kernel"."""
  keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path[-2:])
  return keys == _KERNEL_PATH and np.ndim(leaf) == 2 + leading_axes


def split_host(kernel: np.ndarray, shards: ClassShards) -> np.ndarray:
  """Host [D, C] -> [N, D, S]: zero-padded to N x S columns, block i = device i's classes."""
  kernel = np.asarray(kernel)
  if kernel.shape[-1] != shards.num_classes:
    raise ValueError(f"class-centre leaf of {kernel.shape[-1]} classes, expected "
                     f"{shards.num_classes}")
  padded = pad_host(kernel, shards)
  return padded.reshape(kernel.shape[0], shards.num_shards, shards.shard_size).transpose(1, 0, 2)


def pad_host(kernel: np.ndarray, shards: ClassShards) -> np.ndarray:
  """Host [D, C] -> [D, N x S] with zero padding columns."""
  return np.pad(np.asarray(kernel), ((0, 0), (0, shards.padding)))


def join_host(blocks: np.ndarray, shards: ClassShards) -> np.ndarray:
  """[N, D, S] blocks -> the real [D, C] (padding dropped)."""
  blocks = np.asarray(blocks)
  return blocks.transpose(1, 0, 2).reshape(blocks.shape[1], -1)[:, :shards.num_classes]


def sample_classes(rng, shard, local_labels, owned, shards: ClassShards, global_batch: int):
  """Partial FC v2's classes of one shard for one step (module docstring).

  Args:
    rng: the step's sampling key (the same on every device; the shard index is folded in).
    shard: int32 scalar, this device's index on the axis.
    local_labels: [B] int label - shard * S of each sample of the global batch.
    owned: [B] bool, the sample's class is in this shard.
    shards: the split.
    global_batch: B.
  Returns:
    (index [K] int32 ascending columns of this shard's kernel, kept [K] bool): the
    positives and the drawn negatives are kept; the rest of the K columns, and padding
    classes, are not.
  """
  size = shards.shard_size
  slots = shards.sample_slots(global_batch)
  columns = jnp.arange(size)
  real = columns < jnp.asarray(shards.real_classes())[shard]
  positive = jnp.zeros(size, bool).at[jnp.where(owned, local_labels, size)].set(
      True, mode="drop")
  scores = jax.random.uniform(jax.random.fold_in(rng, shard), (size,), jnp.float32)
  # Positives first (2 > any uniform draw), then the real classes in random order, the
  # padding last.
  scores = jnp.where(positive, 2.0, jnp.where(real, scores, -1.0))
  _, top = jax.lax.top_k(scores, slots)
  quota = jnp.maximum(jnp.asarray(shards.num_sample())[shard], jnp.sum(positive))
  kept = (jnp.arange(slots) < quota) & real[top]
  order = jnp.argsort(top)
  return top[order].astype(jnp.int32), kept[order]


def margin_loss(kernel, embeddings, labels, spec: losses.MarginSpec, margin_rng, sample_rng,
                shards: ClassShards, axis_name):
  """The class-sharded margin-head loss of one device (module docstring).

  Args:
    kernel: [D, S] float32, this device's block of class centres.
    embeddings: [b, D] this device's features (any float dtype).
    labels: [b] int global classes of this device's samples.
    spec: the margin head (every head of losses.HEADS).
    margin_rng: the step's margin key (as the unsharded head draws with).
    sample_rng: the step's Partial-FC key (unused without sampling).
    shards: the split and the sample rate.
    axis_name: the data axis, over which the classes are split too.
  Returns:
    (mean CE over the global batch [], training accuracy over the global batch []: argmax
    of the cosines to the classes taking part at this step), both float32 and the same on
    every device.
  """
  features = jax.lax.all_gather(embeddings, axis_name, tiled=True)     # [B, D]
  labels = jax.lax.all_gather(labels, axis_name, tiled=True)           # [B]
  global_batch = features.shape[0]
  shard = jax.lax.axis_index(axis_name)
  first = shard * shards.shard_size
  local = labels - first
  owned = (local >= 0) & (local < shards.shard_size)
  if shards.sampling:
    index, kept = sample_classes(sample_rng, shard, local, owned, shards, global_batch)
    kernel = jnp.take(kernel, index, axis=1)                            # [D, K]
    positions = jnp.searchsorted(index, jnp.where(owned, local, 0)).astype(jnp.int32)
  else:
    index = jnp.arange(shards.shard_size, dtype=jnp.int32)
    kept = jnp.ones(shards.shard_size, bool)
    positions = local.astype(jnp.int32)
  class_ids = first + index
  active = kept & (class_ids < shards.num_classes)
  positions = jnp.where(owned, positions, -1)
  cos = heads.cosines(features, kernel)                                 # [B, K]
  target_cos = losses.sharded_target_cosine(cos, positions, axis_name)
  margins = losses.draw_margins(margin_rng, target_cos, spec)           # global batch
  per_sample = losses.sharded_margin_cross_entropy(cos, positions, margins, active, spec,
                                                   axis_name)
  predicted = losses.sharded_argmax(cos, class_ids, active, axis_name)
  return jnp.mean(per_sample), jnp.mean(predicted == labels)


def describe(shards: ClassShards, field: str = "head") -> str:
  """One log line on the split (and its padding)."""
  text = (f"{field}.shard_classes: {shards.num_classes} class centres split over "
          f"{shards.num_shards} devices, {shards.shard_size} per device")
  if shards.padding:
    text += (f" ({shards.padding} padding classes after the last real one, masked out of "
             "every softmax and not saved)")
  if shards.sampling:
    text += (f"; Partial-FC sample_rate {shards.sample_rate}: up to "
             f"{int(shards.num_sample().max())} classes per device and step, positives "
             "always kept")
  return text


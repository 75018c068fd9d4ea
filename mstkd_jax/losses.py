"""Pure loss functions: margin logits of the ArcFace family (fixed and elastic), CE, KD.

All computed in float32 whatever the backbone's dtype. Margins act on the target class only:
ArcFace-like heads use s * cos(theta_i + m_i), CosFace-like heads s * (cos(theta_i) - m_i),
other classes s * cos(theta_j).
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

HEADS = ("arcface", "cosface", "elastic_arcface", "elastic_cosface",
         "elastic_arcface_plus", "elastic_cosface_plus")

# arccos has an infinite derivative at +-1; keeping cos strictly inside (-1, 1) keeps
# gradients finite (float32 rounds 1 - 1e-7 to 0.99999988).
_COS_LIMIT = 1.0 - 1e-7


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(||x||, eps) in float32, as PyTorch's F.normalize; finite gradients at x = 0.

  Args:
    x: array of any float dtype; normalized along `axis`.
    axis: the vector axis.
    eps: the smallest norm divided by.

  Returns:
    float32 array of x's shape. Where the sum of squares is 0 (x = 0, or so small that it
    underflows) the value is x / eps and the gradient is I / eps, as in PyTorch; sqrt is
    then evaluated at 1 instead of 0, whose infinite derivative would make it NaN.
  """
  x = x.astype(jnp.float32)
  squares = jnp.sum(x * x, axis=axis, keepdims=True)
  positive = squares > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)
  return x / jnp.maximum(norm, eps)


# (m, std) of each head where they are not given: ArcFace's and CosFace's usual margins; the
# elastic heads as the MST-KD / ElasticFace released config sets them with the loss name.
STANDARD_MARGINS = {
    "arcface": (0.5, 0.0), "cosface": (0.35, 0.0),
    "elastic_arcface": (0.5, 0.05), "elastic_arcface_plus": (0.5, 0.0175),
    "elastic_cosface": (0.35, 0.05), "elastic_cosface_plus": (0.35, 0.02),
}


@dataclasses.dataclass(frozen=True)
class MarginSpec:
  """Which margin head, and its scale s, margin m and margin std (0 for fixed margins).

  m or std left None take the head's STANDARD_MARGINS, so naming another head never keeps
  the previous head's margins by accident.
  """
  name: str = "elastic_arcface"
  s: float = 64.0
  m: float | None = None
  std: float | None = None

  def __post_init__(self):
    if self.name not in HEADS:
      raise ValueError(f"margin head must be one of {HEADS}, got {self.name!r}")
    m, std = STANDARD_MARGINS[self.name]
    if self.m is None:
      object.__setattr__(self, "m", m)
    if self.std is None:
      object.__setattr__(self, "std", std)

  @property
  def additive_angle(self) -> bool:
    return "arcface" in self.name

  @property
  def elastic(self) -> bool:
    return self.name.startswith("elastic")

  @property
  def plus(self) -> bool:
    return self.name.endswith("_plus")


def plus_assignment(margins, target_cos):
  """The ElasticFace+ rule of the authors' code, exactly: m_sorted[order[i]] for sample i.

  m_sorted holds the batch's margins in ascending order; order is the batch indices sorted by
  target cosine, descending. Read literally, sample i does not receive the margin of its own
  rank: the rank permutation is used as an index into the sorted margins, which is what the
  released code computes (`margin[idicate_cosie]`), so this is what we reproduce.

  Args:
    margins: [B] drawn margins.
    target_cos: [B] cosine of each sample to its own class centre.
  Returns:
    [B] margins reassigned to the samples.
  """
  m_sorted = jnp.sort(margins)
  order = jnp.argsort(-target_cos, stable=True)
  return m_sorted[order]


def draw_margins(rng, target_cos, spec: MarginSpec, axis_name=None):
  """Per-sample margins [B_local] for this step.

  Elastic heads draw m_i ~ N(m, std) for every sample at every step. Under a mapped axis
  the margins are drawn for the whole global batch from the same key on every device (and,
  for "+" heads, ranked over the global batch), then each device takes its own slice: the
  margins a sample receives do not depend on how many devices share the batch.
  """
  target_cos = jax.lax.stop_gradient(target_cos.astype(jnp.float32))
  if not spec.elastic:
    return jnp.full(target_cos.shape, spec.m, jnp.float32)
  local = target_cos.shape[0]
  if axis_name is not None:
    target_cos = jax.lax.all_gather(target_cos, axis_name, tiled=True)
  margins = spec.m + spec.std * jax.random.normal(rng, target_cos.shape, jnp.float32)
  if spec.plus:
    margins = plus_assignment(margins, target_cos)
  if axis_name is not None:
    start = jax.lax.axis_index(axis_name) * local
    margins = jax.lax.dynamic_slice_in_dim(margins, start, local)
  return margins


def margin_logits(cos, labels, margins, spec: MarginSpec):
  """Scaled logits [B, C] with per-sample margins on the target class.

  For ArcFace-like heads theta_i + m_i is not clamped to [0, pi], as in the authors' code:
  when theta_i + m_i > pi, cos(theta_i + m_i) grows again (the target logit is then not
  monotonic in theta). With m = 0.5 and std = 0.05 this only happens for samples whose
  cosine to their own centre is below about -0.88.

  Args:
    cos: [B, C] cosine similarities (any float dtype; computed in float32).
    labels: [B] int target classes.
    margins: [B] margin of each sample (radians for ArcFace-like, cosine units otherwise).
    spec: which head and its scale.
  """
  cos = jnp.clip(cos.astype(jnp.float32), -1.0, 1.0)
  one_hot = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.float32)
  target_cos = jnp.sum(cos * one_hot, axis=-1)
  if spec.additive_angle:
    theta = jnp.arccos(jnp.clip(target_cos, -_COS_LIMIT, _COS_LIMIT))
    new_target = jnp.cos(theta + margins)
  else:
    new_target = target_cos - margins
  return spec.s * (cos + one_hot * (new_target - target_cos)[:, None])


def target_cosine(cos, labels):
  """cos[i, labels[i]]: [B]."""
  return jnp.take_along_axis(cos, labels[:, None], axis=-1)[:, 0]


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy over the batch, float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def mse_distance(targets, student):
  """MST-KD's distance (the paper's a-KD / EAF-KD term): the mean squared difference over
  every element, mean((target - student)**2) of [B, D] float32 arrays; a scalar."""
  return jnp.mean((targets - student) ** 2)


def cosine_distance(targets, student):
  """1 - cos(target, student), averaged over the batch: [B, D] float32 arrays -> a scalar.

  Targets are L2-normalized here too, so targets of any norm give the angle alone. For unit
  vectors ||t - s||^2 = 2 - 2 cos, so this is D / 2 times `mse_distance`: the same direction
  of pull, D / 2 times as strong at one weight (64x at D = 128).
  """
  return jnp.mean(1.0 - jnp.sum(l2_normalize(targets) * student, axis=-1))


# The distances a student can be distilled with (config field student.kd.distance): a new
# one is a function of (targets [B, D], unit student embeddings [B, D]) and a line here.
KD_DISTANCES = {"mse": mse_distance, "cosine": cosine_distance}


def kd_loss(targets, student_embeddings, kd_weight, distance: str = "mse"):
  """The distillation term: kd_weight * KD_DISTANCES[distance](target, normalize(student)).

  Args:
    targets: [B, D] MST-KD targets (the adaptor's unit outputs), any float dtype.
    student_embeddings: [B, D] raw student embeddings; L2-normalized here, in float32.
    kd_weight: the term's weight (10,000 in the paper, with "mse").
    distance: a KD_DISTANCES name.

  Raises:
    ValueError: an unknown distance.
  """
  if distance not in KD_DISTANCES:
    raise ValueError(f"KD distance must be one of {sorted(KD_DISTANCES)}, got {distance!r}")
  student = l2_normalize(student_embeddings)
  return kd_weight * KD_DISTANCES[distance](targets.astype(jnp.float32), student)


# ------------------------------------------------------------- class-sharded margin head
# The centres are split by columns over the devices of a mapped axis; every device sees the
# features of the global batch and the cosines of its own classes only. These functions run
# inside pmap or shard_map (`axis_name`), and every device returns the same global values.

def sharded_target_cosine(cos, positions, axis_name):
  """Each sample's cosine to its own class centre, from the device that holds that class.

  Args:
    cos: [B, K] float32 cosines of the global batch to this device's K (held or sampled)
      classes.
    positions: [B] int column of each sample's class in `cos`, -1 where another device
      holds it.
    axis_name: the mapped axis over which the classes are split.
  Returns:
    [B] float32, the same on every device (a psum over the axis: one device adds the value,
    the others 0).
  """
  owned = positions >= 0
  local = jnp.take_along_axis(cos.astype(jnp.float32),
                              jnp.maximum(positions, 0)[:, None], axis=-1)[:, 0]
  return jax.lax.psum(jnp.where(owned, local, 0.0), axis_name)


def sharded_margin_cross_entropy(cos, positions, margins, active, spec: MarginSpec,
                                 axis_name):
  """Per-sample softmax cross-entropy [B] of margin logits whose classes are split over devices.

  The logits are those of `margin_logits` (the margin on the target class, on the device
  that holds it). The log-normalizer is combined over the axis as in arcface_torch's
  partial_fc_v2.py (DistCrossEntropy): M = pmax of the rows' largest logits (no gradient;
  it only shifts), log Z = M + log(psum(sum_j exp(logit_j - M))), and the target logit is
  psummed from its device; CE = log Z - target logit.

  Args:
    cos: [B, K] cosines of the global batch to this device's K classes (any float dtype).
    positions: [B] int column of each sample's class in `cos`, -1 where another device holds
      it (every sample's class must be active on exactly one device).
    margins: [B] float32 margin of each sample (losses.draw_margins over the global batch).
    active: [K] bool; inactive columns (padding classes, classes not sampled at this step)
      take no part: their probability is exactly 0 and they receive no gradient.
    spec: the margin head.
    axis_name: the mapped axis over which the classes are split.
  Returns:
    [B] float32 cross-entropy of each sample of the global batch, the same on every device.
  """
  logits = margin_logits(cos, positions, margins, spec)   # one_hot(-1) is a zero row
  active = active[None, :]
  row_max = jnp.max(jnp.where(active, logits, -jnp.inf), axis=-1)
  top = jax.lax.pmax(jax.lax.stop_gradient(row_max), axis_name)          # [B]
  # -inf (not a large negative) for inactive columns: exp gives 0 and a zero gradient,
  # where exp of an unmasked logit far above `top` could overflow into inf * 0 = NaN.
  shifted = jnp.where(active, logits - top[:, None], -jnp.inf)
  log_normalizer = top + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(shifted), axis=-1), axis_name))
  owned = positions >= 0
  local_target = jnp.take_along_axis(logits, jnp.maximum(positions, 0)[:, None], axis=-1)[:, 0]
  target = jax.lax.psum(jnp.where(owned, local_target, 0.0), axis_name)
  return log_normalizer - target


def sharded_argmax(cos, class_ids, active, axis_name):
  """The global class of the largest cosine of each row [B] (the first on ties, as argmax).

  Args:
    cos: [B, K] cosines to this device's K classes.
    class_ids: [K] int global class of each column, ascending.
    active: [K] bool; inactive columns are never chosen.
    axis_name: the mapped axis over which the classes are split.
  Returns:
    [B] int32, the same on every device (no gradient).
  """
  cos = jax.lax.stop_gradient(cos.astype(jnp.float32))
  masked = jnp.where(active[None, :], cos, -jnp.inf)
  local_best = jnp.max(masked, axis=-1)
  local_class = class_ids[jnp.argmax(masked, axis=-1)].astype(jnp.int32)
  best = jax.lax.pmax(local_best, axis_name)
  candidate = jnp.where(local_best == best, local_class, jnp.iinfo(jnp.int32).max)
  return jax.lax.pmin(candidate, axis_name)

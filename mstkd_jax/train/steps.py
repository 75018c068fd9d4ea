"""Per-device step functions: pure `(state, batch, rng) -> (state, metrics)`.

Wrapped by `parallel.DataParallel.wrap` (pmap or shard_map); gradients and metrics are
averaged over the data-parallel axis, BatchNorm statistics are computed over the global
batch (the models take `axis_name`), so results do not depend on the device count.
Static things (modules, margin spec, optimiser) are bound with functools.partial.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mstkd_jax import losses
from mstkd_jax.data.input_pipeline import PIXEL_VALUES
from mstkd_jax.train import sharded_head
from mstkd_jax.train.parallel import AXIS
from mstkd_jax.train.state import TrainState


def step_rngs(rng, step, names):
  """Independent keys for this step: fold_in(rng, step), one per name.

  Keys meant to differ per device (dropout) are folded with the device index by the
  caller; keys for global draws (elastic margins) stay the same on every device.
  """
  keys = jax.random.split(jax.random.fold_in(rng, step), len(names))
  return dict(zip(names, keys))


def apply_updates(state: TrainState, grads, batch_stats, tx: optax.GradientTransformation,
                  axis_name=AXIS, local_shards: int = 0) -> TrainState:
  """Averages gradients over devices and applies the optimiser.

  With `local_shards` = N > 0 the head's parameters are class-sharded (train/sharded_head.py):
  each device's block of centres keeps its own gradient, divided by N instead of averaged.
  """
  if local_shards:
    grads = {name: (jax.tree.map(lambda g: g / local_shards, g_tree) if name == "head"
                    else jax.lax.pmean(g_tree, axis_name))
             for name, g_tree in grads.items()}
  else:
    grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, opt_state=opt_state)


def network_input(inputs):
  """What a network is fed: uint8 pixels (training batches) become float32 in [-1, 1],
  (x / 255 - 0.5) / 0.5; anything else (normalized images, embeddings) is returned as it is.

  Compiled for a CPU, the pixels are looked up in data.input_pipeline.PIXEL_VALUES: the
  host's normalize_images to the bit (XLA's CPU code computes x / 255 as x * (1 / 255),
  which rounds 205 of the 256 values differently), so CPU runs give the numbers they gave
  when the host normalized. Elsewhere they are computed: a TPU's gather would cost 6% of an
  IResNet-34 step (the compiler's estimate, v5e), and a last-bit difference in the input
  does not survive the bfloat16 convolutions.
  """
  if inputs.dtype != jnp.uint8:
    return inputs
  return jax.lax.platform_dependent(inputs, cpu=lambda x: jnp.asarray(PIXEL_VALUES)[x],
                                    default=computed_pixels)


def computed_pixels(pixels):
  """uint8 -> float32 (x / 255 - 0.5) / 0.5 as XLA computes it (network_input off CPUs)."""
  return (pixels.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def _forward(backbone: nn.Module, params, batch_stats, inputs, dropout_rng):
  """Training-mode forward of network_input(inputs); returns (embeddings, updated
  batch_stats)."""
  inputs = network_input(inputs)
  variables = {"params": params}
  mutable = []
  if batch_stats:
    variables["batch_stats"] = batch_stats
    mutable = ["batch_stats"]
  embeddings, new_vars = backbone.apply(variables, inputs, train=True, mutable=mutable,
                                        rngs={"dropout": dropout_rng})
  return embeddings, new_vars.get("batch_stats", batch_stats)


def _margin_loss(head, head_params, embeddings, labels, margin, margin_rng, axis_name):
  """Margin-head CE; returns (loss, cosines)."""
  cos = head.apply({"params": head_params}, embeddings)
  margins = losses.draw_margins(margin_rng, losses.target_cosine(cos, labels), margin,
                                axis_name)
  return losses.cross_entropy(losses.margin_logits(cos, labels, margins, margin), labels), cos


def classification_step(state: TrainState, batch, rng, *, backbone: nn.Module,
                        head: nn.Module, margin: losses.MarginSpec,
                        tx: optax.GradientTransformation, schedule, input_key="image",
                        axis_name=AXIS, classes: sharded_head.ClassShards | None = None):
  """One SGD step of backbone + margin head (teachers, the student alone, the adaptor).

  batch: {input_key: [B, ...] backbone input, "label": [B] int identity}. The backbone is
  any module taking (inputs, train=) and returning embeddings (an IResNet, or the adaptor
  over concatenated teacher embeddings).

  `classes` (with a `DataParallel.with_class_shards` of the same split) makes the head
  class-sharded, with Partial-FC sampling at classes.sample_rate < 1: state.params["head"]
  ["kernel"] is then this device's [D, S] block (train/sharded_head.py). None is the
  replicated head, unchanged.
  """
  if classes is not None:
    return _sharded_classification_step(state, batch, rng, backbone=backbone, margin=margin,
                                        tx=tx, schedule=schedule, input_key=input_key,
                                        axis_name=axis_name, classes=classes)
  keys = step_rngs(rng, state.step, ("dropout", "margin"))
  dropout_rng = jax.random.fold_in(keys["dropout"], jax.lax.axis_index(axis_name))
  labels = batch["label"]

  def loss_fn(params):
    embeddings, batch_stats = _forward(backbone, params["backbone"], state.batch_stats,
                                       batch[input_key], dropout_rng)
    loss, cos = _margin_loss(head, params["head"], embeddings, labels, margin,
                             keys["margin"], axis_name)
    return loss, (batch_stats, cos)

  (loss, (batch_stats, cos)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = apply_updates(state, grads, batch_stats, tx, axis_name)
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(cos, axis=-1) == labels),
  }
  metrics = jax.lax.pmean(metrics, axis_name)
  metrics["lr"] = schedule(state.step)
  return new_state, metrics


def _sharded_classification_step(state: TrainState, batch, rng, *, backbone: nn.Module,
                                 margin: losses.MarginSpec, tx: optax.GradientTransformation,
                                 schedule, input_key, axis_name,
                                 classes: sharded_head.ClassShards):
  """classification_step with the class-sharded head: the same keys for dropout and margins
  (plus one for Partial-FC sampling), the loss and accuracy of the global batch."""
  keys = step_rngs(rng, state.step, ("dropout", "margin"))
  dropout_rng = jax.random.fold_in(keys["dropout"], jax.lax.axis_index(axis_name))
  # Its own key, folded from the step's: the dropout and margin keys stay those of the
  # replicated head (the same draws, hence the same numbers at sample_rate 1).
  sample_rng = jax.random.fold_in(keys["margin"], 1)

  def loss_fn(params):
    embeddings, batch_stats = _forward(backbone, params["backbone"], state.batch_stats,
                                       batch[input_key], dropout_rng)
    loss, accuracy = sharded_head.margin_loss(
        params["head"]["kernel"], embeddings, batch["label"], margin, keys["margin"],
        sample_rng, classes, axis_name)
    return loss, (batch_stats, accuracy)

  (loss, (batch_stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state = apply_updates(state, grads, batch_stats, tx, axis_name,
                            local_shards=classes.num_shards)
  # Both are global values already (the same on every device); pmean keeps the replicated
  # head's metric path.
  metrics = jax.lax.pmean({"loss": loss, "accuracy": accuracy}, axis_name)
  metrics["lr"] = schedule(state.step)
  return new_state, metrics


TEACHER_MAPS = ("sequential", "vmap")


def online_targets(images, frozen: dict, *, teacher, adaptor: nn.Module,
                   teacher_map: str = "sequential",
                   positions: tuple[tuple[int, ...], ...] | None = None):
  """MST-KD targets computed in the step: frozen teachers, then the frozen adaptor.

  The teachers come in stacks, each of one architecture: `teacher` is that architecture's
  module, or a tuple of modules, one per stack; frozen["teachers"] is the stack's variables
  (stacked on a leading axis), or a tuple of them in the same order; `positions[k]` lists
  the places in the fixed teacher order of stack k's teachers (None: one stack, in order).
  frozen["adaptor"] holds the adaptor's variables. Each teacher embeds the (already
  flipped) images [B, H, W, 3]; its embeddings [B, D_g] are L2-normalized, concatenated in
  teacher order into [B, sum D_g], and the adaptor (inference mode) maps them to unit
  targets [B, D]. Exactly what extraction + the adaptor stage cache.

  teacher_map: "sequential" runs a stack's teachers one after another with lax.map
  (ordinary convolutions, the teacher compiled once); "vmap" maps one forward over the
  stacked parameters, which XLA lowers to G-group convolutions: the same numbers, but on
  CPU 2-3x slower than G ordinary forwards (`python -m mstkd_jax.bench` times both).
  Different stacks run one after another.
  """
  modules = tuple(teacher) if isinstance(teacher, (tuple, list)) else (teacher,)
  stacks = frozen["teachers"] if isinstance(teacher, (tuple, list)) else (frozen["teachers"],)
  if positions is None:
    if len(modules) != 1:
      raise ValueError("several teacher stacks need their `positions` in the teacher order")
    positions = (tuple(range(jax.tree.leaves(stacks[0])[0].shape[0])),)
  if teacher_map not in TEACHER_MAPS:
    raise ValueError(f"teacher_map must be one of {TEACHER_MAPS}, got {teacher_map!r}")
  ordered = [None] * sum(len(p) for p in positions)
  for module, variables, places in zip(modules, stacks, positions):
    forward = lambda v, module=module: module.apply(v, images, train=False)
    if teacher_map == "sequential":
      embeddings = jax.lax.map(forward, variables)
    else:
      embeddings = jax.vmap(forward)(variables)
    embeddings = losses.l2_normalize(embeddings)                     # [G_k, B, D_k]
    for j, place in enumerate(places):
      ordered[place] = embeddings[j]
  concatenated = jnp.concatenate(ordered, axis=-1)                   # [B, sum D_g]
  targets = adaptor.apply(frozen["adaptor"], concatenated, train=False)
  return jax.lax.stop_gradient(targets)


def student_step(state: TrainState, batch, rng, frozen: dict | None = None, *,
                 backbone: nn.Module, head: nn.Module | None,
                 margin: losses.MarginSpec | None, kd_weight: float,
                 tx: optax.GradientTransformation, schedule, target_fn=None,
                 kd_distance: str = "mse",
                 orientation: str = "as_fed", axis_name=AXIS,
                 classes: sharded_head.ClassShards | None = None):
  """One SGD step of an MST-KD student: the KD term alone (head None: a-KD) or with the
  margin head's CE (EAF-KD). The KD term is losses.kd_loss with `kd_weight` and
  `kd_distance` (a losses.KD_DISTANCES name; "mse" is the paper's).

  Targets come from batch["target"] (cached: looked up on the host) or, when `target_fn` is
  given, from target_fn(images, frozen) inside the step (online: `frozen` is one named
  pytree of the frozen networks' variables, e.g. {"teachers": ..., "adaptor": ...}, never
  seen by the optimiser), where images are the images fed, or with orientation="stored"
  those images un-mirrored by batch["flip"] (the stored images, as the cached "stored"
  targets).

  `classes` makes the margin head class-sharded, as in classification_step (EAF-KD only:
  a-KD has no head); the KD term is the same either way. Its CE and accuracy are then those
  of the global batch.
  """
  if classes is not None and head is None:
    raise ValueError("classes= shards a margin head; this student has none (a-KD)")
  keys = step_rngs(rng, state.step, ("dropout", "margin"))
  dropout_rng = jax.random.fold_in(keys["dropout"], jax.lax.axis_index(axis_name))
  if target_fn is None:
    targets = batch["target"]
  else:
    images = network_input(batch["image"])
    if orientation == "stored":
      images = jnp.where(batch["flip"][:, None, None, None], images[:, :, ::-1], images)
    elif orientation != "as_fed":
      raise ValueError(f"orientation must be 'as_fed' or 'stored', got {orientation!r}")
    targets = target_fn(images, frozen)

  def loss_fn(params):
    embeddings, batch_stats = _forward(backbone, params["backbone"], state.batch_stats,
                                       batch["image"], dropout_rng)
    kd = losses.kd_loss(targets, embeddings, kd_weight, kd_distance)
    parts = {"kd": kd}
    loss = kd
    if head is not None and classes is not None:
      # The Partial-FC key as _sharded_classification_step folds it.
      ce, accuracy = sharded_head.margin_loss(
          params["head"]["kernel"], embeddings, batch["label"], margin, keys["margin"],
          jax.random.fold_in(keys["margin"], 1), classes, axis_name)
      loss = loss + ce
      parts.update(ce=ce, accuracy=accuracy)
    elif head is not None:
      ce, cos = _margin_loss(head, params["head"], embeddings, batch["label"], margin,
                             keys["margin"], axis_name)
      loss = loss + ce
      parts.update(ce=ce, accuracy=jnp.mean(jnp.argmax(cos, axis=-1) == batch["label"]))
    return loss, (batch_stats, parts)

  (loss, (batch_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state = apply_updates(state, grads, batch_stats, tx, axis_name,
                            local_shards=classes.num_shards if classes is not None else 0)
  metrics = jax.lax.pmean({"loss": loss, **parts}, axis_name)
  metrics["lr"] = schedule(state.step)
  return new_state, metrics


def embed_step(variables: Any, batch, *, backbone: nn.Module):
  """Inference embeddings [B, D] (raw backbone output) of batch["image"] (normalized
  float32 or uint8 pixels, see network_input) and of its flip."""
  images = network_input(batch["image"])
  both = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
  out = backbone.apply(variables, both, train=False)
  return {"embedding": out[:images.shape[0]], "embedding_flip": out[images.shape[0]:]}

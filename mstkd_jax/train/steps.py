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
                  axis_name=AXIS) -> TrainState:
  """Averages gradients over devices and applies the optimiser."""
  grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, opt_state=opt_state)


def classification_step(state: TrainState, batch, rng, *, backbone: nn.Module,
                        head: nn.Module, margin: losses.MarginSpec,
                        tx: optax.GradientTransformation, schedule, axis_name=AXIS):
  """One SGD step of backbone + margin head (teachers, the student alone, the adaptor).

  batch: {"image": [B, ...] backbone input, "label": [B] int identity}. The backbone is
  any module taking (inputs, train=) and returning embeddings (an IResNet, or the adaptor
  over concatenated teacher embeddings).
  """
  keys = step_rngs(rng, state.step, ("dropout", "margin"))
  dropout_rng = jax.random.fold_in(keys["dropout"], jax.lax.axis_index(axis_name))
  labels = batch["label"]

  def loss_fn(params):
    variables = {"params": params["backbone"]}
    mutable = []
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
      mutable = ["batch_stats"]
    embeddings, new_vars = backbone.apply(variables, batch["image"], train=True,
                                          mutable=mutable, rngs={"dropout": dropout_rng})
    cos = head.apply({"params": params["head"]}, embeddings)
    margins = losses.draw_margins(keys["margin"], losses.target_cosine(cos, labels), margin,
                                  axis_name)
    loss = losses.cross_entropy(losses.margin_logits(cos, labels, margins, margin), labels)
    return loss, (new_vars.get("batch_stats", state.batch_stats), cos)

  (loss, (batch_stats, cos)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = apply_updates(state, grads, batch_stats, tx, axis_name)
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(cos, axis=-1) == labels),
  }
  metrics = jax.lax.pmean(metrics, axis_name)
  metrics["lr"] = schedule(state.step)
  return new_state, metrics


def embed(variables: Any, batch, *, backbone: nn.Module):
  """Inference embeddings [B, D] (raw backbone output) of batch["image"] and of its flip."""
  images = batch["image"]
  both = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
  out = backbone.apply(variables, both, train=False)
  return {"embedding": out[:images.shape[0]], "embedding_flip": out[images.shape[0]:]}

"""Training state and optimiser: SGD with momentum, PyTorch-style weight decay, step LR decay.

The optimiser treats each top-level entry of the parameters ("backbone", "head", "adaptor",
...) as a parameter group with its own LR schedule and optional gradient-norm clipping, as
the authors' PyTorch code does with one torch.optim.SGD per module.
"""

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; `step` is also the data position (the pipeline is stateless)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def step_decay_schedule(peak_lr: float, steps_per_epoch: int, decay_epochs: Sequence[int],
                        factor: float = 0.1) -> Callable[[jax.Array], jax.Array]:
  """LR for the update made at (0-based) `step`: peak_lr x factor^(decays passed).

  `decay_epochs` are 1-based epoch numbers from which the LR is multiplied by `factor`,
  reproducing the authors' LambdaLR (0.1 ** len([m for m in epochs if m - 1 <= epoch]),
  stepped once per epoch): with decay_epochs (8, 14, 20, 25) the 8th epoch already runs at
  0.1 x peak, i.e. the LR drops at step (8 - 1) x steps_per_epoch.
  """
  boundaries = jnp.asarray([(e - 1) * steps_per_epoch for e in sorted(decay_epochs)] or [-1],
                           jnp.int32)
  num_boundaries = len(decay_epochs)

  def schedule(step):
    passed = jnp.sum((jnp.asarray(step, jnp.int32) >= boundaries)[:num_boundaries])
    return peak_lr * jnp.asarray(factor, jnp.float32) ** passed
  return schedule


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 512) -> float:
  """The linear scaling rule of the paper: LR = base_lr x global_batch / 512."""
  return base_lr * global_batch / reference_batch


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """Optimiser settings of one top-level parameter entry."""
  schedule: Callable[[jax.Array], jax.Array]
  clip_norm: float | None = None


def sgd(groups: Mapping[str, ParamGroup], *, momentum: float = 0.9,
        weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """SGD as torch.optim.SGD(momentum, weight_decay), one group per top-level param entry.

  Per group: clip the gradient's global norm (on that group alone, as
  clip_grad_norm_(backbone.parameters(), 5) does), add weight_decay x param to the gradient
  (PyTorch's coupled weight decay, on every parameter), then buf = momentum x buf + grad and
  param -= lr x buf.
  """
  def group_tx(group: ParamGroup):
    parts = [optax.clip_by_global_norm(group.clip_norm)] if group.clip_norm else []
    parts += [optax.add_decayed_weights(weight_decay),
              optax.sgd(group.schedule, momentum=momentum)]
    return optax.chain(*parts)

  def labels(params):
    missing = set(params) - set(groups)
    if missing:
      raise ValueError(f"no optimiser settings for parameter groups {sorted(missing)}")
    return {name: jax.tree.map(lambda _, n=name: n, sub) for name, sub in params.items()}

  return optax.multi_transform({name: group_tx(g) for name, g in groups.items()}, labels)


def create_state(params, batch_stats, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params))

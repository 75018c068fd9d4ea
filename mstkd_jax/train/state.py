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
import numpy as np
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
  """LR for the update made at (0-based) `step`: peak_lr x factor^(decays passed), float32.

  `decay_epochs` are 1-based epoch numbers from which the LR is multiplied by `factor`,
  reproducing the authors' LambdaLR (0.1 ** len([m for m in epochs if m - 1 <= epoch]),
  stepped once per epoch): with decay_epochs (8, 14, 20, 25) the 8th epoch already runs at
  0.1 x peak, i.e. the LR drops at step (8 - 1) x steps_per_epoch.

  The LR after k decays is float32(peak_lr) x round_f32(factor^k) to the last bit, at every
  boundary of every config (tests/test_optim.py). Optax multiplies its scales one after
  another in float32, which can land a bit away from that, so it runs over the unit LR
  with scales (`_unit_scales`) chosen to make its running product exactly
  round_f32(factor^k), and peak_lr multiplies that once.
  """
  boundaries: dict[int, int] = {}  # step -> how many decays start there
  for epoch in decay_epochs:
    step = (epoch - 1) * steps_per_epoch
    boundaries[step] = boundaries.get(step, 0) + 1
  scales = _unit_scales(factor, [boundaries[b] for b in sorted(boundaries)])
  unit = optax.piecewise_constant_schedule(1.0, dict(zip(sorted(boundaries), scales)))
  return lambda step: jnp.float32(peak_lr) * unit(step)


def _unit_scales(factor: float, decays: Sequence[int]) -> list[float]:
  """Scales s_i whose float32 running product is round_f32(factor_f32^k) after each boundary.

  `decays[i]` is how many decays boundary i passes at once (k grows by that much). Where no
  float32 scale makes a product exact (not the case for 0.1 up to 12 decays), the nearest
  is kept: the next boundary aims at its own power again, so errors never add up.
  """
  f = float(np.float32(factor))
  value, k, scales = np.float32(1.0), 0, []
  for count in decays:
    k += count
    target = np.float32(f ** k)
    guess = np.float32(float(target) / float(value)) if value else np.float32(0.0)
    candidates = [np.float32(f ** count), guess]
    up = down = guess
    for _ in range(4):
      up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
      candidates += [up, down]
    exact = [c for c in candidates if c >= 0 and np.float32(c * value) == target]
    scale = exact[0] if exact else guess
    scales.append(float(scale))
    value = np.float32(scale * value)
  return scales


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

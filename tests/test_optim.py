"""LR schedule boundaries and SGD against a numpy transcription of torch.optim.SGD."""

import numpy as np
import optax
import pytest

from mstkd_jax.train import state as state_lib


def test_linear_scaling_rule():
  assert state_lib.scaled_lr(0.1, 512) == 0.1
  assert state_lib.scaled_lr(0.1, 128) == 0.025


def test_step_decay_at_the_authors_epoch_boundaries():
  # Authors: lr(epoch) = 0.1 ** len([m for m in (8, 14) if m - 1 <= epoch]), per epoch.
  schedule = state_lib.step_decay_schedule(1.0, steps_per_epoch=10, decay_epochs=(8, 14))
  expected = {0: 1.0, 69: 1.0, 70: 0.1, 129: 0.1, 130: 0.01, 500: 0.01}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6)


def test_no_decay_epochs_keeps_the_lr():
  schedule = state_lib.step_decay_schedule(0.5, 10, ())
  assert float(schedule(0)) == float(schedule(10_000)) == 0.5


def torch_sgd_reference(params, grads_per_step, lrs, momentum, wd, clip):
  """torch: clip_grad_norm_(backbone) then SGD(momentum, weight_decay, dampening=0)."""
  params = {k: v.astype(np.float64).copy() for k, v in params.items()}
  bufs = {}
  for grads, lr in zip(grads_per_step, lrs):
    grads = {k: v.astype(np.float64) for k, v in grads.items()}
    norm = np.sqrt(sum(np.sum(g ** 2) for k, g in grads.items() if k.startswith("backbone")))
    factor = min(1.0, clip / (norm + 1e-6))
    for k in params:
      g = grads[k] * (factor if k.startswith("backbone") else 1.0)
      d = g + wd * params[k]
      bufs[k] = d if k not in bufs else momentum * bufs[k] + d
      params[k] = params[k] - lr * bufs[k]
  return params


def test_sgd_matches_pytorch_sgd_with_clipping_and_weight_decay():
  rng = np.random.default_rng(0)
  params = {"backbone": {"w": rng.normal(size=(4, 3)).astype(np.float32)},
            "head": {"k": rng.normal(size=(3, 2)).astype(np.float32)}}
  grads = [{"backbone": {"w": rng.normal(0, s, (4, 3)).astype(np.float32)},
            "head": {"k": rng.normal(0, 5, (3, 2)).astype(np.float32)}} for s in (10, 0.1, 3)]
  schedule = state_lib.step_decay_schedule(0.2, 1, (3,))
  tx = state_lib.sgd({"backbone": state_lib.ParamGroup(schedule, 5.0),
                      "head": state_lib.ParamGroup(schedule)}, momentum=0.9, weight_decay=5e-4)
  opt_state = tx.init(params)
  current = params
  for g in grads:
    updates, opt_state = tx.update(g, opt_state, current)
    current = optax.apply_updates(current, updates)
  flat = lambda t: {"backbone.w": t["backbone"]["w"], "head.k": t["head"]["k"]}
  expected = torch_sgd_reference(flat(params), [flat(g) for g in grads], [0.2, 0.2, 0.02],
                                 0.9, 5e-4, 5.0)
  for key, value in flat(current).items():
    np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6)


def test_every_parameter_group_needs_settings():
  tx = state_lib.sgd({"backbone": state_lib.ParamGroup(lambda s: 0.1)})
  with pytest.raises(ValueError, match="adaptor"):
    tx.init({"backbone": {"w": np.zeros(2)}, "adaptor": {"w": np.zeros(2)}})

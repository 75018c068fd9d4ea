"""LR schedule boundaries and SGD against a numpy transcription of torch.optim.SGD."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import distill, teacher
from mstkd_jax.errors import UserError
from mstkd_jax.train import build, state as state_lib


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


def _formula_schedule(peak_lr, steps_per_epoch, decay_epochs, factor):
  """The schedule's formula in jnp: peak x float32(factor) ** decays passed."""
  boundaries = jnp.asarray([(e - 1) * steps_per_epoch for e in sorted(decay_epochs)] or [-1],
                           jnp.int32)

  def schedule(step):
    passed = jnp.sum((jnp.asarray(step, jnp.int32) >= boundaries)[:len(decay_epochs)])
    return peak_lr * jnp.asarray(factor, jnp.float32) ** passed
  return schedule


def _optim_sections(config, prefix=""):
  """(name, optim section, global batch) of every section of a config holding an optimiser."""
  if "optim" in config and "train" in config:
    yield prefix or "config", config.optim, config.train.batch_size
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and key not in ("optim", "train"):
      yield from _optim_sections(value, f"{prefix}{key}.")


def _config_schedules():
  """(where, peak LR, decay epochs, factor) of every parameter group of every preset."""
  out = set()
  for module in (teacher, distill):
    for preset in ("default", "smoke", "tiny", "full", "bupt_iresnet34"):
      try:
        config = module.get_config(preset)
      except UserError:  # a preset this config file does not have
        continue
      for name, optim, batch in _optim_sections(config):
        for base_lr, _ in build.backbone_and_head_groups(optim).values():
          out.add((f"{module.__name__}:{preset} {name}", state_lib.scaled_lr(base_lr, batch),
                   tuple(optim.lr_decay_epochs), optim.lr_decay_factor))
  return sorted(out)


@pytest.mark.parametrize("steps_per_epoch", [1, 7, 10])
def test_optax_schedule_is_bit_equal_to_the_formula_at_every_config_boundary(
    steps_per_epoch):
  schedules = _config_schedules()
  assert len({s[2] for s in schedules}) >= 4  # several decay settings are covered
  for where, peak, decay_epochs, factor in schedules:
    schedule = state_lib.step_decay_schedule(peak, steps_per_epoch, decay_epochs, factor)
    formula = _formula_schedule(peak, steps_per_epoch, decay_epochs, factor)
    steps = {0, 1, 10**6} | {max((e - 1) * steps_per_epoch + d, 0)
                             for e in decay_epochs for d in (-1, 0, 1)}
    # Jitted with a traced int32 step, as the train step calls it (eagerly, XLA's pow gives
    # the formula other last bits than under jit: 0.1**4 -> 1.0000001e-4).
    schedule, formula = jax.jit(schedule), jax.jit(formula)
    for step in sorted(steps):
      got, want = np.asarray(schedule(jnp.int32(step))), np.asarray(formula(jnp.int32(step)))
      assert got.dtype == want.dtype == np.float32, where
      assert got.tobytes() == want.tobytes(), (where, step, got, want)


def test_schedule_with_several_decays_at_one_epoch_passes_them_all():
  schedule = jax.jit(state_lib.step_decay_schedule(1.0, 4, (3, 3, 5)))
  reference = jax.jit(_formula_schedule(1.0, 4, (3, 3, 5), 0.1))
  got = [float(schedule(jnp.int32(s))) for s in (7, 8, 15, 16)]
  assert got == [float(reference(jnp.int32(s))) for s in (7, 8, 15, 16)]
  np.testing.assert_allclose(got, [1.0, 0.01, 0.01, 0.001], rtol=1e-6)


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

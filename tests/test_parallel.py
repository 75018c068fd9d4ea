"""1 vs 8 devices and pmap vs shard_map give the same training trajectory."""

import functools

import jax
import numpy as np
import pytest

import numerics
from mstkd_jax import losses, models
from mstkd_jax.train import parallel as parallel_lib, state as state_lib, steps
from mstkd_jax.train import build

GLOBAL_BATCH = 16
NUM_CLASSES = 6
# 1 or 8 devices, pmap or shard_map: the same 3 steps with BatchNorm statistics and
# gradients summed in another order; the widest reduction is the first BatchNorm's, over 16
# images x 16 x 16 pixels (4,096 terms): 144 EPS32 = 1.7e-5. Measured (largest relative
# difference of losses, parameters, BatchNorm statistics, optimizer state), XLA's code path
# by XLA_FLAGS=--xla_cpu_max_isa: AVX-512 (default on the AVX-512/AMX CPU) 9 EPS32, AVX2
# 6, SSE4.2 13.
TRAINING_BOUND = numerics.reorder_bound(terms=GLOBAL_BATCH * 16 * 16, steps=3)


def _setup():
  # One block per stage keeps compilation short; the structure is IResNet's.
  backbone = models.create("iresnet18", stage_depths=(1, 1, 1, 1), width=4,
                           embedding_size=16, axis_name=parallel_lib.AXIS)
  head = models.create("margin_head", num_classes=NUM_CLASSES)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  variables = build.init_variables(backbone, k1, np.zeros((1, 16, 16, 3), np.float32))
  head_vars = build.init_variables(head, k2, np.zeros((1, 16), np.float32))
  schedule = state_lib.step_decay_schedule(0.1, 2, (2,))
  tx = state_lib.sgd({"backbone": state_lib.ParamGroup(schedule, 5.0),
                      "head": state_lib.ParamGroup(schedule)})
  state = state_lib.create_state({"backbone": variables["params"],
                                  "head": head_vars["params"]},
                                 variables["batch_stats"], tx)
  # The "+" elastic head draws margins and ranks cosines over the global batch.
  step = functools.partial(steps.classification_step, backbone=backbone, head=head,
                           margin=losses.MarginSpec("elastic_arcface_plus", 64.0, 0.5, 0.05),
                           tx=tx, schedule=schedule)
  return jax.tree.map(np.asarray, state), step


def _batches(num_steps, devices):
  rng = np.random.default_rng(0)
  for _ in range(num_steps):
    images = rng.uniform(-1, 1, (GLOBAL_BATCH, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)
    yield {"image": images.reshape(devices, -1, 16, 16, 3),
           "label": labels.reshape(devices, -1)}


def _train(kind, devices, num_steps=3):
  state, step = _setup()
  par = parallel_lib.DataParallel(kind, devices)
  p_step = par.wrap(step)
  dstate = par.replicate(state)
  rng = par.replicate(jax.random.PRNGKey(1))
  losses_seen = []
  for batch in _batches(num_steps, devices):
    dstate, metrics = p_step(dstate, par.shard(batch), rng)
    losses_seen.append(float(par.unreplicate(metrics)["loss"]))
  return par.unreplicate(dstate), losses_seen


@pytest.fixture(scope="module")
def reference():
  assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
  return _train("pmap", 1)


@pytest.mark.parametrize("kind,devices", [("pmap", 8), ("shard_map", 8)])
def test_same_parameters_whatever_devices_and_parallelism(reference, kind, devices):
  ref_state, ref_losses = reference
  state, seen = _train(kind, devices)
  assert int(state.step) == int(ref_state.step) == 3
  numerics.check("losses", numerics.difference(seen, ref_losses), TRAINING_BOUND)
  numerics.check_tree("params", ref_state.params, state.params, TRAINING_BOUND)
  numerics.check_tree("batch_stats", ref_state.batch_stats, state.batch_stats,
                      TRAINING_BOUND)
  numerics.check_tree("optimizer state", ref_state.opt_state, state.opt_state,
                      TRAINING_BOUND)


def test_training_changes_parameters(reference):
  state, _ = _setup()
  ref_state, _ = reference
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
           zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params))]
  assert min(moved) > 0

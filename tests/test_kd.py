"""MST-KD targets: online (frozen networks inside the step) equals cached (extracted)."""

import functools

import jax
import numpy as np

import numerics
from mstkd_jax import models
from mstkd_jax.data import input_pipeline
from mstkd_jax.stages import adaptor as adaptor_stage, extract
from mstkd_jax.train import parallel as parallel_lib, state as state_lib, steps
from mstkd_jax.train import build

NUM_TEACHERS, EMBEDDING, SIZE, BATCH = 3, 16, 16, 8
# Online (teachers and adaptor inside the student step) against cached (extracted, then
# mapped) targets: the same networks, fused and reduced differently; one step, the widest
# reduction a teacher BatchNorm's over 8 images x 16 x 16 (2,048 terms): 44 EPS32 = 5.2e-6.
# Measured: targets equal, losses within 2 EPS32 (AVX-512, AVX2 and SSE4.2 code paths).
KD_BOUND = numerics.reorder_bound(terms=BATCH * SIZE * SIZE)


def _networks():
  teacher = models.create("iresnet18", stage_depths=(1, 1, 1, 1), width=4,
                          embedding_size=EMBEDDING, axis_name=parallel_lib.AXIS)
  example = np.zeros((1, SIZE, SIZE, 3), np.float32)
  teachers = [build.init_variables(teacher, jax.random.PRNGKey(i), example, train=False)
              for i in range(NUM_TEACHERS)]
  # Non-trivial running statistics, so inference BatchNorm matters.
  rng = np.random.default_rng(0)
  teachers = [jax.tree_util.tree_map_with_path(
      lambda p, x: (x + rng.normal(0, 0.1, x.shape)).astype(x.dtype)
      if "batch_stats" in jax.tree_util.keystr(p) and "mean" in jax.tree_util.keystr(p)
      else x, t) for t in teachers]
  adaptor = models.create("adaptor", kind="DLDPO", embedding_size=EMBEDDING, dropout=0.2)
  adaptor_vars = build.init_variables(adaptor, jax.random.PRNGKey(9),
                                        np.zeros((1, NUM_TEACHERS * EMBEDDING), np.float32))
  return teacher, teachers, adaptor, adaptor_vars


def test_online_targets_equal_the_cached_targets_and_the_losses_agree():
  teacher, teachers, adaptor, adaptor_vars = _networks()
  parallel = parallel_lib.get("pmap", 1)
  images = np.random.default_rng(1).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)

  # Cached: the extraction stage's embeddings (image and mirror), then the adaptor stage's map.
  extracted = np.stack([extract._normalized_pair(v, teacher, images, parallel, 4)  # pylint: disable=protected-access
                        for v in teachers], axis=2)                        # [B, 2, G, D]
  cached = adaptor_stage._map(adaptor_stage._apply_fn(adaptor), adaptor_vars, extracted,  # pylint: disable=protected-access
                              np.empty((BATCH, 2, EMBEDDING), np.float32))
  flips = np.arange(BATCH) % 2 == 1
  cached_fed = cached[np.arange(BATCH), flips.astype(int)]                 # [B, D]

  # Online: the same images as fed (mirrored where flipped), through the frozen networks.
  fed = input_pipeline.normalize_images(np.where(flips[:, None, None, None],
                                                 images[:, :, ::-1], images))
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *teachers)
  online = steps.online_targets(fed, {"teachers": stacked, "adaptor": adaptor_vars},
                                teacher=teacher, adaptor=adaptor)
  numerics.check_tree("targets", cached_fed, online, KD_BOUND)

  # The student's loss on this batch is the same either way.
  student = models.create("iresnet18", stage_depths=(1, 1, 1, 1), width=4,
                          embedding_size=EMBEDDING, axis_name=parallel_lib.AXIS)
  variables = build.init_variables(student, jax.random.PRNGKey(5),
                                     np.zeros((1, SIZE, SIZE, 3), np.float32), train=False)
  schedule = state_lib.step_decay_schedule(0.1, 10, ())
  tx = state_lib.sgd({"backbone": state_lib.ParamGroup(schedule, 5.0)})
  state = jax.tree.map(np.asarray, state_lib.create_state(
      {"backbone": variables["params"]}, variables["batch_stats"], tx))
  common = dict(backbone=student, head=None, margin=None, kd_weight=10000.0, tx=tx,
                schedule=schedule)
  batch = {"image": fed[None], "target": cached_fed[None].astype(np.float32),
           "label": np.zeros((1, BATCH), np.int32)}
  rng = parallel.replicate(jax.random.PRNGKey(0))
  cached_step = parallel.wrap(functools.partial(steps.student_step, **common),
                              donate_state=False)
  online_step = parallel.wrap(functools.partial(
      steps.student_step, target_fn=functools.partial(steps.online_targets, teacher=teacher,
                                                      adaptor=adaptor), **common),
                              donate_state=False)
  _, cached_metrics = cached_step(parallel.replicate(state), parallel.shard(batch), rng)
  frozen = parallel.replicate({"teachers": stacked, "adaptor": adaptor_vars})
  _, online_metrics = online_step(parallel.replicate(state), parallel.shard(batch), rng, frozen)
  cached_loss = float(parallel.unreplicate(cached_metrics)["loss"])
  online_loss = float(parallel.unreplicate(online_metrics)["loss"])
  numerics.check("loss", numerics.difference(online_loss, cached_loss), KD_BOUND)
  assert cached_loss > 0

  # orientation="stored" (the released scripts): the stored image's target whatever the
  # flip; online, the teachers see the fed images un-mirrored.
  stored_batch = dict(batch, target=cached[None, :, 0].astype(np.float32), flip=flips[None])
  assert not np.allclose(cached[flips, 0], cached[flips, 1], atol=1e-3)
  stored_cached = parallel.wrap(functools.partial(steps.student_step, **common),
                                donate_state=False)
  stored_online = parallel.wrap(functools.partial(
      steps.student_step, target_fn=functools.partial(steps.online_targets, teacher=teacher,
                                                      adaptor=adaptor),
      orientation="stored", **common), donate_state=False)
  _, metrics_c = stored_cached(parallel.replicate(state), parallel.shard(stored_batch), rng)
  _, metrics_o = stored_online(parallel.replicate(state), parallel.shard(stored_batch), rng,
                               frozen)
  stored_loss = float(parallel.unreplicate(metrics_c)["loss"])
  numerics.check("loss (stored orientation)", numerics.difference(
      float(parallel.unreplicate(metrics_o)["loss"]), stored_loss), KD_BOUND)
  assert abs(stored_loss - cached_loss) > 1e-3 * cached_loss  # the flipped targets differ

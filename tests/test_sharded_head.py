"""The class-sharded margin head (head.shard_classes) and Partial-FC sampling
(head.sample_rate) on 8 simulated devices: the distributed softmax against numpy, the same
training as the replicated head, sampling, checkpoints across device counts, bad input, and
the adaptor and student stages with it."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# pylint: disable=g-import-not-at-top,wrong-import-position
import functools
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import numerics
from mstkd_jax import losses, models
from mstkd_jax.errors import UserError
from mstkd_jax.train import build, loop, parallel as parallel_lib, sharded_head
from mstkd_jax.train import state as state_lib, steps
from mstkd_jax.train.checkpoints import Checkpoints

DEVICES = 8
GLOBAL_BATCH = 16
NUM_CLASSES = 20      # 3 per device and 4 padding classes on 8 devices
EMBEDDING = 16
# The class-sharded head against the replicated one: the softmax normaliser is summed over
# the devices' classes (pmax/psum) instead of in one row, the gradients in another order,
# and the margin logits are s * cos with s = 64 (logit_scale), whose rounding exp() turns
# into a relative error of s * EPS32 in every gradient. 3 steps over 16 images of 16 x 16:
# 912 EPS32 = 1.1e-4. Measured on 3 steps (largest relative difference, the head's
# gradients relative to their own largest value): AVX-512 (default on the AVX-512/AMX CPU)
# 181 EPS32, AVX2 154, SSE4.2 77; the parameters and losses within 11 EPS32.
TRAINING_BOUND = numerics.reorder_bound(terms=GLOBAL_BATCH * 16 * 16, steps=3, logit_scale=64)


# ------------------------------------------------------------------ head against numpy

def _numpy_margin_ce(cos, labels, margins, spec, active):
  """Per-sample CE of the margin logits over the active classes, float64 numpy."""
  cos = np.clip(cos.astype(np.float64), -1, 1)
  rows = np.arange(len(labels))
  target = cos[rows, labels]
  if spec.additive_angle:
    new = np.cos(np.arccos(np.clip(target, -1 + 1e-7, 1 - 1e-7)) + margins)
  else:
    new = target - margins
  logits = spec.s * cos
  logits[rows, labels] = spec.s * new
  logits = np.where(active[None], logits, -np.inf)
  top = logits.max(axis=1, keepdims=True)
  log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
  return log_z - logits[rows, labels]


def _mesh_map(fn, in_specs, out_specs):
  par = parallel_lib.DataParallel("shard_map", DEVICES)
  return jax.jit(jax.shard_map(fn, mesh=par.mesh, in_specs=in_specs, out_specs=out_specs,
                               check_vma=False))


@pytest.mark.parametrize("name", losses.HEADS)
def test_distributed_cross_entropy_equals_numpy_on_the_full_matrix(name):
  spec = losses.MarginSpec(name)
  shards = sharded_head.ClassShards(NUM_CLASSES, DEVICES)
  rng = np.random.default_rng(0)
  cos = rng.uniform(-1, 1, (GLOBAL_BATCH, shards.padded_classes)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)
  margins = rng.normal(spec.m, 0.05, GLOBAL_BATCH).astype(np.float32)
  # Padding classes and some not-sampled classes (never a label) are inactive.
  active = np.arange(shards.padded_classes) < NUM_CLASSES
  inactive = np.setdiff1d(np.arange(NUM_CLASSES), labels)[:3]
  active[inactive] = False

  def per_device(cos_block, active_block):
    shard = jax.lax.axis_index("batch")
    local = labels - shard * shards.shard_size
    positions = jnp.where((local >= 0) & (local < shards.shard_size), local, -1)
    ce = losses.sharded_margin_cross_entropy(cos_block, positions, jnp.asarray(margins),
                                             active_block, spec, "batch")
    target = losses.sharded_target_cosine(cos_block, positions, "batch")
    class_ids = shard * shards.shard_size + jnp.arange(shards.shard_size)
    argmax = losses.sharded_argmax(cos_block, class_ids, active_block, "batch")
    return ce, target, argmax

  ce, target, argmax = _mesh_map(per_device, (P(None, "batch"), P("batch")), P())(
      cos, active)
  np.testing.assert_allclose(ce, _numpy_margin_ce(cos, labels, margins, spec, active),
                             rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(target, cos[np.arange(GLOBAL_BATCH), labels])
  np.testing.assert_array_equal(argmax, np.argmax(np.where(active, cos, -np.inf), axis=1))
  # The replicated head's CE on the same logits (the path shard_classes=false takes).
  if active[:NUM_CLASSES].all():
    full = losses.margin_logits(cos[:, :NUM_CLASSES], labels, margins, spec)
    np.testing.assert_allclose(
        ce, optax.softmax_cross_entropy_with_integer_labels(full, labels), rtol=1e-5)


def test_distributed_cross_entropy_is_stable_far_from_zero():
  """Logits of s = 64 and margins push exp out of float32's range without the max."""
  spec = losses.MarginSpec("cosface", s=1000.0)
  cos = np.full((2, 8), 0.9, np.float32)
  cos[:, 3] = 0.95
  labels = np.asarray([3, 5], np.int32)

  def per_device(cos_block):
    shard = jax.lax.axis_index("batch")
    positions = jnp.where(labels == shard, 0, -1)
    return losses.sharded_margin_cross_entropy(cos_block, positions,
                                               jnp.full(2, 0.35, jnp.float32),
                                               jnp.ones(1, bool), spec, "batch")

  ce = _mesh_map(per_device, P(None, "batch"), P())(cos)
  assert np.isfinite(ce).all()
  np.testing.assert_allclose(
      ce, _numpy_margin_ce(cos, labels, np.full(2, 0.35), spec, np.ones(8, bool)), rtol=1e-5)


# ------------------------------------------------------- sharded vs replicated training

def _recording(tx):
  """tx whose state also holds the gradient of the last update (to compare gradients)."""
  def init(params):
    return tx.init(params), jax.tree.map(jnp.zeros_like, params)

  def update(grads, state, params=None):
    updates, inner = tx.update(grads, state[0], params)
    return updates, (inner, grads)
  return optax.GradientTransformation(init, update)


def _setup(classes=None, head_name="elastic_arcface_plus"):
  backbone = models.create("iresnet18", stage_depths=(1, 1, 1, 1), width=4,
                           embedding_size=EMBEDDING, axis_name=parallel_lib.AXIS)
  head = models.create("margin_head", num_classes=NUM_CLASSES)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  variables = build.init_variables(backbone, k1, np.zeros((1, 16, 16, 3), np.float32))
  head_vars = build.init_variables(head, k2, np.zeros((1, EMBEDDING), np.float32))
  schedule = state_lib.step_decay_schedule(0.1, 2, (2,))
  tx = _recording(state_lib.sgd({"backbone": state_lib.ParamGroup(schedule, 5.0),
                                 "head": state_lib.ParamGroup(schedule)}))
  state = state_lib.create_state({"backbone": variables["params"],
                                  "head": head_vars["params"]}, variables["batch_stats"], tx)
  step = functools.partial(steps.classification_step, backbone=backbone, head=head,
                           margin=losses.MarginSpec(head_name), tx=tx, schedule=schedule,
                           classes=classes)
  return jax.tree.map(np.asarray, state), step


def _batches(start, devices, total=6):
  for step in range(start, total):
    rng = np.random.default_rng(step)
    images = rng.uniform(-1, 1, (GLOBAL_BATCH, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)
    yield {"image": images.reshape(devices, -1, 16, 16, 3),
           "label": labels.reshape(devices, -1)}


def _parallel(kind, devices, sharded, rate=1.0):
  par = parallel_lib.DataParallel(kind, devices)
  return par.with_class_shards(NUM_CLASSES, rate) if sharded else par


def _train(kind, sharded, num_steps=3, rate=1.0):
  par = _parallel(kind, DEVICES, sharded, rate)
  state, step = _setup(par.class_shards)
  p_step = par.wrap(step)
  device_state = par.replicate(state)
  rng = par.replicate(jax.random.PRNGKey(1))
  seen = []
  for batch in _batches(0, DEVICES, num_steps):
    device_state, metrics = p_step(device_state, par.shard(batch), rng)
    seen.append(par.unreplicate(metrics))
  return par.unreplicate(device_state), seen


@pytest.fixture(scope="module")
def replicated():
  assert jax.device_count() == DEVICES
  return _train("pmap", sharded=False)


@pytest.mark.parametrize("kind", parallel_lib.KINDS)
def test_sharded_head_trains_as_the_replicated_head(replicated, kind):
  ref_state, ref_metrics = replicated
  state, metrics = _train(kind, sharded=True)
  assert state.params["head"]["kernel"].shape == (EMBEDDING, NUM_CLASSES)  # joined whole
  for ref, got in zip(ref_metrics, metrics):
    numerics.check("loss", numerics.difference(got["loss"], ref["loss"]), TRAINING_BOUND)
    assert got["accuracy"] == ref["accuracy"]
  numerics.check_tree("params", ref_state.params, state.params, TRAINING_BOUND)
  numerics.check_tree("grads (step 3)", ref_state.opt_state[1], state.opt_state[1],
                      TRAINING_BOUND)
  # Relative to the head's own largest gradient.
  numerics.check_tree("head grads", ref_state.opt_state[1]["head"],
                      state.opt_state[1]["head"], TRAINING_BOUND)
  numerics.check_tree("optimizer state", ref_state.opt_state, state.opt_state,
                      TRAINING_BOUND)
  numerics.check_tree("batch_stats", ref_state.batch_stats, state.batch_stats,
                      TRAINING_BOUND)


def test_replicated_head_is_unchanged_by_the_sharded_code():
  """shard_classes=false takes the old path: DataParallel without class shards replicates
  the head, classification_step without `classes` is the replicated step."""
  par = parallel_lib.DataParallel("pmap", DEVICES)
  assert par.class_shards is None
  placed = par.replicate({"head": {"kernel": np.ones((4, 20), np.float32)}})
  assert placed["head"]["kernel"].shape == (DEVICES, 4, 20)


# --------------------------------------------------------------------------- sampling

def test_sampling_keeps_every_positive_and_the_rate_of_the_rest():
  shards = sharded_head.ClassShards(1000, 2, sample_rate=0.1)
  labels = np.asarray([3, 3, 7, 600, 999, 10, 11, 12], np.int32)
  assert shards.num_sample().tolist() == [50, 50]
  assert shards.sample_slots(len(labels)) == 50

  def per_device(rng):
    shard = jax.lax.axis_index("batch")
    local = labels - shard * shards.shard_size
    owned = (local >= 0) & (local < shards.shard_size)
    index, kept = sharded_head.sample_classes(rng, shard, local, owned, shards, len(labels))
    return index[None], kept[None]

  par = parallel_lib.DataParallel("shard_map", 2)
  run = jax.jit(jax.shard_map(per_device, mesh=par.mesh, in_specs=P(),
                              out_specs=P("batch"), check_vma=False))
  index, kept = map(np.asarray, run(jax.random.PRNGKey(3)))
  again, _ = map(np.asarray, run(jax.random.PRNGKey(3)))
  other, _ = map(np.asarray, run(jax.random.PRNGKey(4)))
  np.testing.assert_array_equal(index, again)           # a function of the key
  assert not np.array_equal(index, other)
  for shard, positives in ((0, {3, 7, 10, 11, 12}), (1, {100, 499})):
    assert (np.diff(index[shard]) > 0).all()            # ascending, no repeats
    assert positives <= set(index[shard][kept[shard]].tolist())
    assert kept[shard].sum() == 50


def test_positives_beyond_the_rate_are_all_kept_and_nothing_else():
  """Partial FC v2: where a shard's positives outnumber int(rate x classes), only they."""
  shards = sharded_head.ClassShards(40, 1, sample_rate=0.1)   # int(0.1 x 40) = 4
  labels = np.arange(0, 16, 2, dtype=np.int32)                 # 8 positives
  index, kept = jax.jit(functools.partial(
      sharded_head.sample_classes, shards=shards, global_batch=len(labels)))(
          jax.random.PRNGKey(0), 0, labels, np.ones(len(labels), bool))
  assert set(np.asarray(index)[np.asarray(kept)].tolist()) == set(labels.tolist())


def test_sampled_training_runs_and_moves_unsampled_rows_only_by_momentum_and_decay():
  """rate 0.1 of 20 classes over 2 shards (10 each): one class drawn per shard, plus the
  positives. A centre that no batch holds still moves: weight decay reaches it through SGD,
  as in Partial FC v2 (the whole weight is one parameter)."""
  par = parallel_lib.DataParallel("shard_map", 2).with_class_shards(NUM_CLASSES, 0.1)
  state, step = _setup(par.class_shards)
  p_step = par.wrap(step)
  device_state = par.replicate(state)
  rng = par.replicate(jax.random.PRNGKey(1))
  seen = set()
  for batch in _batches(0, 2, 3):
    seen |= set(batch["label"].ravel().tolist())
    device_state, metrics = p_step(device_state, par.shard(batch), rng)
    assert np.isfinite(par.unreplicate(metrics)["loss"])
  final = par.unreplicate(device_state)
  grads = final.opt_state[1]["head"]["kernel"]         # the last step's gradient
  moved = np.abs(final.params["head"]["kernel"] - state.params["head"]["kernel"]).max(0)
  assert (moved > 0).all()
  last_labels = set(list(_batches(2, 2, 3))[0]["label"].ravel().tolist())
  # The last step's gradient is zero in the rows it did not sample (a positive always is).
  sampled = np.abs(grads).max(axis=0) > 0
  assert set(np.flatnonzero(~sampled).tolist()).isdisjoint(last_labels)
  assert sampled.sum() <= len(last_labels) + 2


# ------------------------------------------------------------------------ checkpoints

def _loop_run(workdir, kind, devices, total, sharded=True):
  par = _parallel(kind, devices, sharded)
  # ElasticArcFace (not "+": its margin ranking may swap on float-rounding ties).
  state, step = _setup(par.class_shards, head_name="elastic_arcface")
  settings = loop.LoopSettings(name="sharded", total_steps=total, steps_per_epoch=2,
                               images_per_step=GLOBAL_BATCH, log_every=2, checkpoint_every=2)
  return loop.train(workdir=str(workdir), settings=settings, init_state=state, step_fn=step,
                    batches=lambda start: _batches(start, devices), parallel=par,
                    rng=jax.random.PRNGKey(1))


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_run_resumes_bit_identical(tmp_path):
  whole = _loop_run(tmp_path / "whole", "pmap", DEVICES, 4)
  _loop_run(tmp_path / "split", "pmap", DEVICES, 2)                # stopped at step 2
  _assert_same(whole, _loop_run(tmp_path / "split", "pmap", DEVICES, 4))


def test_checkpoint_of_8_devices_resumes_on_4_and_without_sharding(tmp_path):
  _loop_run(tmp_path / "four", "shard_map", DEVICES, 2)
  # The checkpoint holds the whole [D, C] centres and momentum, whatever the devices.
  checkpoints = Checkpoints(str(tmp_path / "four" / "checkpoints"))
  try:
    stored = checkpoints.stored_tree(2)
    saved = checkpoints.restore(2, _setup()[0])
  finally:
    checkpoints.close()
  kernels = {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in
             jax.tree_util.tree_flatten_with_path(
                 stored, is_leaf=lambda x: hasattr(x, "shape"))[0]
             if jax.tree_util.keystr(path).endswith("['head']['kernel']")}
  assert len(kernels) >= 2 and set(kernels.values()) == {(EMBEDDING, NUM_CLASSES)}, kernels
  par4 = _parallel("shard_map", 4, True)                          # 5 classes a device
  _assert_same(par4.unreplicate(par4.replicate(saved)), saved)    # re-split, same values
  shutil.copytree(tmp_path / "four", tmp_path / "plain")
  on_four = _loop_run(tmp_path / "four", "shard_map", 4, 4)
  # Restored by the replicated head (shard_classes=false): the same arrays, nothing to
  # convert.
  plain = _loop_run(tmp_path / "plain", "shard_map", DEVICES, 4, sharded=False)
  numerics.check_tree("params", plain.params, on_four.params, TRAINING_BOUND)
  numerics.check_tree("optimizer state", plain.opt_state, on_four.opt_state, TRAINING_BOUND)


# -------------------------------------------------------------------------- bad input

def _head(**fields):
  return ml_collections.ConfigDict(dict(name="elastic_arcface", s=64.0, m=None, std=None,
                                        shard_classes=False, sample_rate=1.0) | fields)


@pytest.mark.parametrize("rate", [0.0, -0.5, 1.5, True, "half"])
def test_sample_rate_outside_0_1_is_refused_naming_the_field(rate):
  par = parallel_lib.DataParallel("pmap", DEVICES)
  with pytest.raises(UserError, match=r"^config field head.sample_rate=.*expected a number "
                                      r"in \(0, 1\]"):
    build.class_shards(_head(shard_classes=True, sample_rate=rate), par, 100)


def test_sampling_without_shards_and_sharding_where_not_read_are_refused():
  """Every training stage reads the fields (margin_spec(..., shards_classes=True)); a
  caller that does not (the speed benchmark's stage steps) refuses them."""
  par = parallel_lib.DataParallel("pmap", DEVICES)
  with pytest.raises(UserError, match="head.sample_rate=0.5 .* needs head.shard_classes=True"):
    build.class_shards(_head(sample_rate=0.5), par, 100)
  with pytest.raises(UserError, match="head.shard_classes=True: this command does not shard"):
    build.margin_spec(_head(shard_classes=True))
  assert build.margin_spec(_head(shard_classes=True), shards_classes=True).name == \
      "elastic_arcface"


def test_uneven_classes_are_padded_and_said_in_one_line(capsys):
  par = parallel_lib.DataParallel("shard_map", DEVICES)
  par, shards = build.class_shards(_head(shard_classes=True), par, 27997)
  assert (shards.shard_size, shards.padding) == (3500, 3)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1 and "3 padding classes" in lines[0] and "27997" in lines[0]
  assert par.class_shards is shards
  assert parallel_lib.DataParallel("shard_map", DEVICES).class_shards is None


# ------------------------------------------------------------ adaptor and student stages

def _adaptor_stage(tmp_path):
  """(the tiny recipe's adaptor stage config on 8 devices, 1 epoch, and an extraction
  folder of random unit teacher embeddings for its training set)."""
  from configs import distill  # pylint: disable=g-import-not-at-top
  from mstkd_jax import files, pipeline  # pylint: disable=g-import-not-at-top
  from mstkd_jax.data import sources  # pylint: disable=g-import-not-at-top
  config = distill.get_config("tiny")
  config.data.data_dir = str(tmp_path / "data")
  train_set = sources.training_set(config.data, str(tmp_path))
  stage = {s.name: s for s in pipeline.make_stages(config, str(tmp_path), train_set)}[
      "adaptor/specialized/SL"]
  c = ml_collections.ConfigDict(stage.config.to_dict())
  c.num_devices = DEVICES
  c.train.update(epochs=1.0, log_every=2)
  teachers, size = len(train_set.group_names), config.teacher.model.embedding_size
  rng = np.random.default_rng(0)

  def unit(shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  extract_dir = tmp_path / "extract"
  extract_dir.mkdir()
  np.save(extract_dir / "teacher_embeddings.npy", unit((train_set.num_examples, 2, teachers,
                                                        size)))
  files.save_npz(str(extract_dir / "verification_teacher_embeddings.npz"),
                 {"group_a/embeddings": unit((20, 2, teachers, size)),
                  "group_a/issame": np.arange(10) % 2 == 0})
  return c, str(extract_dir), train_set.num_identities


def _final_state(monkeypatch):
  """Records the final host state of every StageRun.train (a list, in call order)."""
  from mstkd_jax.stages import shared  # pylint: disable=g-import-not-at-top
  finals, train = [], shared.StageRun.train

  def recording(self, *args, **kwargs):
    finals.append(train(self, *args, **kwargs))
    return finals[-1]
  monkeypatch.setattr(shared.StageRun, "train", recording)
  return finals


def test_adaptor_stage_with_sharded_head_trains_as_the_replicated_head(tmp_path, monkeypatch):
  """The adaptor stage (ElasticArcFace over every training identity: 16 here, 2 a device)
  with head.shard_classes=true, sample_rate 1, ends where the replicated head does."""
  from mstkd_jax.stages import adaptor, shared  # pylint: disable=g-import-not-at-top
  config, extract_dir, num_classes = _adaptor_stage(tmp_path)
  finals = _final_state(monkeypatch)
  results = []
  for shard in (False, True):
    config.head.shard_classes = shard
    results.append(adaptor.run(config, str(tmp_path / f"shard_{shard}"), "adaptor",
                               inputs=shared.Inputs(extract_dir=extract_dir)))
  replicated, sharded = finals
  assert sharded.params["head"]["kernel"].shape == (EMBEDDING, num_classes)
  assert int(sharded.step) == int(replicated.step) == 6
  # 6 steps of batch 16 over 2 x 16 teacher dimensions, s = 64 (measured: 2 EPS32).
  bound = numerics.reorder_bound(terms=16 * 32, steps=6, logit_scale=64)
  numerics.check_tree("params", replicated.params, sharded.params, bound)
  numerics.check_tree("optimizer state", replicated.opt_state, sharded.opt_state, bound)
  numerics.check("best mean loss", numerics.difference(results[1]["best"]["mean_loss"],
                                                       results[0]["best"]["mean_loss"]),
                 bound)


FEATURES = 24


def _student_setup(classes=None, kd_weight=500.0):
  """An EAF-KD student step (margin-head CE + KD to cached targets). Its backbone is a
  small dense network (the adaptor module over [B, FEATURES] inputs), to compile fast: the
  IResNet's path through the sharded head is the teacher's, tested above."""
  backbone = models.create("adaptor", kind="DuL", embedding_size=EMBEDDING, dropout=0.2)
  head = models.create("margin_head", num_classes=NUM_CLASSES)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params = {"backbone": build.init_variables(backbone, k1, np.zeros((1, FEATURES),
                                                                    np.float32))["params"],
            "head": build.init_variables(head, k2, np.zeros((1, EMBEDDING),
                                                            np.float32))["params"]}
  schedule = state_lib.step_decay_schedule(0.1, 2, (2,))
  tx = _recording(state_lib.sgd({"backbone": state_lib.ParamGroup(schedule, 5.0),
                                 "head": state_lib.ParamGroup(schedule)}))
  state = jax.tree.map(np.asarray, state_lib.create_state(params, {}, tx))
  step = functools.partial(steps.student_step, backbone=backbone, head=head,
                           margin=losses.MarginSpec("elastic_arcface"), kd_weight=kd_weight,
                           tx=tx, schedule=schedule, classes=classes)
  return state, step


def test_kd_student_step_with_sharded_head_trains_as_the_replicated_head(kind="pmap"):
  """EAF-KD's step (steps.student_step) with the class-sharded head, sample_rate 1: the
  same loss, KD and CE terms, gradients and parameters after 3 steps (pmap; shard_map
  wraps the same step as for the teacher's, tested with both above)."""
  rng = np.random.default_rng(7)
  data = []
  for _ in range(3):
    targets = rng.normal(size=(GLOBAL_BATCH, EMBEDDING))
    data.append({
        "image": rng.normal(size=(DEVICES, GLOBAL_BATCH // DEVICES, FEATURES)).astype(
            np.float32),
        "label": rng.integers(0, NUM_CLASSES, (DEVICES, GLOBAL_BATCH // DEVICES)).astype(
            np.int32),
        "target": (targets / np.linalg.norm(targets, axis=-1, keepdims=True)).astype(
            np.float32).reshape(DEVICES, -1, EMBEDDING)})
  runs = []
  for sharded in (False, True):
    par = _parallel(kind, DEVICES, sharded)
    state, step = _student_setup(par.class_shards)
    p_step = par.wrap(step)
    device_state = par.replicate(state)
    key = par.replicate(jax.random.PRNGKey(1))
    metrics = []
    for batch in data:
      device_state, m = p_step(device_state, par.shard(batch), key)
      metrics.append(par.unreplicate(m))
    runs.append((par.unreplicate(device_state), metrics))
  (ref_state, ref_metrics), (state, metrics) = runs
  assert state.params["head"]["kernel"].shape == (EMBEDDING, NUM_CLASSES)
  for ref, got in zip(ref_metrics, metrics):
    for key in ("loss", "kd", "ce"):
      numerics.check(key, numerics.difference(got[key], ref[key]), TRAINING_BOUND)
    assert got["accuracy"] == ref["accuracy"]
  assert ref_metrics[-1]["kd"] > 0.1 * ref_metrics[-1]["ce"]    # both terms matter
  numerics.check_tree("params", ref_state.params, state.params, TRAINING_BOUND)
  numerics.check_tree("grads (step 3)", ref_state.opt_state[1], state.opt_state[1],
                      TRAINING_BOUND)
  numerics.check_tree("optimizer state", ref_state.opt_state, state.opt_state,
                      TRAINING_BOUND)


def test_a_kd_student_step_refuses_class_shards():
  with pytest.raises(ValueError, match="this student has none"):
    steps.student_step(None, {}, None, backbone=None, head=None, margin=None, kd_weight=1.0,
                       tx=None, schedule=None, classes=sharded_head.ClassShards(20, 8))


def test_shard_classes_may_change_in_a_workdir_and_sample_rate_may_not(tmp_path):
  """head.shard_classes is a run-control field (the checkpoint holds the whole centres
  either way): a stage's workdir and the recipe's seed folders accept a change of it.
  head.sample_rate changes what is trained: refused."""
  from configs import distill  # pylint: disable=g-import-not-at-top
  from mstkd_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  stage = ml_collections.ConfigDict(dict(seed=0, head=_head(), train=dict(epochs=1.0)))
  workdir_lib.prepare(stage, str(tmp_path))
  stage.head.shard_classes = True
  workdir_lib.prepare(stage, str(tmp_path))                     # not refused
  stage.head.sample_rate = 0.5
  with pytest.raises(UserError, match=r"differs in: head.sample_rate: 1.0 -> 0.5\)"):
    workdir_lib.prepare(stage, str(tmp_path))
  # The recipe's config (a seed folder's record): the adaptor's head sits under `adaptor`.
  old = workdir_lib.config_dict(distill.get_config("tiny"))
  new = distill.get_config("tiny")
  for role in ("teacher", "adaptor", "student"):
    new[role].head.shard_classes = True
  assert workdir_lib.changed_fields(old, workdir_lib.config_dict(new)) == []
  new.adaptor.head.sample_rate = 0.5
  assert workdir_lib.changed_fields(old, workdir_lib.config_dict(new)) == [
      "adaptor.head.sample_rate: 1.0 -> 0.5"]


class _Stop(Exception):
  pass


@pytest.mark.parametrize("kd", ["none", "EAF-KD", "a-KD"])
def test_student_stages_read_shard_classes_and_sample_rate(tmp_path, monkeypatch, kd):
  """The student alone and the EAF-KD student train with the class-sharded head of
  head.shard_classes / head.sample_rate; a-KD has no head and keeps its devices whole.
  (Stopped where training would start: the steps are tested above.)"""
  from configs import distill  # pylint: disable=g-import-not-at-top
  from mstkd_jax import pipeline  # pylint: disable=g-import-not-at-top
  from mstkd_jax.data import sources  # pylint: disable=g-import-not-at-top
  from mstkd_jax.stages import shared, student  # pylint: disable=g-import-not-at-top
  config = distill.get_config("tiny")
  config.data.data_dir = str(tmp_path / "data")
  config.kd_losses = ("a-KD", "EAF-KD")
  train_set = sources.training_set(config.data, str(tmp_path))
  name = "student/student_alone" if kd == "none" else f"student/mstkd/SL/{kd}"
  stage = {s.name: s for s in pipeline.make_stages(config, str(tmp_path), train_set)}[name]
  c = ml_collections.ConfigDict(stage.config.to_dict())
  c.num_devices = DEVICES
  if kd == "a-KD":
    assert "head" not in c        # a-KD trains no margin head: its config has none
  else:
    c.head.update(shard_classes=True, sample_rate=0.5)
  adaptor_dir = tmp_path / "adaptor"
  adaptor_dir.mkdir()
  np.save(adaptor_dir / "targets.npy", np.zeros((train_set.num_examples, 2,
                                                 config.student.model.embedding_size),
                                                np.float32))
  seen = {}

  def stop(self, settings, init_state, step_fn, batches, **kwargs):
    seen.update(shards=self.parallel.class_shards, classes=step_fn.keywords["classes"],
                head="head" in init_state.params)
    raise _Stop
  monkeypatch.setattr(shared.StageRun, "train", stop)
  with pytest.raises(_Stop):
    student.run(c, str(tmp_path / "student"), name,
                inputs=shared.Inputs(adaptor_dir=str(adaptor_dir)))
  if kd == "a-KD":
    assert seen == {"shards": None, "classes": None, "head": False}
  else:
    assert seen["classes"] is seen["shards"] == sharded_head.ClassShards(
        train_set.num_identities, DEVICES, 0.5)
    assert seen["head"]

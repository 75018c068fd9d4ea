"""Mixed precision: bfloat16 convolutions, float32 parameters, statistics, heads and losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mstkd_jax import losses, models
from mstkd_jax.train import parallel as parallel_lib, state as state_lib, steps
from mstkd_jax.train import build

SIZE, EMBEDDING, CLASSES, PER_CLASS, BATCH, STEPS = 16, 16, 8, 8, 32, 30
MARGIN = losses.MarginSpec("elastic_arcface", 64.0, 0.5, 0.05)


def _backbone(dtype):
  return models.create("iresnet18", stage_depths=(1, 1, 1, 1), width=8,
                       embedding_size=EMBEDDING, dtype=dtype, axis_name=parallel_lib.AXIS)


def _faces():
  """A small learnable set: each identity a smooth pattern, its images noisy copies."""
  rng = np.random.default_rng(0)
  coarse = rng.uniform(-1, 1, (CLASSES, SIZE // 4, SIZE // 4, 3))
  patterns = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
  labels = np.repeat(np.arange(CLASSES), PER_CLASS).astype(np.int32)
  images = patterns[labels] + 0.3 * rng.normal(size=(len(labels), SIZE, SIZE, 3))
  return np.clip(images, -1, 1).astype(np.float32), labels


def _setup(dtype):
  backbone = _backbone(dtype)
  head = models.create("margin_head", num_classes=CLASSES)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  variables = build.init_variables(backbone, k1, np.zeros((1, SIZE, SIZE, 3), np.float32))
  head_vars = build.init_variables(head, k2, np.zeros((1, EMBEDDING), np.float32))
  schedule = state_lib.step_decay_schedule(0.1, STEPS, ())
  tx = state_lib.sgd({"backbone": state_lib.ParamGroup(schedule, 5.0),
                      "head": state_lib.ParamGroup(schedule)})
  state = state_lib.create_state({"backbone": variables["params"], "head": head_vars["params"]},
                                 variables["batch_stats"], tx)
  step = functools.partial(steps.classification_step, backbone=backbone, head=head,
                           margin=MARGIN, tx=tx, schedule=schedule)
  return jax.tree.map(np.asarray, state), step


@pytest.fixture(scope="module")
def bfloat16_run():
  """A tiny bfloat16 teacher trained for STEPS steps: (losses, final host state)."""
  state, step = _setup(jnp.bfloat16)
  par = parallel_lib.DataParallel("pmap", 1)
  p_step = par.wrap(step)
  dstate, rng = par.replicate(state), par.replicate(jax.random.PRNGKey(1))
  images, labels = _faces()
  order = np.random.default_rng(1)
  history = []
  for _ in range(STEPS):
    pick = order.choice(len(labels), BATCH, replace=False)
    batch = {"image": images[pick][None], "label": labels[pick][None]}
    dstate, metrics = p_step(dstate, par.shard(batch), rng)
    history.append(float(par.unreplicate(metrics)["loss"]))
  return history, par.unreplicate(dstate)


def _equations(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (jit, while, custom_vjp...) too."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for item in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(item, "jaxpr", item)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


def _operand_dtypes(jaxpr, primitive):
  return [tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in _equations(jaxpr)
          if eqn.primitive.name == primitive]


def test_bfloat16_teacher_step_convolves_in_bfloat16_and_keeps_float32_state():
  state, step = _setup(jnp.bfloat16)
  batch = {"image": np.zeros((BATCH, SIZE, SIZE, 3), np.float32),
           "label": np.zeros((BATCH,), np.int32)}
  traced = jax.make_jaxpr(step, axis_env=[(parallel_lib.AXIS, 1)], return_shape=True)
  jaxpr, (new_state, metrics) = traced(state, batch, jax.random.PRNGKey(0))
  convs = _operand_dtypes(jaxpr.jaxpr, "conv_general_dilated")
  assert convs and all(d == ("bfloat16", "bfloat16") for d in convs), convs  # fwd and bwd
  # The margin head's matmul ([B, D] x [D, classes]) and its gradients stay float32.
  head_dots = [tuple(str(v.aval.dtype) for v in eqn.invars)
               for eqn in _equations(jaxpr.jaxpr) if eqn.primitive.name == "dot_general"
               and CLASSES in eqn.outvars[0].aval.shape]
  assert head_dots and all(d == ("float32", "float32") for d in head_dots), head_dots
  assert {x.dtype for x in jax.tree.leaves(new_state)} <= {jnp.dtype(jnp.float32),
                                                           jnp.dtype(jnp.int32)}
  assert metrics["loss"].dtype == jnp.float32


def test_bfloat16_online_kd_step_runs_teachers_in_bfloat16_and_the_adaptor_in_float32():
  teacher, student = _backbone(jnp.bfloat16), _backbone(jnp.bfloat16)
  adaptor = models.create("adaptor", kind="DuL", embedding_size=EMBEDDING)
  example = np.zeros((1, SIZE, SIZE, 3), np.float32)
  teacher_vars = build.init_variables(teacher, jax.random.PRNGKey(0), example, train=False)
  stacked = jax.tree.map(lambda x: np.stack([x, x]), teacher_vars)
  adaptor_vars = build.init_variables(adaptor, jax.random.PRNGKey(1),
                                        np.zeros((1, 2 * EMBEDDING), np.float32))
  variables = build.init_variables(student, jax.random.PRNGKey(2), example, train=False)
  schedule = state_lib.step_decay_schedule(0.1, 10, ())
  tx = state_lib.sgd({"backbone": state_lib.ParamGroup(schedule, 5.0)})
  state = state_lib.create_state({"backbone": variables["params"]},
                                 variables["batch_stats"], tx)
  target_fn = functools.partial(steps.online_targets, teacher=teacher, adaptor=adaptor)
  step = functools.partial(steps.student_step, backbone=student, head=None, margin=None,
                           kd_weight=10000.0, tx=tx, schedule=schedule, target_fn=target_fn)
  batch = {"image": np.zeros((4, SIZE, SIZE, 3), np.float32)}
  jaxpr, (new_state, metrics) = jax.make_jaxpr(
      step, axis_env=[(parallel_lib.AXIS, 1)], return_shape=True)(
          state, batch, jax.random.PRNGKey(0), {"teachers": stacked, "adaptor": adaptor_vars})
  convs = _operand_dtypes(jaxpr.jaxpr, "conv_general_dilated")
  assert convs and all(d == ("bfloat16", "bfloat16") for d in convs), convs
  adaptor_dots = [tuple(str(v.aval.dtype) for v in eqn.invars)
                  for eqn in _equations(jaxpr.jaxpr) if eqn.primitive.name == "dot_general"
                  and eqn.invars[0].aval.shape[-1] == 2 * EMBEDDING]
  assert adaptor_dots and all(d == ("float32", "float32") for d in adaptor_dots)
  assert {x.dtype for x in jax.tree.leaves(new_state)} <= {jnp.dtype(jnp.float32),
                                                           jnp.dtype(jnp.int32)}
  assert metrics["kd"].dtype == jnp.float32


def test_bfloat16_teacher_run_trains(bfloat16_run):
  history, _ = bfloat16_run
  assert np.isfinite(history).all()
  first, last = np.mean(history[:5]), np.mean(history[-5:])
  assert last < 0.7 * first, (first, last)


def test_bfloat16_embeddings_stay_close_to_float32_for_the_same_weights(bfloat16_run):
  _, state = bfloat16_run
  variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
  images, _ = _faces()
  embed = lambda dtype: np.asarray(jax.jit(functools.partial(
      _backbone(dtype).apply, train=False))(variables, images[::2]))
  low, full = embed(jnp.bfloat16), embed(jnp.float32)
  assert low.dtype == np.float32
  cosine = np.sum(np.asarray(losses.l2_normalize(low)) * np.asarray(losses.l2_normalize(full)),
                  axis=-1)
  assert cosine.min() > 0.99, cosine


def test_auto_dtype_is_float32_on_cpus_and_bfloat16_on_accelerators():
  assert [build.platform_dtype(p) for p in ("cpu", "gpu", "tpu")] == [
      "float32", "bfloat16", "bfloat16"]
  assert jax.default_backend() == "cpu"
  assert build.compute_dtype({"dtype": "auto"}) == jnp.float32
  with pytest.raises(build.UserError, match=r"model.dtype='float16': expected one of "
                                            r"\['float32', 'bfloat16', 'auto'\]"):
    build.compute_dtype({"dtype": "float16"})


def test_resolve_dtypes_replaces_every_auto_and_leaves_the_rest():
  from configs import distill  # pylint: disable=g-import-not-at-top
  config = distill.get_config("bupt_iresnet34")
  assert config.teacher.model.dtype == config.student.model.dtype == "auto"
  with config.unlocked():
    config.teacher.models = {"group_a": {"name": "iresnet50", "dtype": "auto"},
                             "group_b": {"name": "iresnet18", "dtype": "float32"}}
  tpu = build.resolve_dtypes(config, "tpu")
  assert tpu.teacher.model.dtype == tpu.student.model.dtype == "bfloat16"
  assert tpu.teacher.models.group_a.dtype == "bfloat16"
  assert tpu.teacher.models.group_b.dtype == "float32"
  assert build.resolve_dtypes(config).student.model.dtype == "float32"   # this CPU
  assert config.student.model.dtype == "auto"                            # a copy
  default = distill.get_config("default")
  assert build.resolve_dtypes(default) is default                        # nothing to do

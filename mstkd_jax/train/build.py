"""Networks and optimizer from a stage's config: the backbone, the margin spec, host
variables, SGD over parameter groups, and the loop settings.

Configs are read here, in `stages/` and in `main`; models, losses and steps take plain values.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mstkd_jax import losses, models
from mstkd_jax.errors import UserError
from mstkd_jax.models import iresnet
from mstkd_jax.train import loop, parallel as parallel_lib, sharded_head, state as state_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# model.dtype="auto": the platform's fast type, resolved once per run (resolve_dtypes).
AUTO = "auto"


def platform_dtype(platform: str) -> str:
  """What model.dtype="auto" means on a JAX platform ("cpu", "gpu", "tpu", ...): "float32"
  on CPUs (no bfloat16 speed-up there; every CPU number in the README is float32),
  "bfloat16" on accelerators (their matrix units' fast input type)."""
  return "float32" if platform == "cpu" else "bfloat16"


def resolve_dtypes(config, platform: str | None = None):
  """`config` with every model section's dtype "auto" replaced by platform_dtype(platform;
  default jax.default_backend()): a copy where there is one, `config` itself otherwise.

  Done once, before the stages are made, so each stage's fingerprint and config.json hold
  the dtype it ran with: a stage resumed on another platform, where "auto" means another
  dtype, is refused as changed instead of going on in another precision.
  """
  def autos(node, path=()):
    for key in node.keys():
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict):
        yield from autos(value, path + (key,))
      elif key == "dtype" and value == AUTO:
        yield path
  found = list(autos(config))
  if not found:
    return config
  dtype = platform_dtype(platform or jax.default_backend())
  config = ml_collections.ConfigDict(config.to_dict())
  for path in found:
    node = config
    for key in path:
      node = node[key]
    node.dtype = dtype
  return config


def backbone(model_config: ml_collections.ConfigDict, **overrides):
  """The configured backbone (models.create(model.name, ...) with the section's other
  fields), its BatchNorm averaged over the data-parallel axis.

  Raises:
    UserError: model.dtype is not one of DTYPES, the name is unknown, or the model does
      not take the section's fields.
  """
  # A section read back from a stage's config.json holds lists where the config had tuples
  # (stage_depths): module attributes must be hashable.
  settings = {k: tuple(v) if isinstance(v, list) else v
              for k, v in model_config.to_dict().items()}
  name = settings.pop("name")
  dtype = compute_dtype(settings)
  settings.pop("dtype", None)
  if settings.get("dropout", 0.0) is None:
    settings["dropout"] = iresnet.STANDARD_DROPOUT.get(name, 0.0)
  settings.update(dtype=dtype, axis_name=parallel_lib.AXIS, **overrides)
  return models.create(name, **settings)


def compute_dtype(model_config: ml_collections.ConfigDict | dict):
  """The jnp dtype of a model section's `dtype` field (float32 where it has none; "auto":
  platform_dtype of jax.default_backend()).

  Raises:
    UserError: model.dtype is not one of DTYPES or "auto".
  """
  dtype = model_config.get("dtype", "float32")
  if dtype == AUTO:
    dtype = platform_dtype(jax.default_backend())
  if dtype not in DTYPES:
    raise UserError(f"config field model.dtype={dtype!r}: expected one of "
                    f"{list(DTYPES) + [AUTO]}")
  return DTYPES[dtype]


def cast_kernels(variables: dict, dtype) -> dict:
  """Frozen network variables with every "kernel" parameter (convolutions and dense
  layers) cast to the compute dtype `dtype` once, on the host, instead of in every step:
  Flax's Conv and Dense cast their kernel to their compute dtype when they run (round to
  nearest even, as this cast), so the outputs are the same, bit for bit. Everything else
  (BatchNorm scales, biases and statistics, PReLU slopes) stays as it is: those layers
  compute in float32. float32 leaves the variables as they are.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return variables

  def cast(path, x):
    return np.asarray(x).astype(dtype) if path[-1].key == "kernel" else x
  return {k: jax.tree_util.tree_map_with_path(cast, v) if k == "params" else v
          for k, v in variables.items()}


# Fields of a head section that say how the head is laid out over devices (class_shards),
# not which margins it applies.
_LAYOUT_FIELDS = {"shard_classes": False, "sample_rate": 1.0}


def margin_spec(head_config, shards_classes: bool = False) -> losses.MarginSpec:
  """The margin head's losses.MarginSpec; UserError naming the `head` section if invalid.

  `shards_classes`: the calling stage reads head.shard_classes and head.sample_rate
  (`class_shards`); other stages refuse them set.
  """
  fields = head_config.to_dict()
  layout = {k: fields.pop(k, default) for k, default in _LAYOUT_FIELDS.items()}
  if not shards_classes:
    for key, default in _LAYOUT_FIELDS.items():
      if layout[key] != default:
        raise UserError(f"config field head.{key}={layout[key]!r}: this command does not "
                        f"shard the class centres (the training stages do); expected "
                        f"{default!r} here")
  try:
    return losses.MarginSpec(**fields)
  except (TypeError, ValueError) as e:
    raise UserError(f"config section head: {e}") from e


def class_shards(head_config, parallel: parallel_lib.DataParallel, num_classes: int):
  """(DataParallel, sharded_head.ClassShards or None) of head.shard_classes and
  head.sample_rate: with shard_classes the centres are split over all devices (padding
  classes where the device count does not divide `num_classes`, said in one log line) and
  the returned DataParallel places the state so.

  Raises:
    UserError: head.sample_rate outside (0, 1], or below 1 without head.shard_classes.
  """
  shard = head_config.get("shard_classes", False)
  rate = head_config.get("sample_rate", 1.0)
  if not isinstance(shard, bool):
    raise UserError(f"config field head.shard_classes={shard!r}: expected True or False")
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate <= 1.0:
    raise UserError(f"config field head.sample_rate={rate!r}: expected a number in (0, 1] "
                    "(the fraction of classes kept per step; 1.0 = all)")
  if not shard:
    if rate < 1.0:
      raise UserError(f"config field head.sample_rate={rate!r} samples each device's block "
                      "of classes: it needs head.shard_classes=True")
    return parallel, None
  parallel = parallel.with_class_shards(num_classes, float(rate))
  if jax.process_index() == 0:
    print(sharded_head.describe(parallel.class_shards), flush=True)
  return parallel, parallel.class_shards


def init_variables(module, rng, example_input, **kwargs) -> dict:
  """Host (numpy) variables of `module` for inputs shaped like `example_input`."""
  # The weights are made whole on one device, so threefry need not be partitionable; the
  # non-partitionable variant compiles 2-3x faster on CPU.
  with jax.threefry_partitionable(False):
    variables = jax.jit(functools.partial(module.init, **kwargs))(rng, example_input)
  return jax.tree.map(np.asarray, dict(variables))


def template_variables(module, example_input, **kwargs) -> dict:
  """Zero host variables of `module`'s shapes and dtypes for inputs like `example_input`,
  traced (jax.eval_shape), not compiled: the template a saved network is restored into."""
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.PRNGKey(0),
                          example_input)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))


def optimizer(optim_config, *, global_batch: int, steps_per_epoch: int, groups: dict):
  """SGD over parameter groups; `groups` maps a group name to (base_lr, clip_norm or None).

  Returns (optax transformation, LR schedule of the first group for logging).
  """
  param_groups = {}
  for name, (base_lr, clip_norm) in groups.items():
    schedule = state_lib.step_decay_schedule(
        state_lib.scaled_lr(base_lr, global_batch), steps_per_epoch,
        tuple(optim_config.lr_decay_epochs), optim_config.lr_decay_factor)
    param_groups[name] = state_lib.ParamGroup(schedule, clip_norm or None)
  tx = state_lib.sgd(param_groups, momentum=optim_config.momentum,
                     weight_decay=optim_config.weight_decay)
  return tx, next(iter(param_groups.values())).schedule


def backbone_and_head_groups(optim_config) -> dict:
  """The usual parameter groups: the backbone clipped, the head at head_base_lr (or base_lr)."""
  head_lr = (optim_config.head_base_lr if optim_config.head_base_lr >= 0
             else optim_config.base_lr)
  return {"backbone": (optim_config.base_lr, optim_config.clip_norm), "head": (head_lr, None)}


def loop_settings(config, name: str, num_examples: int) -> loop.LoopSettings:
  """The loop's settings from a stage config's `train` section and the examples per epoch."""
  steps_per_epoch, total = loop.steps_for(num_examples, config.train.batch_size,
                                          config.train.epochs)
  return loop.LoopSettings(
      name=name, total_steps=total, steps_per_epoch=steps_per_epoch,
      images_per_step=config.train.batch_size, log_every=config.train.log_every,
      checkpoint_every=config.train.checkpoint_every,
      keep_checkpoints=config.train.keep_checkpoints)

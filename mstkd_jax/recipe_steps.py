"""The recipe's step functions built from a config, each with what it is called on: what
`bench` times on the devices it has and `plan` compiles for a TPU topology it has not.

`Builder` makes each step (the plain student, cached- and online-KD students, the adaptor,
the extraction) with its host state and the shapes of its batch; `abstract=True` keeps
every array a jax.ShapeDtypeStruct (traced with jax.eval_shape, nothing initialized), so
that a network of any size is planned without its memory.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from mstkd_jax import models
from mstkd_jax.errors import UserError, warn
from mstkd_jax.train import build
from mstkd_jax.train import state as state_lib, steps as steps_lib

# Training-set sizes assumed when the config's data source is not the synthetic set:
# BUPT-Balancedface's identities, its four groups, 112x112 aligned faces.
DEFAULT_CLASSES, DEFAULT_GROUPS, DEFAULT_IMAGE_SIZE = 28000, 4, 112


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the steps are built from: sizes, dtype and the optimiser settings."""
  dtype: str
  batch: int                 # global images per step
  image_size: int
  num_classes: int
  num_teachers: int
  embedding_size: int
  adaptor_kind: str
  adaptor_size: int
  adaptor_dropout: float
  kd_weight: float
  stage_depths: tuple[int, ...]   # blocks per stage of student, teachers and PyTorch net


def field(config, path: str, default=None):
  """config.<path> ("student.train"), or `default` where the config has no such field."""
  node = config
  for key in path.split("."):
    if not hasattr(node, "keys") or key not in node:
      return default
    node = node[key]
  return node


def student(config, key: str):
  """The student's `key` section (model, head): the recipe's student.<key>, or a
  single-stage config's <key>."""
  return field(config, f"student.{key}") or config[key]


def optim_config(config):
  return field(config, "student.optim") or config.optim


def setup_from_config(config, *, batch: int = 0, image_size: int = 0, num_classes: int = 0,
                      num_teachers: int = 0, stage_depths: tuple[int, ...] = ()) -> Setup:
  """The steps' sizes: the student recipe's batch, the training set's classes and groups.

  Works for the recipe's config (configs/distill.py: the student section, the first
  adaptor kind) and for a single-stage config (its train section, an SL adaptor).

  Raises:
    UserError: the adaptor's embedding size is not the student's, or the image size is
      not a multiple of 16.
  """
  data = config.data.synthetic
  synthetic = config.data.source == "synthetic"
  model = student(config, "model")
  embedding_size = model.embedding_size
  kinds = tuple(field(config, "adaptors", ("SL",))) or ("SL",)
  setup = Setup(
      dtype=model.dtype,
      batch=batch or (field(config, "student.train") or config.train).batch_size,
      image_size=image_size or (data.image_size if synthetic else DEFAULT_IMAGE_SIZE),
      num_classes=num_classes or (data.num_groups * data.identities_per_group if synthetic
                                  else DEFAULT_CLASSES),
      num_teachers=num_teachers or (data.num_groups if synthetic else DEFAULT_GROUPS),
      embedding_size=embedding_size,
      adaptor_kind=kinds[0],
      adaptor_size=field(config, "adaptor.model.embedding_size", embedding_size),
      adaptor_dropout=field(config, "adaptor.model.dropout", 0.2),
      kd_weight=field(config, "student.kd.weight", 10000.0),
      stage_depths=tuple(stage_depths) or tuple(models.create(model.name).stage_depths))
  if setup.adaptor_size != embedding_size:
    raise UserError(f"config field adaptor.model.embedding_size={setup.adaptor_size} differs "
                    f"from the student's model.embedding_size={embedding_size}; it distils the "
                    "adaptor's targets, so they must match")
  if setup.image_size % 16:
    raise UserError(f"--image_size={setup.image_size}: expected a multiple of 16")
  return setup


@dataclasses.dataclass
class Step:
  """One step, ready to wrap over devices and compile.

  train=True: `fn(state, batch, rng, *extra) -> (state, metrics)` for DataParallel.wrap;
  train=False: `fn(state, batch) -> outputs` (state: the network's variables) for
  DataParallel.wrap_apply. `state` and `extra` are host pytrees (numpy arrays, or
  jax.ShapeDtypeStructs from an abstract Builder), to replicate; `batch` maps each input
  to its jax.ShapeDtypeStruct [local_devices, per_device, ...].
  """
  name: str
  fn: Callable
  train: bool
  state: Any
  batch: dict
  extra: tuple = ()
  examples_per_device: int = 0   # images (embeddings, for the adaptor) per device per call
  # Teacher forwards run in a lax.map beyond the one that XLA's cost analysis counts (it
  # counts a loop's body once): G - 1 for the online-KD step with sequential teachers.
  uncounted_forwards: int = 0


class Builder:
  """Builds the modules and host variables once, then each step on demand."""

  def __init__(self, config, setup: Setup, *, local_devices: int, per_device: int,
               abstract: bool = False):
    self.config, self.setup, self.abstract = config, setup, abstract
    self.local_devices, self.per_device = local_devices, per_device
    self.backbone = build.backbone(student(config, "model"), stage_depths=setup.stage_depths)
    self.head = models.create("margin_head", num_classes=setup.num_classes)
    self.adaptor = models.create("adaptor", kind=setup.adaptor_kind,
                                 embedding_size=setup.adaptor_size,
                                 dropout=setup.adaptor_dropout)
    self.margin = build.margin_spec(student(config, "head"))
    keys = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    self.image = np.zeros((1, setup.image_size, setup.image_size, 3), np.float32)
    self.variables = self._init(self.backbone, keys[0], self.image, train=False)
    self.head_params = self._init(
        self.head, keys[1], np.zeros((1, setup.embedding_size), np.float32))["params"]
    self.concatenated = setup.num_teachers * setup.embedding_size
    self.adaptor_vars = self._init(self.adaptor, keys[2],
                                   np.zeros((1, self.concatenated), np.float32))
    self.adaptor_head_params = self._init(
        self.head, keys[3], np.zeros((1, setup.adaptor_size), np.float32))["params"]

  def _init(self, module, key, example, **kwargs) -> dict:
    if self.abstract:
      return dict(jax.eval_shape(functools.partial(module.init, **kwargs), key, example))
    return build.init_variables(module, key, example, **kwargs)

  def batch_shapes(self) -> dict:
    """Every input any step reads, as jax.ShapeDtypeStruct [local_devices, per_device, ...]:
    image uint8 [.., S, S, 3] (training batches' pixels; extraction is fed float32 in
    [-1, 1], as evaluation normalizes on the host), label int32, target float32 [.., D]
    (unit), teacher_embeddings float32 [.., G x D] (G unit vectors, concatenated)."""
    lead = (self.local_devices, self.per_device)
    size, dim = self.setup.image_size, self.setup.embedding_size
    spec = jax.ShapeDtypeStruct
    return {"image": spec(lead + (size, size, 3), np.uint8),
            "label": spec(lead, np.int32),
            "target": spec(lead + (dim,), np.float32),
            "teacher_embeddings": spec(lead + (self.concatenated,), np.float32)}

  def _inputs(self, *keys) -> dict:
    shapes = self.batch_shapes()
    return {k: shapes[k] for k in keys}

  def optimiser(self, groups, optim=None):
    optim = optim or optim_config(self.config)
    head_lr = optim.head_base_lr if optim.head_base_lr >= 0 else optim.base_lr
    spec = {"backbone": (optim.base_lr, optim.clip_norm), "head": (head_lr, None)}
    return build.optimizer(optim, global_batch=self.setup.batch, steps_per_epoch=1000,
                           groups={g: spec[g] for g in groups})

  def _state(self, params, batch_stats, tx):
    if self.abstract:
      return jax.eval_shape(functools.partial(state_lib.create_state, tx=tx), params,
                            batch_stats)
    return jax.tree.map(np.asarray, state_lib.create_state(params, batch_stats, tx))

  def _student_state(self, tx):
    params = {"backbone": self.variables["params"], "head": self.head_params}
    return self._state(params, self.variables.get("batch_stats", {}), tx)

  def plain(self) -> Step:
    """classification_step of the student and its margin head (the student alone; with a
    teacher's config, a teacher)."""
    tx, schedule = self.optimiser(("backbone", "head"))
    fn = functools.partial(steps_lib.classification_step, backbone=self.backbone,
                           head=self.head, margin=self.margin, tx=tx, schedule=schedule)
    return Step("plain", fn, True, self._student_state(tx), self._inputs("image", "label"),
                examples_per_device=self.per_device)

  def _kd_step(self, tx, schedule, target_fn=None):
    return functools.partial(steps_lib.student_step, backbone=self.backbone, head=self.head,
                             margin=self.margin, kd_weight=self.setup.kd_weight, tx=tx,
                             schedule=schedule, target_fn=target_fn)

  def cached_kd(self) -> Step:
    """student_step (EAF-KD) with the targets in the batch."""
    tx, schedule = self.optimiser(("backbone", "head"))
    return Step("cached_kd", self._kd_step(tx, schedule), True, self._student_state(tx),
                self._inputs("image", "label", "target"), examples_per_device=self.per_device)

  def online_kd(self, teacher_map: str = "sequential") -> Step:
    """student_step (EAF-KD) with G frozen teachers (the student's architecture, stacked,
    kernels in its compute dtype) and the adaptor run inside the step."""
    tx, schedule = self.optimiser(("backbone", "head"))
    target_fn = functools.partial(steps_lib.online_targets, teacher=self.backbone,
                                  adaptor=self.adaptor, teacher_map=teacher_map)
    count = self.setup.num_teachers
    # As the student stage loads them: kernels cast to the compute dtype once (cast_kernels).
    dtype = build.compute_dtype(student(self.config, "model"))
    if self.abstract:
      def stacked(path, x):
        kernel = path[0].key == "params" and path[-1].key == "kernel"
        return jax.ShapeDtypeStruct((count,) + x.shape, dtype if kernel else x.dtype)
      teachers = jax.tree_util.tree_map_with_path(stacked, self.variables)
    else:
      teachers = build.cast_kernels(
          jax.tree.map(lambda x: np.stack([x] * count), self.variables), dtype)
    return Step("online_kd" if teacher_map == "sequential" else f"online_kd_{teacher_map}",
                self._kd_step(tx, schedule, target_fn), True, self._student_state(tx),
                self._inputs("image", "label"),
                extra=({"teachers": teachers, "adaptor": self.adaptor_vars},),
                examples_per_device=self.per_device,
                uncounted_forwards=count - 1 if teacher_map == "sequential" else 0)

  def adaptor_step(self) -> Step:
    """The adaptor stage's step: its own margin head settings and optimiser, if configured."""
    tx, schedule = self.optimiser(("backbone", "head"), field(self.config, "adaptor.optim"))
    head_config = field(self.config, "adaptor.head") or student(self.config, "head")
    fn = functools.partial(steps_lib.classification_step, backbone=self.adaptor,
                           head=self.head, margin=build.margin_spec(head_config), tx=tx,
                           schedule=schedule, input_key="teacher_embeddings")
    params = {"backbone": self.adaptor_vars["params"], "head": self.adaptor_head_params}
    return Step("adaptor", fn, True, self._state(params, {}, tx),
                self._inputs("teacher_embeddings", "label"),
                examples_per_device=self.per_device)

  def extraction(self) -> Step:
    """One teacher embedding a batch of images and their mirrors (2 forwards per image)."""
    fn = functools.partial(steps_lib.embed_step, backbone=self.backbone)
    image = self.batch_shapes()["image"]
    return Step("extraction", fn, False, self.variables,
                {"image": jax.ShapeDtypeStruct(image.shape, np.float32)},
                examples_per_device=self.per_device)

  def step_flops(self, step: Step, compiled, lowered) -> float | None:
    """FLOPs per device of one call of `step` (checked_flops), with the teacher forwards
    that XLA's analysis leaves out of a loop added; None where they cannot be counted."""
    flops = checked_flops(compiled, lowered, step.name)
    if flops and step.uncounted_forwards:
      forward = self.teacher_forward_flops()
      return flops + step.uncounted_forwards * forward if forward else None
    return flops

  def teacher_forward_flops(self) -> float | None:
    """FLOPs of one teacher's inference forward of one device's batch, counted on the
    lowered (unoptimized) module on this host's default backend; nothing is compiled."""
    forward = jax.jit(lambda v, x: self.backbone.apply(v, x, train=False))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                          self.variables)
    images = jax.ShapeDtypeStruct((self.per_device,) + self.image.shape[1:], np.float32)
    return lowered_flops(forward.lower(shapes, images))


def _flops_of(analysis) -> float | None:
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def lowered_flops(lowered) -> float | None:
  """FLOPs XLA's cost analysis counts in a lowered (not yet optimized) module, per device;
  None where the backend gives none (a compile-only TPU client gives none)."""
  try:
    return _flops_of(lowered.cost_analysis())
  except Exception:  # pylint: disable=broad-except
    return None


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled executable per device, from XLA's cost analysis."""
  try:
    return _flops_of(compiled.cost_analysis())
  except Exception:  # pylint: disable=broad-except
    return None


def checked_flops(compiled, lowered, what: str) -> float | None:
  """FLOPs per device of one call: the compiled executable's count, cross-checked against
  the lowered module's.

  Where the two differ by more than 10% of the lowered count, or the compiled analysis
  gives none, warns in one line and returns the lowered count: it counts the program as
  written (the model's FLOPs, on which MFU is defined), whereas the compiled count can
  miss work the compiler hands to a library (XLA:GPU's convolutions: jax-ml/jax#16008,
  #20184, #22249) or add rematerialized work. `what` names the step in the warning.
  """
  after, before = compiled_flops(compiled), lowered_flops(lowered)
  if before is None:
    return after
  if after is None:
    warn(f"{what}: the compiled cost analysis gives no FLOP count; using the lowered "
         f"module's, {before:.4g}")
    return before
  if abs(after - before) > 0.1 * before:
    warn(f"{what}: the compiled cost analysis counts {after:.4g} FLOPs, the lowered module "
         f"{before:.4g} ({after / before:.2f}x); using the lowered module's count")
    return before
  return after

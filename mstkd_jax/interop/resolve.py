"""Which backbone a checkpoint holds, and loading it: an Orbax stage checkpoint of this project,
a PyTorch IResNet state_dict (.pth), or an ONNX recognition model (.onnx).

Every model setting is taken from the first layer that has it: the caller's explicit
settings (evaluate's flags), else (Orbax) the workdir's config.json, else (Orbax) the
checkpoint's shapes, else DEFAULTS. A .pth carries no config, so it is read with the explicit
settings and DEFAULTS; when it does not fit, the refusal says what its shapes imply
(architecture and input size). An .onnx file is a graph, run by onnxruntime
(interop/onnx_model.py): its input size and embedding size come from the graph (--image_size
only where the graph leaves the input size open), its architecture from our export's
metadata when it has it; the other model flags do not apply to it.
"""

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from mstkd_jax import files, paths
from mstkd_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ArchSettings:
  """The backbone to build; None = from config.json, the checkpoint, or DEFAULTS.

  Attributes:
    arch: registered IResNet name, e.g. "iresnet34".
    width: channels of the stem (64 in the paper).
    embedding_size: embedding size (512 in the paper).
    use_se: squeeze-and-excitation blocks.
    image_size: side of the square model input, a multiple of 16 (112 in the paper).
  """
  arch: str | None = None
  width: int | None = None
  embedding_size: int | None = None
  use_se: bool | None = None
  image_size: int | None = None


DEFAULTS = ArchSettings(arch="iresnet34", width=64, embedding_size=512, use_se=False,
                        image_size=112)
FIELDS = tuple(f.name for f in dataclasses.fields(ArchSettings))


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A backbone ready to embed, and where it came from.

  Attributes:
    module: the Flax IResNet.
    variables: {"params", "batch_stats"} as numpy arrays (float32).
    settings: the ArchSettings it was built with, every field set.
    origins: {field: "flag" | "config.json" | "checkpoint shapes" | "default"}.
    format: "orbax", "pytorch" or "onnx" (module: an onnx_model.OnnxBackbone, variables {}).
    path: the file or step folder that was read.
    step: the training step (Orbax), else None.
    config: the stage workdir's config.json (Orbax), else None.
    name: a model name for reports: the workdir's folder name, or the file's stem.
  """
  module: Any
  variables: dict
  settings: ArchSettings
  origins: dict
  format: str
  path: str
  step: int | None
  config: dict | None
  name: str


# --- Settings --------------------------------------------------------------------------


def iresnet_names() -> list[str]:
  """The registered backbone names (IResNets and MobileFaceNets)."""
  from mstkd_jax import models  # pylint: disable=g-import-not-at-top
  return models.backbone_names()


def check_positive(value: Any, what: str, error=UserError) -> int:
  """int(value); `error` naming `what` unless it is an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise error(f"{what}={value!r}: expected a positive integer")
  return int(value)


def check_settings(settings: ArchSettings, where: str, error=UserError) -> None:
  """Raises `error` naming `where` (e.g. "--" for flags) for a value no IResNet takes."""
  if settings.arch is not None and settings.arch not in iresnet_names():
    raise error(f"{where}arch={settings.arch!r}: unknown architecture; expected one of "
                f"{iresnet_names()}")
  for field in ("width", "embedding_size", "image_size"):
    value = getattr(settings, field)
    if value is not None:
      check_positive(value, f"{where}{field}", error)
  if settings.image_size is not None and settings.image_size % 16:
    raise error(f"{where}image_size={settings.image_size}: expected a multiple of 16 (the "
                "IResNet halves its input four times)")
  if settings.use_se is not None and not isinstance(settings.use_se, (bool, np.bool_)):
    raise error(f"{where}use_se={settings.use_se!r}: expected true or false")


def as_settings(value: Any, error=UserError) -> ArchSettings:
  """An ArchSettings from None, an ArchSettings or a dict of its fields."""
  if value is None:
    return ArchSettings()
  if isinstance(value, ArchSettings):
    return value
  if isinstance(value, Mapping):
    unknown = sorted(set(value) - set(FIELDS))
    if unknown:
      raise error(f"arch_settings: unknown field(s) {unknown}; expected some of "
                  f"{list(FIELDS)}")
    return ArchSettings(**value)
  raise error(f"arch_settings: expected an ArchSettings or a dict, got "
              f"{type(value).__name__}")


def config_settings(config: Mapping | None) -> ArchSettings:
  """The model settings a stage's config.json holds (image size of its synthetic data)."""
  if not config:
    return ArchSettings()
  model = config.get("model") if isinstance(config.get("model"), Mapping) else {}
  data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
  image_size = data.get("image_size")
  synthetic = data.get("synthetic")
  if image_size is None and data.get("source") == "synthetic" and isinstance(synthetic,
                                                                               Mapping):
    image_size = synthetic.get("image_size")
  return ArchSettings(arch=model.get("name"), width=model.get("width"),
                      embedding_size=model.get("embedding_size"), use_se=model.get("use_se"),
                      image_size=image_size)


def shape_settings(shapes: Mapping) -> ArchSettings:
  """The settings of `orbax_checkpoint.describe_iresnet`'s description."""
  return ArchSettings(arch=shapes["name"], width=shapes["width"],
                      embedding_size=shapes["embedding_size"], use_se=shapes["use_se"],
                      image_size=shapes["image_size"])


def resolve(layers: Sequence[tuple[str, ArchSettings]]) -> tuple[ArchSettings, dict]:
  """First non-None value of every field over (origin, settings) layers, with its origin."""
  values, origins = {}, {}
  for field in FIELDS:
    for origin, settings in layers:
      value = getattr(settings, field)
      if value is not None:
        values[field], origins[field] = value, origin
        break
  return ArchSettings(**values), origins


def describe(settings: ArchSettings) -> str:
  """"iresnet34 width=64 ..."; fields an ONNX graph does not tell are left out."""
  return " ".join([str(settings.arch)] + [
      f"{field}={getattr(settings, field)}" for field in FIELDS[1:]
      if getattr(settings, field) is not None])


def _describe_shapes(shapes: Mapping) -> str:
  return (f"{shapes['name'] or 'IResNet of depths ' + str(shapes['stage_depths'])} "
          f"width={shapes['width']} embedding_size={shapes['embedding_size']} "
          f"use_se={shapes['use_se']} image_size={shapes['image_size']}")


def build_module(settings: ArchSettings):
  """The IResNet of fully resolved settings (float32)."""
  from mstkd_jax import models  # pylint: disable=g-import-not-at-top
  return models.create(settings.arch, width=int(settings.width),
                       embedding_size=int(settings.embedding_size),
                       use_se=bool(settings.use_se))


def template(module, image_size: int):
  """Shapes and dtypes of the module's variables, without computing them."""
  import jax  # pylint: disable=g-import-not-at-top
  example = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), example)


# --- PyTorch state_dict shapes ---------------------------------------------------------


def describe_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """The backbone settings a PyTorch state_dict's shapes imply (interop.backbones):
  for an IResNet, orbax_checkpoint.describe_iresnet's dict {"name" (None for unknown
  depths), "stage_depths", "width", "embedding_size", "use_se", "image_size" (None when
  the last feature map is not square)}; a MobileFaceNet's adds "scale".
  Raises:
    UserError: the state_dict is no known backbone's.
  """
  from mstkd_jax.interop import backbones  # pylint: disable=g-import-not-at-top
  return backbones.describe_state_dict(state_dict)


# --- Loading ---------------------------------------------------------------------------


def load_model(checkpoint: Any, explicit: ArchSettings) -> LoadedModel:
  """Builds the backbone and loads its variables from an Orbax folder or a .pth file.

  Args:
    checkpoint: an Orbax stage workdir, model/ or checkpoints/ folder or step folder; or a
      PyTorch IResNet state_dict file.
    explicit: settings given by the caller; they win over every other layer.
  Raises:
    UserError: the checkpoint cannot be read, its config.json holds an invalid model
      setting, or it does not fit the resolved model (the message says what it looks like).
  """
  path = paths.resolve(checkpoint, "--checkpoint")
  if files.isdir(path):
    return _load_orbax(path, explicit)
  if paths.is_url(path):
    raise UserError(f"--checkpoint={path}: a PyTorch or ONNX file is read from a local path; "
                    "copy it here first (an Orbax checkpoint may be a URL)")
  from mstkd_jax.interop import onnx_model  # pylint: disable=g-import-not-at-top
  if onnx_model.is_onnx_path(path):
    return onnx_model.load_model(path, explicit)
  return _load_pytorch(path, explicit)


def _load_pytorch(path: str, explicit: ArchSettings) -> LoadedModel:
  from mstkd_jax.interop import torch_checkpoint  # pylint: disable=g-import-not-at-top
  inferred = torch_checkpoint.infer_settings(path) if explicit.arch is None else {}
  settings, origins = resolve([("flag", explicit), ("checkpoint shapes", ArchSettings(**inferred)),
                               ("default", DEFAULTS)])
  module = build_module(settings)
  side = settings.image_size // 16
  try:
    variables = torch_checkpoint.load_backbone(path, template(module, settings.image_size),
                                               feature_hw=(side, side))
  except UserError as e:
    if "does not fit" not in str(e):
      raise
    raise UserError(f"{e}\n  this run built {describe(settings)}; give the checkpoint's "
                    "--arch, --width, --embedding_size, --use_se and --image_size"
                    + _input_size_hint(path, settings)) from e
  return LoadedModel(module=module, variables=variables, settings=settings, origins=origins,
                     format="pytorch", path=path, step=None, config=None,
                     name=os.path.splitext(os.path.basename(path))[0])


def _input_size_hint(path: str, settings: ArchSettings) -> str:
  """What fc.weight's shape says the input size is, when it is not the one built."""
  from mstkd_jax.interop import torch_checkpoint  # pylint: disable=g-import-not-at-top
  try:
    shapes = describe_state_dict(torch_checkpoint.load_state_dict(path))
  except UserError:
    return ""
  size = shapes["image_size"]
  if size is None or size == settings.image_size:
    return ""
  return (f"\n  its weights take a {size // 16}x{size // 16} feature map of the last "
          f"stage, so its input size is {size}: --image_size={size}")


def _load_orbax(path: str, explicit: ArchSettings) -> LoadedModel:
  from mstkd_jax.interop import backbones, orbax_checkpoint  # pylint: disable=g-import-not-at-top
  from mstkd_jax.train import tree_checks  # pylint: disable=g-import-not-at-top
  variables, info = orbax_checkpoint.load_backbone_variables(path)
  shapes = backbones.describe_variables(variables)
  configured = config_settings(info.config)
  config_file = os.path.join(info.workdir or "", "config.json")
  check_settings(configured, f"{config_file}: model setting ")
  settings, origins = resolve([("flag", explicit), ("config.json", configured),
                               ("checkpoint shapes", shape_settings(shapes)),
                               ("default", DEFAULTS)])
  module = build_module(settings)
  expected = tree_checks.flat_shapes(template(module, settings.image_size))
  found = tree_checks.flat_shapes(variables)
  if expected != found:
    problems = tree_checks.shape_mismatches(expected, found)
    given = ", ".join(f"{k} from {v}" for k, v in origins.items() if v != "checkpoint shapes")
    raise UserError(
        f"{info.path}: the checkpoint does not fit the model {describe(settings)} "
        f"({given}):\n  " + "\n  ".join(problems)
        + f"\n  the checkpoint looks like: {_describe_shapes(shapes)}; drop or fix the model "
        "flags")
  return LoadedModel(module=module, variables=variables, settings=settings, origins=origins,
                     format="orbax", path=info.path, step=info.step, config=info.config,
                     name=info.name)

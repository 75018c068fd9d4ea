r"""Evaluates one face-recognition checkpoint per demographic group (insightface protocol).

  python -m mstkd_jax.evaluate --checkpoint=workdir/teacher_smoke --data=synthetic \
      --out=/tmp/eval
  python -m mstkd_jax.evaluate --checkpoint=r34.pth --arch=iresnet34 \
      --data=rfw/African_test.bin --data=rfw/Asian_test.bin --out=/tmp/eval

--checkpoint is either an Orbax checkpoint of this project (a stage workdir: its trained
model/, else the latest of its checkpoints/; a model/ or checkpoints/ folder; or one step
folder such as checkpoints/<step>; only the backbone is read) or a PyTorch
insightface/MST-KD IResNet state_dict (a file, e.g. .pth). --data (repeatable) is
an insightface verification .bin (its group is the file stem without "_test":
African_test.bin -> African), an RFW folder (test/data + test/txts, every group in it), or
the built-in synthetic set by name: `synthetic` (the workdir's configured synthetic set when
the checkpoint's config.json has one, else configs.common.synthetic_data("default")) or
`synthetic:<scale>` (configs.common.synthetic_data(scale)), cached under <out>/data unless
--data_dir.

Images are decoded as RGB, resized to the model input when their size differs (bilinear,
see RESAMPLING; warned once per data source) and normalized (x / 255 - 0.5) / 0.5 as
insightface does. Each distinct image is embedded once, with its horizontal mirror; the
report holds flip-fused accuracy (embedding of image + embedding of mirror) and plain
(no-flip) accuracy per group, TAR@FAR, mean, STD and SER, and the global-threshold
fairness metrics. It is printed and written to --out (report.json, roc.json, report.md,
PNGs), and nothing is written there when the evaluation fails.

Model settings come from the flags when given, else (Orbax) from the workdir's
config.json, else (Orbax) from the checkpoint's shapes, else the defaults in DEFAULTS.
Evaluation always computes in float32. Errors a user can fix print one `error: ...` and
exit with 2 (flags) or 1 (checkpoint or data).

In Python: `evaluate(checkpoint, arch_settings, data_sources, out_dir)` returns the
report dict (see mstkd_jax.evaluation.report.build_report).
"""

import dataclasses
import os
import shutil
import sys
import tempfile
from typing import Any, Mapping, Sequence

from absl import app, flags, logging
import numpy as np

from mstkd_jax import paths
from mstkd_jax.errors import UserError

RESAMPLING = "bilinear (PIL Image.resize with BILINEAR: antialiased when shrinking)"
NORMALIZATION = "(x / 255 - 0.5) / 0.5 on RGB uint8, as insightface"
SYNTHETIC = "synthetic"
NUM_FOLDS = 10


class FlagError(UserError):
  """A bad command-line setting (exit code 2); other UserErrors are data/checkpoint (1)."""


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
_FIELDS = tuple(f.name for f in dataclasses.fields(ArchSettings))


@dataclasses.dataclass
class PairSet:
  """One group's verification pairs over its distinct images.

  Attributes:
    images: uint8 [M, S, S, 3], every distinct image once, already at the model's size.
    pairs: int64 [P, 2] rows into `images`; pair k is (pairs[k, 0], pairs[k, 1]).
    issame: bool [P].
  """
  images: np.ndarray
  pairs: np.ndarray
  issame: np.ndarray


@dataclasses.dataclass
class _Source:
  """A --data entry, classified before anything is loaded."""
  label: str            # how messages and the report name it
  kind: str             # "bin", "rfw", "synthetic" or "arrays"
  groups: tuple[str, ...]
  path: str | None = None
  spec: Any = None      # synthetic.SyntheticSpec for "synthetic"
  arrays: Mapping | None = None  # group -> VerificationSet-like for "arrays"


# --- Settings --------------------------------------------------------------------------


def _iresnet_names() -> list[str]:
  from mstkd_jax.models import iresnet  # pylint: disable=g-import-not-at-top
  return sorted(iresnet.DEPTHS)


def _check_positive(value: Any, what: str, error=FlagError) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise error(f"{what}={value!r}: expected a positive integer")
  return int(value)


def _check_settings(settings: ArchSettings, where: str, error=UserError) -> None:
  """Raises `error` naming `where` (e.g. "--" for flags) for a value no IResNet takes."""
  if settings.arch is not None and settings.arch not in _iresnet_names():
    raise error(f"{where}arch={settings.arch!r}: unknown architecture; expected one of "
                f"{_iresnet_names()}")
  for field in ("width", "embedding_size", "image_size"):
    value = getattr(settings, field)
    if value is not None:
      _check_positive(value, f"{where}{field}", error)
  if settings.image_size is not None and settings.image_size % 16:
    raise error(f"{where}image_size={settings.image_size}: expected a multiple of 16 (the "
                "IResNet halves its input four times)")
  if settings.use_se is not None and not isinstance(settings.use_se, (bool, np.bool_)):
    raise error(f"{where}use_se={settings.use_se!r}: expected true or false")


def _as_settings(arch_settings: Any) -> ArchSettings:
  if arch_settings is None:
    return ArchSettings()
  if isinstance(arch_settings, ArchSettings):
    return arch_settings
  if isinstance(arch_settings, Mapping):
    unknown = sorted(set(arch_settings) - set(_FIELDS))
    if unknown:
      raise FlagError(f"arch_settings: unknown field(s) {unknown}; expected some of "
                      f"{list(_FIELDS)}")
    return ArchSettings(**arch_settings)
  raise FlagError(f"arch_settings: expected an ArchSettings or a dict, got "
                  f"{type(arch_settings).__name__}")


def _config_settings(config: Mapping | None) -> ArchSettings:
  """The model settings a stage's config.json holds (image size of its synthetic data)."""
  if not config:
    return ArchSettings()
  model = config.get("model") if isinstance(config.get("model"), Mapping) else {}
  data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
  image_size = data.get("image_size")
  synthetic = data.get("synthetic")
  if image_size is None and data.get("source") == SYNTHETIC and isinstance(synthetic, Mapping):
    image_size = synthetic.get("image_size")
  return ArchSettings(arch=model.get("name"), width=model.get("width"),
                      embedding_size=model.get("embedding_size"), use_se=model.get("use_se"),
                      image_size=image_size)


def _resolve(layers: Sequence[tuple[str, ArchSettings]]) -> tuple[ArchSettings, dict]:
  """First non-None value of every field over (origin, settings) layers, with its origin."""
  values, origins = {}, {}
  for field in _FIELDS:
    for origin, settings in layers:
      value = getattr(settings, field)
      if value is not None:
        values[field], origins[field] = value, origin
        break
  return ArchSettings(**values), origins


def _describe(settings: ArchSettings) -> str:
  return (f"{settings.arch} width={settings.width} embedding_size={settings.embedding_size} "
          f"use_se={settings.use_se} image_size={settings.image_size}")


def _module(settings: ArchSettings):
  from mstkd_jax import models  # pylint: disable=g-import-not-at-top
  return models.create(settings.arch, width=int(settings.width),
                       embedding_size=int(settings.embedding_size),
                       use_se=bool(settings.use_se))


def _template(module, image_size: int):
  """Shapes and dtypes of the module's variables, without computing them."""
  import jax  # pylint: disable=g-import-not-at-top
  example = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), example)


# --- Checkpoints -----------------------------------------------------------------------


def _load_model(checkpoint: str, explicit: ArchSettings) -> dict:
  """Builds the backbone and loads its variables; returns what the report records."""
  path = paths.local(checkpoint, "--checkpoint")
  if os.path.isdir(path):
    return _load_orbax(path, explicit)
  return _load_pytorch(path, explicit)


def _load_pytorch(path: str, explicit: ArchSettings) -> dict:
  from mstkd_jax.interop import torch_checkpoint  # pylint: disable=g-import-not-at-top
  settings, origins = _resolve([("flag", explicit), ("default", DEFAULTS)])
  module = _module(settings)
  side = settings.image_size // 16
  try:
    variables = torch_checkpoint.load_iresnet(path, _template(module, settings.image_size),
                                              feature_hw=(side, side))
  except UserError as e:
    if "does not fit" not in str(e):
      raise
    raise UserError(f"{e}\n  this run built {_describe(settings)}; give the checkpoint's "
                    "--arch, --width, --embedding_size, --use_se and --image_size") from e
  return {"module": module, "variables": variables, "settings": settings,
          "origins": origins, "format": "pytorch", "path": path, "step": None,
          "config": None, "name": os.path.splitext(os.path.basename(path))[0]}


def _load_orbax(path: str, explicit: ArchSettings) -> dict:
  from mstkd_jax.interop import orbax_checkpoint  # pylint: disable=g-import-not-at-top
  variables, info = orbax_checkpoint.load_backbone_variables(path)
  shapes = orbax_checkpoint.describe_iresnet(variables)
  configured = _config_settings(info.config)
  config_file = os.path.join(info.workdir or "", "config.json")
  _check_settings(configured, f"{config_file}: model setting ")
  inferred = ArchSettings(arch=shapes["name"], width=shapes["width"],
                          embedding_size=shapes["embedding_size"], use_se=shapes["use_se"],
                          image_size=shapes["image_size"])
  settings, origins = _resolve([("flag", explicit), ("config.json", configured),
                                ("checkpoint shapes", inferred), ("default", DEFAULTS)])
  module = _module(settings)
  from mstkd_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
  expected = checkpoints.flat_shapes(_template(module, settings.image_size))
  found = checkpoints.flat_shapes(variables)
  if expected != found:
    problems = checkpoints.shape_mismatches(expected, found)
    given = ", ".join(f"{k} from {v}" for k, v in origins.items() if v != "checkpoint shapes")
    looks = (f"{shapes['name'] or 'IResNet of depths ' + str(shapes['stage_depths'])} "
             f"width={shapes['width']} embedding_size={shapes['embedding_size']} "
             f"use_se={shapes['use_se']} image_size={shapes['image_size']}")
    raise UserError(
        f"{info.path}: the checkpoint does not fit the model {_describe(settings)} "
        f"({given}):\n  " + "\n  ".join(problems)
        + f"\n  the checkpoint looks like: {looks}; drop or fix the model flags")
  return {"module": module, "variables": variables, "settings": settings,
          "origins": origins, "format": "orbax", "path": info.path, "step": info.step,
          "config": info.config, "name": info.name}


# --- Data ------------------------------------------------------------------------------


def _bin_group(path: str) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  return stem[:-len("_test")] if stem.endswith("_test") and len(stem) > 5 else stem


def _synthetic_spec(scale: str | None, config: Mapping | None, label: str):
  from mstkd_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  data = (config or {}).get("data") if isinstance((config or {}).get("data"), Mapping) else {}
  if scale is None and data.get("source") == SYNTHETIC and isinstance(
      data.get("synthetic"), Mapping):
    settings = dict(data["synthetic"])
  else:
    try:
      from configs import common  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise FlagError(f"--data={label}: the synthetic presets live in configs/common.py of "
                      "the repository; run from the repository root") from e
    try:
      settings = common.synthetic_data(scale or "default").to_dict()
    except KeyError:
      raise FlagError(f"--data={label}: unknown synthetic scale {scale!r}; expected "
                      f"{SYNTHETIC} or {SYNTHETIC}:<scale> with a scale of "
                      "configs.common.synthetic_data, e.g. smoke or default") from None
  try:
    return synthetic.SyntheticSpec(**settings)
  except TypeError as e:
    raise UserError(f"--data={label}: the synthetic settings {settings} do not fit "
                    f"SyntheticSpec: {e}") from e


def _is_synthetic(text: str) -> bool:
  return text == SYNTHETIC or text.startswith(SYNTHETIC + ":")


def _precheck(entry: Any, index: int) -> None:
  """Refuses an entry of the wrong type or a path that does not exist (before any loading)."""
  if isinstance(entry, Mapping):
    if not entry:
      raise UserError(f"data_sources[{index}]: expected a dict of group -> VerificationSet, "
                      "got an empty dict")
    return
  if not isinstance(entry, (str, os.PathLike)):
    raise FlagError(f"data_sources[{index}]: expected a path, {SYNTHETIC}[:scale] or a dict "
                    f"of group -> VerificationSet, got {type(entry).__name__}")
  text = os.fspath(entry)
  if _is_synthetic(text):
    return
  path = paths.local(text, "--data")
  if not os.path.exists(path):
    raise UserError(f"--data={text}: {path} does not exist; expected a verification .bin "
                    f"file, an RFW folder, or {SYNTHETIC}[:scale]")


def _classify(entry: Any, index: int, config: Mapping | None) -> _Source:
  """What a data entry is and which groups it holds; checks paths, loads no images."""
  _precheck(entry, index)
  if isinstance(entry, Mapping):
    return _Source(label=f"data_sources[{index}]", kind="arrays",
                   groups=tuple(str(g) for g in entry), arrays=entry)
  text = os.fspath(entry)
  if _is_synthetic(text):
    scale = text.partition(":")[2] or None
    spec = _synthetic_spec(scale, config, text)
    return _Source(label=text, kind="synthetic", groups=tuple(spec.group_names), spec=spec)
  path = paths.local(text, "--data")
  if os.path.isdir(path):
    from mstkd_jax.data import rfw  # pylint: disable=g-import-not-at-top
    return _Source(label=text, kind="rfw", groups=tuple(rfw.RFWReader(path).groups),
                   path=path)
  return _Source(label=text, kind="bin", groups=(_bin_group(path),), path=path)


def _check_unique_groups(sources: Sequence[_Source]) -> None:
  seen: dict[str, str] = {}
  for source in sources:
    for group in source.groups:
      if group in seen:
        where = ("twice in " + source.label if seen[group] == source.label
                 else f"in both {seen[group]} and {source.label}")
        raise UserError(f"group {group!r} appears {where}; expected every group once "
                        "(rename a .bin file or drop one --data)")
      seen[group] = source.label


def _decode_unique(slots: Sequence[tuple[Any, str]], read) -> tuple[list, np.ndarray]:
  """Decodes each distinct image once: (images, image row of every pair slot).

  `slots` holds (key, source) per pair slot, slots with one key showing one image;
  `read(key)` returns the encoded bytes.
  """
  from mstkd_jax.data import image_tree  # pylint: disable=g-import-not-at-top
  rows: dict[Any, int] = {}
  images = []
  index = np.empty(len(slots), np.int64)
  for slot, (key, source) in enumerate(slots):
    if key not in rows:
      rows[key] = len(images)
      images.append(image_tree.decode_image(read(key), source))
    index[slot] = rows[key]
  return images, index


def _fit_images(images: Sequence[np.ndarray], size: int) -> tuple[np.ndarray, list]:
  """Stacks RGB images at size x size, resizing the others; returns (images, other sizes)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  other = sorted({tuple(img.shape[:2]) for img in images if img.shape[:2] != (size, size)})
  out = np.empty((len(images), size, size, 3), np.uint8)
  for i, img in enumerate(images):
    if img.shape[:2] != (size, size):
      img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    out[i] = img
  return out, [list(s) for s in other]


def _check_rgb(images: Any, where: str) -> np.ndarray:
  arr = np.asarray(images)
  if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
    raise UserError(f"{where}: images of shape {arr.shape} and dtype {arr.dtype} cannot be "
                    "fed to the model; expected uint8 RGB images [N, H, W, 3]")
  return arr


def _check_pairs(pairs: np.ndarray, issame: np.ndarray, count: int, where: str) -> None:
  if pairs.ndim != 2 or pairs.shape[1] != 2 or issame.shape != (pairs.shape[0],):
    raise UserError(f"{where}: pairs of shape {pairs.shape} and issame of shape "
                    f"{issame.shape}; expected [P, 2] and [P]")
  if pairs.size and (pairs.min() < 0 or pairs.max() >= count):
    raise UserError(f"{where}: pair indices must lie in [0, {count}), found "
                    f"{pairs.min()}..{pairs.max()}")
  if pairs.shape[0] < NUM_FOLDS:
    raise UserError(f"{where}: {pairs.shape[0]} pairs; the {NUM_FOLDS}-fold verification "
                    f"protocol needs at least {NUM_FOLDS}")


def _load_source(source: _Source, size: int, data_dir: str, warn) -> tuple[dict, list]:
  """{group: PairSet} of one source at the model's size, and the sizes that were resized."""
  groups: dict[str, tuple[list, np.ndarray, np.ndarray]] = {}
  if source.kind == "bin":
    from mstkd_jax.data import verification_bin  # pylint: disable=g-import-not-at-top
    encoded, issame = verification_bin.load_verification_bin(source.path)
    # Identical bytes are one image (a .bin stores an image again for every pair).
    slots = [(data, f"{source.path}#{k}") for k, data in enumerate(encoded)]
    images, index = _decode_unique(slots, lambda data: data)
    groups[source.groups[0]] = (images, index.reshape(-1, 2), np.asarray(issame, bool))
  elif source.kind == "rfw":
    from mstkd_jax.data import image_tree, rfw  # pylint: disable=g-import-not-at-top
    reader = rfw.RFWReader(source.path)
    for group in reader.groups:
      slots, same = [], []
      for p in reader.pairs(group):
        for name, number in ((p.name1, p.index1), (p.name2, p.index2)):
          path = reader.image_path(group, name, number)
          slots.append((path, path))
        same.append(p.same)
      images, index = _decode_unique(slots, image_tree.read_image_file)
      groups[group] = (images, index.reshape(-1, 2), np.asarray(same, bool))
  elif source.kind == "synthetic":
    from mstkd_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    faces = synthetic.load_or_generate(source.spec, data_dir)
    for group in source.groups:
      groups[group] = (list(faces.eval_images[group]), faces.eval_pairs[group],
                       faces.eval_issame[group])
  else:
    for group, vset in source.arrays.items():
      where = f"{source.label}[{group!r}]"
      try:
        images, pairs, same = vset.images, vset.pairs, vset.issame
      except AttributeError:
        raise UserError(f"{where}: expected a VerificationSet (images, pairs, issame), got "
                        f"{type(vset).__name__}") from None
      groups[str(group)] = (list(_check_rgb(images, where)), np.asarray(pairs),
                            np.asarray(same))
  out, resized = {}, []
  for group, (images, pairs, same) in groups.items():
    _check_pairs(np.asarray(pairs), np.asarray(same), len(images),
                 f"{source.label} group {group!r}")
    fitted, other = _fit_images(images, size)
    resized.extend(s for s in other if s not in resized)
    out[group] = PairSet(images=fitted, pairs=np.asarray(pairs, np.int64),
                         issame=np.asarray(same).astype(bool))
  if resized:
    shown = ", ".join(f"{h}x{w}" for h, w in resized[:4]) + (" ..." if len(resized) > 4 else "")
    warn(f"{source.label}: images of {shown} pixels, the model takes {size}x{size}; "
         f"resizing them with {RESAMPLING}")
  return out, resized


# --- Evaluation ------------------------------------------------------------------------


def _evaluate_groups(model: dict, pair_sets: Mapping[str, PairSet], parallel,
                     batch_size: int) -> dict:
  from mstkd_jax.evaluation import verification  # pylint: disable=g-import-not-at-top
  from mstkd_jax.stages import runtime  # pylint: disable=g-import-not-at-top
  results = {}
  for group, pair_set in pair_sets.items():
    emb, emb_flip = runtime.embed_images(model["variables"], model["module"], pair_set.images,
                                         parallel, batch_size)
    rows = pair_set.pairs.reshape(-1)
    try:
      results[group] = verification.evaluate_verification(emb[rows], emb_flip[rows],
                                                          pair_set.issame, num_folds=NUM_FOLDS)
    except UserError as e:
      raise UserError(f"group {group!r}: {e}") from e
  return results


def _write_report(report: dict, out_dir: str) -> dict:
  """Writes the report files into a hidden folder of out_dir, then moves them in."""
  from mstkd_jax.evaluation import report as report_lib  # pylint: disable=g-import-not-at-top
  try:
    staging = tempfile.mkdtemp(prefix=".report-", dir=out_dir)
  except OSError as e:
    raise UserError(f"--out={out_dir}: cannot write there ({e.strerror or e})") from e
  try:
    written = report_lib.write_report(report, staging)
    final = {}
    for label, path in written.items():
      final[label] = os.path.join(out_dir, os.path.basename(path))
      os.replace(path, final[label])
  except OSError as e:
    raise UserError(f"--out={out_dir}: cannot write the report ({e.strerror or e})") from e
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return final


def _warner(messages: list, verbose: bool):
  def warn(message: str) -> None:
    messages.append(message)
    if verbose:
      print(f"warning: {message}", file=sys.stderr, flush=True)
  return warn


def evaluate(checkpoint: Any, arch_settings: Any, data_sources: Sequence[Any], out_dir: Any,
             *, name: str | None = None, batch_size: int = 256, data_dir: Any = None,
             parallel=None, verbose: bool = True) -> dict:
  """Evaluates a checkpoint on verification sets per group; writes and returns the report.

  Args:
    checkpoint: an Orbax stage workdir (its model/, else the latest checkpoints/ step), a
      model/ or checkpoints/ folder, or a step folder; or a PyTorch IResNet state_dict
      file (.pth).
    arch_settings: an ArchSettings or a dict of its fields; None fields (or None) are
      taken from the workdir's config.json, the checkpoint's shapes, or DEFAULTS.
    data_sources: .bin paths, RFW folders, "synthetic" / "synthetic:<scale>", or dicts
      of group -> VerificationSet (uint8 RGB images, pairs, issame); at least one.
    out_dir: where report.json, roc.json, report.md and the PNGs go (created).
    name: the model's name in the report; default: the checkpoint file's stem, or the
      stage workdir's folder name.
    batch_size: images per embedding step (over all local devices).
    data_dir: synthetic data cache; default <out_dir>/data.
    parallel: a mstkd_jax.train.parallel.DataParallel; default pmap over every local device.
    verbose: print warnings (stderr) and the result table (stdout).

  Returns:
    The report of `report.build_report` for {name: {group: result}}, its "config" holding
    the checkpoint, model settings (and where each came from), data sources, warnings and
    the written files.

  Raises:
    FlagError: a setting is invalid (unknown arch, bad size, no data sources, ...).
    UserError: a checkpoint or data problem. Nothing is left in out_dir then.
  """
  from mstkd_jax.evaluation import report as report_lib  # pylint: disable=g-import-not-at-top
  explicit = _as_settings(arch_settings)
  _check_settings(explicit, "--", FlagError)
  batch_size = _check_positive(batch_size, "--batch_size")
  if isinstance(data_sources, (str, os.PathLike, Mapping)):
    data_sources = [data_sources]
  data_sources = list(data_sources or [])
  if not data_sources:
    raise FlagError("--data: no data sources; expected at least one --data=PATH (a .bin "
                    f"file or an RFW folder) or --data={SYNTHETIC}[:scale]")
  if out_dir is None or not os.fspath(out_dir):
    raise FlagError("--out: expected the folder to write the report into")
  if name is not None and not str(name).strip():
    raise FlagError("--name: expected a non-empty model name")
  out_dir = paths.local(out_dir, "--out")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FlagError(f"--out={out_dir}: is a file; expected a folder")
  if checkpoint is None or not os.fspath(checkpoint):
    raise FlagError("--checkpoint: expected an Orbax stage workdir, model/ or checkpoints/ "
                    "folder or step folder, or a PyTorch .pth file")
  checkpoint_path = paths.local(checkpoint, "--checkpoint")
  if not os.path.exists(checkpoint_path):
    raise UserError(f"--checkpoint={os.fspath(checkpoint)}: {checkpoint_path} does not exist; "
                    "expected a stage workdir, its model/ or checkpoints/ folder or a step "
                    "folder (Orbax), or a PyTorch .pth state_dict")
  for i, entry in enumerate(data_sources):
    _precheck(entry, i)
  data_dir = paths.local(data_dir, "--data_dir") if data_dir else (
      os.path.join(out_dir, "data"))

  # Whatever this call creates is removed again if it fails.
  created = [p for p in (out_dir, data_dir) if not os.path.exists(p)]
  messages: list[str] = []
  warn = _warner(messages, verbose)
  try:
    model = _load_model(checkpoint_path, explicit)
    sources = [_classify(entry, i, model["config"]) for i, entry in enumerate(data_sources)]
    _check_unique_groups(sources)
    size = int(model["settings"].image_size)
    pair_sets, data_records = {}, []
    for source in sources:
      loaded, resized = _load_source(source, size, data_dir, warn)
      pair_sets.update(loaded)
      data_records.append({
          "source": source.path or source.label,
          "format": source.kind, "groups": list(loaded),
          "pairs": {g: int(p.pairs.shape[0]) for g, p in loaded.items()},
          "images": {g: int(p.images.shape[0]) for g, p in loaded.items()},
          "resized_from": resized or None})
    if parallel is None:
      from mstkd_jax.train import parallel as parallel_lib  # pylint: disable=g-import-not-at-top
      parallel = parallel_lib.get("pmap", 0)
    results = _evaluate_groups(model, pair_sets, parallel, batch_size)
    model_name = str(name) if name is not None else model["name"]
    config = {
        "checkpoint": model["path"], "checkpoint_format": model["format"],
        "step": model["step"], "model": dataclasses.asdict(model["settings"]),
        "model_settings_from": model["origins"], "dtype": "float32",
        "data": data_records, "batch_size": batch_size, "num_folds": NUM_FOLDS,
        "normalization": NORMALIZATION, "resampling": RESAMPLING,
        "flip": "accuracy: raw embeddings of image and mirror summed, then L2-normalized "
                "(insightface); accuracy_noflip: the image alone",
        "warnings": messages,
    }
    report = report_lib.build_report({model_name: results}, config=config)
    try:
      os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
      raise UserError(f"--out={out_dir}: cannot create the folder ({e.strerror or e})") from e
    written = _write_report(report, out_dir)
  except BaseException:
    for path in reversed(created):
      shutil.rmtree(path, ignore_errors=True)
    raise
  report["config"]["files"] = written
  if verbose:
    print(report_lib.format_table(report))
    groups = report["models"][model_name]["groups"]
    print("No-flip accuracy (%): " + "  ".join(
        f"{g} {e['accuracy_noflip']:.2f}" for g, e in groups.items()))
    print(f"Report written to {out_dir} (report.json, report.md, roc.json, PNGs)", flush=True)
  return report


# --- Command line ----------------------------------------------------------------------

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Orbax stage workdir (its model/, else latest checkpoints/), a model/ "
    "or checkpoints/ folder or a step folder; or a PyTorch IResNet .pth state_dict.")
_DATA = flags.DEFINE_multi_string(
    "data", [], "Verification data, repeatable: an insightface .bin (group = file stem "
    "without _test), an RFW folder, or synthetic[:scale].")
_OUT = flags.DEFINE_string("out", None, "Folder for report.json, report.md, roc.json, PNGs.")
_ARCH = flags.DEFINE_string("arch", None, "IResNet name (default: from config.json or the "
                            f"checkpoint, else {DEFAULTS.arch}).")
_WIDTH = flags.DEFINE_integer("width", None, "Stem channels (default: from config.json or "
                              f"the checkpoint, else {DEFAULTS.width}).")
_EMBEDDING = flags.DEFINE_integer(
    "embedding_size", None, "Embedding size (default: from config.json or the checkpoint, "
    f"else {DEFAULTS.embedding_size}).")
_USE_SE = flags.DEFINE_boolean("use_se", None, "Squeeze-and-excitation blocks (default: from "
                               "config.json or the checkpoint, else false).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Model input side, a multiple of 16 "
                                   "(default: from config.json or the checkpoint, else "
                                   f"{DEFAULTS.image_size}).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per embedding step.")
_NAME = flags.DEFINE_string("name", None, "Model name in the report (default: checkpoint file "
                            "stem, or the stage workdir's folder name).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Synthetic data cache (default <out>/data).")


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; give every setting as a --flag",
          file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)
  settings = ArchSettings(arch=_ARCH.value, width=_WIDTH.value,
                          embedding_size=_EMBEDDING.value, use_se=_USE_SE.value,
                          image_size=_IMAGE_SIZE.value)
  try:
    evaluate(_CHECKPOINT.value, settings, _DATA.value, _OUT.value, name=_NAME.value,
             batch_size=_BATCH_SIZE.value, data_dir=_DATA_DIR.value)
  except FlagError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
  """absl's flag parsing, with flag mistakes reported as one line (exit code 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "out"])
  app.run(main, flags_parser=parse_flags)

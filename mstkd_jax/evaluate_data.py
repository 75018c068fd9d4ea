"""The --data entries of evaluate: what each one is (a .bin file, an RFW folder, the synthetic
set or a dict of arrays) and which groups it holds, checked before anything is loaded, then
their verification sets decoded at a model's input size with the data records of the report.
"""

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from mstkd_jax import paths
from mstkd_jax.data import pairs
from mstkd_jax.errors import UserError
from mstkd_jax.formats import faces
from mstkd_jax.interop.command_line import FlagError

SYNTHETIC = "synthetic"
# The folds of the insightface protocol; every group needs at least this many pairs.
NUM_FOLDS = 10


@dataclasses.dataclass
class Source:
  """A --data entry, classified before anything is loaded."""
  label: str            # how messages and the report name it
  kind: str             # a key of pairs.PLANNERS
  groups: tuple[str, ...]
  source: Any           # what the planner reads
  path: str | None = None


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


def precheck(entry: Any, index: int) -> None:
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


def classify(entry: Any, index: int, config: Mapping | None, data_dir: str) -> Source:
  """What a data entry (already prechecked) is and which groups it holds; loads no images."""
  if isinstance(entry, Mapping):
    label = f"data_sources[{index}]"
    kind, source, path = "arrays", pairs.ArraySource(entry, label), None
  elif _is_synthetic(os.fspath(entry)):
    label = os.fspath(entry)
    spec = _synthetic_spec(label.partition(":")[2] or None, config, label)
    kind, source, path = "synthetic", pairs.SyntheticSource(spec, data_dir), None
  else:
    label = os.fspath(entry)
    path = paths.local(label, "--data")
    kind, source = pairs.format_of(path), path
  return Source(label=label, kind=kind, groups=pairs.PLANNERS[kind].groups(source),
                 source=source, path=path)


def check_unique_groups(sources: Sequence[Source]) -> None:
  seen: dict[str, str] = {}
  for source in sources:
    for group in source.groups:
      if group in seen:
        where = ("twice in " + source.label if seen[group] == source.label
                 else f"in both {seen[group]} and {source.label}")
        raise UserError(f"group {group!r} appears {where}; expected every group once "
                        "(rename a .bin file or drop one --data)")
      seen[group] = source.label


def load_sources(sources: Sequence[Source], size: int, warn, note) -> tuple[dict, list]:
  """({group: VerificationSet} of every source at the model's size, the data records of
  the report's config)."""
  pair_sets, records = {}, []
  for source in sources:
    loaded, resized, alignment = _load_source(source, size, warn, note)
    pair_sets.update(loaded)
    records.append({
        "source": source.path or source.label,
        "format": source.kind, "groups": list(loaded),
        "pairs": {g: int(p.pairs.shape[0]) for g, p in loaded.items()},
        "images": {g: int(p.images.shape[0]) for g, p in loaded.items()},
        "alignment": alignment, "resized_from": resized or None})
  return pair_sets, records


def _load_source(source: Source, size: int, warn, note) -> tuple[dict, list, dict | str]:
  """{group: VerificationSet} of one source at the model's size, the sizes resized, and
  what was aligned ({group: counts and landmarks file}, or a sentence when nothing was)."""
  plans = pairs.PLANNERS[source.kind].plan(source.source)
  out, resized, alignment = {}, [], {}
  for plan in plans:
    pairs.check_pairs(plan.pairs, plan.issame, len(plan.images),
                      f"{source.label} group {plan.name!r}", min_pairs=NUM_FOLDS)
    decoded = pairs.decode(plan, size)
    resized.extend(s for s in decoded.resized if s not in resized)
    vset = decoded.vset
    out[plan.name] = pairs.VerificationSet(vset.images, np.asarray(vset.pairs, np.int64),
                                           vset.issame)
    if plan.landmarks is not None:
      alignment[plan.name] = {"landmarks": plan.landmarks_file, "aligned": decoded.aligned,
                              "taken_as_aligned": decoded.taken_as_aligned}
      note(f"{source.label} group {plan.name}: {decoded.aligned} images aligned to "
           f"{faces.ALIGNED_SIZE}x{faces.ALIGNED_SIZE} with their 5 landmarks "
           f"({plan.landmarks_file})" + (
               f", {decoded.taken_as_aligned} already {faces.ALIGNED_SIZE}x"
               f"{faces.ALIGNED_SIZE} taken as aligned" if decoded.taken_as_aligned else ""))
  unaligned = source.kind == "rfw" and not alignment
  if resized:
    shown = ", ".join(f"{h}x{w}" for h, w in resized[:4]) + (" ..." if len(resized) > 4 else "")
    warn(f"{source.label}: images of {shown} pixels, the model takes {size}x{size}; "
         f"resizing them with {faces.RESAMPLING}" + (
             "; they are taken as aligned faces (no txts/<group>/<group>_lmk.txt): RFW's "
             "loose crops need their landmarks file, unaligned they verify at chance"
             if unaligned else ""))
  if not alignment:
    alignment = ("none: the images are taken as aligned" + (
        " (no txts/<group>/<group>_lmk.txt)" if source.kind == "rfw" else ""))
  return out, resized, alignment

"""IJB-B / IJB-C 1:1 template verification (numpy + scikit-learn), and its report section.

The protocol of insightface recognition/_evaluation_/ijb/ijb_11.py (`image2template_feature`,
`verification`, the TPR@FPR table; arcface_torch's eval_ijbc.py is the same):

1. image feature = raw embedding of the aligned crop, plus the raw embedding of its
   horizontal mirror with flip (insightface's "F2": summed, not concatenated); not
   L2-normalized (insightface's use_norm_score=True); times the detector face score with
   detector-score weighting;
2. media feature = mean of the image features of one media (video or still) of a template;
3. template feature = sum of its media features, L2-normalized;
4. pair score = cosine (dot product) of the two template features;
5. ROC by sklearn.metrics.roc_curve (its defaults, drop_intermediate=True); TAR at each
   FAR of FAR_GRID = the TPR of the ROC point whose FPR is closest to it, the highest TPR
   among equally close points (insightface's table).

`evaluate_ijb` reports the four variants of insightface's tables: flip on/off x detector
score on/off; "flip+score" is insightface's default setting.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from mstkd_jax.errors import UserError

FAR_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# name -> (flip, detector score); the first is insightface's default and the main number.
VARIANTS = {"flip+score": (True, True), "flip": (True, False), "score": (False, True),
            "plain": (False, False)}
MAIN_VARIANT = "flip+score"
ROC_POINTS = 300      # ROC points kept for the report and the plot (log-spaced FPR)
PAIR_CHUNK = 4096     # template pairs scored at a time (fastest of 4k-64k here)


def far_key(far: float) -> str:
  """"1e-06" ... "0.1": the report's key of a FAR of FAR_GRID."""
  return f"{far:g}"


def image_features(embeddings: np.ndarray, flipped: np.ndarray | None,
                   detector_scores: np.ndarray | None) -> np.ndarray:
  """Step 1: float32 [N, D] image features.

  Args:
    embeddings: float32 [N, D] raw embeddings of the aligned crops.
    flipped: float32 [N, D] raw embeddings of their mirrors, or None (no flip).
    detector_scores: float [N] face scores to weight by, or None.
  """
  features = np.asarray(embeddings, np.float32)
  if flipped is not None:
    features = features + np.asarray(flipped, np.float32)
  if detector_scores is not None:
    features = features * np.asarray(detector_scores, np.float32)[:, None]
  return features


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Steps 2-3: (template ids int64 [T] sorted, L2-normalized features float32 [T, D]).

  Media means and template sums accumulate in float64 (insightface's template array is
  float64); a template whose sum is zero stays zero (sklearn.preprocessing.normalize).
  """
  templates = np.asarray(templates, np.int64)
  medias = np.asarray(medias, np.int64)
  order = np.lexsort((medias, templates))
  t, m = templates[order], medias[order]
  new_media = np.r_[True, (t[1:] != t[:-1]) | (m[1:] != m[:-1])]
  media_starts = np.flatnonzero(new_media)
  sums = np.add.reduceat(features[order], media_starts, axis=0, dtype=np.float64)
  counts = np.diff(np.r_[media_starts, len(order)])
  media_means = sums / counts[:, None]
  media_templates = t[media_starts]
  template_starts = np.flatnonzero(np.r_[True, media_templates[1:] != media_templates[:-1]])
  summed = np.add.reduceat(media_means, template_starts, axis=0)
  norms = np.sqrt(np.sum(summed * summed, axis=1, keepdims=True))
  normalized = np.divide(summed, norms, out=np.zeros_like(summed), where=norms > 0)
  return media_templates[template_starts], normalized.astype(np.float32)


def pair_scores(template_ids: np.ndarray, features: np.ndarray, pairs: np.ndarray,
                chunk: int = PAIR_CHUNK) -> np.ndarray:
  """Step 4: float32 [P] cosine of the two template features of each pair.

  Raises:
    UserError: a pair names a template not in `template_ids`.
  """
  rows = np.searchsorted(template_ids, pairs)
  rows = np.minimum(rows, len(template_ids) - 1)
  if not np.all(template_ids[rows] == pairs):
    raise UserError("template pairs: a pair names a template with no image")
  out = np.empty(len(pairs), np.float32)
  for start in range(0, len(pairs), chunk):
    block = rows[start:start + chunk]
    out[start:start + chunk] = np.einsum("ij,ij->i", features[block[:, 0]],
                                         features[block[:, 1]])
  return out


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray,
               grid: Sequence[float] = FAR_GRID) -> dict:
  """Step 5: {far_key: {"tar", "far" (attained), "threshold"}} (fractions).

  The ROC point with the FPR closest to each target, the highest TPR among ties
  (insightface ijb_11.py: `min(zip(abs(fpr - x), range))` over the flipped ROC).
  """
  out = {}
  for far in grid:
    distance = np.abs(fpr - far)
    index = int(np.flatnonzero(distance == distance.min())[-1])
    out[far_key(far)] = {"tar": float(tpr[index]), "far": float(fpr[index]),
                         "threshold": float(thresholds[index])}
  return out


def _roc_points(fpr: np.ndarray, tpr: np.ndarray, count: int = ROC_POINTS) -> dict:
  """About `count` ROC points at log-spaced FPRs (the highest TPR at or below each)."""
  positive = fpr[fpr > 0]
  lowest = float(positive.min()) if positive.size else 1.0
  grid = np.logspace(math.log10(lowest), 0.0, count)
  index = np.unique(np.r_[np.searchsorted(fpr, grid, side="right") - 1, len(fpr) - 1])
  index = index[index >= 0]
  return {"fpr": fpr[index].tolist(), "tpr": tpr[index].tolist()}


def verify(scores: np.ndarray, labels: np.ndarray, grid: Sequence[float] = FAR_GRID) -> dict:
  """ROC of pair scores: {"tar_at_far", "auc", "roc": {fpr, tpr} (~ROC_POINTS)}.

  Raises:
    UserError: labels of one class only.
  """
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  labels = np.asarray(labels)
  if labels.min() == labels.max():
    raise UserError("template pairs: every pair has one label; a ROC needs genuine and "
                    "impostor pairs")
  fpr, tpr, thresholds = metrics.roc_curve(labels, scores)
  return {"tar_at_far": tar_at_far(fpr, tpr, thresholds, grid),
          "auc": float(metrics.auc(fpr, tpr)), "roc": _roc_points(fpr, tpr)}


def evaluate_ijb(embeddings: np.ndarray, flipped: np.ndarray, detector_scores: np.ndarray,
                 templates: np.ndarray, medias: np.ndarray, pairs: np.ndarray,
                 labels: np.ndarray, variants: Mapping[str, tuple] | None = None) -> dict:
  """The whole protocol for each variant.

  Args:
    embeddings, flipped: float32 [N, D] raw embeddings of the aligned images and mirrors.
    detector_scores: float [N] detector face scores.
    templates, medias: int [N] template and media id of each image.
    pairs: int [P, 2] template ids; labels: [P] 1 same subject, 0 not.
    variants: name -> (flip, detector score); default VARIANTS.

  Returns:
    {variant: verify(...)} plus, where features are not finite (a diverged model),
    {variant: {"error": message}} for that variant instead.
  """
  out = {}
  for name, (flip, weighted) in (variants or VARIANTS).items():
    features = image_features(embeddings, flipped if flip else None,
                              detector_scores if weighted else None)
    ids, feats = template_features(features, templates, medias)
    if not np.all(np.isfinite(feats)):
      out[name] = {"error": "non-finite template features (NaN or Inf embeddings: a "
                            "diverged model); no ROC"}
      continue
    out[name] = verify(pair_scores(ids, feats, np.asarray(pairs, np.int64)), labels)
  return out


def embed_release(variables, module, release, image_size: int, parallel, batch_size: int,
                  warn=None, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Raw embeddings of every image of an IJB release and of its mirror, streamed.

  The loose crops are decoded and aligned a chunk at a time (formats.ijb.aligned_chunks),
  resized to the model's `image_size` when it is not 112 (one warning), and embedded on
  every device (evaluation.embedding.embed_stream, with a progress bar); only the embeddings
  are kept.

  Args:
    release: a formats.ijb.IJBRelease.
    warn: called with the resize warning.

  Returns:
    float32 [N, D] embeddings and float32 [N, D] embeddings of the mirrors, meta order.
  """
  from mstkd_jax.formats import faces, ijb as ijb_data  # pylint: disable=g-import-not-at-top
  from mstkd_jax.evaluation import embedding  # pylint: disable=g-import-not-at-top
  if image_size != ijb_data.ALIGNED_SIZE and warn is not None:
    warn(f"{release.name}: faces are aligned to {ijb_data.ALIGNED_SIZE}x"
         f"{ijb_data.ALIGNED_SIZE}, the model takes {image_size}x{image_size}; resizing "
         f"them with {faces.RESAMPLING}")
  count = len(release.images)
  chunks = ijb_data.aligned_chunks(release, image_size, chunk or ijb_data.CHUNK)
  embeddings = flipped = None
  row = 0
  for emb, emb_flip in embedding.embed_stream(variables, module, chunks, parallel, batch_size,
                                              total=count, desc=release.name):
    if embeddings is None:
      embeddings = np.empty((count, emb.shape[1]), np.float32)
      flipped = np.empty((count, emb.shape[1]), np.float32)
    embeddings[row:row + len(emb)] = emb
    flipped[row:row + len(emb)] = emb_flip
    row += len(emb)
  return embeddings, flipped


# --- Report ------------------------------------------------------------------------------


def report_section(results: Mapping[str, Mapping], summary: Mapping) -> dict:
  """The report's "ijb" entry.

  Args:
    results: model name -> `evaluate_ijb` result.
    summary: the release's counts (formats.ijb.IJBRelease.summary()).

  Returns:
    {"name", "data": summary, "far_grid", "main_variant", "variants": {name: {flip,
    detector_score}}, "models": {model: {variant: {"tar_at_far": {far_key: %}, "detail":
    {far_key: {tar %, far, threshold}}, "auc", "roc"}}}}; TARs in percent (4 decimals).
  """
  models = {}
  for model, variants in results.items():
    entry = {}
    for variant, res in variants.items():
      if "error" in res:
        entry[variant] = {"error": res["error"]}
        continue
      entry[variant] = {
          "tar_at_far": {k: round(100.0 * v["tar"], 4) for k, v in res["tar_at_far"].items()},
          "detail": {k: {"tar": round(100.0 * v["tar"], 4), "far": v["far"],
                         "threshold": v["threshold"]} for k, v in res["tar_at_far"].items()},
          "auc": res["auc"], "roc": res["roc"]}
    models[model] = entry
  return {"name": summary.get("name", "IJB"), "data": dict(summary),
          "far_grid": [far_key(f) for f in FAR_GRID], "main_variant": MAIN_VARIANT,
          "variants": {k: {"flip": f, "detector_score": s} for k, (f, s) in VARIANTS.items()},
          "models": models}


def table(section: Mapping) -> tuple[list[str], list[list[str]]]:
  """(header, rows): one row per model and variant, TAR (%) at each FAR, and AUC (%)."""
  header = ["Model", "Variant"] + list(section["far_grid"]) + ["AUC"]
  rows = []
  for model, variants in section["models"].items():
    for variant, entry in variants.items():
      if "error" in entry:
        rows.append([model, variant] + ["-"] * len(section["far_grid"]) + ["-"])
        continue
      rows.append([model, variant]
                  + [f"{entry['tar_at_far'][k]:.2f}" for k in section["far_grid"]]
                  + [f"{100.0 * entry['auc']:.2f}"])
  return header, rows


def markdown(section: Mapping, markdown_table) -> list[str]:
  """The report.md lines of the IJB section (`markdown_table(header, rows)` formats)."""
  data = section["data"]
  lines = ["", f"## {section['name']} 1:1 template verification: TAR (%) at FAR", "",
           f"{data['templates']} templates, {data['images']} images, {data['pairs']} "
           f"template pairs ({data['genuine']} genuine, {data['impostor']} impostor). "
           "insightface's protocol (ijb_11.py): image + mirror embeddings summed (flip), "
           "times the detector score (score), averaged per media, summed per template, "
           "L2-normalized; cosine scores; sklearn roc_curve; TAR of the ROC point whose FAR "
           f"is closest to each target. {section['main_variant']} is insightface's default."]
  if data.get("missing_images"):
    lines[-1] += (f" {data['missing_images']} listed images were missing and skipped, "
                  f"{data['dropped_pairs']} pairs dropped.")
  lines += ["", markdown_table(*table(section))]
  return lines


def plot_roc(section: Mapping) -> bytes:
  """PNG: the ROC of every model (main variant solid, no-flip dashed) on a log FAR axis,
  the FAR grid marked by vertical lines."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from mstkd_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(7, 5), dpi=100)
  ax = fig.add_subplot()
  models = list(section["models"])
  colours = plots.distinct_colours(len(models))
  for colour, model in zip(colours, models):
    for variant, style in ((section["main_variant"], "-"), ("score", "--")):
      entry = section["models"][model].get(variant)
      if not entry or "roc" not in entry:
        continue
      fpr, tpr = np.asarray(entry["roc"]["fpr"]), np.asarray(entry["roc"]["tpr"])
      keep = fpr > 0
      ax.plot(fpr[keep], tpr[keep], style, color=colour, lw=1.2,
              label=f"{model} ({variant}, AUC {100 * entry['auc']:.2f}%)")
  for far in FAR_GRID:
    ax.axvline(far, color="grey", lw=0.6, ls=":")
  return plots.roc_png(fig, ax, f"ROC on {section['name']} (1:1 template verification)",
                       FAR_GRID[0], rate_names=("False acceptance rate", "True acceptance rate"),
                       rate_ticks=list(FAR_GRID) + [1.0], grid="major", legend_size="small")


def warnings_of(section: Mapping) -> list[str]:
  """One line per model and variant that has no ROC."""
  return [f"{model}: {section['name']} {variant}: {entry['error']}"
          for model, variants in section["models"].items()
          for variant, entry in variants.items() if "error" in entry]


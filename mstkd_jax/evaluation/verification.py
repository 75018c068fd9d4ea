"""Face verification metrics under the insightface (LFW-style) protocol.

k-fold accuracy, ROC and TAR@FAR from pair embeddings; pure numpy, vectorized over thresholds.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mstkd_jax.errors import UserError

# insightface's grids: 400 thresholds for accuracy/ROC, 4,000 for the TAR@FAR search.
DEFAULT_THRESHOLDS = np.arange(0, 4, 0.01)
DEFAULT_FAR_THRESHOLDS = np.arange(0, 4, 0.001)
DEFAULT_THRESHOLDS.flags.writeable = False
DEFAULT_FAR_THRESHOLDS.flags.writeable = False


def far_key(rate: float) -> str:
  """Short dictionary key for a rate: 1e-3 -> "1e-3", 0.01 -> "1e-2", 0.05 -> "5e-2"."""
  mantissa, exponent = f"{float(rate):.6e}".split("e")
  mantissa = mantissa.rstrip("0").rstrip(".")
  return f"{mantissa}e{int(exponent)}"


def l2_normalize(x: Any, axis: int = -1) -> np.ndarray:
  """Divides by the L2 norm along `axis` (float64); an all-zero vector stays zero."""
  x = np.asarray(x, dtype=np.float64)
  norm = np.linalg.norm(x, axis=axis, keepdims=True)
  # Same as sklearn.preprocessing.normalize (used by insightface): no NaN for a zero vector.
  return x / np.where(norm == 0.0, 1.0, norm)


def fuse_flip(emb: Any, emb_flip: Any) -> np.ndarray:
  """Flip fusion: normalize(emb + emb_flip) of the RAW embeddings, as insightface does."""
  emb = np.asarray(emb, dtype=np.float64)
  emb_flip = np.asarray(emb_flip, dtype=np.float64)
  if emb.shape != emb_flip.shape:
    raise UserError(f"flip_embeddings: expected shape {emb.shape} (same as embeddings), "
                    f"got {emb_flip.shape}")
  return l2_normalize(emb + emb_flip)


def pair_distances(normalized: np.ndarray) -> np.ndarray:
  """Squared Euclidean distance of pair k = rows 2k and 2k+1 -> [P]."""
  diff = normalized[0::2] - normalized[1::2]
  return np.sum(diff * diff, axis=1)


def fold_bounds(num_items: int, num_folds: int) -> list[tuple[int, int]]:
  """Contiguous [start, stop) folds in order, as sklearn KFold(shuffle=False).

  The first num_items % num_folds folds hold one item more than the others.
  """
  sizes = np.full(num_folds, num_items // num_folds, dtype=np.int64)
  sizes[:num_items % num_folds] += 1
  stops = np.cumsum(sizes)
  return [(int(b - s), int(b)) for b, s in zip(stops, sizes)]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den, and 0 where den == 0 (insightface's rule for TPR/FPR of an empty class)."""
  num = np.asarray(num, dtype=np.float64)
  den = np.asarray(den, dtype=np.float64)
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _counts_below(distances: np.ndarray, issame: np.ndarray,
                  bounds: list[tuple[int, int]], thresholds: np.ndarray):
  """Per fold and threshold, how many genuine / impostor pairs are predicted "same".

  Returns (pos_below [k, T], neg_below [k, T], n_pos [k], n_neg [k]).
  """
  k, t = len(bounds), len(thresholds)
  pos_below = np.empty((k, t), dtype=np.int64)
  neg_below = np.empty((k, t), dtype=np.int64)
  n_pos = np.empty(k, dtype=np.int64)
  n_neg = np.empty(k, dtype=np.int64)
  for f, (lo, hi) in enumerate(bounds):
    d, s = distances[lo:hi], issame[lo:hi]
    pos, neg = np.sort(d[s]), np.sort(d[~s])
    # side="left" counts values strictly below each threshold: "same" iff distance < threshold.
    pos_below[f] = np.searchsorted(pos, thresholds, side="left")
    neg_below[f] = np.searchsorted(neg, thresholds, side="left")
    n_pos[f], n_neg[f] = pos.size, neg.size
  return pos_below, neg_below, n_pos, n_neg


def threshold_for_far(far_curve: np.ndarray, grid: np.ndarray, target: float) -> float:
  """Threshold reaching `target` FAR on a non-decreasing FAR-vs-threshold curve.

  Rule (that of insightface calculate_val, i.e. scipy interp1d(far, thresholds,
  kind="slinear") as scipy <= 1.8 evaluated it; newer scipy refuses the repeated FAR
  values, insightface issues #2152/#2290):
    * max(far_curve) < target: 0.0 (nothing is accepted).
    * otherwise j = the LAST grid index with far_curve[j] <= target; j the last
      index: grid[j]; else linear interpolation between (far_curve[j], grid[j]) and
      (far_curve[j + 1], grid[j + 1]), which gives grid[j] when far_curve[j] == target
      (the right end of that FAR plateau).
    * far_curve[0] > target (only possible with a grid not starting at 0): grid[0].
  """
  if far_curve.size == 0 or far_curve.max() < target:
    return 0.0
  j = int(np.searchsorted(far_curve, target, side="right")) - 1
  if j < 0:
    return float(grid[0])
  if j == far_curve.size - 1:
    return float(grid[j])
  x0, x1 = far_curve[j], far_curve[j + 1]
  return float(grid[j] + (target - x0) * (grid[j + 1] - grid[j]) / (x1 - x0))


def _check_far_targets(far_targets: Sequence[float]) -> tuple[float, ...]:
  targets = tuple(float(t) for t in far_targets)
  for t in targets:
    if not 0.0 < t <= 1.0:
      raise UserError(f"far_targets: expected rates in (0, 1], got {t}")
  return targets


def evaluate_distances(distances: Any, issame: Any, *, num_folds: int = 10,
                       thresholds: Any = None, far_targets: Sequence[float] = (1e-3, 1e-2),
                       far_thresholds: Any = None) -> dict:
  """k-fold verification metrics from pair distances (insightface calculate_roc/val).

  Accuracy: for each held-out fold, the threshold (from `thresholds`, default
  0.00..3.99 step 0.01) with the best accuracy on the other folds (first maximum)
  is applied to the held-out fold; mean and population std over folds.
  ROC: per-threshold TPR and FPR of each held-out fold, averaged over folds.
  TAR@FAR: on the training folds, FAR over `far_thresholds` (default step 0.001)
  gives a threshold by `threshold_for_far`; TAR and FAR are then measured on the
  held-out fold (0 when the fold has no genuine/impostor pair); the result holds
  mean TAR, population std of TAR and mean FAR over folds.

  Args:
    distances: [P] squared distances of normalized embeddings.
    issame: [P] bool, True for a genuine pair.
    num_folds: folds taken in order, no shuffle.
    thresholds: accuracy/ROC thresholds.
    far_targets: FARs for TAR@FAR; () skips it.
    far_thresholds: grid for the TAR@FAR threshold search.

  Returns:
    A dict of plain Python floats and lists: accuracy, accuracy_std,
    fold_accuracies, best_thresholds, roc {fpr, tpr, thresholds},
    tar_at_far {key: {tar, tar_std, far, fold_thresholds}}.
  """
  distances = np.asarray(distances, dtype=np.float64)
  issame = _as_issame(issame, "issame")
  if distances.ndim != 1 or distances.shape != issame.shape:
    raise UserError(f"distances: expected shape {issame.shape} (one per pair, like issame), "
                    f"got {distances.shape}")
  if not np.all(np.isfinite(distances)):
    raise UserError("distances: expected finite values, found NaN or inf")
  num_folds = _check_num_folds(num_folds, distances.size)
  thresholds = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds, np.float64)
  far_thresholds = (DEFAULT_FAR_THRESHOLDS if far_thresholds is None
                    else np.asarray(far_thresholds, np.float64))
  targets = _check_far_targets(far_targets)

  bounds = fold_bounds(distances.size, num_folds)
  fold_sizes = np.array([hi - lo for lo, hi in bounds], dtype=np.int64)
  rows = np.arange(num_folds)

  # Accuracy and ROC. Training-fold counts = all folds minus the held-out one.
  pos_below, neg_below, n_pos, n_neg = _counts_below(distances, issame, bounds, thresholds)
  train_pos_below = pos_below.sum(0)[None, :] - pos_below
  train_neg_below = neg_below.sum(0)[None, :] - neg_below
  train_neg = n_neg.sum() - n_neg
  # Correct = genuine accepted + impostors rejected; integer counts keep ties exact.
  train_correct = train_pos_below + (train_neg[:, None] - train_neg_below)
  best = np.argmax(train_correct, axis=1)  # first maximum, as np.argmax in insightface
  test_correct = pos_below[rows, best] + (n_neg - neg_below[rows, best])
  fold_acc = test_correct / fold_sizes
  tpr = _ratio(pos_below, n_pos[:, None]).mean(axis=0)
  fpr = _ratio(neg_below, n_neg[:, None]).mean(axis=0)

  result = {
      "accuracy": float(np.mean(fold_acc)),
      "accuracy_std": float(np.std(fold_acc)),
      "fold_accuracies": [float(a) for a in fold_acc],
      "best_thresholds": [float(thresholds[b]) for b in best],
      "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()},
      "tar_at_far": {},
  }
  if not targets:
    return result

  _, far_neg_below, _, _ = _counts_below(distances, issame, bounds, far_thresholds)
  far_train = _ratio(far_neg_below.sum(0)[None, :] - far_neg_below, train_neg[:, None])
  for target in targets:
    tars, fars, fold_thr = [], [], []
    for f, (lo, hi) in enumerate(bounds):
      thr = threshold_for_far(far_train[f], far_thresholds, target)
      accepted = distances[lo:hi] < thr
      same = issame[lo:hi]
      tars.append(float(_ratio(np.sum(accepted & same), n_pos[f])))
      fars.append(float(_ratio(np.sum(accepted & ~same), n_neg[f])))
      fold_thr.append(thr)
    result["tar_at_far"][far_key(target)] = {
        "tar": float(np.mean(tars)),
        "tar_std": float(np.std(tars)),
        "far": float(np.mean(fars)),
        "fold_thresholds": fold_thr,
    }
  return result


def _as_issame(issame: Any, name: str) -> np.ndarray:
  arr = np.asarray(issame)
  if arr.ndim != 1:
    raise UserError(f"{name}: expected a 1-D sequence of same/different labels, "
                    f"got shape {arr.shape}")
  if arr.dtype != np.bool_:
    if arr.size and not (np.issubdtype(arr.dtype, np.number) and np.all((arr == 0) | (arr == 1))):
      raise UserError(f"{name}: expected booleans (or 0/1), got dtype {arr.dtype}")
    arr = arr.astype(bool)
  return arr


def _check_num_folds(num_folds: Any, num_pairs: int) -> int:
  if (isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer))
      or num_folds < 2):
    raise UserError(f"num_folds: expected an integer >= 2, got {num_folds!r}")
  num_folds = int(num_folds)
  if num_pairs < num_folds:
    raise UserError(f"issame: {num_pairs} pairs are fewer than num_folds={num_folds}")
  return num_folds


def _check_embeddings(x: Any, name: str) -> np.ndarray:
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim != 2:
    raise UserError(f"{name}: expected a 2-D array [2 * num_pairs, dim], got shape {arr.shape}")
  if arr.shape[0] % 2:
    raise UserError(f"{name}: expected an even number of rows (pair k = rows 2k, 2k+1), "
                    f"got {arr.shape[0]}")
  if not np.all(np.isfinite(arr)):
    raise UserError(f"{name}: expected finite values, found NaN or inf")
  return arr


def evaluate_verification(embeddings: Any, flip_embeddings: Any, issame: Any, *,
                          num_folds: int = 10,
                          far_targets: Sequence[float] = (1e-3, 1e-2)) -> dict:
  """Full insightface verification of one pair set (e.g. one RFW group).

  Args:
    embeddings: [2P, D] raw model outputs; pair k is rows 2k and 2k+1 (.bin layout).
    flip_embeddings: [2P, D] raw outputs for the flipped images, or None.
    issame: [P] bool (or 0/1) labels.
    num_folds: folds in order, no shuffle.
    far_targets: FARs at which TAR is reported.

  Returns:
    Fractions in [0, 1], plain floats/lists: accuracy, accuracy_std (flip-fused,
    or plain without flips), accuracy_noflip, accuracy_noflip_std, fold_accuracies,
    best_thresholds, tar_at_far {"1e-3": {tar, tar_std, far, fold_thresholds}, ...},
    roc {fpr, tpr, thresholds}, num_pairs, num_folds, flip (bool); and as numpy
    arrays (not JSON) "distances" [P] and "issame" [P] of the fused (or plain)
    embeddings, for the cross-group fairness metrics. ROC and TAR@FAR use the
    fused embeddings.
  """
  emb = _check_embeddings(embeddings, "embeddings")
  labels = _as_issame(issame, "issame")
  num_pairs = emb.shape[0] // 2
  if labels.size != num_pairs:
    raise UserError(f"issame: expected {num_pairs} labels (embeddings has {emb.shape[0]} rows), "
                    f"got {labels.size}")
  _check_num_folds(num_folds, num_pairs)
  targets = _check_far_targets(far_targets)

  plain = pair_distances(l2_normalize(emb))
  if flip_embeddings is None:
    dist = plain
    main = evaluate_distances(dist, labels, num_folds=num_folds, far_targets=targets)
    noflip = main
  else:
    flip = _check_embeddings(flip_embeddings, "flip_embeddings")
    dist = pair_distances(fuse_flip(emb, flip))
    main = evaluate_distances(dist, labels, num_folds=num_folds, far_targets=targets)
    noflip = evaluate_distances(plain, labels, num_folds=num_folds, far_targets=())

  return {
      "accuracy": main["accuracy"],
      "accuracy_std": main["accuracy_std"],
      "accuracy_noflip": noflip["accuracy"],
      "accuracy_noflip_std": noflip["accuracy_std"],
      "fold_accuracies": main["fold_accuracies"],
      "best_thresholds": main["best_thresholds"],
      "tar_at_far": main["tar_at_far"],
      "roc": main["roc"],
      "num_pairs": int(num_pairs),
      "num_folds": int(num_folds),
      "flip": flip_embeddings is not None,
      "distances": dist,
      "issame": labels,
  }
